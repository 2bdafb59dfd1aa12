"""OPT-RTN for INT sym (cpp/fastround/quant/int_opt_rtn.cpp through fastround.ops.encode_weight) against
upstream's quant_tensor_opt_rtn_sym: integer codes, the searched scales (kept in the weight's dtype) and the qdq
weight, over bf16 / fp16 / fp32 weights, 2 / 4 / 8 bits, groups 32 / 64 / 128 / -1 (partial and short groups
included) and imatrices with scattered zeros, all-zero groups and mostly-zero groups (_imatrix_handle_zero's
three branches). Observed agreement on this host: 100% of codes and scales."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from auto_round.data_type.int import quant_tensor_opt_rtn_sym
from auto_round.data_type.utils import reshape_pad_tensor_by_group_size

from fastround import ops
from test_torch_ops import bits_of, weight

IMATRIX_KINDS = ("none", "random", "scattered_zeros", "zero_group", "mostly_zero_group")


def imatrix(cols: int, kind: str, group: int, seed: int) -> torch.Tensor | None:
    """None, or squared-activation-like weights with zeros planted: every 7th entry (groups with a few zeros: the
    mean fill), the first group entirely (weights from the weight row), or 2 of 3 entries of the second group."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(cols, generator=g) * 3.0
    if kind in ("scattered_zeros", "zero_group"):
        m[::7] = 0.0
    if kind == "zero_group":
        m[:group] = 0.0
    if kind == "mostly_zero_group":
        m[group : 2 * group] = 0.0
        m[group : 2 * group : 3] = 1.0
    return m


def upstream_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The integer codes inside upstream's qdq: clamp(round(w / scale), -Q, Q-1) + Q on its padded groups."""
    q = 2 ** (bits - 1)
    grouped, _, pad = reshape_pad_tensor_by_group_size(w, group_size)
    codes = torch.clamp(torch.round(grouped / scale), -q, q - 1) + q
    return codes.reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.uint8)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize(
    ("rows", "cols", "group_size"),
    # 2100 inputs in one group: torch's cascaded fp32 sum (16-vector chunks) and a scalar tail
    [(48, 256, 32), (48, 256, 64), (40, 160, 128), (16, 96, 128), (24, 192, -1), (8, 2100, -1)],
)
@pytest.mark.parametrize("kind", IMATRIX_KINDS)
def test_opt_rtn_matches_upstream(dtype, bits, rows, cols, group_size, kind, caplog):
    caplog.set_level(logging.ERROR)  # upstream warns about zero activations on every zero imatrix
    w = weight(rows, cols, dtype, seed=bits * 31 + cols)
    group = cols if group_size == -1 or cols < group_size else group_size
    m = imatrix(cols, kind, group, seed=bits + cols)
    qdq, scale, _ = quant_tensor_opt_rtn_sym(w.clone(), bits, group_size, imatrix=None if m is None else m.clone())
    enc = ops.encode_weight(w, "int_gptq", bits, group_size, True, opt_rtn=True, imatrix=m)

    assert enc.scales.dtype == dtype  # the searched scale, not rounded to fp16
    want_codes = upstream_codes(w, scale, bits, group_size).numpy()
    code_agree = float((enc.codes.numpy() == want_codes).mean())
    scale_agree = float((bits_of(enc.scales) == bits_of(scale.reshape(rows, -1))).mean())
    assert code_agree >= 0.999, f"codes agree {code_agree:.5f}"
    assert scale_agree >= 0.999, f"scales agree {scale_agree:.5f}"
    # a differing scale, if any, is a neighbouring candidate: within one fp16 ulp of upstream's
    ours16 = enc.scales.to(torch.float16).float()
    theirs16 = scale.reshape(rows, -1).to(torch.float16).float()
    ulp = torch.finfo(torch.float16).eps * theirs16.abs().clamp(min=torch.finfo(torch.float16).tiny)
    assert bool(((ours16 - theirs16).abs() <= ulp).all())
    # the model's qdq weight (the source weight gives the sign of zeros)
    ours = ops.dequantize_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, group_size, True, dtype, weight=w)
    qdq_agree = float((bits_of(ours) == bits_of(qdq)).mean())
    assert qdq_agree >= 0.999, f"qdq agrees {qdq_agree:.5f}"
    assert (enc.zeros == 2 ** (bits - 1)).all()


def test_opt_rtn_lowers_weighted_error():
    """What the search is for: on random data its imatrix-weighted error is below plain RTN's."""
    w = weight(64, 256, torch.float32, seed=11)
    m = torch.rand(256) * 3.0
    opt = ops.encode_weight(w, "int_gptq", 4, 128, True, opt_rtn=True, imatrix=m)
    rtn = ops.encode_weight(w, "int_gptq", 4, 128, True)

    def err(e):
        deq = ops.dequantize_codes(e.codes, e.scales, e.zeros, "int_gptq", 4, 128, True, torch.float32)
        return float((((deq - w) ** 2) * m).sum())

    assert err(opt) < err(rtn)


def test_imatrix_none_equals_ones_and_rows_are_independent():
    w = weight(32, 128, torch.bfloat16, seed=2)
    a = ops.encode_weight(w, "int_gptq", 4, 32, True, opt_rtn=True)
    b = ops.encode_weight(w, "int_gptq", 4, 32, True, opt_rtn=True, imatrix=torch.ones(128))
    assert torch.equal(a.codes, b.codes) and np.array_equal(bits_of(a.scales), bits_of(b.scales))
    half = ops.encode_weight(w[16:].contiguous(), "int_gptq", 4, 32, True, opt_rtn=True)
    assert torch.equal(half.codes, a.codes[16:]) and np.array_equal(bits_of(half.scales), bits_of(a.scales[16:]))
