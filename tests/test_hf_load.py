"""Quantized checkpoints in transformers without auto_round or gptqmodel: tiny Llama / Qwen2 checkpoints quantized
by fastround and by auto-round 0.16.1 (RTN, iters=0) in every packing fastround reads, each written together with
format fake (same run, same settings), then loaded in a subprocess where `import auto_round` and
`import gptqmodel` fail. There the packed checkpoint must give the fake-quantized model's logits within fp32
tolerance and its greedy generation; the small trained model's perplexity must stay within 0.5% of the fake one;
`fastround eval --ppl` evaluates a folder. A second subprocess, with auto_round importable, checks that
backend auto leaves auto-round checkpoints to upstream and that switching backends works.

The sources are fp32 checkpoints whose values are fp16-exact: the packed formats store unquantized tensors in
fp16 (auto_gptq, AWQ) and the fake one in fp32, so only then can the two agree to fp32 rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import checkpoints

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = REPO / "models" / "fastround-llama-tiny"
COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu", "amp": False}
MIXED = {"k_proj": {"bits": 8, "group_size": -1}, "down_proj": {"bits": 2, "group_size": 32}, "o_proj": {"bits": 16}}

# name: (producer, source kind, packed format, quantization arguments). MIXED covers W8 (per channel), W2 (groups
# of 32) and a kept layer beside the W4 default in one checkpoint.
CASES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "fr_auto_round_mixed": ("fastround", "llama_aligned", "auto_round", {"scheme": "W4A16", "layer_config": MIXED}),
    "fr_auto_round_w2_asym": ("fastround", "llama_aligned", "auto_round",
                              {"scheme": "W2A16", "sym": False, "group_size": 32}),
    "fr_auto_round_asym_awq": ("fastround", "llama_aligned", "auto_round",
                               {"scheme": "W4A16", "sym": False, "group_size": 32}),
    # auto_gptq asym is not here: GPTQ v1 stores zp - 1 clamped at 0, so a group whose zero point is 0 (all
    # inputs >= 0) reads back as 1 and the checkpoint differs from the fake model (the format's loss, not the
    # loader's); asym INT is covered by auto_round (W2) and AWQ.
    "fr_auto_gptq": ("fastround", "llama_aligned", "auto_gptq", {"scheme": "W4A16", "group_size": 64}),
    "fr_auto_awq": ("fastround", "llama_aligned", "auto_awq", {"scheme": "W4A16", "sym": False, "group_size": 32}),
    "fr_mxfp4": ("fastround", "llama_aligned", "auto_round", {"scheme": "MXFP4"}),
    "fr_mxfp8": ("fastround", "llama_aligned", "auto_round", {"scheme": "MXFP8"}),
    "fr_nvfp4_e5m3": ("fastround", "llama_aligned", "auto_round", {"scheme": "NVFP4_E5M3"}),
    "fr_qwen2_bias": ("fastround", "qwen2_aligned", "auto_round", {"scheme": "W4A16", "group_size": 32}),
    "up_auto_round_mixed": ("upstream", "llama_aligned", "auto_round", {"scheme": "W4A16", "layer_config": MIXED}),
    "up_auto_gptq": ("upstream", "llama_aligned", "auto_gptq", {"scheme": "W4A16", "group_size": 64}),
    "up_auto_awq": ("upstream", "llama_aligned", "auto_awq", {"scheme": "W4A16", "sym": False, "group_size": 32}),
    "up_mxfp4": ("upstream", "llama_aligned", "auto_round", {"scheme": "MXFP4"}),
}

# The subprocess: auto_round and gptqmodel cannot be imported there.
_BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("auto_round", "gptqmodel", "awq"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""

_CHILD = """
import contextlib, io, json, os, sys
import torch
import fastround
from fastround import hf
from fastround.quant_linear import FPQuantLinear, QuantLinear
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.loads(sys.argv[1])
out = {"serving": hf.serving(), "cases": {}}
ids = torch.tensor([[1, 5, 9, 17, 30, 4, 22, 8, 3, 40, 12, 7, 2, 19, 33, 6]])

