"""The regular flow's torch ops (fastround.ops / torch.ops.fastround): encode_weight, pack_codes and
dequantize_codes against upstream's own quantizers and packers (auto_round.data_type.*, auto_round_extension's
QuantLinear, WQLinear_GEMM) and against the model-free kernels where upstream's arithmetic agrees with them."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from auto_round.data_type.int import quant_tensor_asym, quant_tensor_opt_rtn_sym, quant_tensor_rtn_sym, quant_tensor_sym
from auto_round.data_type.mxfp import quant_mx, quant_mx_opt_rtn
from auto_round.data_type.nvfp import nvfp4_v2
from auto_round.export.export_to_awq.utils import WQLinear_GEMM
from auto_round.utils.model_free_utils import _quantize_weight_nvfp4_e5m3
from auto_round_extension.torch.qlinear_torch import QuantLinear as QuantLinearZp0
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear as QuantLinearZp1
from torch._subclasses.fake_tensor import FakeTensorMode

import fastround  # a broken build must fail here, not skip
from fastround import _C, _torch, ops

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def weight(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with edge rows planted first: all zero, constant, all positive, all negative, tiny, and x.5
    quotients for the sym 4-bit scale (group max 2 gives scale -0.25)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.empty(rows, 1).uniform_(0.005, 0.2, generator=g)
    planted = [
        torch.zeros(cols),
        torch.full((cols,), 0.0625),
        w[0].abs() + 0.01,
        -w[0].abs() - 0.01,
        torch.randn(cols, generator=g) * 1e-6,
        torch.cat([torch.tensor([2.0]), (torch.arange(cols - 1) % 16 - 8 + 0.5) * 0.25]),
    ]
    for i, row in enumerate(planted[: max(0, rows - 2)]):
        w[i] = row
    return w.to(dtype)


def bits_of(t: torch.Tensor) -> np.ndarray:
    """Raw bit patterns, so that -0.0 != 0.0 and NaN == NaN in comparisons."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    diff = bits_of(a) != bits_of(b)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.size} differ, first at {np.argwhere(diff)[0].tolist()}"


def unpack_gptq_qweight(qweight: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """[in/pf, out] int32 words -> codes [out, in] (lane j of a word is input j, low bits first)."""
    pf = 32 // bits
    w = qweight.view(np.uint32).astype(np.uint64)
    lanes = np.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(pf)], axis=1)  # [in/pf, pf, out]
    return lanes.reshape(-1, w.shape[1])[:cols].T.astype(np.uint8)


# (rows, cols, group_size): in=160 with group 128 is a partial group; 40 rows is not a multiple of 32.
INT_SHAPES = [(64, 256, 128), (40, 160, 128), (48, 96, 32), (24, 64, -1), (16, 48, 64)]


# ---------------------------------------------------------------------------------------------- INT RTN


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize(("rows", "cols", "gs"), INT_SHAPES)
def test_int_rtn_matches_upstream(dtype, bits, sym, rows, cols, gs):
    """Scales, zero points and the qdq weight bit for bit against upstream's RTN quantizers (the regular flow
    calls quant_tensor_rtn_sym for sym; quant_tensor_sym is the same formula)."""
    w = weight(rows, cols, dtype, seed=bits * 100 + cols)
    enc = ops.encode_weight(w, "int_gptq", bits, gs, sym)
    groups = 1 if gs == -1 or cols < gs else -(-cols // gs)
    assert enc.codes.shape == (rows, cols) and enc.codes.dtype == torch.uint8
    qdq_ours = ops.dequantize_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, gs, sym, dtype, weight=w)
    # without the weight only the sign of zeros can differ (0 * scale)
    plain = ops.dequantize_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, gs, sym, dtype)
    assert torch.equal(plain, qdq_ours)
    if sym:
        # rtn_sym's round_() keeps the sign of w on zeros; quant_tensor_sym's round_ste gives +0, so 0 * scale
        for fn, ours in ((quant_tensor_rtn_sym, qdq_ours), (quant_tensor_sym, plain)):
            qdq, scale, zp = fn(w, bits, gs)
            assert_bits_equal(enc.scales, scale.reshape(rows, groups), f"{fn.__name__} scales")
            assert_bits_equal(ours, qdq, f"{fn.__name__} qdq")
        assert (enc.zeros == 2 ** (bits - 1)).all()
    else:
        qdq, scale, zp = quant_tensor_asym(w, bits, gs)
        assert_bits_equal(enc.scales, scale.reshape(rows, groups), "asym scales")
        assert torch.equal(enc.zeros, zp.reshape(rows, groups).to(torch.int32))
        assert_bits_equal(qdq_ours, qdq, "asym qdq")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
