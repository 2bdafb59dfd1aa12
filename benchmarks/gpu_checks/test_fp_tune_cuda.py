"""GPU checks of the CUDA MXFP / NVFP4_E5M3 / NVFP4 tuning kernels: torch.ops.fastround.fp_qdq / fp_qdq_codes / fp_qdq_backward on CUDA
tensors (python/src/bind_tune_cuda.cpp over cpp/fastround/tune/fp_qdq_cuda.cu) must equal the same ops on CPU
tensors (the C++ kernels tests/test_tune_fp_ops.py pins on upstream's quant_mx / nvfp4_v2) bit for bit: the qdq, exponents
or scales, codes and scale bytes, and the backward's V, range-factor and input gradients, with autograd through
tune_fp_ops.mx_qdq, for bf16 / fp16 / fp32 inputs, MXFP4, MXFP8, NVFP4_E5M3 and NVFP4 (under the data's global scale), with and
without V and factors.

They need a CUDA device and a fastround built against a CUDA torch, so they live outside tests/ (CI has no GPU).
Run them explicitly on the GPU host:
    bash benchmarks/gpu_build.sh          # builds fastround with CUDA into /tmp, then runs this folder
"""

from __future__ import annotations

import pytest
import torch
from _same_bits import same_bits
from fastround import tune_fp_ops

_ops = torch.ops.fastround


def _same(cpu: torch.Tensor | None, dev: torch.Tensor | None) -> bool:
    """NaNs at the same places, their payloads free (no consumer reads them: sign-SGD skips NaN gradients)."""
    return same_bits(cpu, dev, nan_payloads=False)


def _describe(cpu: torch.Tensor | None, dev: torch.Tensor | None) -> str:
    """Where two results differ, for the assertion message: count, first index, values, max |difference|."""
    if cpu is None or dev is None:
        return f"cpu {'None' if cpu is None else 'tensor'}, device {'None' if dev is None else 'tensor'}"
    dev = dev.cpu()
    a, b = cpu.double(), dev.double()
    diff = ~((a == b) | (torch.isnan(a) & torch.isnan(b)))
    if not diff.any():
        return "equal values, different bits (signed zero)"
    idx = diff.nonzero()[0].tolist()
    return (f"{int(diff.sum())} of {diff.numel()} differ; first {idx}: cpu {a[tuple(idx)].item()!r} device "
            f"{b[tuple(idx)].item()!r}; max |diff| {float((a - b)[diff].abs().nan_to_num(float('inf')).max())}")


KINDS = [(4, "mx_fp"), (8, "mx_fp"), (4, "nvfp4_v2"), (4, "nv_fp")]  # MXFP4, MXFP8, NVFP4_E5M3, NVFP4


def _gs(kind: str, x: torch.Tensor) -> float:
    """NVFP4's global scale of x (upstream's calculate_gparam); the other kinds take none."""
    return tune_fp_ops.nv_global_scale(x) if kind == "nv_fp" else 0.0


def _case(dtype: torch.dtype, bits: int, seed: int, rows: int = 96, cols: int = 320, group: int = 32):
    """x [rows, cols] with an all-zero group, tied maxima, tiny and huge values; v [rows*cols/g, g] in
    [-0.6, 0.6]; factors [rows, cols/g] in [0.4, 1], some 1 and one 0; a gradient like x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * (0.05 if bits == 4 else 3.0)
    x[0, :32] = 0
    x[1, :32] = torch.where(torch.arange(32) % 3 == 0, -0.25, 0.25)
    x[2] *= 1e-20
    x[3, 7] = 1e20 if dtype != torch.float16 else 6e4
    x = x.to(dtype)
    v = (torch.rand(rows * cols // group, group, generator=g) - 0.5) * 1.2
    mx = 0.4 + 0.6 * torch.rand(rows, cols // group, generator=g)
    mx[::5] = 1.0
    mx[4, 2] = 0.0
    grad = torch.randn(rows, cols, generator=g).to(dtype)
    return x, v, mx, grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,kind", KINDS)
@pytest.mark.parametrize("with_v,with_factor", [(True, True), (False, False), (True, False)])
def test_cuda_equals_cpu(cuda, dtype, bits, kind, with_v, with_factor):
    x, v, mx, grad = _case(dtype, bits, seed=bits + 3 * with_v + 5 * with_factor, group=tune_fp_ops.GROUP[kind])
    v = v if with_v else None
    mx = mx if with_factor else None
    d = [None if t is None else t.to(cuda) for t in (x, v, mx, grad)]
    gs = _gs(kind, x)
    qdq, e = _ops.fp_qdq(x, v, mx, bits, kind, gs)
    d_qdq, d_e = _ops.fp_qdq(d[0], d[1], d[2], bits, kind, gs)
    assert _same(qdq, d_qdq) and _same(e, d_e), "forward"
    for a, b in zip(_ops.fp_qdq_codes(x, v, mx, bits, kind, gs), _ops.fp_qdq_codes(d[0], d[1], d[2], bits, kind, gs)):
        assert _same(a, b), "codes"
    cpu_grads = _ops.fp_qdq_backward(grad, x, v, mx, bits, v is not None, mx is not None, True, kind, gs)
    dev_grads = _ops.fp_qdq_backward(d[3], d[0], d[1], d[2], bits, v is not None, mx is not None, True, kind, gs)
    for name, a, b in zip(("grad_v", "grad_max", "grad_x"), cpu_grads, dev_grads):
        assert _same(a, b), f"{name}: {_describe(a, b)}"


@pytest.mark.parametrize("bits,kind", KINDS)
def test_cuda_autograd_equals_cpu(cuda, bits, kind):
    """Through tune_fp_ops.mx_qdq on a 3-D activation and a weight with V and factor."""
    x, v, mx, grad = _case(torch.bfloat16, bits, seed=11, group=tune_fp_ops.GROUP[kind])
    results = []
    for dev in (torch.device("cpu"), cuda):
        # Fresh leaves per device: requires_grad_() on the CPU tensors themselves would make the CUDA copies
        # non-leaf results of .to(), whose .grad stays None.
        xs = x.reshape(4, 24, -1).detach().clone().to(dev).requires_grad_()
        vs, ms = v.detach().clone().to(dev).requires_grad_(), mx.detach().clone().to(dev).requires_grad_()
        w = tune_fp_ops.mx_qdq(x.to(dev), vs, ms, bits, kind, _gs(kind, x))
        a = tune_fp_ops.mx_qdq(xs, None, None, bits, kind, _gs(kind, x) * 0.5)  # a static (calibrated) one
        ((w.float() * grad.to(dev).float()).sum() + (a.float() ** 2).sum()).backward()
        results.append((w, a, vs.grad, ms.grad, xs.grad))
    for name, c, g in zip(("w", "act", "grad_v", "grad_max", "grad_x"), *results):
        assert _same(c, g), f"{name}: {_describe(c, g)}"
