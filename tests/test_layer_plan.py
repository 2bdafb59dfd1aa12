"""The regular flow's per-layer configs equal upstream auto-round 0.16.1's `layer_config` after quantize(), and
its routing and argument errors behave as upstream's (or fail clearly where upstream is silent)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

LAYER_CASES = [
    ("llama", "W4A16", {}, "", False),
    ("llama_aligned", "W2A16G64", {"k_proj": {"bits": 8}, "mlp.down_proj": "W8A16"}, "layers.1", False),
    ("qwen2", "W4A16", {"q_proj": {"bits": 8, "group_size": 32}}, "v_proj", True),
    ("qwen3_moe_aligned", "W4A16", {"experts": {"bits": 2, "group_size": 32}}, "", False),
    ("llama", "MXFP4", {}, "", False),
    ("llama_aligned", "W8A16", {"o_proj": {"bits": 4, "sym": False}}, "", True),
]


def _upstream_layer_config(src: Path, scheme: str, layer_config: dict, ignore: str, lm_head: bool) -> dict:
    from auto_round import AutoRound

    ar = AutoRound(str(src), scheme=scheme, iters=0, disable_opt_rtn=True, enable_torch_compile=False,
                   device_map="cpu", disable_model_free=True, layer_config=dict(layer_config),
                   ignore_layers=ignore, quant_lm_head=lm_head)
    ar.quantize()
    return ar.layer_config


def _normalize(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {kk: (str(vv) if kk == "scale_dtype" else vv) for kk, vv in v.items()} for k, v in config.items()}


@pytest.mark.parametrize("kind,scheme,layer_config,ignore,lm_head", LAYER_CASES)
def test_layer_config_matches_upstream(checkpoint, kind, scheme, layer_config, ignore, lm_head) -> None:
    from transformers import AutoModelForCausalLM

    from fastround.compressor import resolve_scheme
    from fastround.layer_plan import plan_layers

    src = checkpoint(kind)
    expected = _normalize(_upstream_layer_config(src, scheme, layer_config, ignore, lm_head))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    full, _ = resolve_scheme(scheme, {})
    plan = plan_layers(model, full, dict(layer_config), ignore_layers=ignore, quant_lm_head=lm_head)
    assert _normalize(plan.layer_config) == expected
    assert plan.block_names == [[f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]]


def test_unmatched_layer_config_key_warns(checkpoint, caplog) -> None:
    from transformers import AutoModelForCausalLM

    from fastround.compressor import resolve_scheme
    from fastround.layer_plan import plan_layers

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint("llama_aligned")), dtype=torch.bfloat16)
    full, _ = resolve_scheme("W4A16", {})
    with caplog.at_level(logging.WARNING, logger="fastround"):
        plan = plan_layers(model, full, {"no_such_proj": {"bits": 8}})
    assert plan.unmatched == ["no_such_proj"]
    assert "no_such_proj" in caplog.text


def test_module_without_block_list_is_a_clear_error() -> None:
    from fastround.compressor import resolve_scheme
    from fastround.layer_plan import plan_layers

    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    full, _ = resolve_scheme("W4A16", {})
    with pytest.raises(ValueError, match="no block list"):
        plan_layers(net, full, {})


def test_eight_bit_asym_entry_is_refused(checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    from fastround.compressor import resolve_scheme
    from fastround.layer_plan import plan_layers

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint("llama_aligned")), dtype=torch.bfloat16)
    full, _ = resolve_scheme("W4A16", {})
    with pytest.raises(ValueError, match="k_proj"):
        plan_layers(model, full, {"k_proj": {"bits": 8, "sym": False}})


def test_signround_of_static_activations_is_refused_clearly(checkpoint) -> None:
    """SignRound tunes INT, MXFP4 / MXFP8 and NVFP4_E5M3 with dynamic activations; static activation tuning is not
    built yet and says so at construction."""
    from fastround import AutoRound

    scheme = {"bits": 4, "group_size": 32, "data_type": "mx_fp", "act_bits": 4, "act_data_type": "mx_fp",
              "act_group_size": 32, "act_dynamic": False}
    with pytest.raises(NotImplementedError, match="SignRound.*act_dynamic=False"):
        AutoRound(str(checkpoint("llama_aligned")), scheme=scheme, iters=200, device_map="cpu")


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch) -> None:
    from fastround import AutoRound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        AutoRound("no-such-org/no-such-model", iters=0, device_map="cpu")
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        AutoRound(str(tmp_path / "missing" / "..." / "x y"), iters=0, device_map="cpu")


def test_regular_routing_choices(checkpoint) -> None:
    """W8A16 turns opt-RTN off; W4A16 needs an imatrix (data); asym int runs zero-shot, as upstream decides."""
    from fastround import AutoRound

    src = str(checkpoint("llama_aligned"))
    w8 = AutoRound(src, scheme="W8A16", iters=0, device_map="cpu")
    assert (w8.disable_opt_rtn, w8.use_imatrix) == (True, False)
    w4 = AutoRound(src, scheme="W4A16", iters=0, device_map="cpu")
    assert (w4.disable_opt_rtn, w4.use_imatrix) == (False, True)
    asym = AutoRound(src, scheme="W4A16", sym=False, iters=0, device_map="cpu")
    assert asym.use_imatrix is False
