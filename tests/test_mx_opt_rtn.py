"""MXFP4 / MXFP8 OPT-RTN with an imatrix, as the regular flow runs it for iters=0 with calibration data: the torch op
against upstream's quant_mx_opt_rtn (the imatrix-weighted exponent search, gguf.py's zero handling included) and
upstream's MXFP packer, bit for bit; the C++ reference walk; and whole MXFP4 / MXFP8 runs against auto-round 0.16.1."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
from auto_round.data_type.mxfp import quant_mx_opt_rtn
from auto_round.export.export_to_autoround.qlinear_fp import QuantLinear as MxQuantLinear

from fastround import ops

import oracle
from cpp_runner import run_cpp_test
from test_opt_rtn_flow import _run
from test_torch_ops import assert_bits_equal

ROWS, COLS = 40, 256  # 8 groups of 32 a row


def _weight(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[ROWS, COLS]: magnitudes over several octaves per row, an all-zero row, an all-zero group, values whose
    squares underflow (the zero rule's fallback then has sigma 0), a row of grid ties, and a row where MXFP8's
    search weighs a first column in the clamp band (500 saturates at its own exponent) against subnormal-coded
    values (3 * 2^-9, which the next exponent rounds)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g) * torch.exp2(torch.empty(ROWS, COLS).uniform_(-8, 2, generator=g))
    w[0] = 0.0
    w[1, 32:64] = 0.0
    w[2] = torch.where(torch.arange(COLS) % 3 == 0, 0.0, 1e-25 * (torch.arange(COLS) % 7 + 1))
    w[3] = 0.25 * (torch.arange(COLS) % 13) - 1.5
    w[4] = torch.where(torch.arange(COLS) % 32 == 0, 500.0, 3.0 / 512.0)
    return w.to(dtype)


def _imatrix(kind: str, seed: int) -> torch.Tensor:
    """[COLS] float32 loss weights with the zero patterns _imatrix_handle_zero treats differently."""
    g = torch.Generator().manual_seed(seed)
    m = torch.empty(COLS).uniform_(0.01, 4.0, generator=g)
    if kind == "skewed":
        m = torch.exp2(torch.empty(COLS).uniform_(-12, 12, generator=g))
    elif kind == "light_first":  # each group's first column weighs 1e-6: row 4 keeps its own exponent in MXFP8
        m = torch.where(torch.arange(COLS) % 32 == 0, 1e-6, 1e4)
    elif kind == "scattered":  # 1..3 zeros a group: the mean fill
        m[::11] = 0.0
    elif kind == "mixed":  # weights from the weight row (32 and 17 zeros, 20 tiny), the 16-zero boundary, -0.0
        m[0:32] = 0.0
        m[32:48] = 0.0
        m[64:81] = 0.0
        m[96:116] = 1e-31
        m[133] = -0.0
    elif kind == "all_zero":
        m[:] = 0.0
    elif kind == "zero_group_fill":  # zero weight groups of a fallback group get 0/0 weights
        m[0:32] = 0.0
        m[160:162] = 0.0
    elif kind == "negative_min":  # zeros, but the minimum is not 0: no fix-up
        m[0:32] = 0.0
        m[40] = -0.5
    return m


def _upstream_packed(qdq: torch.Tensor, exp: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's MXFP QuantLinear.pack on a Linear holding the qdq weight, as its regular-flow packer calls it."""
    layer = nn.Linear(COLS, ROWS, bias=False)
    layer.weight.data = qdq
    q = MxQuantLinear(bits, 32, COLS, ROWS, False, data_type="mx_fp")
    q.pack(layer, exp.reshape(ROWS, -1), device="cpu")
    weight = q.weight.view(torch.uint8) if bits == 8 else q.weight_packed
    return weight, q.weight_scale


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize(("encoding", "bits"), [("mxfp4", 4), ("mxfp8", 8)])
@pytest.mark.parametrize(
    "kind", ["positive", "skewed", "light_first", "scattered", "mixed", "all_zero", "zero_group_fill", "negative_min"]
)
def test_encode_with_imatrix_matches_upstream(dtype, encoding, bits, kind):
    w = _weight(dtype, seed=bits)
    imatrix = _imatrix(kind, seed=bits + 1)
    enc = ops.encode_weight(w, encoding, bits, 32, True, True, imatrix)
    # quant_mx_opt_rtn divides a float32 input in place: hand it copies
    qdq, exp, _ = quant_mx_opt_rtn(w.clone(), bits, 32, data_type="mx_fp", imatrix=imatrix.clone())
    assert torch.equal(enc.scales.to(torch.int32) - 127, exp.reshape(ROWS, COLS // 32).to(torch.int32))
    assert_bits_equal(ops.dequantize_codes(enc.codes, enc.scales, None, encoding, bits, 32, True, dtype), qdq, "qdq")
    packed = dict(ops.pack_codes(enc.codes, enc.scales, None, encoding, bits, 32, True, 0, False))
    up_weight, up_scale = _upstream_packed(qdq, exp, bits)
    assert torch.equal(packed["weight_packed" if bits == 4 else "weight"].view(torch.uint8), up_weight)
    assert torch.equal(packed["weight_scale"], up_scale)


@pytest.mark.parametrize(("encoding", "bits", "kind"), [("mxfp4", 4, "skewed"), ("mxfp8", 8, "light_first")])
def test_the_imatrix_moves_exponents(encoding, bits, kind):
    """A skewed imatrix changes some exponents against the unweighted search (else the weights go unused)."""
    w = _weight(torch.bfloat16, seed=bits)
    weighted = ops.encode_weight(w, encoding, bits, 32, True, True, _imatrix(kind, seed=bits + 1))
    plain = ops.encode_weight(w, encoding, bits, 32, True, True)
    assert int((weighted.scales != plain.scales).sum()) > 0


def test_cpp_reference_walk():
    """Row-parallel kernel == whole-tensor reference for every dtype, imatrix shape and thread count
    (cpp/tests/test_fp_opt_rtn.cpp)."""
    run_cpp_test("fastround-test-fp-opt-rtn", 300)


@pytest.mark.parametrize("scheme", ["MXFP4", "MXFP8"])
def test_mxfp_regular_flow_matches_upstream(checkpoint, tmp_path, scheme):
    """MXFP with iters=0 collects an imatrix and searches with it: the saved checkpoint equals upstream's (for MXFP4
    on this model, 29 tensors differ when the imatrix is dropped)."""
    src = checkpoint("llama_aligned")
    theirs = _run("upstream", src, tmp_path / "up", scheme=scheme)
    ours = _run("fastround", src, tmp_path / "fr", scheme=scheme)
    assert ours.relative_to(tmp_path / "fr") == theirs.relative_to(tmp_path / "up")
    diff = oracle.compare_checkpoints(ours, theirs, ignore=(".cache", "fastround_summary.json"))
    assert list(diff) == [], "\n".join(diff)
    assert any(name.endswith(".weight_scale") for name in oracle.read_checkpoint(ours))
