"""Model-free speed and memory: fastround vs upstream auto-round vs the disk, on synthetic checkpoints.

Builds a checkpoint with real layer shapes (Llama-3-8B-like dense or Qwen3-30B-A3B-like MoE; --layers and
--vocab pick its size), then measures in one invocation, each run in a fresh subprocess:
  read      reading every shard to /dev/null (the read bound)
  fastround model-free through `python -m fastround`
  upstream  auto-round 0.16.1 model-free through its CLI, torch.compile off and on, at its default parallelism
  fastround-1t  fastround on one thread (--single_thread schemes): the per-core end-to-end rate
for each scheme, from a warm page cache and (where --cold) a cold one (posix_fadvise DONTNEED on the
sources, or drop_caches as root). Peak RSS is the largest sum over the run's process tree, sampled every 20 ms.

    python3 benchmarks/model_free.py --model llama3-8b --layers 4 --vocab 32000 --cold
    python3 benchmarks/model_free.py --kernels            # C++ micro-benchmark of each kernel, per ISA
    python3 benchmarks/model_free.py --isa scalar ...     # force fastround's instruction set (FASTROUND_ISA)
    python3 benchmarks/model_free.py --scaling 1,4,16     # fastround W4A16 over checkpoint sizes (GB)

Prints a markdown table and writes JSON (--json). Numbers are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

SCHEMES = {  # name -> (fastround CLI args, upstream CLI args, extra env)
    "W4A16": (["--scheme", "W4A16"], ["--scheme", "W4A16"], {}),
    "W2A16G64": (["--scheme", "W2A16G64"], ["--scheme", "W2A16G64"], {}),
    "W8A16-asym": (["--scheme", "W8A16", "--asym"], ["--scheme", "W8A16", "--asym"], {"AR_ALLOW_W8_ASYM": "1"}),
    "MXFP4": (["--scheme", "MXFP4"], ["--scheme", "MXFP4"], {}),
}

# (hidden, intermediate, heads, kv_heads, head_dim, experts, moe_intermediate, model_type)
SHAPES = {
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, experts=0, moe_inter=0,
                      model_type="llama", arch="LlamaForCausalLM", vocab=128256, layers=32),
    "qwen3-30b-a3b": dict(hidden=2048, inter=6144, heads=32, kv=4, head_dim=128, experts=128, moe_inter=768,
                          model_type="qwen3_moe", arch="Qwen3MoeForCausalLM", vocab=151936, layers=48),
}


# ---- synthetic checkpoints --------------------------------------------------------------------------------


def layer_tensors(s: dict, i: int) -> list[tuple[str, list[int]]]:
    h, p = s["hidden"], f"model.layers.{i}."
    q, kv = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    out = [
        (p + "input_layernorm.weight", [h]),
        (p + "post_attention_layernorm.weight", [h]),
        (p + "self_attn.q_proj.weight", [q, h]),
        (p + "self_attn.k_proj.weight", [kv, h]),
        (p + "self_attn.v_proj.weight", [kv, h]),
        (p + "self_attn.o_proj.weight", [h, q]),
    ]
    if s["experts"]:
        out += [(p + "self_attn.q_norm.weight", [s["head_dim"]]), (p + "self_attn.k_norm.weight", [s["head_dim"]])]
        out.append((p + "mlp.gate.weight", [s["experts"], h]))
        for e in range(s["experts"]):
            for proj, shape in (("gate_proj", [s["moe_inter"], h]), ("up_proj", [s["moe_inter"], h]),
                                ("down_proj", [h, s["moe_inter"]])):
                out.append((f"{p}mlp.experts.{e}.{proj}.weight", shape))
    else:
        i_ = s["inter"]
        out += [(p + "mlp.gate_proj.weight", [i_, h]), (p + "mlp.up_proj.weight", [i_, h]),
                (p + "mlp.down_proj.weight", [h, i_])]
    return out


def build_checkpoint(root: Path, model: str, layers: int, vocab: int, shard_gb: float) -> Path:
    """bf16 weights ~ N(0, 0.02), norms 1; shards cut at shard_gb like save_pretrained. Reused if present."""
    import torch
    from safetensors.torch import save_file

    s = dict(SHAPES[model], layers=layers, vocab=vocab)
    d = root / f"{model}-L{layers}-V{vocab}"
    if (d / "config.json").exists():
        return d
    tmp = d.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [("model.embed_tokens.weight", [vocab, s["hidden"]])]
    for i in range(layers):
        names += layer_tensors(s, i)
    names += [("model.norm.weight", [s["hidden"]]), ("lm_head.weight", [vocab, s["hidden"]])]
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    limit = int(shard_gb * 1e9)
    for name, shape in names:
        n = 2 * int(torch.Size(shape).numel())
        if size and size + n > limit:
            shards.append({})
            size = 0
        t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else (
            torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shards[-1][name] = t
        size += n
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        tensors.clear()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    cfg = {
        "architectures": [s["arch"]], "model_type": s["model_type"], "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_hidden_layers": layers, "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"], "head_dim": s["head_dim"], "vocab_size": vocab, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }
    if s["experts"]:
        cfg.update(num_experts=s["experts"], num_experts_per_tok=8, moe_intermediate_size=s["moe_inter"],
                   decoder_sparse_step=1, norm_topk_prob=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(d)
    return d


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def drop_page_cache(d: Path) -> None:
    """Evicts the sources from the page cache: drop_caches where permitted (root), else per-file DONTNEED."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    except OSError:
        pass
    for f in shard_files(d):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(d: Path) -> None:
    subprocess.run([sys.executable, "-c", READ_SCRIPT, *map(str, shard_files(d))], check=True)


