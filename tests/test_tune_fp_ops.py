"""SignRound's MXFP tuning op (torch.ops.fastround.fp_qdq) against upstream 0.16.1's quant_mx.

The forward must equal quant_mx with the same V and max_scale bit for bit, for every input dtype and both element
formats; at V = 0 and factor 1 it is the RTN kernel's codes, scales and qdq. Its gradient must equal torch autograd
through quant_mx bit for bit: for V, for the range factor, and for the input (activations, whose gradient reaches
the layers before). The kernels' fast paths equal their scalar references (cpp/tests/test_fp_tune.cpp).
"""

from __future__ import annotations

import pytest
import torch

from cpp_runner import run_cpp_test
from fastround import ops, tune_fp_ops
from fp_tune_cases import bits_equal, nan_bits_equal, nv_case

from auto_round.data_type.mxfp import quant_mx  # noqa: E402


def _case(dtype: torch.dtype, bits: int, seed: int, rows: int = 24, cols: int = 192):
    g = torch.Generator().manual_seed(seed)
    scale = 0.05 if bits == 4 else 2.0
    w = (torch.randn(rows, cols, generator=g) * scale * torch.exp(torch.randn(rows, 1, generator=g)))
    w[0, :32] = 0  # an all-zero group
    w[1, :32] = torch.where(torch.arange(32) % 3 == 0, -0.25, 0.25)  # tied maxima
    w[2, 40] = 1e-3  # a lone outlier
    w = w.to(dtype)
    v = (torch.rand(rows * cols // 32, 32, generator=g) - 0.5) * 1.2
    mx = 0.4 + 0.6 * torch.rand(rows, cols // 32, generator=g)
    mx[::5] = 1.0
    mx[1, 0] = 0.0  # a factor at the clamp edge: the group's range is 0
    mx[0, 0] = 0.7  # (all-zero group, factor not 1)
    return w, v, mx


def _upstream(x, v, mx, bits):
    q, e, _ = quant_mx(x, bits=bits, group_size=32, v=v if v is not None else 0,
                       max_scale=mx.reshape(-1) if mx is not None else 1.0, data_type="mx_fp")
    return q, e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_forward_equals_upstream(dtype, bits):
    w, v, mx = _case(dtype, bits, seed=bits)
    for vv, ff in ((v, mx), (None, None), (v, None)):
        ours = tune_fp_ops.mx_qdq(w, vv, ff, bits)
        theirs, e = _upstream(w, vv, ff, bits)
        assert bits_equal(ours, theirs)
        qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w, vv, ff, bits)
        assert bits_equal(qdq, theirs)
        assert torch.equal(scales.to(torch.int32) - 127, e.reshape(scales.shape).to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_zero_offsets_are_rtn(dtype, bits):
    """V = 0, factor 1: the RTN kernel's codes and E8M0 scales (no exponent search), and its dequantized weight."""
    w, _, _ = _case(dtype, bits, seed=10 + bits)
    enc = f"mxfp{bits}"
    qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w, torch.zeros(w.numel() // 32, 32), None, bits)
    rtn = ops.encode_weight(w, enc, bits, 32, True, opt_rtn=False)
    assert torch.equal(codes, rtn.codes) and torch.equal(scales, rtn.scales)
    assert bits_equal(qdq, ops.dequantize_codes(rtn.codes, rtn.scales, None, enc, bits, 32, True, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_gradients_equal_torch_autograd(dtype, bits):
    w, v, mx = _case(dtype, bits, seed=20 + bits)
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = [v.clone().requires_grad_(), mx.clone().requires_grad_()]
    (tune_fp_ops.mx_qdq(w, ours[0], ours[1], bits).float() * gout.float()).sum().backward()
    ref = [v.clone().requires_grad_(), mx.reshape(-1).clone().requires_grad_()]
    q, _ = _upstream(w, ref[0], ref[1], bits)
    (q.float() * gout.float()).sum().backward()
    assert bits_equal(ours[0].grad, ref[0].grad)
    # The all-zero group's factor gradient is 0 / 0 in both (torch.where over log2).
    a, b = ours[1].grad.reshape(-1), ref[1].grad
    assert nan_bits_equal(a, b)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_gradient_equals_torch_autograd(bits):
    """Activations: no V, factor 1, and the gradient reaching x (through the group maximum too) in x's dtype."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 9, 128, generator=g) * 3).to(torch.bfloat16)
    x[0, 0, :32] = 0
    x[0, 1, :32] = torch.where(torch.arange(32) % 2 == 0, 1.5, -1.5).to(torch.bfloat16)  # tied maxima
    gout = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    ours_x = x.clone().requires_grad_()
    out = tune_fp_ops.mx_qdq(ours_x, None, None, bits)
    (out.float() * gout.float()).sum().backward()
    ref_x = x.clone().requires_grad_()
    q, _, _ = quant_mx(ref_x, bits=bits, group_size=32, v=0, max_scale=torch.tensor(1.0), data_type="mx_fp")
    assert bits_equal(out, q)
    (q.float() * gout.float()).sum().backward()
    a, b = ours_x.grad, ref_x.grad
    assert nan_bits_equal(a, b)


def test_opcheck_fake_and_autograd():
    w, v, mx = _case(torch.bfloat16, 4, seed=5, rows=8, cols=64)
    args = (w, v.requires_grad_(), mx.requires_grad_(), 4)
    torch.library.opcheck(torch.ops.fastround.fp_qdq.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    x = w.clone().requires_grad_()
    torch.library.opcheck(torch.ops.fastround.fp_qdq.default, (x, None, None, 8),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.fastround.fp_qdq_codes.default, (w, v.detach(), mx.detach(), 4),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_is_clear():
    w = torch.zeros(4, 48)
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        tune_fp_ops.mx_qdq(w, None, None, 4)
    with pytest.raises(ValueError, match="bits"):
        tune_fp_ops.mx_qdq(torch.zeros(4, 64), None, None, 6)
    with pytest.raises(ValueError, match="v"):
        tune_fp_ops.mx_qdq(torch.zeros(4, 64), torch.zeros(3, 32), None, 4)


def test_cpp_fast_equals_reference():
    run_cpp_test("fastround-test-fp-tune", 100)


# ---- NVFP4_E5M3 (upstream's nvfp4_v2: a UE5M3 scale per 16 inputs, global scale 1) ----

from auto_round.data_type.nvfp import nvfp4_v2  # noqa: E402


def _nv_upstream(x, v, mx):
    q, s, _ = nvfp4_v2(x, bits=4, group_size=16, v=v if v is not None else 0,
                       max_scale=mx.reshape(-1) if mx is not None else 1.0)
    return q, s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nv_forward_equals_upstream(dtype):
    w, v, mx = nv_case(dtype, seed=1)
    for vv, ff in ((v, mx), (None, None)):
        ours = tune_fp_ops.mx_qdq(w, vv, ff, 4, "nvfp4_v2")
        theirs, scale = _nv_upstream(w, vv, ff)
        assert bits_equal(ours, theirs)
        qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w, vv, ff, 4, "nvfp4_v2")
        assert bits_equal(qdq, theirs)
        _, d = torch.ops.fastround.fp_qdq(w, vv, ff, 4, "nvfp4_v2")
        assert bits_equal(d.reshape(-1), scale.reshape(-1).float())


def test_nv_zero_offsets_are_rtn():
    w, _, _ = nv_case(torch.bfloat16, seed=2)
    qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w, torch.zeros(w.numel() // 16, 16), None, 4, "nvfp4_v2")
    rtn = ops.encode_weight(w, "nvfp4_e5m3", 4, 16, True, opt_rtn=False)
    # Codes come from the qdq, where a value rounding to zero has lost its sign (the regular flow's packer derives
    # them so too, ops.pack_codes(from_qdq=True)); the model-free kernel keeps the source's sign in -0's code.
    zeros = ((codes & 7) == 0) & ((rtn.codes & 7) == 0)
    assert bool(((codes == rtn.codes) | zeros).all()) and torch.equal(scales, rtn.scales)
    assert bits_equal(qdq.abs(), ops.dequantize_codes(rtn.codes, rtn.scales, None, "nvfp4_e5m3", 4, 16, True,
                                                      torch.bfloat16).abs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nv_weight_gradients_equal_torch_autograd(dtype):
    w, v, mx = nv_case(dtype, seed=4)
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = [v.clone().requires_grad_(), mx.clone().requires_grad_()]
    (tune_fp_ops.mx_qdq(w, ours[0], ours[1], 4, "nvfp4_v2").float() * gout.float()).sum().backward()
    ref = [v.clone().requires_grad_(), mx.reshape(-1).clone().requires_grad_()]
    q, _ = _nv_upstream(w, ref[0], ref[1])
    (q.float() * gout.float()).sum().backward()
    assert bits_equal(ours[0].grad, ref[0].grad)
    a, b = ours[1].grad.reshape(-1), ref[1].grad
    assert nan_bits_equal(a, b)


def test_nv_activation_gradient_equals_torch_autograd():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 9, 64, generator=g) * 3).to(torch.bfloat16)
    x[0, 1, :16] = torch.where(torch.arange(16) % 2 == 0, 1.5, -1.5).to(torch.bfloat16)  # tied maxima
    gout = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    ours_x = x.clone().requires_grad_()
    out = tune_fp_ops.mx_qdq(ours_x, None, None, 4, "nvfp4_v2")
    (out.float() * gout.float()).sum().backward()
    ref_x = x.clone().requires_grad_()
    q, _, _ = nvfp4_v2(ref_x, bits=4, group_size=16, v=0, max_scale=torch.tensor(1.0))
    assert bits_equal(out, q)
    (q.float() * gout.float()).sum().backward()
    assert bits_equal(ours_x.grad, ref_x.grad)


def test_nv_opcheck():
    w, v, mx = nv_case(torch.bfloat16, seed=5, rows=8, cols=64)
    torch.library.opcheck(torch.ops.fastround.fp_qdq.default, (w, v.requires_grad_(), mx.requires_grad_(), 4,
                                                               "nvfp4_v2"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
