"""QuaRot R3 (q, k rotated per head after RoPE) and random R1-R4 matrices (fastround.quarot): on tiny unquantized
Llama / Qwen2 / Qwen3 models the logits stay those of the original model and the KV cache holds the keys times R3;
the rotated weights and matrices equal upstream's SpinQuantPreprocessor's bytes for the same torch seed; a W4A16
RTN checkpoint with R3 and random matrices equals upstream's, and loaded through fastround's transformers
integration (auto_round blocked), fastround's and upstream's checkpoints give the logits of the in-memory model."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from test_quarot import _logits, _tiny

from fastround import quarot as Q
from fastround import transform_ops as T

ALL_RANDOM = dict(random_r1=True, random_r2=True, random_r3=True, random_r4=True)


def _cached_keys(model: torch.nn.Module) -> list[torch.Tensor]:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return [layer.keys for layer in cache.layers]  # [batch, kv heads, seq, head_dim] each, after RoPE (and R3)


@pytest.mark.parametrize("kind,fields", [
    *[(kind, f) for f in (dict(r3=True), dict(r3=True, r4=True, **ALL_RANDOM)) for kind in ("llama", "qwen2", "qwen3")],
    ("qwen2", dict(online_r1_rotation=False, rotation_size=16, r3=True, r4=True, **ALL_RANDOM)),  # v bias, embedding
], ids=[f"{f}-{k}" for f in ("r3", "online_random") for k in ("llama", "qwen2", "qwen3")] + ["offline_block_random"])
def test_logits_unchanged_and_cache_rotated(kind: str, fields: dict[str, Any]) -> None:
    model = _tiny(kind, 96)
    other = copy.deepcopy(model)
    before, keys = _logits(model), _cached_keys(model)
    torch.manual_seed(11)
    plan = Q.apply_quarot(model, Q.QuaRotConfig(**fields))
    assert plan.r3 and sorted(plan.random) == (["r1", "r2", "r3", "r4"] if fields.get("random_r1") else [])
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=5e-5)
    hd = plan.arch.head_dim  # 16; Qwen3Config's own default head_dim is 128
    r3 = plan.random["r3"].matrix if "r3" in plan.random else T.deterministic_hadamard_matrix(hd)
    for got, orig in zip(_cached_keys(model), keys):
        torch.testing.assert_close(got, orig @ r3, rtol=0, atol=5e-5)
    # per instance: the class, the transformers module and another model of the class are untouched
    attn = model.model.layers[0].self_attn
    assert "forward" in vars(attn) and "forward" not in vars(other.model.layers[0].self_attn)
    assert attn.fastround_r3.rope is sys.modules[type(attn).__module__].apply_rotary_pos_emb
    torch.testing.assert_close(_logits(other), before, rtol=0, atol=0)
    assert torch.equal(_cached_keys(other)[0], keys[0])


def test_random_signs_go_through_the_kernel() -> None:
    """The hooks apply x·diag(d)·Tᵀ through the FWHT (signs first); it must equal x·M with upstream's stored M,
    also for a K·2^m size (96 = 12·8), and from_stored gives the same rotation back from int8 sign(M)."""
    from auto_round.algorithms.transforms.spinquant.rotation_utils import random_hadamard_matrix

    for n in (32, 96):
        torch.manual_seed(5)
        rot = Q.RandomRotation.draw(n, torch.device("cpu"))
        torch.manual_seed(5)
        assert torch.equal(rot.matrix, random_hadamard_matrix(n))
        x = torch.randn(3, 2 * n)
        want = (x.view(3, 2, n).double() @ rot.matrix.double()).view(3, 2 * n).float()
        torch.testing.assert_close(rot.block_map(fp32=False)(x), want, rtol=0, atol=1e-5)
        back = Q.RandomRotation.from_stored(rot.matrix.sign().to(torch.int8), "m")
        assert torch.equal(back.matrix, rot.matrix) and torch.equal(back.signs, rot.signs)
    with pytest.raises(ValueError, match="not a random Hadamard"):
        Q.RandomRotation.from_stored(torch.ones(32, 32, dtype=torch.int8), "m")
    one_off = rot.matrix.sign().to(torch.int8)
    one_off[40, 77] *= -1
    with pytest.raises(ValueError, match="not a random Hadamard"):
        Q.RandomRotation.from_stored(one_off, "m")


def test_fp32_hook_on_half_activations_is_one_op_with_the_same_bits() -> None:
    """R4's hook is upstream's fp32 transform (x.float() -> FWHT -> cast back); the kernel computes half types in
    fp32 and rounds once, so the hook calls it on x directly. The bits must be those of the casting route."""
    for dtype in (torch.bfloat16, torch.float16):
        for n, k in ((14336, 28), (4096, 1), (96, 12)):
            hk = T.spinquant_matrix(k) if k > 1 else None
            x = (torch.randn(3, 2 * n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
            via_fp32 = T.hadamard_any_device(x.float(), n, hk, None, signs_first=True).to(dtype)
            hook = Q.online_hook("r4", n, k)
            got = hook(None, (x,))[0]
            assert got.dtype == dtype and torch.equal(got.view(torch.int16), via_fp32.view(torch.int16)), (dtype, n)


@pytest.mark.parametrize("fields", [
    dict(r3=True, r4=True, **ALL_RANDOM),
    dict(online_r1_rotation=False, rotation_size=32, r3=True, r4=True, **ALL_RANDOM),
], ids=["online", "offline_block"])
def test_weights_and_matrices_equal_upstream(fields: dict[str, Any]) -> None:
    """upstream's SpinQuantPreprocessor on a copy, the same seed before each: every tensor byte-equal (fp16
    weights; the model-level matrices, random ones included), and the same rotated keys in the KV cache."""
    from auto_round.algorithms.transforms.spinquant.preprocessor import SpinQuantConfig, SpinQuantPreprocessor

    model = _tiny("llama", 96).half()
    theirs = copy.deepcopy(model)
    torch.manual_seed(7)
    plan = Q.apply_quarot(model, Q.QuaRotConfig(**fields))
    torch.manual_seed(7)
    SpinQuantPreprocessor(theirs, SpinQuantConfig(**fields, device="cpu")).preprocess()
    ours = {**model.state_dict(), **plan.model_tensors()}
    up = theirs.state_dict()
    assert {k for k in up if k.startswith("spinquant_")} == set(plan.model_tensors())
    assert [k for k in up if not torch.equal(ours[k].to(up[k].dtype), up[k])] == []
    for a, b in zip(_cached_keys(model.float()), _cached_keys(theirs.float())):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(8)
    again = Q.apply_quarot(_tiny("llama", 96), Q.QuaRotConfig(**fields))
    assert not torch.equal(again.random["r2"].signs, plan.random["r2"].signs)


def test_config_fields() -> None:
    cfg = Q.parse_spinquant({"algorithm": "spinquant", "r3": True, "random_r4": True})
    assert cfg.r3 and cfg.random_r4 and not cfg.random_r1
    with pytest.raises(NotImplementedError, match="trainable_rotation"):
        Q.parse_spinquant({"algorithm": "spinquant", "trainable_rotation": True})
    with pytest.raises(NotImplementedError, match="trainable_rotation"):
        Q.check_loadable({"r1": True, "trainable_rotation": True})
    Q.check_loadable({"r3": True, "random_r1": True, "random_r3": True})
    model = _tiny("llama", 96)
    Q.install_r3(model.model.layers[0].self_attn, 16, None)
    with pytest.raises(ValueError, match="already installed"):
        Q.install_r3(model.model.layers[0].self_attn, 16, None)
    with pytest.raises(NotImplementedError, match="apply_rotary_pos_emb"):  # e.g. OPT's attention: no RoPE
        Q.install_r3(model.model.layers[0].mlp, 16, None)


# Checkpoints: online R1 and R4 in blocks of 32 (hidden 160, intermediate 96), R2 and R3 on head_dim 32, all random
CKPT = {"algorithm": "spinquant", "rotation_size": 32, "r3": True, "r4": True, **ALL_RANDOM}
COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu", "nsamples": 8,
          "seqlen": 32, "batch_size": 4, "amp": False}
IDS = [[1, 5, 9, 17, 30, 4, 22, 8, 3, 40, 12, 7, 2, 19, 33, 6]]

_CHILD = """
import json, sys
import torch
import fastround
from transformers import AutoModelForCausalLM

