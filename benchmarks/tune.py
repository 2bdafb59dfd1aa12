"""SignRound tuning speed and memory: fastround vs upstream auto-round 0.16.1 (eager, and with torch.compile).

Builds a bf16 checkpoint with real layer shapes (Llama-3-8B by default, --layers blocks) and runs, each in a
fresh subprocess,

    AutoRound(path, scheme=S, iters=ITERS, nsamples=N, seqlen=L, batch_size=B, dataset=<N random token rows>,
              disable_model_free=True, device_map=DEV).quantize()

Measured per run: the time of each tuned block (from the first block's start to each block's end, hooked on the
block loop's progress), quantize() wall time, peak GPU memory (max_memory_allocated) and peak RSS. The per-block
figure is the median over the model's blocks. For the FLOP bound it reports 6 * params(block) * tokens * iters
(forward + backward of the block's matmuls, attention excluded; tokens = one batch) at --tflops.

    python3 benchmarks/tune.py --device cuda:0 --layers 2 --schemes W4A16,W2A16G64 --json tune-h200.json
    python3 benchmarks/tune.py --shape qwen3-30b-a3b --layers 1 --device cuda:0 --json tune-moe-h200.json
    python3 benchmarks/tune.py --shape tiny --layers 2 --device cpu --iters 20 --nsamples 16 --seqlen 256 \
        --tools fastround,upstream --json tune-dev.json       # the 2-core development machine

Prints a markdown table and writes JSON (--json; paths under $OUT written as "$OUT/...").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (add_checkpoint_args, block_params, build_checkpoint, machine, run_measured, write_json)
from regular_flow import write_tokenizer

MARKER = "TUNE_RESULT "
TOOLS = ("fastround", "upstream", "upstream-compile")  # also "fastround-compile"


def _emit(**values: Any) -> None:
    print(MARKER + json.dumps(values), flush=True)


def child(spec: dict[str, Any]) -> None:
    import torch

    device = spec["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    tool = spec["tool"]
    if tool.startswith("fastround"):
        import fastround as lib
        from fastround import AutoRound

        extra: dict[str, Any] = {"enable_torch_compile": tool == "fastround-compile"}
    else:
        import auto_round as lib
        from auto_round import AutoRound

        extra = {"enable_torch_compile": tool == "upstream-compile"}
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(3, spec["vocab"], (1, spec["seqlen"]), generator=gen) for _ in range(spec["nsamples"])]
    ends: list[float] = []
    # Both tools show a tqdm bar over blocks; its updates time each block without touching the algorithm.
    import tqdm.std

    orig_update = tqdm.std.tqdm.update

    def update(self: Any, n: float | None = 1) -> Any:
        desc = str(getattr(self, "desc", ""))
        if "block" in desc.lower() or "quantiz" in desc.lower() or "tuning" in desc.lower():
            if cuda:
                torch.cuda.synchronize(device)
            ends.append(time.perf_counter())
        return orig_update(self, n)

    tqdm.std.tqdm.update = update  # type: ignore[method-assign]
    t0 = time.perf_counter()
    ar = AutoRound(spec["model"], scheme=spec["scheme"], iters=spec["iters"], nsamples=spec["nsamples"],
                   seqlen=spec["seqlen"], batch_size=spec["batch_size"], dataset=data, disable_model_free=True,
                   device_map=device, **extra)
    t1 = time.perf_counter()
    ar.quantize()
    t2 = time.perf_counter()
    res: dict[str, Any] = {"version": lib.__version__, "torch": torch.__version__, "init_s": t1 - t0,
                           "quantize_s": t2 - t1, "block_ends": [e - t1 for e in ends]}
    if cuda:
        res.update(gpu_peak_alloc_gb=torch.cuda.max_memory_allocated(device) / 1e9,
                   gpu_name=torch.cuda.get_device_name(device))
    _emit(**res)


def per_block(ends: list[float], blocks: int) -> float | None:
    """Median gap between consecutive block ends (the first block's own time counts from its predecessor's end,
    which we do not have: use the gaps only when there are two or more blocks)."""
    ends = ends[-blocks:] if len(ends) >= blocks else ends
    if len(ends) >= 2:
        return statistics.median(b - a for a, b in zip(ends, ends[1:]))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_checkpoint_args(ap, "--shape", layers=2, shard_gb=5.0)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--schemes", default="W4A16")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--tflops", type=float, default=790.0, help="sustained bf16 TFLOP/s of the device (FLOP bound)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="fr-tune-"))
    src = build_checkpoint(work, args.shape, args.layers, args.vocab, args.shard_gb)
    write_tokenizer(src)  # upstream loads one; the calibration rows are token ids
    params = block_params(args.shape)
    tokens = min(args.batch_size, args.nsamples) * args.seqlen  # one iteration's batch
    flop_bound_s = 6 * params * tokens * args.iters / (args.tflops * 1e12)
    runs = []
    for scheme in args.schemes.split(","):
        for tool in args.tools.split(","):
            spec = {"tool": tool, "model": str(src), "scheme": scheme, "iters": args.iters, "nsamples": args.nsamples,
                    "seqlen": args.seqlen, "batch_size": args.batch_size, "device": args.device, "vocab": args.vocab}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
            m = run_measured(cmd, dict(os.environ), args.timeout, capture_stdout=True, cwd=work)
            got: dict[str, Any] = {}
            for line in m.stdout.splitlines():
                if line.startswith(MARKER):
                    got.update(json.loads(line[len(MARKER):]))
            block_s = per_block(got.get("block_ends", []), args.layers)
            if block_s is None and "quantize_s" in got:
                block_s = got["quantize_s"] / args.layers
            run = {"tool": tool, "scheme": scheme, "rc": m.returncode, "wall_s": m.seconds, "peak_rss_gb": m.peak_rss_gb,
                   "block_s": block_s, **{k: v for k, v in got.items() if k != "block_ends"},
                   "block_ends": got.get("block_ends"), "error": "" if m.returncode == 0 else m.stderr_tail}
            runs.append(run)
            print(f"{scheme} {tool}: rc {m.returncode} block {block_s} s quantize {got.get('quantize_s')} s "
                  f"gpu {got.get('gpu_peak_alloc_gb')} GB", flush=True)
    print()
    print(f"{args.shape}, {args.layers} blocks, {args.nsamples}x{args.seqlen} tokens, bs {args.batch_size}, "
          f"{args.iters} iters on {args.device}; FLOP bound per block {flop_bound_s:.2f} s at {args.tflops} TFLOP/s")
    print("| scheme | tool | s / block | vs upstream eager | x FLOP bound | peak GPU GB | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in runs:
        base = next((x["block_s"] for x in runs if x["scheme"] == r["scheme"] and x["tool"] == "upstream"), None)
        ratio = f"{r['block_s'] / base:.2f}" if base and r["block_s"] else "-"
        bound = f"{r['block_s'] / flop_bound_s:.2f}" if r["block_s"] else "-"
        gpu = f"{r['gpu_peak_alloc_gb']:.1f}" if r.get("gpu_peak_alloc_gb") is not None else "-"
        bs = f"{r['block_s']:.2f}" if r["block_s"] else "failed"
        print(f"| {r['scheme']} | {r['tool']} | {bs} | {ratio} | {bound} | {gpu} | {r['peak_rss_gb']:.1f} |")
    if args.json:
        write_json(args.json, {"machine": machine(), "shape": args.shape, "layers": args.layers,
                               "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                               "batch_size": args.batch_size, "device": args.device,
                               "flop_bound_s": flop_bound_s, "runs": runs, "time": time.strftime("%Y-%m-%d %H:%M")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
