"""Run-time instruction-set choice: every kernel path this CPU has gives the scalar reference's bytes.

* the ISA choke point: ``_C.isa()`` / ``_C.set_isa()`` / ``_C.isa_supported()``, the FASTROUND_ISA override,
  and a clear ValueError for an unknown name or an ISA the CPU lacks;
* for each supported ISA (scalar, avx2, avx512): INT RTN + auto_gptq packing, MXFP4/8 and NVFP4_E5M3
  (packed and fake), plain and opt-RTN, on bf16 / fp16 / fp32 with the edge rows of test_kernels.py and
  test_fp_kernels.py, odd shapes and group sizes, NaN / inf / signalling-NaN sources, 1 vs 2 threads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import test_fp_kernels as fpk
import test_kernels as intk

import fastround  # a broken build must fail here, not skip
_C = fastround._C

ALL_ISAS = ["scalar", "avx2", "avx512"]
ISAS = [name for name in ALL_ISAS if _C.isa_supported(name)]


@pytest.fixture
def restore():
    isa, threads = _C.isa(), _C.max_threads()
    yield
    _C.set_isa(isa)
    _C.set_num_threads(threads)


def on_each_isa(fn):
    """{isa: fn()} with the kernels switched to each supported ISA in turn."""
    out = {}
    for name in ISAS:
        _C.set_isa(name)
        assert _C.isa() == name
        out[name] = fn()
    return out


def assert_all_equal(results: dict, ref, what: str) -> None:
    for name, got in results.items():
        for i, (a, b) in enumerate(zip(got, ref)):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: output {i} on {name} vs the scalar reference")


# ----------------------------------------------------------------------------------------------
# the choke point


def test_scalar_always_supported_and_default_is_best():
    assert "scalar" in ISAS
    # with no override the best ISA the CPU has is active (the test run sets no FASTROUND_ISA)
    if "FASTROUND_ISA" not in os.environ:
        assert _C.isa() == ISAS[-1]


def test_set_isa_round_trip(restore):
    for name in ISAS:
        _C.set_isa(name)
        assert _C.isa() == name


def test_unknown_isa_raises(restore):
    before = _C.isa()
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        _C.set_isa("sse9")
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C.isa_supported("neon2")
    assert _C.isa() == before


@pytest.mark.skipif(len(ISAS) == len(ALL_ISAS), reason="this CPU runs every instruction set")
def test_missing_isa_raises(restore):
    missing = next(name for name in ALL_ISAS if name not in ISAS)
    before = _C.isa()
    with pytest.raises(ValueError, match=f"this CPU cannot run the {missing} kernels"):
        _C.set_isa(missing)
    assert _C.isa() == before


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTROUND_ISA=value)
    code = "import fastround._C as C; print(C.isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("name", ISAS)
def test_env_override(name):
    r = _isa_in_subprocess(name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_env_override_unknown_is_a_clear_error():
    r = _isa_in_subprocess("avx9000")
    assert r.returncode != 0
    assert "FASTROUND_ISA: unknown instruction set 'avx9000'" in r.stderr


# ----------------------------------------------------------------------------------------------
# INT RTN + pack

# (rows, cols, group): whole-vector groups take the SIMD path, the others (12, 20) the scalar one.
INT_SHAPES = [(1, 128, 128), (33, 256, 128), (40, 192, 64), (17, 96, 32), (5, 136, -1), (9, 96, 48), (9, 96, 12),
              (7, 40, 20)]


# Unpackable widths are left out; test_kernels.py covers their error.
INT_CASES = [(shape, bits) for shape in INT_SHAPES for bits in (2, 4, 8) if intk._valid(shape[1], bits, shape[2])]


@pytest.mark.parametrize("case", INT_CASES, ids=intk._packable_id)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_int_every_isa_equals_reference(case, sym, dtype, restore):
    shape, bits = case
    rows, cols, group = shape
    rng = np.random.default_rng(intk._seed("isa", shape, bits, sym, dtype))
    buf, _ = intk._encode(intk._edge_rows(rows, cols, bits, rng), dtype)
    zo = intk._zero_offset(sym)
    ref = _C.quantize_int_gptq(buf, dtype, rows, cols, bits, group, sym, zo, reference=True)
    got = on_each_isa(lambda: _C.quantize_int_gptq(buf, dtype, rows, cols, bits, group, sym, zo, reference=False))
    assert_all_equal(got, ref, f"int{bits} {dtype} {shape}")


def _nonfinite_f32(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, 3] = np.nan
    w[1, 0] = np.inf
    w[2, 5] = -np.inf
    w[3, :] = np.nan
    w[4, 7] = np.float32(1e-42)  # fp32 subnormal
    return w


def _f16_with_snan(rows: int, cols: int, seed: int) -> np.ndarray:
    h = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float16).view(np.uint16).copy()
    h[0, 1] = 0x7C01  # signalling NaN: the scalar decoder keeps its payload
    h[1, 9] = 0xFE00  # negative quiet NaN
    h[2, 2] = 0x7C00  # inf
    h[3, 4] = 0x0001  # smallest fp16 subnormal
    return h


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_int_nonfinite_sources(bits, sym, restore):
    for dtype, buf in (("F32", _nonfinite_f32(8, 128, bits)), ("F16", _f16_with_snan(8, 128, bits))):
        ref = _C.quantize_int_gptq(buf, dtype, 8, 128, bits, 64, sym, 0, reference=True)
        got = on_each_isa(lambda: _C.quantize_int_gptq(buf, dtype, 8, 128, bits, 64, sym, 0, reference=False))
        assert_all_equal(got, ref, f"int{bits} {dtype} non-finite")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_threads(bits, restore):
    rng = np.random.default_rng(bits)
    buf, _ = intk._encode(intk._edge_rows(100, 512, bits, rng), "BF16")
    outs = []
    for name in ISAS:
        _C.set_isa(name)
        for t in (1, 2):
            _C.set_num_threads(t)
            outs.append(_C.quantize_int_gptq(buf, "BF16", 100, 512, bits, 128, True, 1, reference=False))
    for o in outs[1:]:
        assert_all_equal({"threads": o}, outs[0], f"int{bits} threads")


# ----------------------------------------------------------------------------------------------
# MXFP / NVFP4_E5M3

MX_SHAPES = [(1, 32), (3, 64), (17, 128), (40, 160)]
NV_SHAPES = [(1, 16), (5, 48), (17, 128), (40, 256)]


@pytest.mark.parametrize("shape", MX_SHAPES, ids=fpk._sid)
@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("bits", [4, 8], ids=["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_mxfp_every_isa_equals_reference(shape, opt_rtn, bits, dtype, restore):
    rows, cols = shape
    buf = fpk.raw_bytes(fpk.make_weight(rows, cols, dtype, fpk._seed("isa-mx", dtype, bits, opt_rtn, shape)))
    ref = _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt_rtn, True)
    got = on_each_isa(lambda: _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt_rtn, False))
    assert_all_equal(got, ref, f"mxfp{bits} {dtype} {shape}")


@pytest.mark.parametrize("shape", NV_SHAPES, ids=fpk._sid)
@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_nvfp4_every_isa_equals_reference(shape, opt_rtn, dtype, restore):
    rows, cols = shape
    buf = fpk.raw_bytes(fpk.make_weight(rows, cols, dtype, fpk._seed("isa-nv", dtype, opt_rtn, shape)))
    ref = _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn, True)
    got = on_each_isa(lambda: _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn, False))
    assert_all_equal(got, ref, f"nvfp4 {dtype} {shape}")
    _C.set_isa("scalar")
    fake_ref = _C.fake_quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn)
    fake = on_each_isa(lambda: (_C.fake_quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn),))
    assert_all_equal(fake, (fake_ref,), f"nvfp4 fake {dtype} {shape}")


def _magnitude_sweep(rows: int, cols: int, dtype: str, seed: int) -> bytes:
    """Every row a different magnitude from 2^-40 to 2^40: shared exponents, UE5M3 subnormal and saturated
    scales, candidate bytes of every spacing."""
    rng = np.random.default_rng(seed)
    lo, hi = {"F16": (-20, 14), "BF16": (-40, 40), "F32": (-40, 40)}[dtype]
    mags = 2.0 ** np.linspace(lo, hi, rows)[:, None]
    w = rng.standard_normal((rows, cols)) * mags
    w[:, ::7] = np.round(w[:, ::7] * 4) / 4  # some values on coarse grids
    return fpk.raw_bytes(torch.from_numpy(w).to(fpk.DTYPES[dtype]))


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
def test_magnitude_sweep_every_isa(dtype, opt_rtn, restore):
    rows, cols = 97, 256
    buf = _magnitude_sweep(rows, cols, dtype, 7)
    for bits in (4, 8):
        ref = _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt_rtn, True)
        assert_all_equal(on_each_isa(lambda: _C.quantize_mxfp(buf, dtype, rows, cols, bits, opt_rtn, False)), ref,
                         f"mxfp{bits} sweep")
    ref = _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn, True)
    assert_all_equal(on_each_isa(lambda: _C.quantize_nvfp4_e5m3(buf, dtype, rows, cols, opt_rtn, False)), ref,
                     "nvfp4 sweep")


@pytest.mark.parametrize("opt_rtn", [False, True], ids=["plain", "opt"])
def test_fp_nonfinite_sources(opt_rtn, restore):
    for dtype, buf in (("F32", _nonfinite_f32(8, 128, 1)), ("F16", _f16_with_snan(8, 128, 2))):
        for bits in (4, 8):
            ref = _C.quantize_mxfp(buf, dtype, 8, 128, bits, opt_rtn, True)
            assert_all_equal(on_each_isa(lambda: _C.quantize_mxfp(buf, dtype, 8, 128, bits, opt_rtn, False)), ref,
                             f"mxfp{bits} {dtype} non-finite")
        ref = _C.quantize_nvfp4_e5m3(buf, dtype, 8, 128, opt_rtn, True)
        assert_all_equal(on_each_isa(lambda: _C.quantize_nvfp4_e5m3(buf, dtype, 8, 128, opt_rtn, False)), ref,
                         f"nvfp4 {dtype} non-finite")
        _C.set_isa("scalar")
        fake_ref = _C.fake_quantize_nvfp4_e5m3(buf, dtype, 8, 128, opt_rtn)
        fake = on_each_isa(lambda: (_C.fake_quantize_nvfp4_e5m3(buf, dtype, 8, 128, opt_rtn),))
        assert_all_equal(fake, (fake_ref,), f"nvfp4 fake {dtype} non-finite")


def test_fp_threads(restore):
    buf = _magnitude_sweep(64, 512, "BF16", 3)
    outs = []
    for name in ISAS:
        _C.set_isa(name)
        for t in (1, 2):
            _C.set_num_threads(t)
            outs.append(_C.quantize_mxfp(buf, "BF16", 64, 512, 4, True, False)
                        + _C.quantize_nvfp4_e5m3(buf, "BF16", 64, 512, True, False))
    for o in outs[1:]:
        assert_all_equal({"threads": o}, outs[0], "fp threads")
