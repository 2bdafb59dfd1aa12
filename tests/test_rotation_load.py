"""Rotated checkpoints through fastround's transformers quantizer: tiny Llama checkpoints with rotation_config
(MXFP4 RTN, hadamard and random_hadamard, with hadamard_matrix buffers for the random one) and with
spinquant_config (W4A16 RTN, QuaRot online R1 + R2 + R4 with spinquant_r{1,4}_{type,size} buffers), written by
fastround and by auto-round 0.16.1, are loaded in a subprocess where `import auto_round` fails. Their logits must
equal those of the rotated quantized model fastround's quantize() returns (qdq weights and its own online hooks)
within fp32 tolerance (one through fastround.load_quantized); a checkpoint without rotation still loads as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from test_hf_load import _BLOCK, _fp16_exact_fp32, _run_child
from test_rotation import UpstreamRuns, _texts

COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu", "nsamples": 8,
          "seqlen": 32, "batch_size": 4, "amp": False}
# online R1 and R4 in blocks of 32 (hidden 160, intermediate 96), R2 on head_dim 32
QUAROT = {"algorithm": "spinquant", "rotation_size": 32, "r4": True}
CONFIGS: dict[str, dict[str, Any]] = {
    "mxfp4_hadamard": {"scheme": "MXFP4", "rotation_config": "hadamard"},
    "mxfp4_random": {"scheme": "MXFP4", "rotation_config": "random_hadamard"},
    "w4_quarot": {"scheme": "W4A16", "rotation_config": QUAROT},
    "w4_plain": {"scheme": "W4A16"},
}
UPSTREAM = ("mxfp4_hadamard", "mxfp4_random", "w4_quarot")
IDS = [[1, 5, 9, 17, 30, 4, 22, 8, 3, 40, 12, 7, 2, 19, 33, 6]]

_CHILD = """
import json, sys
import torch
import fastround
from fastround.quant_linear import FPQuantLinear, QuantLinear, online_rotation_count
from transformers import AutoModelForCausalLM

spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["ids"])
out = {}
for name, folder in spec["folders"].items():
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    if name == spec["load_quantized_case"]:
        model = fastround.load_quantized(folder, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    hooks = {n: online_rotation_count(m) for n, m in model.named_modules()
             if isinstance(m, (QuantLinear, FPQuantLinear))}
    with torch.inference_mode():
        out[name] = {"logits": model(ids).logits.float().tolist(), "hooks": hooks}
out["_blocked_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "auto_round")
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fastround import AutoRound

    root = tmp_path_factory.mktemp("rotation_load")
    src = _fp16_exact_fp32("llama_aligned", root)
    # upstream's runs (a fresh process each, as upstream patches its layers once per process) while fastround's run
    upstream = UpstreamRuns([(dict(COMMON, dataset=_texts(), src=str(src), **CONFIGS[name]), root / f"up_{name}")
                             for name in UPSTREAM])
    ids = torch.tensor(IDS)
    reference: dict[str, torch.Tensor] = {}
    folders: dict[str, str] = {}
    for name, kw in CONFIGS.items():
        ar = AutoRound(str(src), dataset=_texts(), **COMMON, **kw)
        model, _ = ar.quantize()
        with torch.inference_mode():
            reference[name] = model(ids).logits.float()
        ar = AutoRound(str(src), dataset=_texts(), **COMMON, **kw)
        _, folder = ar.quantize_and_save(str(root / f"fr_{name}"), format="auto_round")
        folders[f"fr_{name}"] = str(folder)
    folders["fr_mxfp4_random_bf16"] = folders["fr_mxfp4_random"]
    for name, (folder, _) in zip(UPSTREAM, upstream.wait()):
        folders[f"up_{name}"] = str(folder)
    loaded = _run_child(_BLOCK + _CHILD, {"folders": folders, "ids": IDS, "load_quantized_case": "up_w4_quarot"})
    return {"loaded": loaded, "reference": reference, "folders": folders}


def _case(runs: dict[str, Any], name: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    got = runs["loaded"][name]
    ref = runs["reference"][name.split("_", 1)[1].removesuffix("_bf16")]
    return torch.tensor(got["logits"]), ref, got["hooks"]


@pytest.mark.parametrize("name", ["fr_mxfp4_hadamard", "fr_mxfp4_random", "fr_w4_quarot", "fr_w4_plain",
                                  "up_mxfp4_hadamard", "up_mxfp4_random", "up_w4_quarot"])
def test_logits_equal_in_memory_rotated_model(runs: dict[str, Any], name: str) -> None:
    got, ref, _ = _case(runs, name)
    assert runs["loaded"]["_blocked_loaded"] == []
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))


def test_bf16_load_of_random_hadamard(runs: dict[str, Any]) -> None:
    """Loaded in bf16 the hadamard_matrix buffers are cast; the hooks rebuild M exactly from its signs."""
    got, ref, _ = _case(runs, "fr_mxfp4_random_bf16")
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_hooks_where_the_export_rotated(runs: dict[str, Any]) -> None:
    for prefix in ("fr", "up"):
        for name in ("mxfp4_hadamard", "mxfp4_random"):
            _, _, hooks = _case(runs, f"{prefix}_{name}")
            assert len(hooks) == 14 and all(v == 1 for v in hooks.values()), (prefix, name, hooks)
        _, _, hooks = _case(runs, f"{prefix}_w4_quarot")
        # online R1 on q/k/v/gate/up, R4 on down_proj, none on o_proj (R2 lives in the weights)
        want = {n: 0 if n.endswith("o_proj") else 1 for n in hooks}
        assert hooks == want and len(hooks) == 14
    _, _, hooks = _case(runs, "fr_w4_plain")
    assert len(hooks) == 14 and not any(hooks.values())


def test_rotation_buffers_in_checkpoints(runs: dict[str, Any]) -> None:
    """What the loader reads: upstream writes one shared hadamard_matrix, fastround one per layer; QuaRot's
    per-layer type/size buffers on the online layers."""
    from safetensors import safe_open

    def keys(name: str) -> list[str]:
        with safe_open(str(Path(runs["folders"][name]) / "model.safetensors"), "pt") as f:
            return list(f.keys())

    assert len([k for k in keys("fr_mxfp4_random") if k.endswith(".hadamard_matrix")]) == 14
    assert len([k for k in keys("up_mxfp4_random") if k.endswith(".hadamard_matrix")]) >= 1
    assert not any(k.endswith(".hadamard_matrix") for k in keys("fr_mxfp4_hadamard"))
    for prefix in ("fr", "up"):
        sq = [k for k in keys(f"{prefix}_w4_quarot") if ".spinquant_r" in k]
        assert len(sq) == 2 * 10 + 2 * 2, sq
        cfg = json.loads((Path(runs["folders"][f"{prefix}_w4_quarot"]) / "config.json").read_text())
        assert cfg["quantization_config"]["spinquant_config"]["r4"] is True


def test_shared_matrices_must_agree() -> None:
    """A random_hadamard checkpoint whose layers lack their own matrix and whose stored ones differ is refused."""
    from fastround.hf_quantizer import LayerPlan, apply_rotation_hooks

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    from fastround import transform_ops as T

    model[0].register_buffer("hadamard_matrix", T.random_hadamard_matrix(32))
    model[1].register_buffer("hadamard_matrix", -T.random_hadamard_matrix(32))
    plans = {n: LayerPlan("fp") for n in ("0", "1", "2")}
    cfg = {"rotation_config": {"block_size": 32, "hadamard_type": "random_hadamard"}, "data_type": "mx_fp"}
    with pytest.raises(ValueError, match="differ"):
        apply_rotation_hooks(model, cfg, plans)
    with pytest.raises(ValueError, match="hadamard_matrix"):
        apply_rotation_hooks(torch.nn.Sequential(torch.nn.Linear(32, 32)), cfg, {"0": LayerPlan("fp")})


def test_unloadable_spinquant_is_refused() -> None:
    from fastround.quarot import check_loadable

    with pytest.raises(NotImplementedError, match="trainable_rotation"):
        check_loadable({"r1": True, "trainable_rotation": True})
    check_loadable({"r1": True, "r3": True, "random_r1": True, "random_r3": True})  # tests/test_quarot_r3_random.py


def test_fuse_env_does_not_change_what_loads(runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """AR_FUSE_ONLINE_ROTATION steers quantization; a transform-backend checkpoint (backend auto, fuse unset) still
    loads with its per-linear hooks when the loading process has it set."""
    import fastround

    monkeypatch.setenv("AR_FUSE_ONLINE_ROTATION", "1")
    model = fastround.load_quantized(runs["folders"]["fr_mxfp4_hadamard"])
    with torch.inference_mode():
        got = model(torch.tensor(IDS)).logits.float()
    ref = runs["reference"]["mxfp4_hadamard"]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))
