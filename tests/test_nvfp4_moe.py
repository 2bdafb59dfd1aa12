"""NVFP4 on a MoE model (tiny Qwen3-MoE) against auto-round 0.16.1 (eager, CPU): RTN (iters=0) and SignRound.

Upstream calibrates each block as on a dense model (weight global scales 448 * 6 / max|W|, an expert's gate/up
sharing their minimum as a dense MLP's do; each layer's max |input| over the block's forward), then, before the
global scales, runs set_amax_for_all_moe_layers: an expert projection no calibration token was routed to takes
the largest max |input| of the same projection over the block's reached experts, so every expert gets a static
input_global_scale. The checkpoint here is starved on purpose (a constant embedding dimension that the routers
read: layer 0 never routes to experts 2 and 3, layer 1 never to expert 3), so that rule decides some scales.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

import oracle
from test_signround import _run, assert_same_checkpoint

FAST = {"scheme": "NVFP4", "nsamples": 2, "seqlen": 16, "batch_size": 2}
# Expert projections the calibration forward never reaches in the starved checkpoint (checked below).
UNREACHED = {f"model.layers.{b}.mlp.experts.{e}.{p}" for b, e in ((0, 2), (0, 3), (1, 3))
             for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def starved(checkpoint, tmp_path_factory) -> Path:
    """qwen3_moe_aligned with embedding column 0 set to 1 and every router's column 0 to +0.5 (-0.5 for the
    last expert): column 0 dominates the normalised hidden states, so the last expert always loses the top-2."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("starved") / "qwen3_moe_starved"
    shutil.copytree(checkpoint("qwen3_moe_aligned"), dst)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, t in tensors.items():
            if name == "model.embed_tokens.weight":
                t[:, 0] = 1.0
            elif name.endswith("mlp.gate.weight"):
                t[:-1, 0] = 0.5
                t[-1, 0] = -0.5
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


def _ours_own_modeling(src: Path, out: Path, fmt: str, **kwargs) -> Path:
    """fastround on transformers' own Qwen3-MoE classes (fused experts split by fastround, TopKRouter), which
    upstream's run replaced process-wide."""
    import checkpoints

    checkpoints._original_moe_block()
    return _run("fastround", src, out, fmt, **kwargs)


def _assert_same_but_routers(theirs: Path, ours: Path) -> None:
    """Every tensor byte for byte; the config too but for the routers' 16-bit extra_config entries, which
    upstream writes for its Linear router and fastround's TopKRouter (no quantization target) does not get."""
    assert oracle.read_checkpoint(theirs) == oracle.read_checkpoint(ours)
    a = json.loads((ours / "config.json").read_text())["quantization_config"]
    b = json.loads((theirs / "config.json").read_text())["quantization_config"]
    extra = b.pop("extra_config", {})
    assert extra and all(k.endswith("mlp.gate") for k in extra), extra
    assert {k: v for k, v in a.items() if k != "extra_config"} == b
    assert not a.get("extra_config")


def _spy_fill(monkeypatch) -> set[str]:
    """Names the MoE rule filled (layers the forward never reached), over every block of the run."""
    from fastround import blockloop

    filled: set[str] = set()
    real = blockloop._nv_fill_unreached_experts

    def spy(model, blocks, act_max):
        out = real(model, blocks, act_max)
        filled.update(set(out) - set(act_max))
        return out

    monkeypatch.setattr(blockloop, "_nv_fill_unreached_experts", spy)
    return filled


def test_nvfp4_moe_rtn_equals_upstream(starved, tmp_path, monkeypatch) -> None:
    """RTN (OPT-RTN, upstream's default, searches the attention layers; MoE experts take plain RTN)."""
    theirs = _run("upstream", starved, tmp_path / "up", "auto_round", iters=0, **FAST)
    filled = _spy_fill(monkeypatch)
    # In upstream's modeling (still installed by its run): Linear routers, kept in 16 bits as upstream keeps them.
    ours = _run("fastround", starved, tmp_path / "fr", "auto_round", iters=0, **FAST)
    tensors = assert_same_checkpoint(theirs, ours)
    assert filled == UNREACHED
    assert UNREACHED <= {k[: -len(".input_global_scale")] for k in tensors if k.endswith(".input_global_scale")}
    filled.clear()
    own = _ours_own_modeling(starved, tmp_path / "own", "auto_round", iters=0, **FAST)
    _assert_same_but_routers(theirs, own)
    assert filled == UNREACHED


