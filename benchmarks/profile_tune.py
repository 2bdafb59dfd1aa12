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
                   batch_size=args.batch_size, dataset=data, disable_model_free=True, device_map=args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        ar.quantize()
    wall = time.perf_counter() - t0
    print(f"quantize() {wall:.2f} s for {args.layers} block(s) x {args.iters} iterations")
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
