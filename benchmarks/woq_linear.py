"""torch.ops.fastround.woq_linear against the bf16 torch linear and torch's own int4 CPU kernel
(aten._weight_int4pack_mm_for_cpu, when this torch has it) on Llama-3-8B layer shapes, W4 group 128 (GPTQ words of
random codes: speed does not depend on the values). fastround_ms is the tiled word order QuantLinear runs on the CPU
("gptq_tiled", infer_ops.woq_tile_qweight); at M <= --plain_rows also fastround_plain_ms, the checkpoint's order.

Each method cycles through enough copies of its weight that the working set exceeds --cold_mb, so a call streams
its weight from memory as in a decode step over a whole model, not from cache. Also times both fastround paths
(GEMV / dequantize + matmul) at --sweep_rows to show where the adapter's switch (kWoqGemvMaxRows) belongs.

  python3 benchmarks/woq_linear.py --threads 16 --json benchmarks/results/woq_linear-<host>.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

SHAPES = {"qkvo": (4096, 4096), "gate_up": (4096, 14336), "down": (14336, 4096), "kv": (4096, 1024)}  # (in, out)


CLOCK = time.perf_counter


def timed(fn: Callable[[int], Any], copies: int, iters: int, min_seconds: float) -> float:
    """Median seconds of fn(i % copies) over at least `iters` calls and `min_seconds`, after a warm-up pass."""
    for i in range(copies):
        fn(i)
    samples: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(samples) < iters or time.perf_counter() - start < min_seconds:
        t = CLOCK()
        fn(i % copies)
        samples.append(CLOCK() - t)
        i += 1
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=str, default="", help="comma list of thread counts (default: all cores)")
    ap.add_argument("--shapes", type=str, default=",".join(SHAPES))
    ap.add_argument("--rows", type=str, default="1,512", help="comma list of M (tokens)")
    ap.add_argument("--sweep_rows", type=str, default="1,4,8,16,32",
                    help="M values at which both fastround paths are timed on the first shape ('' skips)")
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--plain_rows", type=int, default=1,
                    help="also time the checkpoint's (untiled) word order at M up to this (0: never)")
    ap.add_argument("--cold_mb", type=float, default=512.0, help="working set per method (MB)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--min_seconds", type=float, default=0.5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, for 1 thread on a shared machine (other loads do not count)")
    ap.add_argument("--json", type=str, default="")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch
    import torch.nn.functional as F

    from fastround import infer_ops

    threads = [int(t) for t in args.threads.split(",") if t] or [os.cpu_count() or 1]
    rows = [int(m) for m in args.rows.split(",") if m]
    gs = args.group_size
    int4_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    int4_pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []

    for shape_name in args.shapes.split(","):
        k, n = SHAPES[shape_name]
        packed_bytes = k * n // 2 + (k // gs) * n * 2 + (k // gs) * n // 2  # qweight + fp16 scales + qzeros
        bf16_bytes = k * n * 2
        qcopies = max(1, int(args.cold_mb * 2**20 // packed_bytes) + 1)
        bcopies = max(1, int(args.cold_mb * 2**20 // bf16_bytes) + 1)
        qw = [torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen) for _ in range(qcopies)]
        qt = [infer_ops.woq_tile_qweight(q) for q in qw]
        qz = [torch.full((k // gs, n // 8), 0x77777777, dtype=torch.int32) for _ in range(qcopies)]
        sc = [(torch.rand(k // gs, n, generator=gen) * 0.01 + 0.001).to(torch.float16) for _ in range(qcopies)]
        wb = [(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(bcopies)]
        t4 = []
        if int4_mm is not None and int4_pack is not None:
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
            sz = torch.stack([torch.rand(k // gs, n) * 0.01 + 0.001, torch.zeros(k // gs, n)], -1).to(torch.bfloat16)
            t4 = [(int4_pack(codes, 1), sz.clone()) for _ in range(qcopies)]  # the same bytes per copy as ours
        for nt in threads:
            torch.set_num_threads(nt)
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                rec: dict[str, Any] = {"shape": shape_name, "in": k, "out": n, "rows": m, "threads": nt}

                def ours(i: int) -> Any:
                    return infer_ops.woq_linear(x, qt[i], qz[i], sc[i], None, 4, gs, "gptq_tiled")

                def ours_plain(i: int) -> Any:
                    return infer_ops.woq_linear(x, qw[i], qz[i], sc[i], None, 4, gs, "gptq")

                rec["fastround_ms"] = timed(ours, qcopies, args.iters, args.min_seconds) * 1e3
                if m <= args.plain_rows:
                    rec["fastround_plain_ms"] = timed(ours_plain, qcopies, args.iters, args.min_seconds) * 1e3
                rec["bf16_ms"] = timed(lambda i: F.linear(x, wb[i]), bcopies, args.iters, args.min_seconds) * 1e3
                if t4:
                    rec["torch_int4_ms"] = timed(lambda i: int4_mm(x, t4[i][0], gs, t4[i][1]), qcopies, args.iters,
                                                 args.min_seconds) * 1e3
                    rec["vs_torch_int4"] = rec["torch_int4_ms"] / rec["fastround_ms"]
                rec["vs_bf16"] = rec["bf16_ms"] / rec["fastround_ms"]
                rec["fastround_packed_gbps"] = packed_bytes / rec["fastround_ms"] / 1e6
                rec["bf16_gbps"] = bf16_bytes / rec["bf16_ms"] / 1e6
                results.append(rec)
                print(" ".join(f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}"
                               for key, val in rec.items()), flush=True)
            if shape_name == args.shapes.split(",")[0] and args.sweep_rows:
                for m in (int(v) for v in args.sweep_rows.split(",")):
                    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                    entry: dict[str, Any] = {"shape": shape_name, "rows": m, "threads": nt}
                    for path, env in (("gemv", str(m)), ("dequant_matmul", "0")):
                        os.environ["FASTROUND_WOQ_GEMV_ROWS"] = env
                        entry[f"{path}_ms"] = timed(lambda i: infer_ops.woq_linear(x, qt[i], qz[i], sc[i], None, 4,
                                                                                    gs, "gptq_tiled"),
                                                    qcopies, args.iters, args.min_seconds) * 1e3
                    os.environ.pop("FASTROUND_WOQ_GEMV_ROWS")
                    sweep.append(entry)
                    print("sweep", entry, flush=True)

    payload = {"benchmark": "woq_linear", "machine": machine(), "torch": torch.__version__, "group_size": gs,
               "cold_mb": args.cold_mb, "clock": args.clock, "results": results, "path_sweep": sweep}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