def test_nvfp4_moe_unreached_expert_takes_peers_maximum(starved, tmp_path) -> None:
    """The filled input global scale is the smallest of the reached experts' (the largest input maximum), and a
    reached expert keeps its own, in the written checkpoint."""
    from safetensors import safe_open

    out = _ours_own_modeling(starved, tmp_path / "fr", "auto_round", iters=0, disable_opt_rtn=True, **FAST)
    scales: dict[str, float] = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.endswith(".input_global_scale") and ".experts." in k:
                    scales[k[: -len(".input_global_scale")]] = float(f.get_tensor(k))
    for proj in ("up_proj", "down_proj"):
        reached = [scales[f"model.layers.0.mlp.experts.{e}.{proj}"] for e in (0, 1)]
        assert scales[f"model.layers.0.mlp.experts.2.{proj}"] == min(reached)
        assert scales[f"model.layers.0.mlp.experts.3.{proj}"] == min(reached)
    down = [scales[f"model.layers.1.mlp.experts.{e}.down_proj"] for e in range(3)]
    assert len(set(down)) > 1  # reached experts keep their own maxima (no unification)
    assert scales["model.layers.1.mlp.experts.3.down_proj"] == min(down)


def test_nvfp4_moe_signround_equals_upstream(starved, tmp_path, caplog, monkeypatch) -> None:
    """SignRound, written in llm_compressor: the tuning must move (a best iteration after 0 in both blocks)."""
    kwargs = {"iters": 2, "lr": 0.02, **FAST}
    theirs = _run("upstream", starved, tmp_path / "up", "llm_compressor", **kwargs)
    filled = _spy_fill(monkeypatch)
    ours = _run("fastround", starved, tmp_path / "fr", "llm_compressor", **kwargs)  # upstream's modeling
    assert_same_checkpoint(theirs, ours)
    assert filled == UNREACHED
    filled.clear()
    with caplog.at_level(logging.INFO, logger="fastround"):
        own = _ours_own_modeling(starved, tmp_path / "own", "llm_compressor", **kwargs)
    best_iters = [int(i) for i in re.findall(r"loss iter 0: [0-9.e+-]+ -> iter (\d+):", caplog.text)]
    assert len(best_iters) == 2 and min(best_iters) > 0, best_iters
    assert filled == UNREACHED
    assert oracle.read_checkpoint(theirs) == oracle.read_checkpoint(own)
    a = json.loads((own / "config.json").read_text())["quantization_config"]
    b = json.loads((theirs / "config.json").read_text())["quantization_config"]
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    assert b["ignore"] == routers + a["ignore"]  # the Linear routers upstream keeps in 16 bits (see above)
    assert {k: v for k, v in a.items() if k != "ignore"} == {k: v for k, v in b.items() if k != "ignore"}


def test_nvfp4_moe_without_reached_peer_is_refused(starved, tmp_path) -> None:
    """Layer 1's expert 3 is never reached; with experts 0-2 kept in 16 bits it has no NVFP4 peer whose input
    maximum it could take (upstream asserts at export): refused by name, nothing written."""
    out = tmp_path / "fr"
    keep = {f"model.layers.1.mlp.experts.{e}.{p}": {"bits": 16, "data_type": "float", "act_bits": 16}
            for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.gate_proj.*never reached"):
        _ours_own_modeling(starved, out, "auto_round", iters=0, disable_opt_rtn=True, layer_config=keep, **FAST)
    assert not any(out.rglob("*.safetensors"))