def n_quant(model):
    return sum(isinstance(m, (QuantLinear, FPQuantLinear)) for m in model.modules())

for name, (packed, fake) in spec["cases"].items():
    if name == spec.get("load_quantized_case"):
        model = fastround.load_quantized(packed, device="cpu", dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32)
    with torch.inference_mode():
        a, b = model(ids).logits, ref(ids).logits
        gen = model.generate(ids[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
        gen_ref = ref.generate(ids[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    out["cases"][name] = {"max_diff": (a - b).abs().max().item(), "scale": b.abs().max().item(),
                          "n_quant": n_quant(model), "n_ref_quant": n_quant(ref),
                          "gen": gen.tolist(), "gen_ref": gen_ref.tolist()}

if spec.get("ppl"):
    from fastround import eval as fr_eval
    packed, fake, text_file = spec["ppl"]
    text = open(text_file, encoding="utf-8").read()
    tok = AutoTokenizer.from_pretrained(fake)
    ppl = fr_eval.perplexity(fastround.load_quantized(packed, dtype=torch.float32), text, seqlen=256, tokenizer=tok)
    ppl_ref = fr_eval.perplexity(AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32), text, seqlen=256,
                                 tokenizer=tok)
    from fastround.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["eval", packed, "--ppl", text_file, "--seqlen", "256"])
    out["ppl"] = {"packed": ppl, "fake": ppl_ref, "cli_rc": rc, "cli": buf.getvalue()}
out["blocked_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("auto_round", "gptqmodel"))
print("RESULT " + json.dumps(out))
"""


def _start_child(code: str, arg: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    # The child inherits this process's environment, so it imports the same fastround (installed, or a build tree
    # named by PYTHONPATH); prepending the source tree would shadow an installed build with sources lacking _C.
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(arg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)


def _child_result(proc: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=600)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _run_child(code: str, arg: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    return _child_result(_start_child(code, arg, env))


def _fp16_exact_fp32(kind: str, root: Path) -> Path:
    """An fp32 checkpoint of `kind` whose values are fp16-exact, in several shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = checkpoints.build(kind, root / f"{kind}-fp16", "float16")
    dst = root / f"{kind}-fp32"
    model = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32)
    model.config.dtype = torch.float32
    model.save_pretrained(dst, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(half).save_pretrained(dst)
    return dst


def _quantize(producer: str, src: Path, out: Path, fmt: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """(packed folder, fake folder) from one run that saves both."""
    if producer == "fastround":
        from fastround import AutoRound

        ar = AutoRound(str(src), **COMMON, **kwargs)
    else:
        from auto_round import AutoRound

        ar = AutoRound(str(src), enable_torch_compile=False, **COMMON, **kwargs)
    _, folders = ar.quantize_and_save(str(out), format=f"{fmt},fake")
    assert isinstance(folders, list) and len(folders) == 2, folders
    packed, fake = (str(f) for f in folders)
    assert "fake" in Path(fake).name and "fake" not in Path(packed).name, folders
    return packed, fake


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf_load")
    sources = {kind: _fp16_exact_fp32(kind, root) for kind in ("llama_aligned", "qwen2_aligned")}
    folders: dict[str, tuple[str, str]] = {}
    for name, (prod, kind, fmt, kw) in CASES.items():
        folders[name] = _quantize(prod, sources[kind], root / name, fmt, kw)
        if name == "fr_auto_round_mixed":
            # test_upstream_installed_backend_auto's child (auto_round importable) runs while the rest is built
            upstream_child = _start_child(_CHILD_UPSTREAM, folders[name])
    from fastround import AutoRound

    ar = AutoRound(str(SMALL_MODEL), scheme="W4A16", **COMMON)
    _, small = ar.quantize_and_save(str(root / "small"), format="auto_round,fake")
    text_file = root / "heldout.txt"
    text_file.write_text((SMALL_MODEL / "validation.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    spec = {"cases": folders, "load_quantized_case": "fr_auto_round_mixed",
            "ppl": [str(small[0]), str(small[1]), str(text_file)]}
    result = _run_child(_BLOCK + _CHILD, spec)
    result["folders"] = folders
    result["upstream_child"] = upstream_child
    return result


def test_fastround_serves_without_upstream_packages(loaded: dict[str, Any]) -> None:
    assert loaded["serving"] == {"auto-round": "fastround", "gptq": "fastround", "awq": "fastround"}
    assert loaded["blocked_loaded"] == []


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_fake_quantized(loaded: dict[str, Any], case: str) -> None:
    r = loaded["cases"][case]
    assert r["n_quant"] > 0 and r["n_ref_quant"] == 0
    assert r["max_diff"] <= 2e-5 * max(1.0, r["scale"]), r
    assert r["gen"] == r["gen_ref"]


def test_layer_counts(loaded: dict[str, Any]) -> None:
    counts = {name: r["n_quant"] for name, r in loaded["cases"].items()}
    assert counts["fr_auto_gptq"] == 14  # 2 blocks x 7 Linear; lm_head stays
    assert counts["fr_auto_round_mixed"] == 12  # o_proj kept at 16 bits
    assert counts["up_auto_round_mixed"] == 12


def test_perplexity_within_half_a_percent(loaded: dict[str, Any]) -> None:
    p = loaded["ppl"]
    assert abs(p["packed"] / p["fake"] - 1) < 0.005, p
    assert p["cli_rc"] == 0 and f"perplexity {p['packed']:.4f}" in p["cli"], p


_CHILD_UPSTREAM = """
import json, sys, os
import torch
import fastround
from fastround import hf
from fastround.hf_quantizer import FastroundHfQuantizer
from fastround.quant_linear import QuantLinear
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto

packed, fake = json.loads(sys.argv[1])
ids = torch.tensor([[1, 5, 9, 17, 30, 4, 22, 8]])
out = {"auto": hf.serving(), "auto_class": auto.AUTO_QUANTIZER_MAPPING["auto-round"].__name__}
# upstream 0.16.1 builds the model with its own layers; without auto-round-lib its CPU backend cannot run them
# (docs/inference.md), so only the loading is checked here
up = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
out["upstream_has_ours"] = any(isinstance(m, QuantLinear) for m in up.modules())
out["upstream_loaded"] = "auto_round" in sys.modules
out["fastround"] = hf.use("fastround")
ref = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32)
ours = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
out["ours_has_ours"] = any(isinstance(m, QuantLinear) for m in ours.modules())
with torch.inference_mode():
    out["ours_diff"] = (ours(ids).logits - ref(ids).logits).abs().max().item()
out["upstream"] = hf.use("upstream")
out["restored"] = auto.AUTO_QUANTIZER_MAPPING["auto-round"].__name__
out["forced"] = any(isinstance(m, QuantLinear) for m in fastround.load_quantized(packed).modules())
out["after_forced"] = hf.serving()
try:
    hf.use("nonsense")
except ValueError as e:
    out["bad_backend"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_upstream_installed_backend_auto(loaded: dict[str, Any]) -> None:
    r = _child_result(loaded["upstream_child"])  # started by the fixture on folders["fr_auto_round_mixed"]
    assert r["auto"]["auto-round"] == "upstream" and r["auto_class"] == "AutoRoundQuantizer"
    assert r["upstream_loaded"] and not r["upstream_has_ours"]
    assert r["fastround"] == {"auto-round": "fastround", "gptq": "fastround", "awq": "fastround"}
    assert r["ours_has_ours"] and r["ours_diff"] < 1e-4, r
    assert r["upstream"] == {"auto-round": "upstream", "gptq": "upstream", "awq": "upstream"}
    assert r["restored"] == "AutoRoundQuantizer"
    assert r["forced"] and r["after_forced"] == r["upstream"]  # load_quantized puts the routing back
    assert "backend must be one of" in r["bad_backend"]


# ---- in process: the dequantizers the layers use ----

def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("encoding,bits,group_size,sym,zero_offset", [
    ("int_gptq", 4, 128, True, 1), ("int_gptq", 2, 32, False, 0), ("int_gptq", 8, -1, True, 1),
    ("int_gptq", 4, 64, False, 1), ("int_awq", 4, 32, False, 0), ("mxfp4", 4, 32, True, 0),
    ("mxfp8", 8, 32, True, 0), ("nvfp4_e5m3", 4, 16, True, 0),
])
def test_dequantize_packed_inverts_pack_codes(encoding: str, bits: int, group_size: int, sym: bool,
                                              zero_offset: int) -> None:
    from fastround import ops

    w = _weight(64, 192)
    enc = ops.encode_weight(w, encoding, bits, group_size, sym)
    packed = [t for _, t in ops.pack_codes(enc.codes, enc.scales, enc.zeros, encoding, bits, group_size, sym,
                                           zero_offset, True)]
    got = ops.dequantize_packed(packed, encoding, 64, 192, bits, group_size, sym, zero_offset)
    want = ops.dequantize_codes(enc.codes, enc.scales, enc.zeros, encoding, bits, group_size, sym, torch.float32)
    assert torch.equal(got, want)


def test_dequantize_packed_names_a_bad_tensor() -> None:
    from fastround import ops

    with pytest.raises(ValueError, match=r"dequantize_packed\] qzeros: expected a CPU I32 tensor \[2, 8\]"):
        ops.dequantize_packed([torch.zeros(32, 64, dtype=torch.int32), torch.zeros(3, 8, dtype=torch.int32),
                               torch.zeros(2, 64, dtype=torch.float16)], "int_gptq", 64, 192, 4, 128, True, 1)


def _gptq_layer(bits: int, group_size: int, sym: bool, layout: str, g_idx: torch.Tensor | None = None):
    """A QuantLinear [64 out, 192 in] holding RTN codes of a random weight, the regular flow's unpadded tensors."""
    from fastround import ops
    from fastround.quant_linear import QuantLinear

    w = _weight(64, 192, seed=bits)
    enc = ops.encode_weight(w, "int_gptq", bits, group_size, sym)
    zero_offset = 1 if layout == "gptq" else 0
    tensors = dict(ops.pack_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, group_size, sym, zero_offset,
                                  False))
    layer = QuantLinear(192, 64, bits, group_size, sym, layout, g_idx=g_idx is not None,
                        shapes={k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    for k, v in tensors.items():
        getattr(layer, k).copy_(v)
    if g_idx is not None:
        layer.g_idx.copy_(g_idx)
    ref = ops.dequantize_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", bits, group_size, sym, torch.float32)
    return layer, ref


@pytest.mark.parametrize("bits,group_size,sym,layout", [(4, 128, True, "gptq"), (2, 32, False, "gptq_v2"),
                                                        (8, -1, True, "gptq")])
def test_quant_linear_reference_and_g_idx_paths(bits: int, group_size: int, sym: bool, layout: str) -> None:
    layer, ref = _gptq_layer(bits, group_size, sym, layout)
    assert torch.equal(layer.dequantize(), ref)
    gs = 192 if group_size == -1 else group_size
    trivial, _ = _gptq_layer(bits, group_size, sym, layout, g_idx=torch.arange(192, dtype=torch.int32) // gs)
    qweight, qzeros, scales = trivial.qweight, trivial.qzeros, trivial.scales
    zero_offset = 1 if layout == "gptq" else 0
    # the act-order lookup gives the contiguous result when g_idx is trivial
    assert torch.equal(trivial._dequantize_g_idx(qweight, qzeros, scales, zero_offset), ref)
    x = torch.randn(3, 192)
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-5, atol=1e-5)


def test_quant_linear_act_order_g_idx() -> None:
    """Inputs stored in a permuted group order: each input takes its own group's scale and zero point."""
    layer, _ = _gptq_layer(4, 32, False, "gptq_v2")
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(3))
    g_idx = (torch.arange(192) // 32)[perm].to(torch.int32)
    act, _ = _gptq_layer(4, 32, False, "gptq_v2", g_idx=g_idx)
    assert not act._g_idx_is_trivial()
    from fastround.quant_linear import _unpack_words

    codes = _unpack_words(act.qweight, 192, 4)
    zeros = _unpack_words(act.qzeros.t(), 64, 4)  # [groups, out]
    g = g_idx.long()
    want = (codes - zeros.t()[:, g]) * act.scales.float().t()[:, g]
    assert torch.equal(act.dequantize(), want)
    assert not torch.equal(act.dequantize(), layer.dequantize())


def test_backend_env_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastround import hf

    monkeypatch.setenv("FASTROUND_HF_BACKEND", "everything")
    with pytest.raises(ValueError, match="backend must be one of auto, fastround, upstream"):
        hf.install()


def test_dequantize_packed_fake_kernel_and_opcheck() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastround import ops

    w = _weight(64, 192)
    enc = ops.encode_weight(w, "int_gptq", 4, 64, True)
    packed = [t for _, t in ops.pack_codes(enc.codes, enc.scales, enc.zeros, "int_gptq", 4, 64, True, 1, True)]
    args = (packed, "int_gptq", 64, 192, 4, 64, True, 1)
    torch.library.opcheck(torch.ops.fastround.dequantize_packed.default, args)
    with FakeTensorMode() as mode:
        fake = torch.ops.fastround.dequantize_packed([mode.from_tensor(t) for t in packed], *args[1:])
    assert (fake.shape, fake.dtype) == ((64, 192), torch.float32)


def test_forward_dispatches_to_woq_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantLinear calls torch.ops.fastround.woq_linear when it exists, keeps the reference under
    FASTROUND_WOQ_REFERENCE=1, and falls back to it for good on a layer the op refuses. Until the C++ op lands a
    recording stand-in takes its place (its schema, refusing 2-bit layers); once it exists it must compute the
    reference's linear."""
    from types import SimpleNamespace

    from fastround import quant_linear

    calls: list[tuple[int, int, str]] = []
    real = getattr(torch.ops.fastround, "woq_linear", None) if quant_linear.HAS_WOQ_LINEAR else None

    def stand_in(x, qweight, qzeros, scales, bias, bits, group_size, layout):  # type: ignore[no-untyped-def]
        calls.append((bits, group_size, layout))
        if real is not None:
            return real(x, qweight, qzeros, scales, bias, bits, group_size, layout)
        if bits == 2:
            raise ValueError("stand-in refuses 2-bit layers")
        return torch.full((*x.shape[:-1], scales.shape[1]), 7.0, dtype=x.dtype)

    monkeypatch.setattr(quant_linear, "HAS_WOQ_LINEAR", True)
    monkeypatch.setattr(quant_linear, "_ops", SimpleNamespace(woq_linear=stand_in))
    x = torch.randn(2, 192)
    for bits, layout in ((4, "gptq"), (2, "gptq_v2")):
        layer, ref = _gptq_layer(bits, 32, True, layout)
        want = x @ ref.t()
        monkeypatch.setenv("FASTROUND_WOQ_REFERENCE", "1")
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        assert calls == [] or calls[-1][2] != layout
        monkeypatch.delenv("FASTROUND_WOQ_REFERENCE")
        first, again = layer(x), layer(x)
        if real is not None:
            torch.testing.assert_close(first, want, rtol=1e-3, atol=1e-3)
        elif bits == 4:
            assert torch.equal(first, torch.full_like(first, 7.0)) and torch.equal(again, first)
            assert layer._woq_ok
        else:  # refused once, then the reference without asking again
            torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
            assert not layer._woq_ok
    if real is None:
        assert calls == [(4, 32, "gptq"), (4, 32, "gptq"), (2, 32, "gptq_v2")]


def test_dtype_cast_keeps_packed_tensors() -> None:
    """model.to(bf16) would round fp16 scales and turn FP8 codes into floats; only the bias follows the cast."""
    from fastround.quant_linear import FPQuantLinear

    layer, ref = _gptq_layer(4, 32, True, "gptq")
    layer.register_buffer("bias", torch.zeros(64, dtype=torch.float32))
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), ref)
    fp8 = FPQuantLinear(64, 32, "mxfp8", bias=False).to(torch.float16)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.uint8


def test_quant_linear_under_torch_compile() -> None:
    """aot_eager traces the reference path with FakeTensors, through dequantize_packed's fake kernel."""
    layer, ref = _gptq_layer(4, 32, True, "gptq")
    x = torch.randn(2, 192)
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
