"""The regular flow (a model loaded in memory, iters=0) against auto-round 0.16.1 run the same way: RTN in
auto_round / auto_gptq / auto_awq on tiny models, every tensor and config compared; the output-folder
naming; and the errors a user can hit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import oracle

COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu"}


def _upstream(src: Path, out: Path, fmt: str, **kwargs: Any) -> Path:
    """Upstream's quantize_and_save into `out`; returns the folder it names itself."""
    from auto_round import AutoRound

    ar = AutoRound(str(src), enable_torch_compile=False, **COMMON, **kwargs)
    _, folder = ar.quantize_and_save(str(out), format=fmt)
    return Path(folder if isinstance(folder, str) else folder[0])


def _ours(src: Path, out: Path, fmt: str, **kwargs: Any) -> Path:
    from fastround import AutoRound

    ar = AutoRound(str(src), **COMMON, **kwargs)
    _, folder = ar.quantize_and_save(str(out), format=fmt)
    return Path(folder if isinstance(folder, str) else folder[0])


def _sort_awq_skip_list(folder: Path) -> None:
    """auto_awq's modules_to_not_convert is a set's iteration order upstream and sorted in fastround
    (docs/compatibility.md); sort both copies so the rest is compared exactly."""
    for name in ("config.json", "quantization_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        cfg = data.get("quantization_config", data)
        if isinstance(cfg.get("modules_to_not_convert"), list):
            cfg["modules_to_not_convert"] = sorted(cfg["modules_to_not_convert"])
            path.write_text(json.dumps(data, indent=2))


def _assert_same(ours: Path, theirs: Path) -> None:
    for folder in (ours, theirs):
        _sort_awq_skip_list(folder)
    diff = oracle.compare_checkpoints(ours, theirs, ignore=(".cache", "fastround_summary.json"))
    assert list(diff) == [], "\n".join(diff)


RTN_CASES = [
    # kind, format, scheme kwargs, layer_config, ignore_layers
    ("llama_aligned", "auto_round", {"scheme": "W4A16"}, None, ""),
    ("llama_aligned", "auto_round", {"scheme": "W2A16G64"}, {"k_proj": {"bits": 8}}, "layers.1"),
    ("llama_aligned", "auto_round", {"scheme": "W8A16", "group_size": 32}, None, ""),
    ("llama_aligned", "auto_round", {"scheme": "W4A16", "sym": False, "group_size": 32}, None, ""),
    ("llama_aligned", "auto_round", {"scheme": "W2A16", "sym": False, "group_size": 32}, None, ""),
    ("qwen2_aligned", "auto_round", {"scheme": "W4A16", "group_size": 32}, {"q_proj": "W8A16"}, ""),
    ("qwen3_moe_aligned", "auto_round", {"scheme": "W4A16", "group_size": 64}, None, ""),
    ("llama_aligned", "auto_gptq", {"scheme": "W4A16"}, {"o_proj": {"bits": 8}}, "mlp.up_proj"),
    ("qwen2_aligned", "auto_gptq", {"scheme": "W2A16G32"}, None, ""),
    ("llama_aligned", "auto_awq", {"scheme": "W4A16", "sym": False, "group_size": 32}, None, ""),
    ("qwen2_aligned", "auto_awq", {"scheme": "W4A16", "group_size": 32}, None, "v_proj"),
]


@pytest.mark.parametrize("kind,fmt,scheme,layer_config,ignore", RTN_CASES)
def test_rtn_matches_upstream(checkpoint, tmp_path, kind, fmt, scheme, layer_config, ignore) -> None:
    src = checkpoint(kind)
    kw = dict(scheme, layer_config=layer_config, ignore_layers=ignore)
    theirs = _upstream(src, tmp_path / "up", fmt, **kw)
    ours = _ours(src, tmp_path / "fr", fmt, **kw)
    assert ours.relative_to(tmp_path / "fr") == theirs.relative_to(tmp_path / "up")
    _assert_same(ours, theirs)


CAST_CASES = [
    # kind, checkpoint dtype, kwargs: the tuning dtype is not the checkpoint's, so the model is cast (fastround:
    # block by block as the loop reaches each; upstream: whole at load) and the quantized weights come from it
    ("llama_aligned", "float32", {"scheme": "W4A16"}),
    ("llama_aligned", "bfloat16", {"scheme": "W4A16", "amp": False}),
]


@pytest.mark.parametrize("kind,dtype,kwargs", CAST_CASES)
def test_rtn_with_a_dtype_cast_matches_upstream(checkpoint, tmp_path, kind, dtype, kwargs) -> None:
    src = checkpoint(kind, dtype)
    theirs = _upstream(src, tmp_path / "up", "auto_round", **kwargs)
    ours = _ours(src, tmp_path / "fr", "auto_round", **kwargs)
    _assert_same(ours, theirs)


def test_block_by_block_cast_equals_casting_the_model_first(checkpoint, tmp_path) -> None:
    """An fp32 fused-MoE checkpoint: its experts become views of the fused tensors and are cast to bf16 with
    their block. The quantized tensors equal those of the same model cast whole before fastround sees it.
    (Upstream quantizes fp32 MoE experts differently, before and after this change; not compared here.)"""
    from transformers import AutoModelForCausalLM

    from fastround import AutoRound

    src = checkpoint("qwen3_moe_aligned_fused", "float32")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    _, whole = AutoRound(model, None, scheme="W4A16", group_size=64, **COMMON).quantize_and_save(
        str(tmp_path / "whole"))
    lazy = oracle.read_checkpoint(_ours(src, tmp_path / "lazy", "auto_round", scheme="W4A16", group_size=64))
    whole_tensors = oracle.read_checkpoint(whole)
    quantized = [n for n in whole_tensors if n.endswith((".qweight", ".qzeros", ".scales"))]
    assert any(".experts." in n for n in quantized)
    for name in quantized:
        assert lazy[name] == whole_tensors[name], name


def test_quantize_returns_qdq_model_and_layer_config(checkpoint) -> None:
    """quantize() -> (model with qdq weights, layer_config), the weights equal upstream's qdq weights."""
    from auto_round import AutoRound as UpstreamAutoRound

    from fastround import AutoRound

    src = str(checkpoint("llama_aligned"))
    up = UpstreamAutoRound(src, enable_torch_compile=False, scheme="W4A16", **COMMON)
    up_model, up_cfg = up.quantize()
    model, cfg = AutoRound(src, scheme="W4A16", **COMMON).quantize()
    assert set(cfg) == set(up_cfg)
    ours = dict(model.named_parameters())
    for name, p in up_model.named_parameters():
        assert torch.equal(ours[name].data, p.data), name


def test_output_inside_source_is_refused(checkpoint, tmp_path) -> None:
    import shutil

    src = tmp_path / "model"
    shutil.copytree(checkpoint("llama_aligned"), src)
    before = sorted(os.listdir(src))
    from fastround import AutoRound

    with pytest.raises(ValueError, match="inside"):
        AutoRound(str(src), scheme="W4A16", **COMMON).quantize_and_save(str(src / "out"))
    assert sorted(os.listdir(src)) == before


def test_awq_with_two_bits_is_refused(checkpoint, tmp_path) -> None:
    from fastround import AutoRound

    with pytest.raises(ValueError, match="auto_awq"):
        AutoRound(str(checkpoint("llama_aligned")), scheme="W2A16", **COMMON).quantize_and_save(
            str(tmp_path / "o"), format="auto_awq"
        )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("config.json"))


