"""torch.ops.fastround.woq_linear (fastround/infer_ops.py, cpp/fastround/infer): the packed linear equals
dequantize-then-matmul in fp32 for every layout, bits and grouping, on words written by fastround's packers and by
upstream auto_round's export of a tiny model; the C++ kernels equal their references; the op traces under
torch.compile through its fake kernel; bad inputs raise errors naming the tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import oracle
from cpp_runner import run_cpp_test
from fastround import infer_ops, ops

AWQ_SLOT_OUTPUT = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot s of an AWQ word holds output 8w + AWQ_SLOT_OUTPUT[s]


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] int32 words -> [..., n, 32/bits] unsigned lanes, lane 0 the low bits."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (words.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts & ((1 << bits) - 1)


def unpack_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                     layout: str, in_features: int) -> torch.Tensor:
    """W [out, in] fp32 = (q - z) * s read with torch bit ops, independently of the C++ decoder."""
    if layout == "awq":
        q = _fields(qweight, 4)  # [in, out/8, slot]
        z = _fields(qzeros, 4)
        order = torch.tensor(AWQ_SLOT_OUTPUT)
        q = torch.empty_like(q).index_copy_(-1, order, q).reshape(qweight.shape[0], -1)  # [in, out]
        z = torch.empty_like(z).index_copy_(-1, order, z).reshape(qzeros.shape[0], -1)  # [G, out]
    else:
        q = _fields(qweight, bits).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [in_p, out]
        z = _fields(qzeros, bits).reshape(qzeros.shape[0], -1) + (1 if layout == "gptq" else 0)  # [G, out_p]
    out = scales.shape[1]
    q, z = q[:in_features, :out], z[:, :out]
    gs = in_features if group_size == -1 or group_size > in_features else group_size
    g = torch.arange(in_features) // gs
    return ((q - z[g]).to(torch.float32) * scales.to(torch.float32)[g]).T.contiguous()


def reference_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.float32) @ w.T
    return y + bias.to(torch.float32) if bias is not None else y


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """fp32 summation-order error of sum |x w| (plus, for the matmul path, a bf16 weight) and one output rounding."""
    ref = reference_linear(x, w, bias)
    mag = x.to(torch.float32).abs() @ w.abs().T
    rel = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[x.dtype]
    wrel = 2.0**-8 if x.dtype == torch.bfloat16 else 1e-5
    tol = mag * wrel + ref.abs() * rel + 1e-5
    err = (y.to(torch.float32) - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert bool((err <= tol).all()), f"worst |err|/tol {float((err / tol).max()):.3g}"


# ---- the C++ kernels ----


def test_cpp_fast_equals_reference() -> None:
    run_cpp_test("fastround-test-woq-gemm", 1000)


# ---- words from fastround's packers ----


def _packed_layer(layout: str, bits: int, group_size: int, out_f: int, in_f: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g) * 0.05
    sym = layout == "gptq"
    enc = ops.encode_weight(weight, "int_gptq", bits, group_size, sym)
    row = "int_awq" if layout == "awq" else "int_gptq"
    tensors = dict(ops.pack_codes(enc.codes, enc.scales, enc.zeros, row, bits, group_size, sym,
                                  1 if layout == "gptq" else 0, True))
    gs = in_f if group_size == -1 else group_size
    gi = torch.arange(in_f) // gs
    truth = (enc.codes.to(torch.float32) - enc.zeros[:, gi]) * enc.scales.to(torch.float32)[:, gi]
    return {"tensors": tensors, "truth": truth, "bias": torch.randn(out_f, generator=g)}


CASES = [(layout, bits, gs) for layout in ("gptq", "gptq_v2") for bits in (2, 4, 8) for gs in (32, 128, -1)]
CASES += [("awq", 4, gs) for gs in (32, 128, -1)]


@pytest.mark.parametrize(("layout", "bits", "group_size"), CASES)
def test_fastround_packed_equals_dequantize_matmul(layout: str, bits: int, group_size: int) -> None:
    out_f, in_f = 264, 384  # out not a whole GEMV block: vector blocks and the element tail both run
    layer = _packed_layer(layout, bits, group_size, out_f, in_f, seed=bits * 10 + len(layout))
    t = layer["tensors"]
    w = unpack_reference(t["qweight"], t["qzeros"], t["scales"], bits, group_size, layout, in_f)
    assert torch.equal(w, layer["truth"]), "the torch unpacker disagrees with the codes the packer was given"
    g = torch.Generator().manual_seed(5)
    for m in (1, 3, 9, 40):  # GEMV rows (1 and 2 take the bf16 pair path) and the dequantize + matmul path
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(m, in_f, generator=g).to(dtype)
            bias = layer["bias"] if m % 2 else None
            y = infer_ops.woq_linear(x, t["qweight"], t["qzeros"], t["scales"], bias, bits, group_size, layout)
            assert_close_to_reference(y, x, w, bias)


def test_leading_dims_and_scale_dtypes() -> None:
    layer = _packed_layer("gptq", 4, 128, 128, 256, seed=3)
    t = layer["tensors"]
    w = unpack_reference(t["qweight"], t["qzeros"], t["scales"], 4, 128, "gptq", 256)
    x = torch.randn(2, 3, 256)
    for sdt in (torch.float16, torch.bfloat16, torch.float32):
        scales = t["scales"].to(sdt)
        wd = unpack_reference(t["qweight"], t["qzeros"], scales, 4, 128, "gptq", 256)
        y = infer_ops.woq_linear(x, t["qweight"], t["qzeros"], scales, None, 4, 128, "gptq")
        assert y.shape == (2, 3, 128)
        assert_close_to_reference(y.reshape(6, 128), x.reshape(6, 256), wd, None)
    assert infer_ops.woq_linear(x[:0], t["qweight"], t["qzeros"], t["scales"], None, 4, 128, "gptq").shape == (0, 3, 128)
    assert torch.equal(w, unpack_reference(t["qweight"], t["qzeros"], t["scales"].to(torch.float32), 4, 128, "gptq",
                                           256))


# ---- the tiled word order (QuantLinear's CPU layout) ----


@pytest.mark.parametrize(("layout", "bits", "group_size"), [("gptq", 4, 128), ("gptq_v2", 2, 32), ("gptq", 8, -1)])
def test_tiled_words_equal_dequantize_matmul(layout: str, bits: int, group_size: int) -> None:
    out_f, in_f = 192, 384  # three tiles
    layer = _packed_layer(layout, bits, group_size, out_f, in_f, seed=bits + 40)
    t = layer["tensors"]
    w = unpack_reference(t["qweight"], t["qzeros"], t["scales"], bits, group_size, layout, in_f)
    tiled = infer_ops.woq_tile_qweight(t["qweight"])
    assert tiled.shape == t["qweight"].shape and not torch.equal(tiled, t["qweight"])
    assert torch.equal(infer_ops.woq_tile_qweight(tiled, untile=True), t["qweight"])
    # Tile 1 of row 0 holds outputs 64..127 of the checkpoint's row 0.
    assert torch.equal(tiled.reshape(-1)[t["qweight"].shape[0] * 64:][:64], t["qweight"][0, 64:128])
    g = torch.Generator().manual_seed(6)
    for m in (1, 2, 5, 40):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, in_f, generator=g).to(dtype)
            y = infer_ops.woq_linear(x, tiled, t["qzeros"], t["scales"], layer["bias"], bits, group_size,
                                     layout + "_tiled")
            assert_close_to_reference(y, x, w, layer["bias"])
    with pytest.raises(ValueError, match=r"woq_tile_qweight.*multiple of 64"):
        infer_ops.woq_tile_qweight(t["qweight"][:, :100])
    with pytest.raises(ValueError, match=r"woq_linear.*layout.*only gptq and gptq_v2"):
        infer_ops.woq_linear(x, tiled, t["qzeros"], t["scales"], None, bits, group_size, "awq_tiled")


def test_quant_linear_tiles_once_and_keeps_checkpoint_order() -> None:
    """A CPU QuantLinear reorders its qweight at the first forward; state_dict(), dequantize(), casts and loads see
    the checkpoint's words."""
    from fastround.quant_linear import QuantLinear

    layer_t = _packed_layer("gptq", 4, 64, 128, 256, seed=12)
    t = layer_t["tensors"]
    ql = QuantLinear(256, 128, 4, 64, True, "gptq", shapes={k: (v.dtype, tuple(v.shape)) for k, v in t.items()})
    ql.load_state_dict(t, strict=False)
    plain = t["qweight"].clone()
    w = unpack_reference(t["qweight"], t["qzeros"], t["scales"], 4, 64, "gptq", 256)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = ql(x)
    assert ql._tiled and ql.qweight.shape == plain.shape and not torch.equal(ql.qweight, plain)
    assert_close_to_reference(y, x, w, None)
    assert torch.equal(ql.state_dict()["qweight"], plain)
    torch.testing.assert_close(ql.dequantize(), w)
    assert_close_to_reference(ql(x.float()), x.float(), w, None)  # a tensor made in inference mode serves later
    ql.load_state_dict(t, strict=False)  # words arrive in the checkpoint's order again
    assert not ql._tiled and torch.equal(ql.qweight, plain)
    ql(x)
    ql.to(torch.bfloat16)
    assert not ql._tiled and torch.equal(ql.qweight, plain)


