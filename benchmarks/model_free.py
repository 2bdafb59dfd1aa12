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
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import (READ_SCRIPT, SHAPES, add_checkpoint_args, build_checkpoint, last_line, layer_tensors, machine,
                     run_measured, shard_files, warm_page_cache, write_json)

SCHEMES = {  # name -> (fastround CLI args, upstream CLI args, extra env)
    "W4A16": (["--scheme", "W4A16"], ["--scheme", "W4A16"], {}),
    "W2A16G64": (["--scheme", "W2A16G64"], ["--scheme", "W2A16G64"], {}),
    "W8A16-asym": (["--scheme", "W8A16", "--asym"], ["--scheme", "W8A16", "--asym"], {"AR_ALLOW_W8_ASYM": "1"}),
    "MXFP4": (["--scheme", "MXFP4"], ["--scheme", "MXFP4"], {}),
}

# ---- page cache ---------------------------------------------------------------------------------------------


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
    m = run_measured(cmd, env, timeout)
    shutil.rmtree(out, ignore_errors=True)
    note = "" if m.returncode == 0 else last_line(m.stderr_tail) or f"exit {m.returncode}"
    return Run(tool, scheme if tool != "read" else "-", cache, m.seconds, m.peak_rss_gb, src_gb, m.returncode == 0, note,
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
    add_checkpoint_args(ap, "--model", layers=2, shard_gb=1.0)
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
            write_json(args.json, {"machine": machine(), "isa": isa_used(), "kernels": res})
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
        write_json(args.json, {"machine": machine(), "isa": isa_used(), "argv": sys.argv[1:],
                               "runs": [asdict(r) for r in runs]})
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