def test_awq_layout_mismatch_fails_before_any_output(checkpoint, tmp_path) -> None:
    """in_features 160 is no whole number of 128-groups: upstream fails inside its AWQ packer after quantizing;
    fastround names the layer and leaves no output folder."""
    from fastround import AutoRound

    with pytest.raises(ValueError, match="AWQ"):
        AutoRound(str(checkpoint("llama_aligned")), scheme="W4A16", sym=False, **COMMON).quantize_and_save(
            str(tmp_path / "o"), format="auto_round"
        )
    assert not any((tmp_path / "o").rglob("*.safetensors"))


def test_model_in_memory_equals_model_from_folder(checkpoint, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    _, mem = AutoRound(model, tokenizer, scheme="W2A16G64", **COMMON).quantize_and_save(str(tmp_path / "mem"))
    disk = _ours(src, tmp_path / "disk", "auto_round", scheme="W2A16G64")
    assert Path(mem).name == disk.name
    assert oracle.read_checkpoint(mem) == oracle.read_checkpoint(disk)


def test_text_data_without_tokenizer_is_a_clear_error(checkpoint, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from fastround import AutoRound

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint("llama_aligned")), dtype=torch.bfloat16)
    ar = AutoRound(model, None, scheme="W4A16", iters=0, dataset=["w1 w2 w3"], device_map="cpu")
    with pytest.raises(ValueError, match="tokenizer"):
        ar.quantize_and_save(str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_fused_moe_experts_are_split_like_upstream(checkpoint, tmp_path) -> None:
    """transformers 5 holds Qwen3-MoE experts as fused 3-D parameters; fastround splits them into per-expert
    Linear layers by structure (upstream swaps in its own modeling class). Every tensor equals upstream's;
    the routers stay transformers' TopKRouter (not a Linear), so only their 16-bit extra_config entries differ."""
    import checkpoints
    import transformers.models.qwen3_moe.modeling_qwen3_moe as mod

    src = checkpoint("qwen3_moe_aligned")
    theirs = _upstream(src, tmp_path / "up", "auto_round", scheme="W4A16", group_size=64)
    checkpoints._original_moe_block()  # upstream patched transformers process-wide; fastround must not rely on it
    assert mod.Qwen3MoeSparseMoeBlock.__module__ == mod.__name__
    ours = _ours(src, tmp_path / "fr", "auto_round", scheme="W4A16", group_size=64)
    assert oracle.read_checkpoint(ours) == oracle.read_checkpoint(theirs)
    a = json.loads((ours / "config.json").read_text())["quantization_config"]
    b = json.loads((theirs / "config.json").read_text())["quantization_config"]
    routers = {k for k in b.get("extra_config", {}) if k.endswith("mlp.gate")}
    assert routers and set(b["extra_config"]) - set(a.get("extra_config", {})) == routers
    assert {k: v for k, v in a.items() if k != "extra_config"} == {k: v for k, v in b.items() if k != "extra_config"}
