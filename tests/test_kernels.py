"""The C++ INT kernels: fused fast path vs scalar reference (bit for bit), vs upstream's RTN formula
written in torch, the torch-tensor entry point, dequantization, and the documented worked example
(shared/reference/model-free.md §3.4 and §4.2)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import fastround  # a broken build must fail here, not skip
_C = fastround._C
import fastround._torch as _torch  # noqa: E402  (after torch, which it links against)

DTYPES = ("BF16", "F16", "F32")
BITS = (2, 4, 8)

# (rows, cols, group_size): rows not multiples of 8/16/32, cols not multiples of the group.
SHAPES = [
    (1, 64, 32),
    (7, 100, 64),  # cols padded 100 -> 128
    (33, 200, 128),  # 200 -> 256, rows span two 32-row tiles
    (52, 96, -1),  # per channel
    (13, 100, -1),  # per channel with cols not a multiple of 16 (padded to whole words)
    (40, 130, 32),  # 130 -> 160
    (70, 256, 128),  # three tiles, last one partial
    (9, 20, 10),  # small group; packs only where 20 % (32/bits) == 0 (8-bit)
]


# ----------------------------------------------------------------------------------------------
# data


def _edge_rows(rows: int, cols: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Random rows with edge cases planted in the leading rows (float32, values exact in bf16/fp16
    where it matters)."""
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 0.2)).astype(np.float32)
    half = 2 ** (bits - 1)
    planted = [
        np.zeros(cols, np.float32),  # all zero: scale clamp (+fp16(1e-5)), codes == zero point
        np.full(cols, 0.0625, np.float32),  # constant: max == min for asym
        np.abs(w[0]) + np.float32(0.01),  # all positive: sym scale negative, asym zp == 0
        -np.abs(w[0]) - np.float32(0.01),  # all negative: |min| branch
        (rng.standard_normal(cols) * 1e-7).astype(np.float32),  # tiny: scale clamp with signs
        (rng.standard_normal(cols) * 1e3).astype(np.float32),  # large
        # ties: group max 0.25*half gives sym scale -0.25 exactly; (k + 0.5) * 0.25 are x.5 quotients
        np.resize(
            np.concatenate([[0.25 * half], (np.arange(-half, half) + 0.5) * 0.25]).astype(np.float32), cols
        ),
        # asym ties: min -0.25*c, max 0.25*(maxq-c) give scale 0.25 exactly and zp c
        np.resize(
            np.concatenate(
                [[-0.25 * (half // 2), 0.25 * (2 * half - 1 - half // 2)],
                 (np.arange(0, 2 * half - 1) + 0.5) * 0.25 - 0.25 * (half // 2)]
            ).astype(np.float32),
            cols,
        ),
        # ties of the fp16 scale rounding itself: mx = half * (1 + 2**-11) -> s halfway between fp16 values
        np.resize(np.array([half * (1 + 2.0**-11), -0.5, 0.25, 0.0], np.float32), cols),
        np.resize(np.array([half * (1 + 3 * 2.0**-11), -1.5, 0.75, -0.25], np.float32), cols),
        # only nonzero value is tiny: sym scale clamps to -fp16(1e-5)
        np.resize(np.array([1e-6, 0.0, 0.0, 0.0], np.float32), cols),
        np.resize(np.array([-1e-6, 0.0, 0.0, 0.0], np.float32), cols),
    ]
    for i, row in enumerate(planted[:rows]):
        w[i] = row
    return w


def _encode(w32: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw buffer in `dtype`, the float32 values it holds)."""
    if dtype == "F32":
        return np.ascontiguousarray(w32), w32.astype(np.float32)
    if dtype == "F16":
        h = w32.astype(np.float16)
        return np.ascontiguousarray(h), h.astype(np.float32)
    if dtype == "BF16":
        u = (np.ascontiguousarray(w32).view(np.uint32) >> 16).astype(np.uint16)
        return u, (u.astype(np.uint32) << 16).view(np.float32)
    raise AssertionError(dtype)


def _valid(cols: int, bits: int, group: int) -> bool:
    pf = 32 // bits
    if group == -1:
        return True
    return (math.ceil(cols / group) * group) % pf == 0


# ----------------------------------------------------------------------------------------------
# unpacking and the torch reference


def _layout(rows: int, cols: int, bits: int, group: int) -> tuple[int, int, int, int]:
    pf = 32 // bits
    if group == -1:
        cols_p = math.ceil(cols / pf) * pf
        g = cols_p
    else:
        g = group
        cols_p = math.ceil(cols / g) * g
    rows_p = math.ceil(rows / pf) * pf
    return g, cols_p // g, cols_p, rows_p


def _unpack_qweight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """[cols_p/pf, rows] int32 -> codes [rows, cols_p] (lane 0 in the low bits)."""
    pf = 32 // bits
    words = np.asarray(qweight).view(np.uint32)
    lanes = np.stack([(words >> (bits * j)) & ((1 << bits) - 1) for j in range(pf)], axis=1)  # [k, pf, rows]
    return lanes.reshape(-1, words.shape[1]).T.astype(np.int64)


def _unpack_qzeros(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """[groups, rows_p/pf] int32 -> lanes [groups, rows_p]."""
    pf = 32 // bits
    words = np.asarray(qzeros).view(np.uint32)
    lanes = np.stack([(words >> (bits * j)) & ((1 << bits) - 1) for j in range(pf)], axis=2)  # [g, k, pf]
    return lanes.reshape(words.shape[0], -1).astype(np.int64)


def torch_rtn(w: torch.Tensor, bits: int, group: int, sym: bool, zero_offset: int):
    """Upstream's eager RTN in torch: (codes [rows, cols_p], zero lanes [groups, rows_p], scale bits
    [groups, rows] uint16)."""
    rows, cols = w.shape
    g, ng, cols_p, rows_p = _layout(rows, cols, bits, group)
    wp = torch.zeros(rows_p, cols_p, dtype=torch.float32)
    wp[:rows, :cols] = w.float()
    x = wp.reshape(rows_p, ng, g)
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    min_scale = torch.tensor(1e-5).half()
    if sym:
        half = 2 ** (bits - 1)
        s = torch.where(mx >= -mn, -mx / half, -mn / half)
        s16 = s.half()
        s16 = torch.where(s16 < 0, torch.minimum(s16, -min_scale), torch.maximum(s16, min_scale))
        sf = s16.float()
        q = torch.clamp(torch.round(x / sf[..., None]), -half, half - 1) + half
        zp = torch.full_like(sf, half)
    else:
        s = (mx - mn) / maxq
        s16 = torch.maximum(s.half(), min_scale)
        sf = s16.float()
        zp = torch.round(-mn / sf)
        q = torch.clamp(torch.round(x / sf[..., None]) + zp[..., None], 0, maxq)
    codes = q.reshape(rows_p, cols_p)[:rows].to(torch.int64).numpy()
    lanes = torch.clamp(zp - zero_offset, 0, maxq).to(torch.int64).T.contiguous().numpy()  # [ng, rows_p]
    scale_bits = s16[:rows].T.contiguous().view(torch.int16).numpy().view(np.uint16)
    return codes, lanes, scale_bits, (q.reshape(rows_p, cols_p) - zp.repeat_interleave(g, 1)), sf


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _zero_offset(sym: bool) -> int:
    return 1 if sym else 0


def _case_id(shape) -> str:
    return "x".join(str(v) for v in shape)


@pytest.fixture
def restore_threads():
    n = _C.max_threads()
    yield
    _C.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# fast path vs scalar reference


# Shapes that cannot pack at some bits are left out here; test_unpackable_shape_raises covers them.
PACKABLE = [(shape, bits) for shape in SHAPES for bits in BITS if _valid(shape[1], bits, shape[2])]


def _packable_id(case) -> str:
    shape, bits = case
    return f"{_case_id(shape)}-b{bits}"


@pytest.mark.parametrize("case", PACKABLE, ids=_packable_id)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_equals_reference(case, sym, dtype):
    shape, bits = case
    rows, cols, group = shape
    rng = np.random.default_rng(_seed(shape, bits, sym, dtype))
    buf, _ = _encode(_edge_rows(rows, cols, bits, rng), dtype)
    zo = _zero_offset(sym)
    fast = _C.quantize_int_gptq(buf, dtype, rows, cols, bits, group, sym, zo, reference=False)
    ref = _C.quantize_int_gptq(buf, dtype, rows, cols, bits, group, sym, zo, reference=True)
    g, ng, cols_p, rows_p = _layout(rows, cols, bits, group)
    pf = 32 // bits
    assert fast[0].dtype == np.int32 and fast[0].shape == (cols_p // pf, rows)
    assert fast[1].dtype == np.int32 and fast[1].shape == (ng, rows_p // pf)
    assert fast[2].dtype == np.uint16 and fast[2].shape == (ng, rows)
    for name, a, b in zip(("qweight", "qzeros", "scales"), fast, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between fast and reference paths")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_zero_offset_variants_fast_equals_reference(bits, sym):
    """Both zero offsets with both sym settings (the kernel takes any combination)."""
    rows, cols, group = 37, 192, 64
    rng = np.random.default_rng(7 + bits)
    buf, _ = _encode(_edge_rows(rows, cols, bits, rng), "BF16")
    for zo in (0, 1):
        fast = _C.quantize_int_gptq(buf, "BF16", rows, cols, bits, group, sym, zo, reference=False)
        ref = _C.quantize_int_gptq(buf, "BF16", rows, cols, bits, group, sym, zo, reference=True)
        for a, b in zip(fast, ref):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_threads_do_not_change_output(bits, sym, restore_threads):
    rows, cols, group = 133, 300, 128  # five 32-row tiles, last partial; cols 300 -> 384
    rng = np.random.default_rng(1234 + bits)
    buf, _ = _encode(_edge_rows(rows, cols, bits, rng), "BF16")
    zo = _zero_offset(sym)
    _C.set_num_threads(1)
    one = _C.quantize_int_gptq(buf, "BF16", rows, cols, bits, group, sym, zo)
    _C.set_num_threads(2)
    two = _C.quantize_int_gptq(buf, "BF16", rows, cols, bits, group, sym, zo)
    ref = _C.quantize_int_gptq(buf, "BF16", rows, cols, bits, group, sym, zo, reference=True)
    for a, b, c in zip(one, two, ref):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


# ----------------------------------------------------------------------------------------------
# vs upstream's formula in torch


@pytest.mark.parametrize("case", PACKABLE, ids=_packable_id)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_rtn(case, sym, dtype):
    shape, bits = case
    rows, cols, group = shape
    rng = np.random.default_rng(_seed(shape, bits, sym, dtype, 'torch'))
    buf, values = _encode(_edge_rows(rows, cols, bits, rng), dtype)
    zo = _zero_offset(sym)
    qweight, qzeros, scales = _C.quantize_int_gptq(buf, dtype, rows, cols, bits, group, sym, zo)
    codes, lanes, scale_bits, _, _ = torch_rtn(torch.from_numpy(values), bits, group, sym, zo)
    np.testing.assert_array_equal(scales, scale_bits, err_msg="fp16 scale bits differ from upstream's formula")
    got_codes = _unpack_qweight(qweight, bits)
    mismatch = np.argwhere(got_codes != codes)
    assert mismatch.size == 0, (
        f"{len(mismatch)} codes differ from upstream's formula, first at [row, col] {mismatch[0].tolist()}: "
        f"got {got_codes[tuple(mismatch[0])]}, want {codes[tuple(mismatch[0])]}"
    )
    np.testing.assert_array_equal(_unpack_qzeros(qzeros, bits), lanes, err_msg="qzeros lanes differ")


def test_all_zero_row_scale_is_positive_min():
    """-0.0 counts as positive: an all-zero group gets +fp16(1e-5) = 0x00A8, sym codes 8 (0x88888888)."""
    rows, cols = 8, 32
    w = np.zeros((rows, cols), np.float32)
    qweight, qzeros, scales = _C.quantize_int_gptq(w, "F32", rows, cols, 4, 32, True, 1)
    assert (scales == 0x00A8).all()
    assert (qweight.view(np.uint32) == 0x88888888).all()
    assert (qzeros.view(np.uint32) == 0x77777777).all()
    qweight, qzeros, scales = _C.quantize_int_gptq(w, "F32", rows, cols, 4, 32, False, 0)
    assert (scales == 0x00A8).all()
    assert (qweight == 0).all() and (qzeros == 0).all()


def test_tiny_only_value_gives_negative_min_scale():
    w = np.zeros((8, 32), np.float32)
    w[:, 5] = 1e-6
    _, _, scales = _C.quantize_int_gptq(w, "F32", 8, 32, 4, 32, True, 1)
    assert (scales == 0x80A8).all()
    w[:, 5] = -1e-6
    _, _, scales = _C.quantize_int_gptq(w, "F32", 8, 32, 4, 32, True, 1)
    assert (scales == 0x00A8).all()


@pytest.mark.parametrize("bits", BITS)
def test_sym_constant_qzeros_words(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    _, qzeros, _ = _C.quantize_int_gptq(w, "F32", 16, 64, bits, 32, True, 1)
    want = {2: 0x55555555, 4: 0x77777777, 8: 0x7F7F7F7F}[bits]
    assert (qzeros.view(np.uint32) == want).all()


# ----------------------------------------------------------------------------------------------
# documented worked example (model-free.md §3.4, §4.2)


def _worked_example_matrix() -> np.ndarray:
    w = np.zeros((8, 16), np.float32)
    w[0, :8] = [-0.6875, -0.25, 0.1875, 0.625, -0.375, 0.0625, 0.5, -0.5]
    w[1, :8] = [0.5, 0.25, 0.125, 0, 0.75, 0.375, 0.0625, 0.5]
    rng = np.random.default_rng(0)
    w[2:, :] = rng.standard_normal((6, 16)).astype(np.float32) * 0.3
    w[0, 8:] = rng.standard_normal(8) * 0.3
    w[1, 8:] = rng.standard_normal(8) * 0.3
    return w


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_worked_example_sym(reference):
    buf, _ = _encode(_worked_example_matrix(), "BF16")
    assert ((buf[:2, :8].astype(np.uint32) << 16).view(np.float32) == _worked_example_matrix()[:2, :8]).all()
    qweight, qzeros, scales = _C.quantize_int_gptq(buf, "BF16", 8, 16, 4, 8, True, 1, reference=reference)
    assert qweight.shape == (2, 8) and qzeros.shape == (2, 1) and scales.shape == (2, 8)
    assert int(scales[0, 0]) == 0x2D80
    assert int(scales[0, 1]) == 0xAE00
    assert int(qweight.view(np.uint32)[0, 0]) == 0x2E94FA50
    assert int(qweight.view(np.uint32)[0, 1]) == 0x37408753
    assert _unpack_qweight(qweight, 4)[0, :8].tolist() == [0, 5, 10, 15, 4, 9, 14, 2]
    assert _unpack_qweight(qweight, 4)[1, :8].tolist() == [3, 5, 7, 8, 0, 4, 7, 3]


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_worked_example_asym(reference):
    buf, _ = _encode(_worked_example_matrix(), "BF16")
    qweight, qzeros, scales = _C.quantize_int_gptq(buf, "BF16", 8, 16, 4, 8, False, 0, reference=reference)
    assert int(scales[0, 0]) == 0x2D9A
    assert int(scales[0, 1]) == 0x2A66
    codes = _unpack_qweight(qweight, 4)
    assert codes[0, :8].tolist() == [0, 5, 10, 15, 4, 9, 14, 2]  # zp 8: same codes as sym
    assert codes[1, :8].tolist() == [10, 5, 3, 0, 15, 8, 1, 10]
    zeros = _unpack_qzeros(qzeros, 4)
    assert zeros[0, 0] == 8 and zeros[0, 1] == 0  # zero_offset 0: zp stored as is


# ----------------------------------------------------------------------------------------------
# torch entry point


@pytest.mark.parametrize("shape", [(7, 100, 64), (33, 200, 128), (13, 100, -1), (70, 256, 128)], ids=_case_id)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_entry_equals_numpy(shape, bits, sym, dtype):
    rows, cols, group = shape
    rng = np.random.default_rng(99)
    buf, values = _encode(_edge_rows(rows, cols, bits, rng), dtype)
    zo = _zero_offset(sym)
    t = {"F32": lambda: torch.from_numpy(buf.copy()),
         "F16": lambda: torch.from_numpy(buf.copy()),
         "BF16": lambda: torch.from_numpy(buf.view(np.int16).copy()).view(torch.bfloat16)}[dtype]()
    assert torch.equal(t.float(), torch.from_numpy(values))
    tq, tz, ts = _torch.quantize_int_gptq_tensor(t, bits, group, sym, zo)
    assert tq.dtype == torch.int32 and tz.dtype == torch.int32 and ts.dtype == torch.float16
    nq, nz, ns = _C.quantize_int_gptq(buf, dtype, rows, cols, bits, group, sym, zo)
    np.testing.assert_array_equal(tq.numpy(), nq)
    np.testing.assert_array_equal(tz.numpy(), nz)
    np.testing.assert_array_equal(ts.view(torch.int16).numpy().view(np.uint16), ns)


def test_tensor_entry_non_contiguous():
    w = torch.randn(100, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    wt = w.t()  # [48, 100], not contiguous
    assert not wt.is_contiguous()
    a = _torch.quantize_int_gptq_tensor(wt, 4, 32, True, 1)
    b = _torch.quantize_int_gptq_tensor(wt.contiguous(), 4, 32, True, 1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(8, 32, dtype=torch.int32), torch.zeros(8, 32, dtype=torch.float64), torch.zeros(32)],
    ids=["int32", "float64", "1d"],
)
def test_tensor_entry_rejects_bad_tensor(tensor):
    with pytest.raises(ValueError, match="quantize_int_gptq_tensor"):
        _torch.quantize_int_gptq_tensor(tensor, 4, 32, True, 1)


# ----------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("shape", [(7, 100, 64), (33, 200, 128), (13, 100, -1), (1, 64, 32)], ids=_case_id)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_dequantize_inverts_packing(shape, bits, sym):
    rows, cols, group = shape
    rng = np.random.default_rng(5)
    buf, values = _encode(_edge_rows(rows, cols, bits, rng), "F16")
    zo = _zero_offset(sym)
    qweight, qzeros, scales = _C.quantize_int_gptq(buf, "F16", rows, cols, bits, group, sym, zo)
    deq = _C.dequantize_int_gptq(qweight, qzeros, scales, rows, cols, bits, group, sym, zo)
    assert deq.dtype == np.float32 and deq.shape == (rows, cols)
    _, _, _, q_minus_zp, sf = torch_rtn(torch.from_numpy(values), bits, group, sym, zo)
    g = _layout(rows, cols, bits, group)[0]
    want = (q_minus_zp.float() * sf.repeat_interleave(g, 1))[:rows, :cols].numpy()
    np.testing.assert_array_equal(deq, want)
    # RTN error bound on the random rows (past the 12 planted edge rows): within one step (clamping at
    # the non-dominant extreme can cost more than half a step).
    step = np.abs(sf.repeat_interleave(g, 1)[:rows, :cols].numpy())
    err = np.abs(deq - values)[12:]
    assert (err <= step[12:] * (1 + 1e-5)).all()


def test_dequantize_rejects_mismatched_shapes():
    w = np.zeros((8, 64), np.float32)
    qweight, qzeros, scales = _C.quantize_int_gptq(w, "F32", 8, 64, 4, 32, True, 1)
    with pytest.raises(ValueError, match="do not match"):
        _C.dequantize_int_gptq(qweight, qzeros, scales, 8, 96, 4, 32, True, 1)


# ----------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    "cols,group,bits",
    [(12, 12, 2), (20, 10, 4), (20, 10, 2), (100, 100, 4)],
)
def test_unpackable_shape_raises(cols, group, bits):
    w = np.zeros((8, cols), np.float32)
    with pytest.raises(ValueError, match="not a multiple of"):
        _C.quantize_int_gptq(w, "F32", 8, cols, bits, group, True, 1)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(bits=3), "bits"),
        (dict(bits=16), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-2), "group_size"),
        (dict(dtype="I32"), "dtype"),
        (dict(dtype="F64"), "dtype"),
        (dict(rows=9), "bytes"),
    ],
)
def test_bad_arguments_raise(kwargs, pattern):
    args = dict(dtype="F32", rows=8, cols=64, bits=4, group_size=32, sym=True, zero_offset=1)
    args.update(kwargs)
    w = np.zeros((8, 64), np.float32)
    with pytest.raises(ValueError, match=pattern):
        _C.quantize_int_gptq(w, args["dtype"], args["rows"], args["cols"], args["bits"], args["group_size"],
                             args["sym"], args["zero_offset"])


# ----------------------------------------------------------------------------------------------
# count_nonfinite: the NaN/Inf check model-free runs on every weight before quantizing it

_NP_DTYPE = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}


def _decoded(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return bits.view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [0, 1, 7, 65536, 3 * 65536 + 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_nonfinite_fast_matches_ref(dtype, n, threads, restore_threads):
    """Random bit patterns (every exponent, so NaN, Inf, subnormals and signs) plus planted specials."""
    _C.set_num_threads(threads)
    rng = np.random.default_rng(zlib.crc32(f"{dtype}{n}".encode()))
    kind = _NP_DTYPE[dtype]
    bits = rng.integers(0, np.iinfo(kind).max, n, dtype=kind, endpoint=True)
    if n >= 7:  # +Inf, -Inf, a quiet and a signalling NaN, and the largest finite value, at chunk edges
        specials = {"F32": [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x7F7FFFFF],
                    "F16": [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x7BFF],
                    "BF16": [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x7F7F]}[dtype]  # fmt: skip
        bits[[0, n - 1, n // 2, min(n - 1, 65535), min(n - 1, 65536)]] = specials
    want = int(np.count_nonzero(~np.isfinite(_decoded(bits, dtype))))
    assert _C.count_nonfinite(bits, dtype, reference=True) == want
    assert _C.count_nonfinite(bits, dtype) == want


def test_count_nonfinite_rejects_other_dtypes():
    with pytest.raises(ValueError, match="I32"):
        _C.count_nonfinite(np.zeros(4, np.int32), "I32")