spec = json.loads(sys.argv[1])
out = {}
for name, folder in spec["folders"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    r3 = [n for n, m in model.named_modules() if getattr(m, "fastround_r3", None) is not None]
    rnd = [getattr(m, "fastround_r3").random is not None for n, m in model.named_modules() if n in r3]
    with torch.inference_mode():
        logits = model(torch.tensor(spec["ids"])).logits.float().tolist()
    out[name] = {"logits": logits, "r3": r3, "r3_random": rnd}
out["_blocked_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "auto_round")
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from test_hf_load import _BLOCK, _fp16_exact_fp32, _run_child
    from test_rotation import UpstreamRuns, _texts

    from fastround import AutoRound

    root = tmp_path_factory.mktemp("quarot_r3_random")
    src = _fp16_exact_fp32("llama_aligned", root)
    kw = dict(COMMON, dataset=_texts(), rotation_config=CKPT, scheme="W4A16")
    # upstream in a fresh process (it patches its layers once per process), running while fastround quantizes
    up = UpstreamRuns([(dict(kw, src=str(src)), root / "up")])
    model, _ = AutoRound(str(src), **kw).quantize()
    with torch.inference_mode():
        reference = model(torch.tensor(IDS)).logits.float()
    # quantize_and_save packs as it goes and writes upstream's tensor order (save_quantized after quantize does not)
    _, ours = AutoRound(str(src), **kw).quantize_and_save(str(root / "fr"), format="auto_round")
    ((theirs, _),) = up.wait()
    folders = {"fr": str(ours), "up": str(theirs)}
    loaded = _run_child(_BLOCK + _CHILD, {"folders": folders, "ids": IDS})
    return {"folders": folders, "loaded": loaded, "reference": reference}


def test_rtn_checkpoint_equals_upstream(runs: dict[str, Any]) -> None:
    """AutoRound's seed (42) before the rotation on both sides: the same random matrices, so every tensor (the
    int8 spinquant_r{1,4}_matrix sign buffers, spinquant_R1 / R2_head / R3_head / R4_matrix) and config.json equal
    upstream's."""
    import oracle

    ignore = (".cache", "fastround_summary.json", "tokenizer.json", "tokenizer_config.json")
    diff = oracle.compare_checkpoints(runs["folders"]["fr"], runs["folders"]["up"], ignore=ignore)
    assert diff == []
    from safetensors import safe_open

    with safe_open(str(Path(runs["folders"]["fr"]) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.spinquant_r1_matrix").dtype == torch.int8
    # q/k/v/gate/up (R1) and down (R4) of 2 layers
    assert len([k for k in keys if k.endswith("_matrix") and ".spinquant_r" in k]) == 2 * 5 + 2
    assert {"spinquant_R1", "spinquant_R2_head", "spinquant_R3_head", "spinquant_R4_matrix"} <= set(keys)
    q = json.loads((Path(runs["folders"]["fr"]) / "config.json").read_text())["quantization_config"]
    assert q["spinquant_config"]["r3"] is True and q["spinquant_config"]["random_r3"] is True


@pytest.mark.parametrize("name", ["fr", "up"])
def test_loaded_logits_equal_in_memory_model(runs: dict[str, Any], name: str) -> None:
    """Loaded without auto_round: R1 / R4 from the int8 sign buffers, R3 rebuilt on every attention from the
    config with the stored random spinquant_R3_head (upstream's loader would use the fixed Hadamard there)."""
    got = runs["loaded"][name]
    assert runs["loaded"]["_blocked_loaded"] == []
    assert got["r3"] == [f"model.layers.{i}.self_attn" for i in range(2)] and all(got["r3_random"])
    ref = runs["reference"]
    torch.testing.assert_close(torch.tensor(got["logits"]), ref, rtol=0, atol=2e-4 * float(ref.abs().max()))
