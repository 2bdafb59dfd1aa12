"""Where SignRound's time goes: torch.profiler over fastround's tuning of one block (real layer shapes, random
weights), printing the top operators by device time and by host time, and the iteration rate.

    python3 benchmarks/profile_tune.py --device cuda:0 --iters 30 [--shape llama3-8b]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import add_checkpoint_args, build_checkpoint
from regular_flow import write_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap, "--shape", layers=1, shard_gb=5.0)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--work", default=None)
    ap.add_argument("--compile", action="store_true", help="enable_torch_compile=True")
    ap.add_argument("--memory", action="store_true", help="GPU memory per block: caches at entry, peak while tuning")
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastround import AutoRound

    work = Path(args.work or tempfile.mkdtemp(prefix="fr-prof-"))
    src = build_checkpoint(work, args.shape, args.layers, args.vocab, args.shard_gb)
    write_tokenizer(src)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(3, args.vocab, (1, args.seqlen), generator=gen) for _ in range(args.nsamples)]
    ar = AutoRound(str(src), scheme="W4A16", iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                   batch_size=args.batch_size, dataset=data, disable_model_free=True, device_map=args.device,
                   enable_torch_compile=args.compile)
    if args.memory:
        _probe_memory(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    t0 = time.perf_counter()
    if args.memory:  # the probe alone: the profiler's own allocations would blur it
        ar.quantize()
        print(f"quantize() {time.perf_counter() - t0:.2f} s")
        return 0
    with profile(activities=acts) as prof:
        ar.quantize()
    wall = time.perf_counter() - t0
    print(f"quantize() {wall:.2f} s for {args.layers} block(s) x {args.iters} iterations")
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


def _probe_memory(device: str) -> None:
    """Prints, per tuned block, what is allocated on entry (the cached samples, targets, weights), the bytes of the
    cached sample lists, and the peak while tuning: the difference is the tuning step's working set."""
    import torch

    from fastround import signround

    def nbytes(ts: list[torch.Tensor]) -> int:
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if t.is_cuda}
        return sum(seen.values())

    orig = signround.tune_block

    def probed(comp, root, block, label, names, samples, train_in, targets, settings, dtype):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize(device)
        entry = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = orig(comp, root, block, label, names, samples, train_in, targets, settings, dtype)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        gb = 1e9
        print(f"{label}: entry {entry / gb:.2f} GB (hidden {nbytes(samples.hidden) / gb:.2f}, train_in "
              f"{nbytes(train_in) / gb:.2f}, targets {nbytes(targets) / gb:.2f}), peak {peak / gb:.2f} GB, "
              f"working set {(peak - entry) / gb:.2f} GB, after {torch.cuda.memory_allocated(device) / gb:.2f} GB",
              flush=True)
        return out

    signround.tune_block = probed


if __name__ == "__main__":
    sys.exit(main())
