"""NVFP4_E5M3 through the regular flow (iters=0) against auto-round 0.16.1 run the same way: upstream quantizes it
zero-shot with plain RTN (no calibration data, no scale search, whatever disable_opt_rtn says) and writes it as
auto_round (packing_format auto_round:llm_compressor_nvfp4_e5m3), llm_compressor (its own compressed-tensors
config) or fake. The ops against upstream's quantizer and packer, whole checkpoints against upstream's, the formats
that cannot hold the scheme, and the shape deviation of docs/compatibility.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from auto_round.data_type.nvfp import nvfp4_v2
from auto_round.export.export_to_autoround.qlinear_fp import QuantLinear

from fastround import ops

import oracle
from test_regular_flow import _assert_same
from test_torch_ops import assert_bits_equal

ROWS, COLS = 12, 64  # 4 groups of 16 a row
# A dataset that cannot be loaded offline: a run that wanted calibration data would fail on it.
NO_DATA = "fastround-tests/no-such-dataset"
COMMON = {"iters": 0, "disable_model_free": True, "device_map": "cpu", "dataset": NO_DATA, "scheme": "NVFP4_E5M3"}


def _weight(dtype: torch.dtype) -> torch.Tensor:
    """[ROWS, COLS] over several octaves, with the groups where the regular flow's packer and model-free's part:
    negative values that round to zero (model-free keeps code 8, -0), a zero group, a group whose scale encodes
    to byte 0 (model-free saturates x / 0), UE5M3 subnormal scales, and signed zeros."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(ROWS, COLS, generator=g) * torch.exp2(torch.empty(ROWS, COLS).uniform_(-6, 2, generator=g))
    w[0] = 0.0
    w[1, :16] = 1e-7 * torch.randn(16, generator=g)  # scale below 2^-18: byte 0
    w[1, 16:32] = 3e-6 * torch.randn(16, generator=g)  # subnormal UE5M3 scale
    w[2, :16] = -0.0
    w[3, :16] = torch.tensor([6.0, -0.2, 0.2, -0.0, 0.0] + [0.1] * 11)
    w[4] = (20000.0 if dtype == torch.float16 else 30000.0) * torch.randn(COLS, generator=g)
    return w.to(dtype)


