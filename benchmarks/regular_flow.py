"""Regular-flow RTN speed and memory: fastround vs upstream auto-round 0.16.1 on a model loaded with transformers.

Builds a bf16 checkpoint with real layer shapes (Llama-3-8B by default; --layers and --vocab shrink it) plus a
tiny tokenizer, then for each device (cpu, and cuda:0 where present) and scheme runs, each in a fresh subprocess
from a warm page cache,

    AutoRound(path, scheme=S, iters=0, disable_opt_rtn=True, disable_model_free=True, device_map=DEV)
        .quantize_and_save(out, format="auto_round")

with `fastround.AutoRound` and with `auto_round.AutoRound` (enable_torch_compile=False). Measured: wall time of
the subprocess, its own split into imports, transformers' model-stack import (upstream imports it with itself,
fastround on its first load: imported apart for both so that "init" is each tool's own construction work),
construction and quantize+save, peak RSS of the process tree (sampled every 20 ms), peak GPU memory
(torch.cuda.max_memory_allocated in the child) and the RSS right after the imports (the runtime's share). For the memory target "RTN of a model loaded from disk holds at most the model plus about two
blocks in float" it reports the model's bf16 size, one decoder block's fp32 size and (peak RSS - model) in blocks,
also net of the runtime's share.

    python3 benchmarks/regular_flow.py --layers 8 --vocab 128256 --timeout 150 --budget 300 --json regular.json
    python3 benchmarks/regular_flow.py --shape tiny --layers 1 --vocab 1024 --only upstream   # seconds, 2 cores

Prints a markdown table and writes JSON (--json; paths under $OUT written as "$OUT/...").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (Measured, add_checkpoint_args, block_params, build_checkpoint, checkpoint_bytes, last_line,
                     machine, run_measured, warm_page_cache, write_json)

TOOLS = ("fastround", "upstream")
MARKER = "REGULAR_FLOW_RESULT "  # prefixes the child's JSON lines on stdout


# ---- the measured child -------------------------------------------------------------------------------------


def _emit(**values: Any) -> None:
    print(MARKER + json.dumps(values), flush=True)


def child(spec: dict[str, Any]) -> None:
    """One measured run (or, with spec["prime"], only the imports). Reports through _emit."""
    import psutil
    import torch
    import transformers

    if spec["tool"] == "fastround":
        import fastround as lib
        from fastround import AutoRound

        extra: dict[str, Any] = {}
    else:
        import auto_round as lib
        from auto_round import AutoRound

        extra = {"enable_torch_compile": False}
    if spec.get("prime"):
        # the first import of a --no-compile install writes .pyc files: paid here, outside the measured runs
        from transformers.models.llama import modeling_llama  # noqa: F401

        return
    device = spec["device"]
    cuda = device.startswith("cuda")
    if cuda:
        # the CUDA context counts as runtime, not as the tool's working memory
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    me = psutil.Process()
    import_s = time.time() - me.create_time()
    # transformers' model stack (modeling_utils, generation, the architecture's class): upstream imports it with
    # itself, fastround with its first model load. Imported here for both, apart, so that init_s is each tool's
    # own construction work and runtime_rss_gb holds the same modules for both.
    t_hf = time.perf_counter()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(spec["model"]))]
    _emit(runtime_rss_gb=me.memory_info().rss / 1e9, import_s=import_s, hf_import_s=time.perf_counter() - t_hf,
          version=lib.__version__, torch=torch.__version__, transformers=transformers.__version__,
          threads=torch.get_num_threads(), gpu=torch.cuda.get_device_name(device) if cuda else "")
    t0 = time.perf_counter()
    ar = AutoRound(spec["model"], scheme=spec["scheme"], iters=0, disable_opt_rtn=True, disable_model_free=True,
                   device_map=device, **extra)
    t1 = time.perf_counter()
    _emit(init_s=t1 - t0, compressor=f"{type(ar).__module__}.{type(ar).__name__}")
    ar.quantize_and_save(spec["output"], format="auto_round")
    t2 = time.perf_counter()
    # a CPU run that brings CUDA up anyway carries its context in peak RSS but not in runtime_rss_gb
    res: dict[str, Any] = {"quantize_s": t2 - t1, "cuda_initialized": torch.cuda.is_initialized()}
    if cuda:
        res.update(gpu_peak_alloc_gb=torch.cuda.max_memory_allocated(device) / 1e9,
                   gpu_peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 1e9)
    _emit(**res)


def run_child(spec: dict[str, Any], env: dict[str, str], cwd: Path,
              timeout: float) -> tuple[Measured, dict[str, Any]]:
    """(Measured, the merged JSON the child emitted)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    m = run_measured(cmd, env, timeout, capture_stdout=True, cwd=cwd)  # upstream leaves work folders in the cwd
    got: dict[str, Any] = {}
    for line in m.stdout.splitlines():
        if line.startswith(MARKER):
            got.update(json.loads(line[len(MARKER):]))
    return m, got


