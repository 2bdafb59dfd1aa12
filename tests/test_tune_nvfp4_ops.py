"""SignRound's NVFP4 tuning op (torch.ops.fastround.fp_qdq, data_type "nv_fp") against auto-round 0.16.1.

Upstream tunes an NVFP4 layer through nv_fp4 (weights: E4M3 scales per 16 inputs under the tensor's global scale
448 * 6 / max|W|, V and max_scale trainable) and nv_fp4_with_static_gs (activations: the same under a global scale
of the calibrated max, no parameters), both ref_nvfp4_quant. The op's forward must equal those bit for bit, at
V = 0 the RTN path upstream's regular flow takes (ref_nvfp4_quant_inplace), its codes the ones upstream's packer
derives from the qdq weight, and its gradient torch autograd's through ref_nvfp4_quant, NaN where autograd gives
NaN (a zero scale meets 1 / 0 in get_reciprocal's masked branch).
"""

from __future__ import annotations

import pytest
import torch

from fastround import tune_fp_ops
from fp_tune_cases import bits_equal, nan_bits_equal, nv_case

from auto_round.data_type.nvfp import calculate_gparam, nv_fp4, nv_fp4_rtn, nv_fp4_with_static_gs  # noqa: E402
from auto_round.data_type.nvfp import cast_to_fp4, get_reciprocal  # noqa: E402
from auto_round.export.export_to_autoround.qlinear_fp import pack_fp4_to_uint8  # noqa: E402


def _case(dtype: torch.dtype, seed: int, rows: int = 24, cols: int = 160):
    return nv_case(dtype, seed, rows, cols, tiny_group=True)


def _upstream(x, v, mx, gs):
    q, s, _ = nv_fp4(x, bits=4, group_size=16, v=v if v is not None else 0, global_scale=gs,
                     max_scale=mx.reshape(-1) if mx is not None else 1.0)
    return q, s


def _upstream_packed(qdq: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """upstream's qlinear_fp pack of an nv_fp layer: the qdq weight times 1 / (scale / gs), clamped, cast_to_fp4."""
    t = qdq.reshape(-1, 16).to(torch.float32) * get_reciprocal(scale.reshape(-1, 1) * get_reciprocal(gs.reshape(1)))
    return pack_fp4_to_uint8(cast_to_fp4(t.clamp(-6.0, 6.0)).reshape(qdq.shape))


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def test_global_scale_is_upstreams():
    w, _, _ = _case(torch.bfloat16, seed=0)
    gs = calculate_gparam(w, 16)
    assert tune_fp_ops.nv_global_scale(w) == float(gs)
    assert tune_fp_ops.nv_global_scale(torch.zeros(3)) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_equals_upstream(dtype):
    w, v, mx = _case(dtype, seed=1)
    gs = calculate_gparam(w, 16)
    for vv, ff in ((v, mx), (None, None), (v, None)):
        theirs, scale = _upstream(w, vv, ff, gs)
        ours = tune_fp_ops.mx_qdq(w, vv, ff, 4, "nv_fp", float(gs))
        assert bits_equal(ours, theirs)
        qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w, vv, ff, 4, "nv_fp", float(gs))
        assert bits_equal(qdq, theirs)
        _, s = torch.ops.fastround.fp_qdq(w, vv, ff, 4, "nv_fp", float(gs))
        assert bits_equal(s.reshape(-1), scale.reshape(-1).float())
        assert torch.equal(scales.view(torch.float8_e4m3fn).float().reshape(-1), scale.reshape(-1).float())
        # the bytes upstream's packer writes from this qdq weight and scale (its -0 codes included)
        assert torch.equal(_pack(codes), _upstream_packed(theirs, scale, gs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_zero_offsets_are_upstream_rtn(dtype):
    """V = 0, factor 1 is the RTN path (nv_fp4_rtn, ref_nvfp4_quant_inplace), bit for bit."""
    w, _, _ = _case(dtype, seed=2)
    gs = calculate_gparam(w, 16)
    rtn, rtn_scale, _ = nv_fp4_rtn(w, bits=4, group_size=16, v=0, global_scale=gs)
    qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w, torch.zeros(w.numel() // 16, 16), None, 4, "nv_fp", float(gs))
    assert bits_equal(qdq, rtn)
    assert torch.equal(scales.view(torch.float8_e4m3fn).float().reshape(-1), rtn_scale.reshape(-1).float())
    assert torch.equal(_pack(codes), _upstream_packed(rtn, rtn_scale, gs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_gradients_equal_torch_autograd(dtype):
    w, v, mx = _case(dtype, seed=4)
    gs = calculate_gparam(w, 16)
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = [v.clone().requires_grad_(), mx.clone().requires_grad_()]
    (tune_fp_ops.mx_qdq(w, ours[0], ours[1], 4, "nv_fp", float(gs)).float() * gout.float()).sum().backward()
    ref = [v.clone().requires_grad_(), mx.reshape(-1).clone().requires_grad_()]
    q, _ = _upstream(w, ref[0], ref[1], gs)
    (q.float() * gout.float()).sum().backward()
    assert bits_equal(ours[0].grad, ref[0].grad)
    a, b = ours[1].grad.reshape(-1), ref[1].grad
    assert nan_bits_equal(a, b)
    assert bool(b.isnan().any()) and bool((~b.isnan()).sum() > 100)  # the zero-scale groups and the rest checked


def test_activation_gradient_equals_torch_autograd():
    """Activations: nv_fp4_with_static_gs under a calibrated max (not the tensor's own), gradient to the input
    through the group maxima too."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 9, 64, generator=g) * 3).to(torch.bfloat16)
    x[0, 1, :16] = torch.where(torch.arange(16) % 2 == 0, 1.5, -1.5).to(torch.bfloat16)  # tied maxima
    act_max = torch.tensor(11.5)
    gs = calculate_gparam(act_max, 16)
    gout = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    ours_x = x.clone().requires_grad_()
    out = tune_fp_ops.mx_qdq(ours_x, None, None, 4, "nv_fp", tune_fp_ops.nv_global_scale(act_max))
    (out.float() * gout.float()).sum().backward()
    ref_x = x.clone().requires_grad_()
    q, _, _ = nv_fp4_with_static_gs(ref_x, bits=4, group_size=16, tensor_max=act_max)
    assert tune_fp_ops.nv_global_scale(act_max) == float(gs)
    assert bits_equal(out, q)
    (q.float() * gout.float()).sum().backward()
    assert bits_equal(ours_x.grad, ref_x.grad)


def test_opcheck_and_bad_input():
    w, v, mx = _case(torch.bfloat16, seed=5, rows=8, cols=64)
    gs = tune_fp_ops.nv_global_scale(w)
    torch.library.opcheck(torch.ops.fastround.fp_qdq.default, (w, v.requires_grad_(), mx.requires_grad_(), 4,
                                                               "nv_fp", gs),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="global_scale"):
        tune_fp_ops.mx_qdq(w, None, None, 4, "nv_fp", -1.0)
    with pytest.raises(ValueError, match="global_scale"):
        tune_fp_ops.mx_qdq(w, None, None, 4, "nv_fp", 0.1)  # not an fp32 value
    with pytest.raises(ValueError, match="bits"):
        tune_fp_ops.mx_qdq(w, None, None, 8, "nv_fp", gs)