def _upstream(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qdq weight, weight_packed, weight_scale) as the regular flow leaves and packs a layer."""
    qdq, scale, _ = nvfp4_v2(w.clone(), bits=4, group_size=16, v=0)
    layer = nn.Linear(COLS, ROWS, bias=False)
    layer.weight.data = qdq
    q = QuantLinear(4, 16, COLS, ROWS, False, data_type="nvfp4_v2", act_bits=4, act_data_type="nvfp4_v2")
    q.pack(layer, scale.reshape(ROWS, -1), device="cpu")
    return qdq, q.weight_packed, q.weight_scale


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float16), ids=str)
def test_ops_match_upstream_quantizer_and_packer(dtype: torch.dtype) -> None:
    w = _weight(dtype)
    qdq, packed, scale = _upstream(w)
    enc = ops.encode_weight(w, "nvfp4_e5m3", 4, 16, True, False)
    ours = dict(ops.pack_codes(enc.codes, enc.scales, None, "nvfp4_e5m3", 4, 16, True, 0, False, from_qdq=True))
    assert torch.equal(ours["weight_scale"], scale)
    assert torch.equal(ours["weight_packed"], packed)
    assert_bits_equal(ops.dequantize_codes(enc.codes, enc.scales, None, "nvfp4_e5m3", 4, 16, True, dtype), qdq, "qdq")
    # model-free's packing of the same codes keeps the signed zeros and saturated zero-scale groups
    model_free = dict(ops.pack_codes(enc.codes, enc.scales, None, "nvfp4_e5m3", 4, 16, True, 0, False))
    assert not torch.equal(model_free["weight_packed"], packed)


def _run(which: str, src: Path, out: Path, fmt: str, **kwargs: Any) -> Path:
    if which == "upstream":
        from auto_round import AutoRound

        ar = AutoRound(str(src), enable_torch_compile=False, **COMMON, **kwargs)
    else:
        from fastround import AutoRound

        ar = AutoRound(str(src), **COMMON, **kwargs)
    _, folder = ar.quantize_and_save(str(out), format=fmt)
    return Path(folder if isinstance(folder, str) else folder[0]).parent if "," in fmt else Path(folder)


CASES = [
    # kind, format(s), disable_opt_rtn, other arguments
    ("llama_aligned", "auto_round,llm_compressor,fake", None, {}),
    ("llama_aligned", "llm_compressor", True, {"ignore_layers": "mlp.up_proj", "quant_lm_head": True}),
    # a zero-shot run still searches the scales of layers whose data type has an OPT-RTN (MXFP4 here)
    ("qwen2_aligned", "auto_round", False, {"layer_config": {"k_proj": "MXFP4", "v_proj": {"bits": 16}}}),
    ("qwen2_aligned", "fake", None, {"ignore_layers": "o_proj"}),
]


@pytest.mark.parametrize("kind,fmt,disable_opt_rtn,kwargs", CASES)
def test_regular_flow_matches_upstream(checkpoint, tmp_path, kind, fmt, disable_opt_rtn, kwargs) -> None:
    src = checkpoint(kind)
    kw = dict(kwargs, disable_opt_rtn=disable_opt_rtn)
    theirs = _run("upstream", src, tmp_path / "up", fmt, **kw)
    ours = _run("fastround", src, tmp_path / "fr", fmt, **kw)
    assert ours.relative_to(tmp_path / "fr") == theirs.relative_to(tmp_path / "up")
    folders = [p.parent for p in sorted(theirs.rglob("config.json"))]
    assert len(folders) == fmt.count(",") + 1
    for folder in folders:
        _assert_same(ours / folder.relative_to(theirs), folder)
    tensors = oracle.read_checkpoint(ours if "," not in fmt else ours / "auto-round-nvfp4-v2")
    if fmt != "fake":
        assert any(name.endswith(".weight_packed") for name in tensors)


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq", "auto_round:auto_gptq", "auto_round:gptqmodel",
                                 "auto_round:auto_awq"])
def test_integer_formats_are_refused(checkpoint, tmp_path, fmt) -> None:
    """Upstream refuses them too (a ValueError naming the supported schemes), before quantizing."""
    from fastround import AutoRound

    ar = AutoRound(str(checkpoint("llama_aligned")), **COMMON)
    with pytest.raises(ValueError, match=rf"format {fmt} cannot store NVFP4_E5M3.*scheme NVFP4_E5M3"):
        ar.quantize_and_save(str(tmp_path / "o"), format=fmt)
    assert not ar.quantized
    assert not (tmp_path / "o").exists()


def test_partial_groups_stay_in_full_precision(checkpoint, tmp_path) -> None:
    """in_features not a multiple of 16 (every Linear of kind "llama": 104 and 72): upstream's shape check misses
    nvfp4_v2, quantizes the layers with zero-padded groups and then fails in its packer; fastround keeps them in
    full precision as upstream does for NVFP4 / MXFP, with a 16-bit extra_config entry each."""
    src = checkpoint("llama")
    with pytest.raises(NotImplementedError, match="divisible by 16"):
        _run("upstream", src, tmp_path / "up", "auto_round")
    ours = _run("fastround", src, tmp_path / "fr", "auto_round")
    assert oracle.read_checkpoint(ours) == oracle.read_checkpoint(src)
    extra = json.loads((ours / "config.json").read_text())["quantization_config"]["extra_config"]
    linears = {n[: -len(".weight")] for n in oracle.read_checkpoint(src) if "layers." in n and "proj" in n}
    assert set(extra) == linears
    assert all(e["bits"] == 16 and e["act_bits"] == 16 for e in extra.values())


@pytest.mark.parametrize("scheme,fmt,layer,message", [
    ("NVFP4_E5M3", "auto_round", "W4A16", "format auto_round cannot store integer layer"),
    ("NVFP4_E5M3", "llm_compressor", "W4A16", "format llm_compressor cannot store integer layer"),
    ("NVFP4_E5M3", "llm_compressor", "MXFP4", "format llm_compressor: layer .* has a scheme other than NVFP4_E5M3"),
    ("W4A16", "auto_round", "NVFP4_E5M3", "format auto_round cannot store NVFP4_E5M3 layer"),
])
def test_mixed_nvfp4_e5m3_checkpoints_are_refused(checkpoint, tmp_path, scheme, fmt, layer, message) -> None:
    """Upstream writes an int layer of an NVFP4_E5M3 run through its FP4 packer (E2M1 nibbles under FP8 scales that
    mean nothing), and fails with an AttributeError on an MXFP4 layer in llm_compressor or an NVFP4_E5M3 layer of
    a W4A16 run; fastround names the format and the layer, and publishes nothing."""
    from fastround import AutoRound

    kw = dict(COMMON, scheme=scheme, disable_opt_rtn=True)
    ar = AutoRound(str(checkpoint("llama_aligned")), **kw, layer_config={"k_proj": layer})
    with pytest.raises(ValueError, match=message) as err:
        ar.quantize_and_save(str(tmp_path / "o"), format=fmt)
    assert "model.layers.0.self_attn.k_proj" in str(err.value)
    assert not list((tmp_path / "o").rglob("*.safetensors"))