# ---- the parent ---------------------------------------------------------------------------------------------


def write_tokenizer(d: Path) -> None:
    """A word-level tokenizer of 64 tokens: the regular flow loads one, RTN never uses it."""
    if (d / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(61))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", model_max_length=2048)
    tok.save_pretrained(str(d))


def safetensors_names(d: Path) -> list[str]:
    """Tensor names of every safetensors file under d, from the headers alone."""
    names: list[str] = []
    for f in sorted(d.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names += [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
    return names


@dataclass
class Run:
    tool: str
    scheme: str
    device: str
    ok: bool
    note: str
    seconds: float  # the whole subprocess: imports, load, quantize, save
    peak_rss_gb: float
    model_gb: float  # the checkpoint's bf16 bytes
    block_fp32_gb: float  # one decoder block's parameters in float32
    runtime_rss_gb: float | None = None  # the child's RSS after its imports (torch, the tool, transformers'
    # model stack, a CUDA context)
    import_s: float | None = None  # process start to the tool imported (and CUDA up)
    hf_import_s: float | None = None  # then transformers' model stack (fastround would import it in init)
    init_s: float | None = None  # AutoRound(...) construction
    quantize_s: float | None = None  # quantize_and_save
    gpu_peak_alloc_gb: float | None = None
    gpu_peak_reserved_gb: float | None = None
    compressor: str = ""  # the class AutoRound returned: proves the regular flow ran, not model-free
    cuda_initialized: bool | None = None  # whether the child had a CUDA context when it finished
    qweights: int = 0  # packed weights in the output
    output_gb: float = 0.0
    versions: dict[str, Any] = field(default_factory=dict)  # the tool's, torch's, transformers', threads, GPU name
    rss_over_model_blocks: float | None = field(init=False)  # (peak RSS - model) / one fp32 block
    rss_over_model_blocks_net: float | None = field(init=False)  # the same less the runtime's share

    def __post_init__(self) -> None:
        extra = self.peak_rss_gb - self.model_gb
        measured = self.peak_rss_gb > 0  # not for a run --budget skipped
        self.rss_over_model_blocks = extra / self.block_fp32_gb if measured else None
        self.rss_over_model_blocks_net = (
            None if self.runtime_rss_gb is None else (extra - self.runtime_rss_gb) / self.block_fp32_gb)


def measure(tool: str, scheme: str, device: str, src: Path, work: Path, model_gb: float, block_gb: float,
            env: dict[str, str], timeout: float) -> Run:
    out = work / f"out-{tool}-{scheme}-{device.replace(':', '')}"
    shutil.rmtree(out, ignore_errors=True)
    warm_page_cache(src)
    spec = {"tool": tool, "scheme": scheme, "device": device, "model": str(src), "output": str(out)}
    m, got = run_child(spec, env, work, timeout)
    names = safetensors_names(out) if out.exists() else []
    out_gb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9 if out.exists() else 0.0
    shutil.rmtree(out, ignore_errors=True)
    ok = m.returncode == 0 and "quantize_s" in got
    note = "" if ok else last_line(m.stderr_tail) or f"exit {m.returncode}"
    fields_ = {k: got.get(k) for k in ("runtime_rss_gb", "import_s", "hf_import_s", "init_s", "quantize_s",
                                        "gpu_peak_alloc_gb", "gpu_peak_reserved_gb")}
    return Run(tool, scheme, device, ok, note, m.seconds, m.peak_rss_gb, model_gb, block_gb, **fields_,
               compressor=got.get("compressor", ""), cuda_initialized=got.get("cuda_initialized"),
               qweights=sum(n.endswith(".qweight") for n in names), output_gb=out_gb,
               versions={k: got[k] for k in ("version", "torch", "transformers", "threads", "gpu") if k in got})


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "" if v is None else format(v, fmt)


def table(runs: list[Run]) -> str:
    by = {(r.tool, r.scheme, r.device): r for r in runs}
    lines = ["| device | scheme | tool | wall s | import s | hf import s | init s | quantize+save s | peak RSS GB | "
             "(RSS-model)/block | net of runtime | GPU peak GB | qweights | vs upstream: wall | init+quantize |",
             "| --- | --- | --- |" + " ---: |" * 12]
    for r in runs:
        up = by.get(("upstream", r.scheme, r.device))
        vs = vs_work = ""
        if up and up.ok and r.ok and r.tool != "upstream":
            vs = f"{up.seconds / r.seconds:.1f}x"
            vs_work = f"{(up.init_s + up.quantize_s) / (r.init_s + r.quantize_s):.1f}x"
        wall = f"{r.seconds:.2f}" if r.ok else f"failed: {r.note}"
        lines.append(f"| {r.device} | {r.scheme} | {r.tool} | {wall} | {_f(r.import_s)} | {_f(r.hf_import_s)} | "
                     f"{_f(r.init_s)} | "
                     f"{_f(r.quantize_s)} | {r.peak_rss_gb:.2f} | {_f(r.rss_over_model_blocks)} | "
                     f"{_f(r.rss_over_model_blocks_net)} | {_f(r.gpu_peak_alloc_gb)} | {r.qweights} | {vs} | "
                     f"{vs_work} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap, "--shape", layers=4, shard_gb=5.0)  # 5 GB shards, as Llama-3-8B ships
    ap.add_argument("--schemes", default="W4A16")
    ap.add_argument("--only", choices=TOOLS, default=None, help="run one tool (default: both)")
    ap.add_argument("--devices", default="auto", help="comma-separated device_map values; auto: cpu and cuda:0 "
                                                     "where torch sees a GPU")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastround-bench-regular"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole invocation: a run gets at most what is left, later ones are skipped")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--no_prime", action="store_true", help="skip the unmeasured import of each tool that first "
                                                            "writes its .pyc files (smoke tests)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    tools = [args.only] if args.only else list(TOOLS)
    print(f"machine: {machine()}")
    deadline = time.perf_counter() + (args.budget if args.budget else float("inf"))
    if not args.no_prime:
        for tool in tools:
            m, _ = run_child({"tool": tool, "prime": True}, env, work, 600)
            if m.returncode:
                print(f"{tool} does not import: {last_line(m.stderr_tail)}", flush=True)
    if args.devices == "auto":
        import torch

        # the GPU first: its runs are the short ones, and --budget cuts from the end
        devices = ["cuda:0", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        devices = args.devices.split(",")

    t0 = time.perf_counter()
    src = build_checkpoint(work, args.shape, args.layers, args.vocab, args.shard_gb)
    write_tokenizer(src)
    model_gb = checkpoint_bytes(src) / 1e9
    block_gb = 4 * block_params(args.shape) / 1e9
    print(f"checkpoint: {src} ({time.perf_counter() - t0:.1f} s): model {model_gb:.3f} GB bf16, one block "
          f"{block_gb:.3f} GB fp32; target peak RSS <= model + ~2 blocks = {model_gb + 2 * block_gb:.2f} GB",
          flush=True)

    def save(runs: list[Run]) -> None:
        if args.json:
            write_json(args.json, {
                "machine": machine(), "argv": sys.argv[1:],
                "checkpoint": {"path": str(src), "shape": args.shape, "layers": args.layers, "vocab": args.vocab,
                               "model_gb": model_gb, "block_fp32_gb": block_gb},
                "runs": [asdict(r) for r in runs]})

    runs: list[Run] = []
    for device in devices:
        for scheme in args.schemes.split(","):
            for tool in tools:
                left = deadline - time.perf_counter()
                if left < 10:
                    r = Run(tool, scheme, device, False, "skipped: --budget spent", 0.0, 0.0, model_gb, block_gb)
                else:
                    r = measure(tool, scheme, device, src, work, model_gb, block_gb, env, min(args.timeout, left))
                runs.append(r)
                save(runs)  # a run cut short by the host's time limit still leaves the finished ones
                print(f"{device} {scheme} {tool}: {r.seconds:.2f} s, peak RSS {r.peak_rss_gb:.2f} GB "
                      f"(model + {_f(r.rss_over_model_blocks)} blocks), GPU {_f(r.gpu_peak_alloc_gb)} GB "
                      f"{'' if r.ok else r.note}", flush=True)
    print()
    print(table(runs))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
