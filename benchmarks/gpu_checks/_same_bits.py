"""Bit-for-bit comparison of a CPU op's result with the same op's result on CUDA, for the GPU checks."""

from __future__ import annotations

import torch

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_WORDS = {**INT_VIEW, torch.float64: torch.int64}  # assert_same_bits also compares fp64 results


def same_bits(cpu: torch.Tensor | None, dev: torch.Tensor | None, *, nan_payloads: bool = True) -> bool:
    """Bit equality of dtype, shape and values, signed zeros included (two Nones are equal). With nan_payloads
    False, NaNs must sit at the same places but their bits may differ: x86 makes 0/0 the negative quiet NaN, CUDA
    the canonical positive one."""
    if cpu is None or dev is None:
        return cpu is None and dev is None
    dev = dev.cpu()
    if cpu.dtype != dev.dtype or cpu.shape != dev.shape:
        return False
    if cpu.dtype not in INT_VIEW:
        return torch.equal(cpu, dev)
    if nan_payloads:
        return torch.equal(cpu.view(INT_VIEW[cpu.dtype]), dev.view(INT_VIEW[dev.dtype]))
    nan = torch.isnan(cpu)
    if not torch.equal(nan, torch.isnan(dev)):
        return False
    return torch.equal(cpu[~nan].view(INT_VIEW[cpu.dtype]), dev[~nan].view(INT_VIEW[dev.dtype]))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """same_bits(want, got, nan_payloads=False) as an assertion naming how many values differ and the first one."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.cpu().contiguous(), want.cpu().contiguous()  # want may be the CPU op's or a second CUDA result
    both_nan = g.isnan() & w.isnan()
    diff = ((g.view(_WORDS[g.dtype]) != w.view(_WORDS[w.dtype])) & ~both_nan).reshape(-1)
    if bool(diff.any()):
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{int(diff.sum())} of {diff.numel()} values differ; first at flat {i}: "
                             f"cuda {g.reshape(-1)[i].item()!r} cpu {w.reshape(-1)[i].item()!r}")
