"""Decode (M=1) GEMV of torch.ops.fastround.woq_linear in the checkpoint's GPTQ word order ("gptq") and the tiled
order QuantLinear runs on the CPU ("gptq_tiled"), against torch's int4 kernel (aten._weight_int4pack_mm_for_cpu),
W4 group 128, Llama-3-8B shapes, weights cycled through copies worth --cold_mb so each call streams from DRAM.

The methods' calls alternate, so a burst of load from other jobs on a shared machine hits all of them alike;
reports the minimum and the 25th percentile (one thread: process CPU time; more: wall clock) and the packed GB/s at
the 25th percentile (qweight + fp16 scales + qzeros bytes over that time).

  python3 benchmarks/woq_gemv_interleaved.py --threads 1,2 --json benchmarks/results/woq_gemv_interleaved-dev.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

SHAPES = {"qkvo": (4096, 4096), "gate_up": (4096, 14336), "down": (14336, 4096), "kv": (4096, 1024)}  # (in, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=str, default="1")
    ap.add_argument("--shapes", type=str, default=",".join(SHAPES))
    ap.add_argument("--cold_mb", type=float, default=256.0, help="working set per method (MB); above the LLC")
    ap.add_argument("--calls", type=int, default=40, help="calls per method (at least 3 passes over the copies)")
    ap.add_argument("--json", type=str, default="")
    args = ap.parse_args()

    import torch

    from fastround import infer_ops

    gs = 128
    gen = torch.Generator().manual_seed(0)
    int4_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    int4_pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    results: list[dict[str, Any]] = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        packed = k * n // 2 + (k // gs) * n * 2 + (k // gs) * n // 2
        copies = int(args.cold_mb * 2**20 // packed) + 1
        qw = [torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen) for _ in range(copies)]
        qt = [infer_ops.woq_tile_qweight(q) for q in qw]
        qz = [torch.full((k // gs, n // 8), 0x77777777, dtype=torch.int32) for _ in range(copies)]
        sc = [(torch.rand(k // gs, n, generator=gen) * 0.01 + 0.001).to(torch.float16) for _ in range(copies)]
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        methods: dict[str, Callable[[int], Any]] = {
            "gptq": lambda i: infer_ops.woq_linear(x, qw[i], qz[i], sc[i], None, 4, gs, "gptq"),
            "gptq_tiled": lambda i: infer_ops.woq_linear(x, qt[i], qz[i], sc[i], None, 4, gs, "gptq_tiled"),
        }
        if int4_mm is not None and int4_pack is not None:
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
            sz = torch.stack([torch.rand(k // gs, n) * 0.01 + 0.001, torch.zeros(k // gs, n)], -1).to(torch.bfloat16)
            t4 = [(int4_pack(codes, 1), sz.clone()) for _ in range(copies)]
            methods["torch_int4"] = lambda i: int4_mm(x, t4[i][0], gs, t4[i][1])
        for nt in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(nt)
            clock = time.process_time if nt == 1 else time.perf_counter
            samples: dict[str, list[float]] = {m: [] for m in methods}
            for call in range(max(args.calls, 3 * copies)):
                for method, fn in methods.items():
                    t = clock()
                    fn(call % copies)
                    samples[method].append(clock() - t)
            rec: dict[str, Any] = {"shape": name, "in": k, "out": n, "threads": nt,
                                   "clock": "cpu" if nt == 1 else "wall"}
            for method, s in samples.items():
                s.sort()
                rec[f"{method}_min_ms"] = s[0] * 1e3
                rec[f"{method}_p25_ms"] = s[len(s) // 4] * 1e3
                rec[f"{method}_p25_gbps"] = packed / s[len(s) // 4] / 1e9
            if "torch_int4" in methods:
                rec["tiled_vs_torch_int4_p25"] = rec["torch_int4_p25_ms"] / rec["gptq_tiled_p25_ms"]
            results.append(rec)
            fields = (f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}" for key, val in rec.items())
            print(" ".join(fields), flush=True)
    if args.json:
        write_json(args.json, {"benchmark": "woq_gemv_interleaved", "machine": machine(), "torch": torch.__version__,
                               "cold_mb": args.cold_mb, "results": results})


if __name__ == "__main__":
    main()
