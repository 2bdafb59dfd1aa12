"""Full-dimension Hadamard transform speed: fastround's FWHT kernel (torch.ops.fastround.hadamard_transform) vs a
dense matmul by the same normalised matrix and vs upstream auto-round 0.16.1's torch butterfly (matmul_hadU of the
inplace backend, K from its safetensors library), on [rows, n] fp32 activations.

Sizes: hidden 4096 / 5120 / 8192 and intermediate 12288 / 14336 (n = K·2^m uses the file's K: 5120 -> 160,
12288 -> 192, 14336 -> 224), 2048 rows by default. Each measurement is the fastest of --repeat timed calls after one
warm-up; the dense matmul's matrix is built once outside the timing (torch.mm, MKL, the same thread count).
The kernel is checked against the dense product (max abs difference reported) before timing.

    python3 benchmarks/hadamard.py --threads 16 --json benchmarks/results/hadamard-h200-cpu.json
    python3 benchmarks/hadamard.py --threads 2 --rows 256 --sizes 4096,14336 --repeat 3     # 2-core dev machine
    python3 benchmarks/hadamard.py --device cuda --json $OUT/hadamard-h200-cuda.json         # GPU (also --dtype bfloat16)

--device cuda times the CUDA kernel, upstream's matmul_hadU and torch.mm (cuBLAS, TF32 off) on the GPU with CUDA
events: each measurement is the fastest of --repeat batches of --inner back-to-back calls, divided by --inner; the
kernel's result is also checked bit for bit against the CPU op.

A second table times the fused per-32 rotation + MXFP4 activation qdq (torch.ops.fastround.hadamard_mxfp4_act,
upstream's load-time fast path for rotated MXFP4 checkpoints) against the unfused composition (the FWHT op with
block 32, then the qdq as torch ops, transform_ops.mxfp4_act_qdq_torch) on the same [rows, n] activations; on CUDA
the fused result is also checked bit for bit against the CPU op. --no-mxfp4-act skips it.

    python3 benchmarks/hadamard.py --device cuda --dtype bfloat16 --json $OUT/hadamard-h200-cuda-bf16.json

Prints markdown tables and writes JSON (--json; paths under $OUT written as "$OUT/...").
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import machine, write_json


def timed(fn, repeat: int) -> float:
    """Fastest of `repeat` calls after one warm-up: on a shared machine the median mostly measures the neighbours."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timed_cuda(fn, repeat: int, inner: int) -> float:
    """Fastest of `repeat` batches of `inner` calls (CUDA events around each batch), per call, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3 / inner)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,5120,8192,12288,14336")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="activation dtype (cuda; the CPU run is fp32)")
    ap.add_argument("--inner", type=int, default=20, help="calls per timed batch (cuda)")
    ap.add_argument("--no-upstream", action="store_true", help="skip auto-round's torch routine")
    ap.add_argument("--no-mxfp4-act", action="store_true", help="skip the fused rotation + MXFP4 act qdq table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from fastround import _C
    from fastround import transform_ops as T

    _C.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        if not (torch.cuda.is_available() and T.has_cuda_kernel()):
            raise SystemExit("--device cuda needs a CUDA device and fastround's CUDA build")
        torch.backends.cuda.matmul.allow_tf32 = False  # the dense product in true fp32, as on the CPU
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    upstream = None
    if not args.no_upstream:
        try:
            from auto_round.algorithms.transforms.hadamard.inplace.hooks import matmul_hadU as upstream
        except ImportError:
            upstream = None

    def measure(fn):
        return timed_cuda(fn, args.repeat, args.inner) if cuda else timed(fn, args.repeat)

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        k = 1 if T.is_pow2(n) else T.file_divisor(n)
        hk = T.library_matrix(k) if k > 1 else None
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n)).to(dtype)
        dense = T.hadamard_transform(torch.eye(n), n, hk).T.contiguous()  # T [n, n]; out = x · T^T
        dense_t = dense.T.contiguous()
        want = T.hadamard_transform(x, n, hk)
        row = {"n": n, "k": k, "rows": args.rows, "device": args.device, "dtype": str(dtype).replace("torch.", "")}
        exact_t = dense_t.double()
        if cuda:
            x, dense_t, exact_t = x.cuda(), dense_t.to(dtype).cuda(), exact_t.cuda()
            hk = None if hk is None else hk.cuda()
            got = T.hadamard_transform(x, n, hk)
            row["bits_equal_cpu_op"] = bool(torch.equal(got.cpu().view(torch.int16 if x.element_size() == 2
                                                                           else torch.int32),
                                                        want.view(torch.int16 if x.element_size() == 2
                                                                  else torch.int32)))
        else:
            got = want
        err = (got.double() - x.double() @ exact_t).abs().max().item()  # fp64 on x's device
        t_fwht = measure(lambda: T.hadamard_transform(x, n, hk))
        t_dense = measure(lambda: torch.mm(x, dense_t))
        row.update(fwht_s=t_fwht, dense_matmul_s=t_dense, speedup_vs_dense=t_dense / t_fwht,
                   max_abs_err_vs_dense=err)
        if upstream is not None:
            t_up = measure(lambda: upstream(x))
            row.update(upstream_s=t_up, speedup_vs_upstream=t_up / t_fwht)
        if cuda:
            # Bytes moved at least once each way over the time: how close the kernel is to HBM bandwidth.
            row["fwht_gb_per_s"] = 2 * x.numel() * x.element_size() / t_fwht / 1e9
        rows.append(row)
        print(f"n={n}: fwht {t_fwht*1e3:.3f} ms, dense {t_dense*1e3:.3f} ms, "
              + (f"upstream {row['upstream_s']*1e3:.3f} ms" if upstream is not None else ""), flush=True)

    print(f"\n{args.device} {row['dtype']}\n")
    print("| n | K | rows | FWHT ms | dense matmul ms | x dense | upstream ms | x upstream |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        up = f"{r['upstream_s']*1e3:.3f} | {r['speedup_vs_upstream']:.1f}" if "upstream_s" in r else "- | -"
        print(f"| {r['n']} | {r['k']} | {r['rows']} | {r['fwht_s']*1e3:.3f} | {r['dense_matmul_s']*1e3:.3f} | "
              f"{r['speedup_vs_dense']:.1f} | {up} |")
    act_rows = [] if args.no_mxfp4_act else mxfp4_act_rows(args, dtype, measure)
    if args.json:
        write_json(args.json, {"machine": machine(), "threads": args.threads, "device": args.device,
                               "dtype": str(dtype).replace("torch.", ""), "repeat": args.repeat,
                               "inner": args.inner if cuda else 1, "results": rows,
                               "mxfp4_act_results": act_rows})


def mxfp4_act_rows(args, dtype: torch.dtype, measure) -> list[dict]:
    """Fused per-32 rotation + MXFP4 act qdq vs the FWHT op then the torch qdq, per size; the two must agree."""
    from fastround import transform_ops as T

    cuda = args.device == "cuda"
    view = torch.int16 if torch.empty((), dtype=dtype).element_size() == 2 else torch.int32
    c = torch.tensor(1 / 32 ** 0.5).to(dtype).float().item()  # the fused op's 1/sqrt(32), rounded to the dtype
    out = []
    for n in (int(s) for s in args.sizes.split(",")):
        if n % 32:
            continue
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n)).to(dtype)
        want = T.hadamard_mxfp4_act(x, 32)
        if cuda:
            x = x.cuda()

        def unfused(x=x):
            return T.mxfp4_act_qdq_torch(T.hadamard_transform(x.float(), 32, normalize=False) * c).to(dtype)

        got = T.hadamard_mxfp4_act(x, 32)
        row = {"n": n, "rows": args.rows, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
               "bits_equal_unfused": bool(torch.equal(got.view(view), unfused().view(view)))}
        if cuda:
            row["bits_equal_cpu_op"] = bool(torch.equal(got.cpu().view(view), want.view(view)))
        row["fused_s"] = measure(lambda: T.hadamard_mxfp4_act(x, 32))
        row["fwht_then_qdq_s"] = measure(unfused)
        row["speedup"] = row["fwht_then_qdq_s"] / row["fused_s"]
        if cuda:
            row["fused_gb_per_s"] = 2 * x.numel() * x.element_size() / row["fused_s"] / 1e9
        out.append(row)
    print(f"\nfused rotation + MXFP4 act qdq (block 32), {args.device} {str(dtype).replace('torch.', '')}\n")
    print("| n | rows | fused ms | FWHT then torch qdq ms | x | same bits |")
    print("|---|---|---|---|---|---|")
    for r in out:
        same = r["bits_equal_unfused"] and r.get("bits_equal_cpu_op", True)
        print(f"| {r['n']} | {r['rows']} | {r['fused_s']*1e3:.3f} | {r['fwht_then_qdq_s']*1e3:.3f} | "
              f"{r['speedup']:.1f} | {same} |")
    return out


if __name__ == "__main__":
    main()