def test_int_rtn_codes_vs_model_free(dtype, bits, sym):
    """Upstream's model-free path casts to fp32 first, the regular flow quantizes in the weight's dtype: the codes
    agree with the model-free kernels exactly where that changes no rounding (fp32; bf16 sym, whose quotient
    promotes to fp32). In the other cases the regular codes are the ones upstream's regular packer stores
    (test_pack_regular_matches_upstream_packer)."""
    rows, cols, gs = 40, 160, 128
    w = weight(rows, cols, dtype, seed=7 + bits)
    enc = ops.encode_weight(w, "int_gptq", bits, gs, sym)
    qweight, qzeros, scales = _C.quantize_int_gptq(w.contiguous().view(torch.uint8).numpy(), ST_DTYPE[dtype], rows,
                                                   cols, bits, gs, sym, 0)
    mf_codes = unpack_gptq_qweight(qweight, bits, cols)
    agrees = dtype == torch.float32 or (dtype == torch.bfloat16 and sym)
    if agrees:
        assert np.array_equal(enc.codes.numpy(), mf_codes)
        assert np.array_equal(bits_of(enc.scales), scales.T.view(np.int16))
    else:
        # the same quantizer up to a rounding of the scale (asym: its range and quotient round to the dtype, which
        # shifts a whole 8-bit group by up to 2 codes) or of the quotient (fp16)
        assert np.abs(enc.codes.numpy().astype(int) - mf_codes.astype(int)).max() <= 2


def test_imatrix_is_ignored_by_rtn():
    w = weight(32, 128, torch.bfloat16, seed=3)
    imatrix = torch.rand(128)
    for sym in (True, False):
        a = ops.encode_weight(w, "int_gptq", 4, 32, sym)
        b = ops.encode_weight(w, "int_gptq", 4, 32, sym, opt_rtn=not sym, imatrix=imatrix)  # asym ignores opt_rtn
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize(("rows", "cols", "gs"), [(33, 200, 128), (40, 160, 128), (52, 96, -1), (7, 100, 64)])
def test_pack_padded_equals_quantize_int_gptq_tensor(bits, sym, rows, cols, gs):
    """Padded (model-free) packing of the op's codes == the fused model-free kernel (fp32: same codes)."""
    w = weight(rows, cols, torch.float32, seed=rows + bits)
    enc = ops.encode_weight(w, "int_gptq", bits, gs, sym)
    offset = 1 if sym else 0
    packed = ops.pack_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, gs, sym, offset, True)
    expected = _torch.quantize_int_gptq_tensor(w, bits, gs, sym, offset)
    assert [name for name, _ in packed] == ["qweight", "qzeros", "scales"]
    for (name, got), want in zip(packed, expected):
        assert_bits_equal(got, want, name)


def upstream_qdq(w: torch.Tensor, bits: int, gs: int, sym: bool, opt: bool, imatrix=None):
    if opt:
        return quant_tensor_opt_rtn_sym(w, bits, gs, imatrix=imatrix)
    return quant_tensor_rtn_sym(w, bits, gs) if sym else quant_tensor_asym(w, bits, gs)


