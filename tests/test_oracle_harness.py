"""Self-test of the parity harness: checkpoint builders, oracle runner, differ."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import pytest

import checkpoints
import oracle

CheckpointFactory = Callable[..., Path]


def _index(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("dtype", checkpoints.DTYPES)
@pytest.mark.parametrize("kind", checkpoints.KINDS)
def test_build(checkpoint: CheckpointFactory, kind: str, dtype: str) -> None:
    path = checkpoint(kind, dtype)
    shards = oracle.safetensors_files(path)
    assert 3 <= len(shards) <= 6, shards
    tensors = oracle.read_checkpoint(path)
    weight_map = _index(path)
    assert set(weight_map) == set(tensors)
    assert set(weight_map.values()) == set(shards)

    st_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    assert {d for d, _, _ in tensors.values()} == {st_dtype}
    assert json.loads((path / "config.json").read_text())["dtype"] == dtype
    for side in ("tokenizer.json", "tokenizer_config.json", "original/params.json", "original/notes.txt"):
        assert (path / side).is_file(), side

    # Edge rows planted by the builder: row 0 of every big 2-D weight is zero.
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    row_bytes = q[1][1] * oracle.DTYPE_SIZES[q[0]]
    assert q[2][:row_bytes] == bytes(row_bytes)

    has_lm_head = "lm_head.weight" in tensors
    assert has_lm_head == (kind != "llama_tied")
    if kind == "qwen3_moe":
        assert tensors["model.layers.0.mlp.experts.3.gate_proj.weight"][1] == (40, 104)
        assert tensors["model.layers.0.mlp.experts.3.down_proj.weight"][1] == (104, 40)
        assert tensors["model.layers.0.mlp.gate.weight"][1] == (4, 104)
    if kind == "qwen3_moe_fused":
        assert tensors["model.layers.0.mlp.experts.gate_up_proj"][1] == (4, 80, 104)
        assert tensors["model.layers.0.mlp.experts.down_proj"][1] == (4, 104, 40)
    if kind == "qwen2":
        assert tensors["model.layers.0.self_attn.k_proj.bias"][1] == (50,)


def test_build_is_deterministic(tmp_path: Path, checkpoint: CheckpointFactory) -> None:
    again = checkpoints.build("qwen3_moe_fused", tmp_path / "again", "float16")
    diff = oracle.compare_checkpoints(checkpoint("qwen3_moe_fused", "float16"), again)
    assert list(diff) == [] and diff.order == []


def _expected_gptq_shapes(in_f: int, out_f: int, bits: int = 4, gs: int = 128) -> dict[str, tuple[int, ...]]:
    groups = math.ceil(in_f / gs)
    # Model-free pads in_features up to a whole number of groups (the regular
    # flow does not): qweight rows cover groups * gs inputs.
    return {
        "qweight": (groups * gs * bits // 32, out_f),
        "qzeros": (groups, math.ceil(out_f * bits / 32)),
        "scales": (groups, out_f),
    }


@pytest.fixture(scope="module")
def llama_w4a16(checkpoint: CheckpointFactory, oracle_tmp) -> Path:
    return oracle.run_upstream_api(checkpoint("llama", "bfloat16"), oracle_tmp("llama-w4a16"), scheme="W4A16")


def test_upstream_api_w4a16_llama(llama_w4a16: Path) -> None:
    tensors = oracle.read_checkpoint(llama_w4a16)
    hidden, inter, kv = 104, 72, 52
    layers = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    for i in range(2):
        for name, (in_f, out_f) in layers.items():
            prefix = f"model.layers.{i}.{name}"
            assert f"{prefix}.weight" not in tensors
            for suffix, shape in _expected_gptq_shapes(in_f, out_f).items():
                dtype, got, _ = tensors[f"{prefix}.{suffix}"]
                assert got == shape, (prefix, suffix)
                assert dtype == ("F16" if suffix == "scales" else "I32")
    # Ignored by default: lm_head (pattern) and embeddings (auto-detected).
    assert tensors["lm_head.weight"][:2] == ("BF16", (96, 104))
    assert tensors["model.embed_tokens.weight"][:2] == ("BF16", (96, 104))

    qc = json.loads((llama_w4a16 / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == 128 and qc["sym"] is True
    assert qc["extra_config"] == {"lm_head": {"bits": 16, "data_type": "float"}}
    assert (llama_w4a16 / "tokenizer.json").is_file()
    assert (llama_w4a16 / "original" / "notes.txt").is_file()

    diff = oracle.compare_checkpoints(llama_w4a16, llama_w4a16)
    assert list(diff) == [] and diff.order == []


def test_oracle_cache(checkpoint: CheckpointFactory, llama_w4a16: Path, oracle_tmp) -> None:
    again = oracle.run_upstream_api(checkpoint("llama", "bfloat16"), oracle_tmp("again"), scheme="W4A16")
    assert again != llama_w4a16
    diff = oracle.compare_checkpoints(llama_w4a16, again)
    assert list(diff) == [] and diff.order == []


def test_compare_reports_differences(llama_w4a16: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(llama_w4a16, copy)

    # Flip one byte inside a tensor's data.
    name = "model.layers.1.mlp.down_proj.scales"
    index = _index(copy)
    shard = copy / index[name]
    header, base = oracle.read_safetensors_header(shard)
    begin = header[name]["data_offsets"][0]
    raw = bytearray(shard.read_bytes())
    raw[base + begin + 2 * 5] ^= 0x01  # element 5 of an F16 tensor
    shard.write_bytes(bytes(raw))

    # Reorder the index and extra_config without changing content.
    idx = json.loads((copy / "model.safetensors.index.json").read_text())
    idx["weight_map"] = dict(reversed(list(idx["weight_map"].items())))
    (copy / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    cfg = json.loads((copy / "config.json").read_text())
    qc = cfg["quantization_config"]
    cfg["quantization_config"] = {"bits": qc.pop("bits"), **qc}
    (copy / "config.json").write_text(json.dumps(cfg, indent=2))

    diff = oracle.compare_checkpoints(llama_w4a16, copy)
    text = "\n".join(diff)
    assert f"tensor {name}: bytes differ" in text and "first at flat 5 = (0, 5)" in text
    assert f"{index[name]}: file bytes differ" in text
    assert not any("weight_map" in d or "quantization_config" in d for d in diff), diff
    order = "\n".join(diff.order)
    assert "model.safetensors.index.json.weight_map: key order differs" in order
    assert "config.json.quantization_config: key order differs" in order


def test_upstream_fused_and_split_moe_agree(checkpoint: CheckpointFactory) -> None:
    """Both MoE layouts hold the same weights, so upstream's outputs must match tensor for tensor."""
    split = oracle.run_upstream_core(checkpoint("qwen3_moe"), None, "W4A16_MIXED")
    fused = oracle.run_upstream_core(checkpoint("qwen3_moe_fused"), None, "W4A16_MIXED")
    a, b = oracle.read_checkpoint(split), oracle.read_checkpoint(fused)
    assert a == b
    qc = json.loads((split / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 8  # mixed recipe applied: 8-bit default, 4-bit experts
    assert a["model.layers.0.mlp.experts.0.up_proj.qweight"][1] == (16, 40)
    assert a["model.layers.0.self_attn.q_proj.qweight"][1] == (32, 104)
    assert a["model.layers.0.mlp.gate.weight"][0] == "BF16"
