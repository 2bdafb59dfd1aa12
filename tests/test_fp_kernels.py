"""The C++ MXFP4 / MXFP8 / NVFP4_E5M3 kernels, bit for bit.

* fast path vs the scalar reference path (``reference=True``);
* both vs upstream auto-round 0.16.1's own kernel functions
  (``auto_round.utils.model_free_utils._quantize_weight_mxfp``, ``_pack_weight_nvfp4_e5m3``,
  ``_quantize_weight_nvfp4_e5m3``), plain and opt-RTN, on random bf16 / fp16 / fp32 weights with
  edge rows planted (±0, one value per group, huge / tiny / subnormal magnitudes, fp32 values just
  below powers of two, grid ties, the non-RNE rounding corner, UE5M3 carry, d == 0 NVFP4 groups);
* the upstream-generated test vectors (tests/data/fp-test-vectors.json, copied from
  /work/notes/fp-test-vectors.json);
* 1 vs 2 threads;
* dequantize_mxfp / dequantize_nvfp4_e5m3 vs the formula (element value * 2^(byte-127), resp. the
  decoded UE5M3 scale), and the fake path vs the packed path;
* in_features not a multiple of the group size raises ValueError.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

fastround = pytest.importorskip("fastround")
_C = fastround._C

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
VECTOR_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
VECTORS = Path(__file__).resolve().parent / "data" / "fp-test-vectors.json"

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# upstream kernels (imported lazily: auto_round takes seconds to import)


def _upstream():
    mf = pytest.importorskip("auto_round.utils.model_free_utils")
    return mf


def up_mxfp(w: torch.Tensor, bits: int, opt_rtn: bool) -> tuple[np.ndarray, np.ndarray]:
    """(weight bytes u8, scale u8) from upstream's _quantize_weight_mxfp."""
    # clone: opt-RTN divides an fp32 input in place.
    out = _upstream()._quantize_weight_mxfp(w.clone(), "L", bits, 32, "mx_fp", "cpu", disable_opt_rtn=not opt_rtn)
    if bits == 4:
        weight = out["L.weight_packed"]
    else:
        assert out["L.weight"].dtype == torch.float8_e4m3fn
        weight = out["L.weight"].view(torch.uint8)
    return weight.numpy(), out["L.weight_scale"].numpy()


def up_nvfp4_packed(w: torch.Tensor, opt_rtn: bool) -> tuple[np.ndarray, np.ndarray]:
    out = _upstream()._pack_weight_nvfp4_e5m3(w.clone(), "L", 16, "cpu", disable_opt_rtn=not opt_rtn)
    return out["L.weight_packed"].numpy(), out["L.weight_scale"].numpy()


def up_nvfp4_fake(w: torch.Tensor, opt_rtn: bool) -> np.ndarray:
    out = _upstream()._quantize_weight_nvfp4_e5m3(w.clone(), "L", 16, "cpu", disable_opt_rtn=not opt_rtn)
    q = out["L.weight"]
    assert q.dtype == w.dtype and q.shape == w.shape
    return raw_u8(q)


# ----------------------------------------------------------------------------------------------
# data


