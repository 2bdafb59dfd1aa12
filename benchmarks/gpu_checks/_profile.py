"""Which CUDA kernels an op launched, for the GPU checks that assert a plan or a fusion actually ran."""

from __future__ import annotations

import torch


def kernels(fn) -> list[str]:
    """Names of the device kernels `fn` launches (after one warm-up call: plans and attributes are set up on the
    first)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
