"""Host time of the online rotations per decode step, on the CPU: a small W4 Llama (benchmarks/inference.py's
model at a chosen size, QuantLinear layers) runs 1-token forwards (the linears of a batch-1 decode step) plain, with
the rotations as forward pre-hooks (the path before they were fused) and fused into QuantLinear's op call
(quant_linear.attach_rotation, what a load does now). Blocks of forwards alternate between the three; each figure is
the fastest block in this process's CPU time (a shared machine's waits for a core are not counted), so run it with
one thread:

    OMP_NUM_THREADS=1 python3 benchmarks/hook_host_cost.py --hidden 1024 --intermediate 3584 --layers 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import inference as B


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=896, help="28 x 2^m gives QuaRot's K = 28 R4")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=40, help="forwards per timed block")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = B.build_bf16(args.layers, 1024, "cpu", args.hidden, args.intermediate, max(1, args.hidden // 64))
    model = B.quantize_random(model, 128, "cpu")
    ids = torch.randint(3, 1024, (1, 1))

    def block(n: int) -> float:
        t0 = time.process_time()
        for _ in range(n):
            model(ids, use_cache=False)
        return (time.process_time() - t0) / n

    res = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "kinds": {}}
    with torch.no_grad():
        for kind in ("transform", "quarot", "quarot_r1"):
            best = {"plain": float("inf"), "hooks": float("inf"), "fused": float("inf")}
            for rnd in range(args.rounds):
                for cfg in best:
                    handles = B.add_hooks(model, kind, cfg == "fused") if cfg != "plain" else []
                    if rnd == 0:
                        block(3)
                    best[cfg] = min(best[cfg], block(args.block))
                    B.remove_hooks(handles)
            handles = B.add_hooks(model, kind, True)
            count = len(handles)
            B.remove_hooks(handles)
            p = best["plain"]
            row = {"rotations": count, "plain_ms": p * 1e3, "hooks_ms": best["hooks"] * 1e3,
                   "fused_ms": best["fused"] * 1e3, "hooks_us_per_rotation": (best["hooks"] - p) / count * 1e6,
                   "fused_us_per_rotation": (best["fused"] - p) / count * 1e6}
            res["kinds"][kind] = row
            print(f"{kind} ({count} rotations): plain {row['plain_ms']:.3f} ms/step; pre-hooks {row['hooks_ms']:.3f} "
                  f"(+{row['hooks_us_per_rotation']:.1f} us/rotation, +{100 * (best['hooks'] / p - 1):.1f}%); fused "
                  f"{row['fused_ms']:.3f} (+{row['fused_us_per_rotation']:.1f} us/rotation, "
                  f"+{100 * (best['fused'] / p - 1):.1f}%)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