def cache_is_cold(d: Path) -> bool:
    """True if the DONTNEED hint took effect: a re-read of one shard runs below page-cache speed."""
    f = shard_files(d)[0]
    t0 = time.perf_counter()
    with open(f, "rb") as fh:
        while fh.read(1 << 24):
            pass
    gbps = f.stat().st_size / (time.perf_counter() - t0) / 1e9
    drop_page_cache(d)
    return gbps < 3.0


# ---- measurement --------------------------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    scheme: str
    cache: str
    seconds: float
    peak_rss_gb: float
    source_gb: float
    ok: bool
    note: str = ""
    isa: str = ""  # fastround's kernel instruction set ("" for the other tools)
    gb_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.gb_per_s = self.source_gb / self.seconds if self.ok and self.seconds > 0 else 0.0


def run_measured(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS of the process tree in GB, return code, stderr tail)."""
    peak = [0]
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            peak[0] = max(peak[0], total)
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err = (err or "") + "\ntimeout"
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    return secs, peak[0] / 1e9, proc.returncode, (err or "")[-2000:]


READ_SCRIPT = """
import sys
buf = bytearray(1 << 24)
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
"""


def measure(tool: str, scheme: str, src: Path, work: Path, cache: str, threads: int | None, timeout: float,
            parallelism: int | None = None) -> Run:
    src_gb = sum(f.stat().st_size for f in shard_files(src)) / 1e9
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = work / f"out-{tool}-{scheme}-{cache}"
    shutil.rmtree(out, ignore_errors=True)
    if tool == "read":
        cmd = [sys.executable, "-c", READ_SCRIPT, *map(str, shard_files(src))]
    elif tool in ("fastround", "fastround-1t"):
        if tool == "fastround-1t":
            threads = 1
        cmd = [sys.executable, "-m", "fastround", str(src), "--model_free", *SCHEMES[scheme][0], "--output_dir",
               str(out), "--no_progress"]
        if threads:
            cmd += ["--threads", str(threads)]
        if parallelism:
            cmd += ["--shard_parallelism", str(parallelism)]
    else:
        compile_flag = "--enable_torch_compile" if tool == "upstream-compile" else "--disable_torch_compile"
        cmd = [sys.executable, "-m", "auto_round", str(src), "--model_free", *SCHEMES[scheme][1], "--output_dir",
               str(out), compile_flag]
        env.update(SCHEMES[scheme][2])
    if tool.startswith("fastround"):
        env.update(SCHEMES[scheme][2])
    if cache == "cold":
        drop_page_cache(src)
    secs, rss, rc, err = run_measured(cmd, env, timeout)
    shutil.rmtree(out, ignore_errors=True)
    note = "" if rc == 0 else err.strip().splitlines()[-1][:160] if err.strip() else f"exit {rc}"
    return Run(tool, scheme if tool != "read" else "-", cache, secs, rss, src_gb, rc == 0, note,
               isa_used() if tool.startswith("fastround") else "")


def table(runs: list[Run]) -> str:
    by = {(r.tool, r.scheme, r.cache): r for r in runs}
    lines = ["| scheme | tool | isa | cache | wall s | source GB/s | peak RSS GB | vs upstream (x faster) | vs read bound |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        up = by.get(("upstream", r.scheme, r.cache))
        rd = by.get(("read", "-", r.cache))
        vs_up = f"{up.seconds / r.seconds:.1f}" if up and up.ok and r.ok and r.tool != "read" else ""
        vs_rd = f"{r.seconds / rd.seconds:.2f}" if rd and rd.ok and r.ok else ""
        status = f"{r.seconds:.2f}" if r.ok else f"failed: {r.note}"
        lines.append(f"| {r.scheme} | {r.tool} | {r.isa} | {r.cache} | {status} | {r.gb_per_s:.3f} | {r.peak_rss_gb:.2f} | "
                     f"{vs_up} | {vs_rd} |")
    return "\n".join(lines)


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.platform()}"


def isa_used() -> str:
    """The instruction set fastround's kernels pick in a fresh process with this environment (FASTROUND_ISA)."""
    r = subprocess.run([sys.executable, "-c", "import fastround._C as C; print(C.isa())"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else f"error: {r.stderr.strip().splitlines()[-1:]}"


def kernel_bench(rows: int, cols: int) -> list[dict]:
    import fastround

    exe = Path(fastround.__file__).parent / "bin" / "fastround-bench-kernels"
    out = subprocess.run([str(exe), str(rows), str(cols)], capture_output=True, text=True, check=True).stdout
    res = [json.loads(l) for l in out.splitlines() if l.strip()]
    print("| kernel | path | isa | threads | GB/s of bf16 source |\n| --- | --- | --- | ---: | ---: |")
    for r in res:
        print(f"| {r['kernel']} | {r['path']} | {r['isa']} | {r['threads']} | {r['gb_per_s']:.3f} |")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the real models have 32 / 48)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary rows of embed_tokens and lm_head")
    ap.add_argument("--shard_gb", type=float, default=1.0)
    ap.add_argument("--schemes", default="W4A16,W2A16G64,W8A16-asym,MXFP4")
    ap.add_argument("--tools", default="read,fastround,upstream,upstream-compile")
    ap.add_argument("--cold", action="store_true", help="also measure from a cold page cache")
    ap.add_argument("--threads", type=int, default=None, help="fastround --threads (default: all cores)")
    ap.add_argument("--parallelism", type=int, default=None, help="fastround --shard_parallelism (default: auto)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastround-bench"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--single_thread", default="W4A16,MXFP4",
                    help="schemes also run as fastround --threads 1 (warm cache; '' for none)")
    ap.add_argument("--isa", choices=["scalar", "avx2", "avx512"], default=None,
                    help="fastround kernel instruction set (sets FASTROUND_ISA; default: the best this CPU has)")
    ap.add_argument("--kernels", action="store_true", help="run the C++ kernel micro-benchmark and exit")
    ap.add_argument("--kernel_shape", default="4096,4096")
    ap.add_argument("--scaling", default=None, help="comma-separated checkpoint sizes in GB for a fastround W4A16 run")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.isa:
        os.environ["FASTROUND_ISA"] = args.isa
    print(f"machine: {machine()}")
    print(f"fastround instruction set: {isa_used()}")
    if args.kernels:
        rows, cols = map(int, args.kernel_shape.split(","))
        res = kernel_bench(rows, cols)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "isa": isa_used(), "kernels": res}, indent=2))
        return 0
    runs: list[Run] = []
    caches = ["warm", "cold"] if args.cold else ["warm"]
    if args.scaling:
        s = SHAPES[args.model]
        per_layer = sum(2 * int(math.prod(sh)) for _, sh in layer_tensors(s, 0))
        for gb in [float(x) for x in args.scaling.split(",")]:
            layers = max(1, round((gb * 1e9 - 4 * args.vocab * s["hidden"]) / per_layer))
            src = build_checkpoint(work, args.model, layers, args.vocab, args.shard_gb)
            measure("fastround", "W4A16", src, work, "warm", args.threads, args.timeout, args.parallelism)  # warm up
            r = measure("fastround", "W4A16", src, work, "warm", args.threads, args.timeout, args.parallelism)
            r.note = f"{layers} layers"
            runs.append(r)
            print(f"{r.source_gb:.2f} GB ({layers} layers): {r.seconds:.2f} s, {r.gb_per_s:.3f} GB/s, "
                  f"peak RSS {r.peak_rss_gb:.2f} GB", flush=True)
    else:
        src = build_checkpoint(work, args.model, args.layers, args.vocab, args.shard_gb)
        print(f"checkpoint: {src} ({sum(f.stat().st_size for f in shard_files(src)) / 1e9:.2f} GB, "
              f"{len(shard_files(src))} shards)", flush=True)
        tools = args.tools.split(",")
        for cache in caches:
            if cache == "cold" and not cache_is_cold(src):
                print("cold cache: neither drop_caches nor posix_fadvise(DONTNEED) evicts pages here; skipping cold runs",
                      flush=True)
                continue
            if "read" in tools:
                runs.append(measure("read", "-", src, work, cache, None, args.timeout))
            for scheme in args.schemes.split(","):
                for tool in tools:
                    if tool == "read":
                        continue
                    if cache == "warm":
                        warm_page_cache(src)
                    r = measure(tool, scheme, src, work, cache, args.threads, args.timeout, args.parallelism)
                    runs.append(r)
                    print(f"{scheme} {tool} {cache}: {r.seconds:.2f} s, {r.gb_per_s:.3f} GB/s, "
                          f"{r.peak_rss_gb:.2f} GB RSS {'' if r.ok else r.note}", flush=True)
            singles = [x for x in args.single_thread.split(",") if x] if "fastround" in tools else []
            for scheme in singles if cache == "warm" else []:
                warm_page_cache(src)
                r = measure("fastround-1t", scheme, src, work, cache, 1, args.timeout, 1)
                runs.append(r)
                print(f"{scheme} fastround-1t {cache}: {r.seconds:.2f} s, {r.gb_per_s:.3f} GB/s on one thread "
                      f"({r.isa}) {'' if r.ok else r.note}", flush=True)
        print()
        print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "isa": isa_used(), "argv": sys.argv[1:],
                                               "runs": [asdict(r) for r in runs]}, indent=2))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