# ---- words from upstream auto_round's export ----

UPSTREAM = [
    # (format, scheme, layout): auto_round asym packs GPTQ words with zero points as is (gptqmodel v2)
    ("auto_round", {"scheme": "W2A16", "sym": False}, "gptq_v2"),
    ("auto_gptq", {"scheme": "W8A16"}, "gptq"),
    ("auto_round:auto_awq", {"scheme": "W4A16", "sym": False, "group_size": 32}, "awq"),
]


@pytest.mark.parametrize(("fmt", "scheme", "layout"), UPSTREAM, ids=[u[0] + "-" + u[2] for u in UPSTREAM])
def test_upstream_export_equals_dequantize_matmul(checkpoint: Any, tmp_path: Path, fmt: str, scheme: dict[str, Any],
                                                  layout: str) -> None:
    src = checkpoint("llama_aligned")
    out = oracle.run_upstream_regular(src, tmp_path / "theirs", format=fmt, **scheme)
    import json

    from safetensors.torch import load_file

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    bits, group_size = int(cfg["bits"]), int(cfg["group_size"])
    source: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        source.update(load_file(str(f)))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    layers = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    assert layers
    g = torch.Generator().manual_seed(11)
    for name in layers:
        qweight, qzeros, scales = (tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales"))
        fp = source[f"{name}.weight"].to(torch.float32)  # [out, in]
        in_f = fp.shape[1]
        w = unpack_reference(qweight, qzeros, scales, bits, group_size, layout, in_f)
        # The reading is right (a zero point off by one would be a whole step off): RTN is within half a step.
        gs = in_f if group_size > in_f else group_size
        step = scales.to(torch.float32)[torch.arange(in_f) // gs].T
        assert float(((w - fp).abs() / step).mean()) < 0.3, name
        bias = tensors.get(f"{name}.bias")
        for m in (1, 16):
            x = torch.randn(m, in_f, generator=g, dtype=torch.float32)
            y = infer_ops.woq_linear(x, qweight, qzeros, scales, bias, bits, group_size, layout)
            assert_close_to_reference(y, x, w, bias)


# ---- torch.compile, fake kernel ----


def test_opcheck_and_compile() -> None:
    layer = _packed_layer("gptq_v2", 4, 64, 64, 128, seed=9)
    t = layer["tensors"]
    for m in (1, 12):
        x = torch.randn(m, 128)
        torch.library.opcheck(torch.ops.fastround.woq_linear.default,
                              (x, t["qweight"], t["qzeros"], t["scales"], layer["bias"], 4, 64, "gptq_v2"))

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(infer_ops.woq_linear(x, t["qweight"], t["qzeros"], t["scales"], None, 4, 64, "gptq_v2"))

    torch.library.opcheck(torch.ops.fastround.woq_tile_qweight.default, (t["qweight"], False))
    x = torch.randn(2, 128)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


# ---- bad inputs ----


def test_bad_inputs_name_the_argument() -> None:
    layer = _packed_layer("gptq", 4, 128, 64, 256, seed=1)
    qw, qz, sc = (layer["tensors"][k] for k in ("qweight", "qzeros", "scales"))
    x = torch.randn(1, 256)
    run = infer_ops.woq_linear
    bad = [
        (lambda: run(x, qw, qz[:, :4], sc, None, 4, 128, "gptq"), "qzeros: expected [2, 8]"),
        (lambda: run(x, qw, qz, sc[:1], None, 4, 128, "gptq"), "scales: expected [2, 64]"),
        (lambda: run(torch.randn(1, 300), qw, qz, sc, None, 4, 128, "gptq"), "qweight"),
        (lambda: run(x, qw.to(torch.int64), qz, sc, None, 4, 128, "gptq"), "qweight: expected Int"),
        (lambda: run(x.to(torch.int32), qw, qz, sc, None, 4, 128, "gptq"), "x: dtype must be"),
        (lambda: run(x, qw, qz, sc, None, 3, 128, "gptq"), "bits: 3 is not served"),
        (lambda: run(x, qw, qz, sc, None, 4, 128, "marlin"), "layout: unknown 'marlin'"),
        (lambda: run(x, qw, qz, sc, None, 4, 0, "gptq"), "group_size"),
        (lambda: run(x, qw, qz, sc, torch.zeros(3), 4, 128, "gptq"), "bias: expected [64]"),
        (lambda: run(x, qw, qz, sc, None, 2, 128, "awq"), "awq layout stores 4-bit codes only"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=r"\[fastround\.woq_linear\].*" + message.replace("[", r"\[")
                           .replace("]", r"\]")):
            call()


# ---- the benchmark script runs ----


def test_benchmark_smoke(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "woq_linear.py"
    out = tmp_path / "woq.json"
    run = subprocess.run([sys.executable, str(script), "--threads", "1", "--shapes", "kv", "--rows", "1,20",
                          "--sweep_rows", "2", "--cold_mb", "1", "--iters", "1", "--min_seconds", "0",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [(r["shape"], r["rows"]) for r in res["results"]] == [("kv", 1), ("kv", 20)]
    assert all(r["fastround_ms"] > 0 and r["bf16_ms"] > 0 for r in res["results"])
    assert res["path_sweep"] and res["path_sweep"][0]["gemv_ms"] > 0


def test_interleaved_benchmark_smoke(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "woq_gemv_interleaved.py"
    out = tmp_path / "inter.json"
    run = subprocess.run([sys.executable, str(script), "--threads", "1", "--shapes", "kv", "--cold_mb", "1",
                          "--calls", "3", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["shape"] == "kv" and rec["gptq_p25_ms"] > 0 and rec["gptq_tiled_p25_ms"] > 0
