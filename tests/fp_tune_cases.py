"""What the MXFP / NVFP tuning op tests (test_tune_fp_ops.py, test_tune_nvfp4_ops.py) share: bit comparison and
the NVFP layer case (groups of 16)."""

from __future__ import annotations

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (signed zeros and NaN payloads included)."""
    view = _INT_VIEW[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def nan_bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaNs at the same places, every other value bit for bit (where autograd's 0 / 0 or -0 * inf gives NaN)."""
    return torch.equal(a.isnan(), b.isnan()) and bits_equal(a.nan_to_num(), b.nan_to_num())


def nv_case(dtype: torch.dtype, seed: int, rows: int = 24, cols: int = 160, tiny_group: bool = False):
    """w [rows, cols] with an all-zero group (scale 0), tied maxima and a lone outlier (NVFP4's global-scale max);
    tiny_group: a group whose E4M3 scale is subnormal or 0 under that global scale. v [rows*cols/16, 16] in
    [-0.6, 0.6]; factors [rows, cols/16] in [0.4, 1], some 1 and one 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05 * torch.exp(torch.randn(rows, 1, generator=g))
    w[0, :16] = 0
    w[1, :16] = torch.where(torch.arange(16) % 3 == 0, -0.25, 0.25)
    w[2, 20] = 3.0
    if tiny_group:
        w[4, 32:48] = 1e-6
    w = w.to(dtype)
    v = (torch.rand(rows * cols // 16, 16, generator=g) - 0.5) * 1.2
    mx = 0.4 + 0.6 * torch.rand(rows, cols // 16, generator=g)
    mx[::5] = 1.0
    mx[3, 1] = 0.0
    return w, v, mx
