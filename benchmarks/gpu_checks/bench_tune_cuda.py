"""Speed of the CUDA tuning kernels at Llama-3-8B layer shapes ([out, in] weights, bf16, group 128, fp16 scales):
the forward (int_qdq), the backward with factor gradients (int_qdq_backward) and one sign-SGD step over V and
the two factors, each timed with CUDA events (median of 20 runs after 3 warm-ups), with the bytes each moves at
the least and the resulting GB/s (the H200's copy bandwidth is about 4.3 TB/s counting reads and writes).

    python3 benchmarks/gpu_checks/bench_tune_cuda.py [--json PATH]

Needs a CUDA device and a fastround built with CUDA (benchmarks/gpu_build.sh runs it after the checks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from fastround import _torch, tune_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import cuda_median_ms  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # q/o, gate/up, down of Llama-3-8B


def bench_shape(rows: int, cols: int, gs: int = 128) -> list[dict[str, object]]:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(rows, cols, generator=g, device=dev) * 0.05).to(torch.bfloat16)  # [out, in]
    group, groups = tune_ops.group_layout(cols, gs)
    v = torch.rand(rows * groups, group, generator=g, device=dev) - 0.5  # [out*G, group]
    mn = torch.rand(rows, groups, generator=g, device=dev) * 0.5 + 0.5  # [out, G]
    mx = torch.rand(rows, groups, generator=g, device=dev) * 0.5 + 0.5
    grad = torch.randn(rows, cols, generator=g, device=dev).to(torch.bfloat16)
    wmin, wmax = tune_ops.group_extremes(w, gs)
    args = (4, gs, True, torch.float16, 1e-5)
    ops = torch.ops.fastround
    n = rows * cols
    gv, gmin, gmax = ops.int_qdq_backward(grad, w, v, mn, mx, wmin, wmax, *args, True)
    cases = {
        "forward": (lambda: ops.int_qdq(w, v, mn, mx, wmin, wmax, *args), n * (2 + 4 + 2)),
        "backward": (lambda: ops.int_qdq_backward(grad, w, v, mn, mx, wmin, wmax, *args, True), n * (2 + 2 + 4 + 4)),
        "sign_sgd": (lambda: tune_ops.sign_sgd_step_([v, mn, mx], [gv, gmin.view_as(mn), gmax.view_as(mx)], [],
                                                     1e-3), n * 12),
    }
    rows_out = []
    for name, (fn, nbytes) in cases.items():
        ms = cuda_median_ms(fn)
        rows_out.append({"op": name, "shape": [rows, cols], "ms": round(ms, 4), "gb_s": round(nbytes / ms / 1e6, 1)})
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    assert torch.cuda.is_available() and _torch.with_cuda(), "needs a CUDA device and a fastround built with CUDA"
    results = [r for rows, cols in SHAPES for r in bench_shape(rows, cols)]
    print(f"{'op':10} {'shape':>14} {'ms':>9} {'GB/s':>8}")
    for r in results:
        print(f"{r['op']:10} {tuple(r['shape'])!s:>14} {r['ms']:9.3f} {r['gb_s']:8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