def raw_u8(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor as u8 [rows, cols*itemsize]."""
    t = t.contiguous()
    return t.view(torch.uint8).numpy().reshape(t.shape[0], -1)


def raw_bytes(t: torch.Tensor) -> bytes:
    return raw_u8(t).tobytes()


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _below_pow2(k: int, dtype: str) -> float:
    """Largest value of `dtype` below 2^k."""
    if dtype == "F32":
        return float(np.nextafter(np.float32(2.0**k), np.float32(0)))
    mant = {"BF16": 8, "F16": 11}[dtype]
    return 2.0**k * (1 - 2.0**-mant)


def _huge(dtype: str) -> float:
    return {"BF16": 3.0e38, "F16": 60000.0, "F32": 3.0e38}[dtype]


def _tiny(dtype: str) -> float:
    # subnormal in each dtype
    return {"BF16": 1.0e-39, "F16": 1.0e-7, "F32": 1.0e-42}[dtype]


def _edge_rows(cols: int, dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows (float64 values, cast to the dtype later) that hit the kernels' corners."""

    def tile(values) -> np.ndarray:
        return np.resize(np.asarray(values, dtype=np.float64), cols)

    def per_group(fn, width: int = 16) -> np.ndarray:
        row = np.zeros(cols)
        for g in range(0, cols, width):
            row[g : g + width] = fn(g // width)
        return row

    rand = lambda n, s=1.0: rng.standard_normal(n) * s  # noqa: E731
    ties = [6.0, 0.25, -0.75, 1.25, -1.75, 2.5, -3.5, 5.0, 0.5, -1.0, 1.5, 2.0, -3.0, 4.0, -0.0, 0.0]
    below = [_below_pow2(k, dtype) * (-1) ** k for k in range(-6, 10)]
    return [
        np.zeros(cols),  # all +0: MXFP4 0x7E, MXFP8 0x78, NVFP4 0x00
        np.full(cols, -0.0),  # all -0: codes +0
        tile([0.0, -0.0]),  # alternating ±0
        per_group(lambda g: np.eye(16)[g % 16] * rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 2)),  # one value/group
        tile([_huge(dtype), -_huge(dtype) / 3, 1.0, -7.0, _huge(dtype) / 1000, 0.0]),  # huge
        tile([_tiny(dtype), -_tiny(dtype), 0.0, 3 * _tiny(dtype)]),  # subnormal-only groups
        np.concatenate([rand(cols // 2, 1e-30), rand(cols - cols // 2, 1e3)]) if dtype == "F32"
        else np.concatenate([rand(cols // 2, 1e-5), rand(cols - cols // 2, 1e2)]),  # mixed magnitudes
        tile(below),  # just below powers of two (log2 round-up table)
        tile(ties),  # ties of the FP4 grid (scale 1)
        tile([t * 2.0**-9 for t in ties]),  # same, smaller scale
        tile([4.0, 0.25 - 2.0**-26, -(0.25 - 2.0**-26), 0.75, 0.0, -0.1]),  # non-RNE rounding corner (fp32)
        tile([1.0] + [-0.01] * 15),  # negatives rounding to zero: code 8 / 0x80
        tile([1e-6, -1e-6] + [0.0] * 14),  # NVFP4: scale encodes to 0 (d == 0)
        tile([11.625, -1.0, 0.3, 5.0] + [0.1] * 12),  # UE5M3 carry: 11.625/6 = 1.9375
        tile([448.0, -480.0, 464.0, 0.5, 240.0, 1.0]),  # FP8 grid top / saturation
        tile([60000.0, 1000.0, -500.0, 7.0]),  # fp16: opt-RTN candidate 2.0 overflows qdq in fp16
        rand(cols, 10 ** rng.uniform(-4, 1)),
    ]


def make_weight(rows: int, cols: int, dtype: str, seed: int, edges: bool = True) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    scales = 10 ** rng.uniform(-3, 1, size=(rows, 1))
    w = rng.standard_normal((rows, cols)) * scales
    if edges:
        planted = _edge_rows(cols, dtype, rng)
        # start at a seed-dependent edge so 1-row shapes see different edges
        start = seed % len(planted)
        for i in range(min(rows, len(planted))):
            w[i] = planted[(start + i) % len(planted)]
    t = torch.from_numpy(w)  # float64, -0.0 preserved
    return t.to(DTYPES[dtype]).contiguous()


def _huge_fp16_overflow_case() -> torch.Tensor:
    """[1, 32] fp16 row where upstream's MXFP4 opt-RTN picks candidate 2.0 and qdq=65536 -> fp16 inf."""
    return torch.tensor([[60000.0, 1000.0, -500.0, 7.0] * 8], dtype=torch.float16)


# Shapes: 1 row; cols 32 (one group); cols 48 (NVFP4 only); not multiples of 8/16 in rows.
MX_SHAPES = [(1, 32), (1, 96), (3, 64), (17, 128), (40, 160), (64, 512)]
NV_SHAPES = [(1, 16), (1, 48), (5, 48), (17, 128), (40, 256)]


def _sid(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


# ----------------------------------------------------------------------------------------------
# MXFP4 / MXFP8


@pytest.mark.parametrize("shape", MX_SHAPES, ids=_sid)
@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("bits", [4, 8], ids=["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mxfp_fast_reference_upstream(dtype, bits, opt_rtn, shape):
    rows, cols = shape
    w = make_weight(rows, cols, dtype, _seed("mx", dtype, bits, opt_rtn, shape))
    buf = raw_bytes(w)
    fast = _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt_rtn, False)
    ref = _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt_rtn, True)
    wcols = cols // 2 if bits == 4 else cols
    assert fast[0].dtype == np.uint8 and fast[0].shape == (rows, wcols)
    assert fast[1].dtype == np.uint8 and fast[1].shape == (rows, cols // 32)
    np.testing.assert_array_equal(fast[0], ref[0], err_msg="weight: fast vs reference")
    np.testing.assert_array_equal(fast[1], ref[1], err_msg="scale: fast vs reference")
    assert fast[1].max() <= 0xFE
    uw, us = up_mxfp(w, bits, opt_rtn)
    np.testing.assert_array_equal(fast[1], us, err_msg="scale vs upstream")
    np.testing.assert_array_equal(fast[0], uw, err_msg="weight vs upstream")


@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("bits", [4, 8], ids=["mxfp4", "mxfp8"])
def test_mxfp_fp16_qdq_overflow(bits, opt_rtn):
    """fp16 group max 60000: the candidate-2.0 qdq is 65536, inf once cast back to fp16 (upstream casts)."""
    w = _huge_fp16_overflow_case()
    fast = _C.quantize_mxfp(raw_bytes(w), "F16", 1, 32, bits, opt_rtn, False)
    ref = _C.quantize_mxfp(raw_bytes(w), "F16", 1, 32, bits, opt_rtn, True)
    uw, us = up_mxfp(w, bits, opt_rtn)
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_array_equal(fast[1], ref[1])
    np.testing.assert_array_equal(fast[1], us)
    np.testing.assert_array_equal(fast[0], uw)


def test_mxfp_negative_zero_and_zero_groups():
    """Documented bytes: ±0 groups give scale 0x7E (FP4) / 0x78 (FP8) and all-zero codes (no 0x8)."""
    for dtype in DTYPES:
        w = torch.tensor([[0.0] * 32, [-0.0] * 32, [0.0, -0.0] * 16], dtype=torch.float64).to(DTYPES[dtype])
        for opt in (False, True):
            q4, s4 = _C.quantize_mxfp(raw_bytes(w), dtype, 3, 32, 4, opt, False)
            q8, s8 = _C.quantize_mxfp(raw_bytes(w), dtype, 3, 32, 8, opt, False)
            assert (s4 == 0x7E).all() and (q4 == 0).all()
            assert (s8 == 0x78).all() and (q8 == 0).all()


def test_mxfp_rounding_corner_fp32():
    """|u| = 0.5 - 2^-25 rounds up to 1 (upstream's floor(a+0.5) - mask formula), not to 0 (RNE)."""
    w = torch.tensor([[4.0, 0.25 - 2.0**-26] + [0.0] * 30], dtype=torch.float32)
    q, s = _C.quantize_mxfp(raw_bytes(w), "F32", 1, 32, 4, False, False)
    assert s[0, 0] == 127  # 2^(2 - 2) = 1
    assert q[0, 0] == (0x6 | (0x1 << 4))  # 4.0 -> code 6, 0.25-2^-26 -> 0.5 (code 1)
    uw, us = up_mxfp(w, 4, False)
    np.testing.assert_array_equal(q, uw)
    np.testing.assert_array_equal(s, us)


# ----------------------------------------------------------------------------------------------
# NVFP4_E5M3


@pytest.mark.parametrize("shape", NV_SHAPES, ids=_sid)
@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nvfp4_packed_fast_reference_upstream(dtype, opt_rtn, shape):
    rows, cols = shape
    w = make_weight(rows, cols, dtype, _seed("nv", dtype, opt_rtn, shape))
    buf = raw_bytes(w)
    fast = _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn, False)
    ref = _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn, True)
    assert fast[0].dtype == np.uint8 and fast[0].shape == (rows, cols // 2)
    assert fast[1].dtype == np.uint8 and fast[1].shape == (rows, cols // 16)
    np.testing.assert_array_equal(fast[0], ref[0], err_msg="packed: fast vs reference")
    np.testing.assert_array_equal(fast[1], ref[1], err_msg="scale: fast vs reference")
    up, us = up_nvfp4_packed(w, opt_rtn)
    np.testing.assert_array_equal(fast[1], us, err_msg="scale vs upstream")
    np.testing.assert_array_equal(fast[0], up, err_msg="packed vs upstream")


@pytest.mark.parametrize("shape", NV_SHAPES, ids=_sid)
@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nvfp4_fake_upstream(dtype, opt_rtn, shape):
    rows, cols = shape
    w = make_weight(rows, cols, dtype, _seed("nvfake", dtype, opt_rtn, shape))
    fake = _C.fake_quantize_nvfp4_e5m3(raw_bytes(w), dtype, rows, cols, opt_rtn)
    itemsize = w.element_size()
    assert fake.dtype == np.uint8 and fake.shape == (rows, cols * itemsize)
    np.testing.assert_array_equal(fake, up_nvfp4_fake(w, opt_rtn), err_msg="fake weight vs upstream")

    # The fake weight is the packed weight dequantized and cast to the source dtype (values equal;
    # a d == 0 group dequantizes to -0 where the packed code is 0xF while fake writes +0).
    packed, scale = _C.quantize_nvfp4_e5m3(raw_bytes(w), dtype, rows, cols, opt_rtn, False)
    deq = torch.from_numpy(_C.dequantize_nvfp4_e5m3(packed, scale, rows, cols)).to(DTYPES[dtype])
    fake_t = torch.from_numpy(fake.copy()).view(DTYPES[dtype]).reshape(rows, cols)
    assert torch.equal(deq, fake_t)


def test_nvfp4_zero_scale_group():
    """Scale < 2^-18 encodes to 0x00: pack gives codes 7 / 0xF from x/0 (upstream quirk), fake gives 0."""
    for dtype in DTYPES:
        w = torch.tensor([[1e-6, -1e-6] + [0.0] * 14], dtype=torch.float64).to(DTYPES[dtype])
        for opt in (False, True):
            packed, scale = _C.quantize_nvfp4_e5m3(raw_bytes(w), dtype, 1, 16, opt, False)
            assert scale.tolist() == [[0]]
            assert packed[0, 0] == 0xF7 and (packed[0, 1:] == 0).all()
            up, us = up_nvfp4_packed(w, opt)
            np.testing.assert_array_equal(packed, up)
            np.testing.assert_array_equal(scale, us)
            fake = _C.fake_quantize_nvfp4_e5m3(raw_bytes(w), dtype, 1, 16, opt)
            assert (fake == 0).all()


# ----------------------------------------------------------------------------------------------
# test vectors generated from upstream


def _vector_cases() -> list[dict]:
    return json.loads(VECTORS.read_text())["cases"]


@pytest.mark.parametrize("case", _vector_cases(), ids=lambda c: c["name"])
def test_vectors(case):
    dtype = VECTOR_DTYPES[case["src_dtype"]]
    rows, cols = case["shape"]
    buf = bytes.fromhex(case["input"])
    outs = case["outputs"]
    checked = 0
    for bits in (4, 8):
        for mode, opt in (("plain", False), ("optrtn", True)):
            exp = outs[f"mxfp{bits}_{mode}"]
            wkey = "weight_packed" if bits == 4 else "weight"
            for reference in (False, True):
                q, s = _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt, reference)
                assert s.tobytes().hex() == exp["weight_scale"], (bits, mode, reference)
                assert q.tobytes().hex() == exp[wkey], (bits, mode, reference)
                checked += 1
    for mode, opt in (("plain", False), ("optrtn", True)):
        exp = outs[f"nvfp4_e5m3_{mode}"]
        for reference in (False, True):
            p, s = _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt, reference)
            assert s.tobytes().hex() == exp["weight_scale"], (mode, reference)
            assert p.tobytes().hex() == exp["weight_packed"], (mode, reference)
            checked += 1
        fake = _C.fake_quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt)
        assert fake.tobytes().hex() == exp["fake_weight"], mode
    assert checked == 12


def test_vectors_match_upstream_kernels():
    """The vectors file itself is still what the installed upstream produces (guards a stale copy)."""
    case = next(c for c in _vector_cases() if c["name"] == "loss_order_sensitive_float32")
    rows, cols = case["shape"]
    w = torch.frombuffer(bytearray.fromhex(case["input"]), dtype=torch.float32).reshape(rows, cols)
    uw, us = up_mxfp(w, 4, True)
    assert us.tobytes().hex() == case["outputs"]["mxfp4_optrtn"]["weight_scale"] == "87"
    assert uw.tobytes().hex() == case["outputs"]["mxfp4_optrtn"]["weight_packed"]


# ----------------------------------------------------------------------------------------------
# threads


@pytest.fixture
def restore_threads():
    n = _C.max_threads()
    yield
    _C.set_num_threads(n)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_threads_do_not_change_output(dtype, restore_threads):
    rows, cols = 203, 1024  # many rows so both threads get work; edge rows included
    w = make_weight(rows, cols, dtype, _seed("threads", dtype))
    buf = raw_bytes(w)

    def run_all():
        out = []
        for bits in (4, 8):
            for opt in (False, True):
                out += list(_C.quantize_mxfp(buf, dtype, rows, cols, bits, opt, False))
        for opt in (False, True):
            out += list(_C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt, False))
            out.append(_C.fake_quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt))
        return out

    _C.set_num_threads(1)
    one = run_all()
    _C.set_num_threads(2)
    two = run_all()
    assert len(one) == len(two) == 14
    for i, (a, b) in enumerate(zip(one, two)):
        np.testing.assert_array_equal(a, b, err_msg=f"output {i} differs between 1 and 2 threads")


# ----------------------------------------------------------------------------------------------
# dequantization


def _e4m3_values(codes: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).to(torch.float64).numpy()


def _e2m1_values(packed: np.ndarray) -> np.ndarray:
    lo, hi = packed & 0xF, packed >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)
    vals = E2M1[codes & 7]
    return np.where(codes & 8, -vals, vals)


def _ue5m3_values(scale: np.ndarray) -> np.ndarray:
    e = (scale >> 3).astype(np.int64)
    m = (scale & 7).astype(np.float64)
    v = np.where(e == 0, m / 8 * 2.0**-14, (1 + m / 8) * np.exp2(e - 15.0))
    return np.where(scale == 0xFF, np.nan, v)


def upstream_style_dequant_mxfp(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """element value * 2^(scale - 127), exact in float64, rounded once to float32."""
    vals = _e2m1_values(weight) if bits == 4 else _e4m3_values(weight)
    factor = np.exp2(scale.astype(np.float64) - 127.0).repeat(32, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        return (vals * factor).astype(np.float32)


def _assert_same_floats(a: np.ndarray, b: np.ndarray, msg: str) -> None:
    assert a.shape == b.shape, msg
    assert a.dtype == b.dtype == np.float32, msg
    # bit equality, but any NaN matches any NaN
    both_nan = np.isnan(a) & np.isnan(b)
    bad = (a.view(np.uint32) != b.view(np.uint32)) & ~both_nan
    assert not bad.any(), f"{msg}: {int(bad.sum())} element(s) differ, first at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("bits", [4, 8], ids=["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_mxfp_matches_formula(dtype, bits, opt_rtn):
    rows, cols = 40, 256
    w = make_weight(rows, cols, dtype, _seed("deq", dtype, bits, opt_rtn))
    q, s = _C.quantize_mxfp(raw_bytes(w), dtype, rows, cols, bits, opt_rtn, False)
    got = _C.dequantize_mxfp(q, s, rows, cols, bits)
    _assert_same_floats(got, upstream_style_dequant_mxfp(q, s, bits), "dequantize_mxfp vs formula")
    # and of upstream's own bytes (the same bytes, if the kernel tests pass)
    uw, us = up_mxfp(w, bits, opt_rtn)
    _assert_same_floats(_C.dequantize_mxfp(uw, us, rows, cols, bits), upstream_style_dequant_mxfp(uw, us, bits),
                        "dequantize_mxfp of upstream bytes")


@pytest.mark.parametrize("bits", [4, 8], ids=["mxfp4", "mxfp8"])
def test_dequantize_mxfp_all_codes_and_scales(bits):
    """Every element byte against every E8M0 byte 0..254 (two scales per row, mixed).

    Byte 0xFF is the OCP E8M0 NaN: fastround decodes it to NaN (compressed-tensors 0.20 decodes
    it as 2^128 = inf). The quantizers never write it: upstream's byte is clamp(e+127) with
    e <= 127, i.e. at most 0xFE.
    """
    scales = np.arange(255, dtype=np.uint8)
    rows = scales.size
    cols = 512 if bits == 4 else 256  # every byte value (two FP4 codes / one E4M3 code, NaNs too) per row
    q = np.tile(np.arange(256, dtype=np.uint8), (rows, 1))
    s = np.repeat(scales[:, None], cols // 32, axis=1)
    s[:, 1::2] = s[::-1, 1::2]  # mix scales within a row
    s = np.ascontiguousarray(s)
    got = _C.dequantize_mxfp(q, s, rows, cols, bits)
    _assert_same_floats(got, upstream_style_dequant_mxfp(q, s, bits), "dequantize_mxfp vs formula")

    nan_scale = np.full((1, cols // 32), 0xFF, dtype=np.uint8)
    assert np.isnan(_C.dequantize_mxfp(q[:1], nan_scale, 1, cols, bits)).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_nvfp4_matches_formula(dtype):
    rows, cols = 40, 256
    w = make_weight(rows, cols, dtype, _seed("deqnv", dtype))
    p, s = _C.quantize_nvfp4_e5m3(raw_bytes(w), dtype, rows, cols, True, False)
    got = _C.dequantize_nvfp4_e5m3(p, s, rows, cols)
    exp = (_e2m1_values(p) * _ue5m3_values(s).repeat(16, axis=1)).astype(np.float32)
    _assert_same_floats(got, exp, "dequantize_nvfp4_e5m3 vs formula")


# ----------------------------------------------------------------------------------------------
# bad shapes


@pytest.mark.parametrize("cols", [16, 48, 40, 100, 33])
@pytest.mark.parametrize("bits", [4, 8])
def test_mxfp_cols_not_multiple_of_32_raises(bits, cols):
    rows = 3
    w = make_weight(rows, cols, "BF16", 1, edges=False)
    for opt in (False, True):
        for reference in (False, True):
            with pytest.raises(ValueError, match="32"):
                _C.quantize_mxfp(raw_bytes(w), "BF16", rows, cols, bits, opt, reference)
    # upstream refuses the same shapes
    with pytest.raises(ValueError):
        up_mxfp(w, bits, True)


@pytest.mark.parametrize("cols", [8, 24, 40, 100])
def test_nvfp4_cols_not_multiple_of_16_raises(cols):
    rows = 3
    w = make_weight(rows, cols, "F16", 2, edges=False)
    for opt in (False, True):
        for reference in (False, True):
            with pytest.raises(ValueError, match="16"):
                _C.quantize_nvfp4_e5m3(raw_bytes(w), "F16", rows, cols, opt, reference)
        with pytest.raises(ValueError, match="16"):
            _C.fake_quantize_nvfp4_e5m3(raw_bytes(w), "F16", rows, cols, opt)
    with pytest.raises(ValueError):
        up_nvfp4_packed(w, True)
