"""The batch-1 decode shapes of the online rotations on CUDA: hadamard_transform of one row (QuaRot R4 1 x 14336,
K = 28; R1 1 x 4096 and 1 x 8192; whole power-of-two rows 1024 .. 32768; the transform backend's 32-blocks of 4096
and 14336), fp32 and bf16, under each plan that applies: "cluster" (the default for power-of-two n-blocks from 4096
in calls of up to 8: one launch, a thread-block cluster per n-block), "split" (FASTROUND_FWHT_CLUSTER=0: two launches through a scratch) and
"one-kernel" (both off). Two figures per case: the GPU time of one call (a CUDA graph of --inner calls, replayed)
and the eager call's wall time (host dispatch and launch included, synchronised every --inner calls).

    python3 benchmarks/fwht_decode_cuda.py --json fwht-decode-h200.json
    python3 benchmarks/fwht_decode_cuda.py --rows 8   # the cluster and K = 1 split plans' largest call
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fastround import transform_ops as T

CASES = [("r4", 14336, 14336, 28), ("r1", 4096, 4096, 1), ("r1", 8192, 8192, 1), ("pow2", 1024, 1024, 1),
         ("pow2", 2048, 2048, 1), ("pow2", 16384, 16384, 1), ("pow2", 32768, 32768, 1), ("transform", 4096, 32, 1),
         ("transform", 14336, 32, 1)]


def has_cluster(block: int, k: int, blocks: int) -> bool:
    """Whether a call takes the cluster plan (fwht_cuda.cu's takes_cluster: a power of two from 4096 in at most 8
    n-blocks, its n/8 chunk within 48 KiB of fp32)."""
    return k == 1 and blocks <= 8 and block >= 4096 and block & (block - 1) == 0 and block // 8 * 4 <= 48 * 1024


def has_split(block: int, k: int, blocks: int) -> bool:
    """Whether a call takes a split plan with the cluster plan off (fwht_cuda.cu's takes_split: K > 1 with under 64
    tiles, len % 8 == 0, or a power-of-two block of at least 32768 in at most 8 n-blocks)."""
    if k > 1:
        bpt = max(1, 2048 // block)
        return (block // k) % 8 == 0 and (blocks + bpt - 1) // bpt < 64
    return block >= 32768 and blocks <= 8


PLANS = {"cluster": {}, "split": {"FASTROUND_FWHT_CLUSTER": "0"},
         "one-kernel": {"FASTROUND_FWHT_CLUSTER": "0", "FASTROUND_FWHT_SPLIT": "0"}}


def timings(x: torch.Tensor, n: int, hk: torch.Tensor | None, inner: int, repeat: int) -> tuple[float, float]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            T.hadamard_transform(x, n, hk)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            T.hadamard_transform(x, n, hk)
    gpu = eager = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        gpu = min(gpu, start.elapsed_time(end) * 1e-3 / inner)
        t0 = time.perf_counter()
        for _ in range(inner):
            T.hadamard_transform(x, n, hk)
        torch.cuda.synchronize()
        eager = min(eager, (time.perf_counter() - t0) / inner)
    return gpu, eager


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows", type=int, default=1, help="rows per call (the K = 1 split takes up to 8 n-blocks)")
    args = ap.parse_args()
    rows = []
    print("| case | width | block | K | dtype | plan | GPU us/call | eager us/call |")
    print("| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for name, width, block, k in CASES:
        hk = T.spinquant_matrix(k).cuda() if k > 1 else None
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(args.rows, width, device="cuda").to(dtype)
            blocks = args.rows * width // block
            for plan, env in PLANS.items():
                if (plan == "cluster" and not has_cluster(block, k, blocks)) or (
                        plan == "split" and not has_split(block, k, blocks)):
                    continue  # the plan does not apply: the next one would time the same kernels
                os.environ.update(env)
                try:
                    gpu, eager = timings(x, block, hk, args.inner, args.repeat)
                finally:
                    for key in env:
                        os.environ.pop(key, None)
                row = {"case": name, "rows": args.rows, "width": width, "block": block, "k": k,
                       "dtype": str(dtype)[6:], "plan": plan, "gpu_us": gpu * 1e6, "eager_us": eager * 1e6}
                rows.append(row)
                print(f"| {name} | {width} | {block} | {k} | {row['dtype']} | {plan} | {row['gpu_us']:.2f} | "
                      f"{row['eager_us']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