def upstream_gptq_pack(qdq, scale, zp, bits, gs, sym, zp_minus_one):
    """auto_round_extension's QuantLinear.pack on a Linear holding the qdq weight, as pack_layer calls it."""
    rows, cols = qdq.shape
    linear = nn.Linear(cols, rows, bias=False, dtype=qdq.dtype)
    linear.weight.data.copy_(qdq)
    cls = QuantLinearZp1 if zp_minus_one else QuantLinearZp0
    q = cls(bits, gs, cols, rows, bias=False, weight_dtype=qdq.dtype)
    q.device = torch.device("cpu")
    zeros = int(zp) if sym else zp.reshape(rows, -1)
    q.pack(linear, scale.reshape(rows, -1), zeros, None, device="cpu")
    return {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize(("sym", "opt"), [(True, False), (False, False), (True, True)], ids=("sym", "asym", "opt"))
@pytest.mark.parametrize(("rows", "cols", "gs"), [(64, 160, 128), (40, 256, 64), (32, 96, -1)])
def test_pack_regular_matches_upstream_packer(dtype, bits, sym, opt, rows, cols, gs):
    """pad_partial_groups=False: the bytes upstream's regular flow writes, from its own quantizer and packer
    (in=160 keeps 160/pf qweight rows with 2 scale groups; out=40 keeps (40//32)*bits qzeros words)."""
    w = weight(rows, cols, dtype, seed=rows * bits + cols)
    imatrix = torch.rand(cols) if opt else None
    qdq, scale, zp = upstream_qdq(w, bits, gs, sym, opt, imatrix)
    enc = ops.encode_weight(w, "int_gptq", bits, gs, sym, opt_rtn=opt, imatrix=imatrix)
    for zp_minus_one in (True, False):
        want = upstream_gptq_pack(qdq, scale, zp, bits, gs, sym, zp_minus_one)
        got = dict(ops.pack_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, gs, sym, int(zp_minus_one),
                                  False))
        assert list(got) == ["qweight", "qzeros", "scales"]
        for name in got:
            assert_bits_equal(got[name], want[name], f"{name} (zp-1={zp_minus_one})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("gs", (32, 128))
def test_pack_awq_matches_upstream(dtype, sym, gs):
    rows, cols = 64, 256
    w = weight(rows, cols, dtype, seed=gs)
    qdq, scale, zp = upstream_qdq(w, 4, gs, sym, False)
    linear = nn.Linear(cols, rows, bias=False, dtype=dtype)
    linear.weight.data.copy_(qdq)
    zeros = 2 ** 3 if sym else zp.reshape(rows, -1).t().contiguous().to(torch.float32)
    want = WQLinear_GEMM.from_linear(linear, 4, gs, scales=scale.reshape(rows, -1).t().contiguous(), zeros=zeros,
                                     device="cpu")
    enc = ops.encode_weight(w, "int_awq", 4, gs, sym)
    got = dict(ops.pack_codes(enc.codes, enc.scales, enc.zeros, "int_awq", 4, gs, sym, 0, False))
    for name in ("qweight", "qzeros", "scales"):
        assert_bits_equal(got[name], getattr(want, name), name)


def test_regular_shapes_and_limits():
    layout = _torch.packed_tensors("int_gptq", 40, 160, 4, 128, True, 1, False)
    assert layout == [("qweight", "I32", [20, 40]), ("qzeros", "I32", [2, 4]), ("scales", "F16", [2, 40])]
    padded = _torch.packed_tensors("int_gptq", 40, 160, 4, 128, True, 1, True)
    assert padded[0][2] == [32, 40] and padded[1][2] == [2, 5]
    with pytest.raises(ValueError, match="in_features 100 is not a multiple of 32"):
        _torch.packed_tensors("int_gptq", 8, 100, 4, 64, True, 1, False)


# ---------------------------------------------------------------------------------------------- FP rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("encoding", "bits"), [("mxfp4", 4), ("mxfp8", 8)])
@pytest.mark.parametrize("opt", (False, True), ids=("rtn", "opt"))
def test_mxfp_matches_upstream(dtype, encoding, bits, opt):
    w = weight(48, 256, dtype, seed=bits)
    enc = ops.encode_weight(w, encoding, bits, 32, True, opt_rtn=opt)
    assert enc.zeros is None and enc.scales.shape == (48, 8) and enc.scales.dtype == torch.uint8
    fn = quant_mx_opt_rtn if opt else quant_mx
    qdq, exp, _ = fn(w.clone(), bits, 32, data_type="mx_fp")  # it divides a float32 input in place
    assert torch.equal(enc.scales.to(torch.int32) - 127, exp.reshape(48, 8).to(torch.int32))
    qdq_ours = ops.dequantize_codes(enc.codes, enc.scales, None, encoding, bits, 32, True, dtype)
    assert_bits_equal(qdq_ours, qdq, "qdq")
    # the packed tensors are the model-free kernel's
    packed = dict(ops.pack_codes(enc.codes, enc.scales, None, encoding, bits, 32, True, 0, False))
    mf_w, mf_s = _C.quantize_mxfp(w.contiguous().view(torch.uint8).numpy(), ST_DTYPE[dtype], 48, 256, bits, opt)
    assert np.array_equal(packed["weight_packed" if bits == 4 else "weight"].view(torch.uint8).numpy(), mf_w)
    assert np.array_equal(packed["weight_scale"].numpy(), mf_s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", (False, True), ids=("rtn", "opt"))
def test_nvfp4_e5m3_matches_upstream(dtype, opt):
    w = weight(32, 128, dtype, seed=5)
    enc = ops.encode_weight(w, "nvfp4_e5m3", 4, 16, True, opt_rtn=opt)
    qdq = _quantize_weight_nvfp4_e5m3(w, "x", 16, disable_opt_rtn=not opt)["x.weight"]
    if not opt:
        assert_bits_equal(qdq, nvfp4_v2(w, 4, 16)[0].to(dtype), "nvfp4_v2")
    qdq_ours = ops.dequantize_codes(enc.codes, enc.scales, None, "nvfp4_e5m3", 4, 16, True, dtype)
    assert_bits_equal(qdq_ours, qdq, "qdq")


# ---------------------------------------------------------------------------------------------- the op surface


def test_fake_kernels_match_real_outputs():
    w = weight(40, 160, torch.bfloat16, seed=1)
    cases = [("int_gptq", 4, 128, True, False), ("int_gptq", 4, 128, True, True), ("int_awq", 4, 32, False, False),
             ("mxfp4", 4, 32, True, True), ("mxfp8", 8, 32, True, False), ("nvfp4_e5m3", 4, 16, True, True)]
    for encoding, bits, gs, sym, opt in cases:
        real = torch.ops.fastround.encode_weight(w, encoding, bits, gs, sym, opt)
        offset = 1 if encoding == "int_gptq" else 0
        zeros = real[2] if real[2].numel() else None
        packed = torch.ops.fastround.pack_codes(real[0], real[1], zeros, encoding, bits, gs, sym, offset, False)
        deq = torch.ops.fastround.dequantize_codes(real[0], real[1], zeros, encoding, bits, gs, sym, torch.float16)
        with FakeTensorMode() as mode:
            fw = mode.from_tensor(w)
            fake = torch.ops.fastround.encode_weight(fw, encoding, bits, gs, sym, opt)
            fz = fake[2] if zeros is not None else None
            fake_packed = torch.ops.fastround.pack_codes(fake[0], fake[1], fz, encoding, bits, gs, sym, offset, False)
            fake_deq = torch.ops.fastround.dequantize_codes(fake[0], fake[1], fz, encoding, bits, gs, sym,
                                                            torch.float16)
        for r, f in zip([*real, *packed, deq], [*fake, *fake_packed, fake_deq]):
            assert (r.shape, r.dtype) == (f.shape, f.dtype), encoding


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w: ops.encode_weight(w, "int4", 4, 128, True), r"encoding: unknown 'int4'"),
        (lambda w: ops.encode_weight(w.to(torch.float64), "int_gptq", 4, 128, True), r"weight: dtype must be"),
        (lambda w: ops.encode_weight(w[0], "int_gptq", 4, 128, True), r"weight: expected a 2-D CPU tensor"),
        (lambda w: ops.encode_weight(w, "int_gptq", 3, 128, True), r"bits: 3 is not a width int_gptq holds"),
        (lambda w: ops.encode_weight(w, "mxfp4", 4, 128, True), r"group_size: mxfp4 groups are 32"),
        (lambda w: ops.encode_weight(w, "int_gptq", 4, 0, True), r"group_size: must be -1 or positive"),
        (lambda w: ops.encode_weight(w, "int_gptq", 4, 128, True, True, torch.ones(7)), r"imatrix: expected"),
        (lambda w: ops.encode_weight(w, "nvfp4_e5m3", 4, 16, True, True, torch.ones(256)),
         r"imatrix: an imatrix-weighted"),
        (lambda w: ops.encode_weight(w * float("nan"), "int_gptq", 4, 128, True), r"weight: 8192 NaN/Inf"),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(weight(32, 256, torch.bfloat16, seed=0))


def test_bad_codes_name_the_argument():
    enc = ops.encode_weight(weight(32, 256, torch.float16, seed=0), "int_gptq", 4, 128, True)
    with pytest.raises(ValueError, match=r"codes: values must be below 16"):
        ops.pack_codes(enc.codes + 16, enc.scales, enc.zeros, "int_gptq", 4, 128, True, 1, False)
    with pytest.raises(ValueError, match=r"scales: expected float16/bfloat16/float32 \[32, 2\]"):
        ops.pack_codes(enc.codes, enc.scales[:, :1], enc.zeros, "int_gptq", 4, 128, True, 1, False)
    with pytest.raises(ValueError, match=r"zeros: expected int32 CPU \[32, 2\]"):
        ops.dequantize_codes(enc.codes, enc.scales, None, "int_gptq", 4, 128, True, torch.float16)
    with pytest.raises(ValueError, match=r"zero_offset: must be 0 for int_awq"):
        ops.pack_codes(enc.codes, enc.scales, enc.zeros, "int_awq", 4, 128, True, 1, False)
    with pytest.raises(ValueError, match=r"dtype: dtype must be float32"):
        ops.dequantize_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", 4, 128, True, torch.int8)


def test_stub_lists_the_module():
    """python/fastround/_torch.pyi names exactly what fastround._torch exports."""
    stub = Path(fastround.__file__).with_name("_torch.pyi")
    tree = ast.parse(stub.read_text())
    declared = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    exported = {n for n in dir(_torch) if not n.startswith("_")}
    assert declared == exported
