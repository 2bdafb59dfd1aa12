"""More decoder families through the regular flow: GPT-2 (HF Conv1D layers, weights [in, out]) and OPT, RTN
in auto_round and auto_gptq against auto-round 0.16.1 run the same way, every tensor and config compared; and
auto_awq on Conv1D, where upstream fails with an AttributeError, refused with a clear error instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import checkpoints
import oracle

COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu",
          "scheme": "W4A16", "group_size": 32}


def _build(kind: str, path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=64, n_positions=64))
    else:
        model = OPTForCausalLM(OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=128))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(str(path))
    checkpoints._write_side_files(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {kind: _build(kind, root / kind) for kind in ("gpt2", "opt")}


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq"])
def test_rtn_matches_upstream(models, tmp_path, kind, fmt) -> None:
    from auto_round import AutoRound as Upstream

    from fastround import AutoRound

    src = str(models[kind])
    _, theirs = Upstream(src, enable_torch_compile=False, **COMMON).quantize_and_save(str(tmp_path / "up"), format=fmt)
    _, ours = AutoRound(src, **COMMON).quantize_and_save(str(tmp_path / "fr"), format=fmt)
    assert Path(ours).name == Path(theirs).name
    diff = oracle.compare_checkpoints(ours, theirs)
    assert list(diff) == [], "\n".join(diff)
    if kind == "gpt2":  # Conv1D layers really were packed
        assert any(k.endswith("c_attn.qweight") for k in oracle.read_checkpoint(ours))


def test_awq_refuses_conv1d_clearly(models, tmp_path) -> None:
    from auto_round import AutoRound as Upstream

    from fastround import AutoRound

    src = str(models["gpt2"])
    with pytest.raises(AttributeError):
        Upstream(src, enable_torch_compile=False, **COMMON).quantize_and_save(str(tmp_path / "up"), format="auto_awq")
    with pytest.raises(ValueError, match="Conv1D"):
        AutoRound(src, **COMMON).quantize_and_save(str(tmp_path / "fr"), format="auto_awq")
    assert not any((tmp_path / "fr").rglob("*.safetensors"))
