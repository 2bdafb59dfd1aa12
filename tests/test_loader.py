"""fastround output loads with upstream's own loader (transformers + auto-round's QuantLinear).

For every quantized Linear the loader's dequantized weight, obtained as
`mod(eye(in)).T` (auto-round's QuantLinear has no dequant method), must equal
fastround's own dequantization `_C.dequantize_int_gptq` of the stored tensors
after rounding to fp16: the loader computes fp16(scale_fp16 * int8(q - zp))
(notes §8). Layers fastround keeps in full precision must load as plain
nn.Linear with their original weights, never randomly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import oracle
from fastround._hf import KNOWN_UNPACKABLE

CheckpointFactory = Callable[..., Path]


def _fastround(src: Path, out: Path, **kwargs: Any) -> Path:
    from fastround import AutoRound

    AutoRound(model=str(src), model_free=True, show_progress=False, **kwargs).quantize_and_save(str(out))
    return out


def _load(out: Path, via_auto_round: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """via_auto_round: route a gptq / awq quant_method through auto-round's loader (AutoRoundConfig), as
    upstream documents for its auto_gptq / auto_awq outputs; without it transformers wants optimum."""
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    extra: dict[str, Any] = {"quantization_config": AutoRoundConfig()} if via_auto_round else {}
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out), device_map="cpu", dtype=torch.float32, output_loading_info=True, **extra
    )
    return model.eval(), info


def _loaded_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The weight [out, in] a loaded auto-round QuantLinear computes with, as float32.

    QuantLinear has no dequant method: its forward on eye(in) in float32 gives the fp16 weight exactly
    (each output is one product with 1.0). The bias is left out for the call, since out + bias rounds."""
    bias = mod.bias
    mod.bias = None
    try:
        with torch.no_grad():
            return mod(torch.eye(mod.infeatures, dtype=torch.float32)).T.float()
    finally:
        mod.bias = bias


def _arr(rec: oracle.TensorRecord, np_dtype: Any) -> np.ndarray:
    return np.frombuffer(rec[2], dtype=np_dtype).reshape(rec[1])


def _source_weight(rec: oracle.TensorRecord) -> torch.Tensor:
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[rec[0]]
    return torch.frombuffer(bytearray(rec[2]), dtype=dtype).reshape(rec[1])


def _check_quantized_modules(model: torch.nn.Module, out: Path, bits: int, group_size: int, sym: bool) -> int:
    from fastround import _C

    tensors = oracle.read_checkpoint(out)
    checked = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        assert mod.bias is None
        loaded = _loaded_weight(mod)  # [out, in]
        deq = _C.dequantize_int_gptq(
            _arr(tensors[f"{name}.qweight"], np.int32),
            _arr(tensors[f"{name}.qzeros"], np.int32),
            _arr(tensors[f"{name}.scales"], np.uint16),
            mod.outfeatures,
            mod.infeatures,
            bits,
            group_size,
            sym,
            1 if sym else 0,
        )
        expected = torch.from_numpy(np.asarray(deq)).to(torch.float16).to(torch.float32)
        assert tuple(loaded.shape) == tuple(expected.shape) == (mod.outfeatures, mod.infeatures)
        mismatch = (loaded != expected).sum().item()
        assert mismatch == 0, f"{name}: {mismatch} elements differ from fastround's dequantization"
        checked += 1
    return checked


@pytest.mark.parametrize(
    ("scheme", "bits", "group_size", "sym", "backend"),
    [
        ("W4A16", 4, 32, True, "qlinear_torch_zp"),  # auto_round:auto_gptq packing, loader adds +1 to zeros
        ("W2A16G32", 2, 32, False, "qlinear_torch"),  # auto_round packing, raw zero points
    ],
    ids=["W4A16-g32-sym", "W2A16G32-asym"],
)
def test_upstream_loader_reads_quantized(
    checkpoint: CheckpointFactory, tmp_path: Path, scheme: str, bits: int, group_size: int, sym: bool, backend: str
) -> None:
    src = checkpoint("llama_aligned")
    out = _fastround(src, tmp_path / "out", scheme=scheme, group_size=group_size, sym=sym)
    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    n_linear = sum(1 for n in oracle.read_checkpoint(src) if n.endswith("_proj.weight"))
    for name, mod in model.named_modules():
        if name.endswith("_proj"):
            assert type(mod).__module__.endswith(backend), (name, type(mod))
    assert _check_quantized_modules(model, out, bits, group_size, sym) == n_linear
    # lm_head stays full precision; the loader casts the model to fp16 ("Forced model to torch.float16").
    lm = _source_weight(oracle.read_checkpoint(src)["lm_head.weight"])
    assert torch.equal(model.lm_head.weight.detach().float(), lm.to(model.lm_head.weight.dtype).float())


def test_upstream_loader_reads_kept_layers(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    """llama (in_features 104/72, gs 128): the default keeps every projection in full precision.

    Upstream's own padded output of this checkpoint does not load (its backend
    check needs in % group_size == 0, so qweight/qzeros/scales are reported
    unexpected and .weight missing -> random init); fastround's must load
    every layer with its original weight.
    """
    src = checkpoint("llama")
    out = _fastround(src, tmp_path / "out", scheme="W4A16")
    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    source = oracle.read_checkpoint(src)
    layers = [n[: -len(".weight")] for n in source if n.endswith("_proj.weight")]
    assert layers
    modules = dict(model.named_modules())
    for layer in layers:
        mod = modules[layer]
        assert type(mod) is torch.nn.Linear, (layer, type(mod))
        want = _source_weight(source[f"{layer}.weight"])
        got = mod.weight.detach()
        # Whatever dtype the loader settles on, the values are the source's, cast once.
        assert torch.equal(got.float(), want.to(got.dtype).float()), layer


def test_upstream_loader_rejects_padded_layers(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    """Why deviation (b) exists: with pad_partial_groups=True (upstream's bytes) the loader cannot
    use the padded layers; it reports the packed tensors unexpected and the weights missing."""
    src = checkpoint("llama")
    out = _fastround(src, tmp_path / "out", scheme="W4A16", pad_partial_groups=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 128
    model, info = _load(out)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
    assert "model.layers.0.self_attn.q_proj.qweight" in info["unexpected_keys"]
    # The layer falls back to the "auto_round:fake" backend: a float Linear stand-in with a fresh weight.
    mod = dict(model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert type(mod).__name__ == "FakeActQuantLinear" and not hasattr(mod, "qweight"), type(mod)


@pytest.mark.parametrize("model_type", sorted(KNOWN_UNPACKABLE))
def test_known_unpackable_table_matches_meta_scan(tmp_path, model_type):
    """The shortcut table equals what building the model on the meta device finds."""
    from transformers import CONFIG_MAPPING

    from fastround._hf import detect_unpackable_modules

    cfg = CONFIG_MAPPING[model_type](num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)
    cfg.save_pretrained(tmp_path)
    assert detect_unpackable_modules(str(tmp_path), use_table=False) == KNOWN_UNPACKABLE[model_type]
    assert detect_unpackable_modules(str(tmp_path)) == KNOWN_UNPACKABLE[model_type]
