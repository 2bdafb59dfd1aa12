"""The inplace Hadamard backend (fastround.rotation_inplace, transforms-and-formats.md §1.6): the function a rotated
model computes (fused full, fused grouped, unfused; Llama, Qwen2 with a v bias, OPT with LayerNorms), the rotated
weights against upstream's apply_rotation_transform, W4A16 RTN's fake checkpoint against auto-round 0.16.1's, the
online hooks of the in-memory model, the refused formats and configurations, and SignRound through the hooks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastround import rotation as R
from fastround import rotation_inplace as I
from fastround import transform_ops as T

from test_rotation import COMMON, UpstreamRuns, _texts

# (group size, fuse): fused full, fused grouped, unfused full, unfused grouped
MODES = [(None, True), (16, True), (None, False), (32, False)]


def _tiny(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Llama (GQA, untied), Qwen2 (q/k/v biases, tied embeddings), OPT (LayerNorms with biases, positional
    embeddings, biases everywhere); norms and biases away from their 1 / 0 init so that fusing them counts."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

    torch.manual_seed(0)
    if kind == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                        max_position_embeddings=64, word_embed_proj_dim=64)
    else:
        cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](
            hidden_size=64, intermediate_size=96 if kind == "llama" else 128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
            tie_word_embeddings=kind == "qwen2")
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.normal_(1.0 if "norm" in name and "bias" not in name else 0.0, 0.1)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("group,fuse", MODES)
def test_rotation_leaves_logits_unchanged(kind, group, fuse) -> None:
    model = _tiny(kind)
    with torch.no_grad():
        before = model(_ids()).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = I.apply_inplace(model, "hadamard", group, fuse)
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert any(n.endswith("down_proj.weight") or n.endswith("fc2.weight") for n in changed)
    assert plan.fused is fuse and plan.group_size == group
    if fuse:
        assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert len(plan.hooked) == 4  # down_proj / fc2 and o_proj / out_proj of each layer
        assert {k for k in plan.hooked.values()} == ({"full", "cross_head"} if group is None else {"group"})
    else:
        assert len(plan.hooked) == (12 if kind == "opt" else 14) and set(plan.hooked.values()) == \
            {"full" if group is None else "group"}
    with torch.no_grad():
        after = model(_ids()).logits
    torch.testing.assert_close(after, before, rtol=0, atol=5e-5)


@pytest.mark.parametrize("preset", ["random_hadamard", "quarot_hadamard"])
@pytest.mark.parametrize("group,fuse", [(None, True), (16, True), (None, False)])
def test_random_presets_leave_logits_unchanged(preset, group, fuse) -> None:
    model = _tiny("qwen2")
    with torch.no_grad():
        before = model(_ids()).logits
    I.apply_inplace(model, preset, group, fuse)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, before, rtol=0, atol=5e-5)


@pytest.mark.parametrize("kind,preset,group,fuse", [
    ("llama", "hadamard", None, True), ("llama", "hadamard", None, False), ("llama", "random_hadamard", 32, True),
    ("qwen2", "random_hadamard", None, True), ("opt", "hadamard", 32, True), ("llama", "quarot_hadamard", None, True),
])
def test_rotated_weights_equal_upstreams(kind, preset, group, fuse) -> None:
    """bf16 weights after the rotation, byte for byte, random matrices drawn from the same seed. Except
    upstream's QUIRK: full fused mode leaves a v_proj bias unrotated (Qwen2, OPT), which changes the function
    (its logits move, ours do not); fastround rotates it with the weight."""
    from auto_round.algorithms.transforms.hadamard.inplace import apply_rotation_transform, \
        clear_random_hadamard_cache

    ours = _tiny(kind, torch.bfloat16)
    theirs = copy.deepcopy(ours)
    with torch.no_grad():
        before = ours(_ids()).logits.float()
    torch.manual_seed(5)
    I.apply_inplace(ours, preset, group, fuse)
    our_next = torch.rand(4)
    torch.manual_seed(5)
    clear_random_hadamard_cache()
    apply_rotation_transform(theirs, group_size=group, rotation_matrix=preset, fuse_online_to_weight=fuse,
                             compute_device="cpu")
    assert torch.equal(our_next, torch.rand(4))  # the same draws from the global RNG
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    v_bias_quirk = fuse and group is None and kind in ("qwen2", "opt")
    assert differ == ([k for k in a if k.endswith("v_proj.bias")] if v_bias_quirk else [])
    with torch.inference_mode():
        up_logits = theirs(_ids()).logits.float()
    with torch.no_grad():
        our_logits = ours(_ids()).logits.float()
    assert (our_logits - before).abs().max() < 0.05  # bf16 noise
    if v_bias_quirk:
        assert (up_logits - before).abs().max() > 0.05


def _fake_tensors(folder: Path) -> dict[str, torch.Tensor]:
    f = safe_open(str(folder / "model.safetensors"), "pt")
    return {k: f.get_tensor(k) for k in f.keys()}


def test_w4a16_rtn_fake_checkpoint_equals_upstream(checkpoint, tmp_path) -> None:
    """W4A16 RTN with rotation_config="hadamard": an int scheme resolves to the inplace backend, the string's
    block_size is upstream's 32 (its string normaliser assumes mx_fp), fused grouped mode on the aligned Llama;
    every tensor of the fake checkpoint and config.json equal upstream's."""
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    kw = dict(COMMON, dataset=_texts(), src=str(src), scheme="W4A16", rotation_config="hadamard", format="fake")
    ((theirs, _),) = UpstreamRuns([(kw, tmp_path / "up")]).wait()  # a fresh (forked) process: see test_rotation
    ar = AutoRound(str(src), dataset=_texts(), **COMMON, scheme="W4A16", rotation_config="hadamard")
    _, ours = ar.quantize_and_save(str(tmp_path / "fr"), format="fake")
    assert ar.inplace_plan is not None and ar.inplace_plan.group_size == 32 and ar.inplace_plan.fused
    ours = Path(ours)
    assert ours.relative_to(tmp_path / "fr") == theirs.relative_to(tmp_path / "up")
    a, b = _fake_tensors(ours), _fake_tensors(theirs)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())


def test_in_memory_model_computes_with_its_hooks(checkpoint) -> None:
    """quantize() leaves the rotated qdq weights with their online hooks: down_proj reads x·A per group, o_proj
    too, q_proj (fused: fed by the rotated residual) has none; and the quantized model stays close to the float
    one, which it would not without the hooks."""
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    ar = AutoRound(str(src), dataset=_texts(), **COMMON, scheme="W4A16", rotation_config="hadamard")
    model, _ = ar.quantize()
    layer = model.model.layers[0]
    for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
        x = torch.randn(3, lin.in_features, dtype=lin.weight.dtype)
        want = torch.nn.functional.linear(T.hadamard_transform(x, 32), lin.weight)
        torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
    assert not layer.self_attn.q_proj._forward_pre_hooks
    assert sorted(ar.inplace_plan.hooked) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.o_proj"))


def test_formats_that_cannot_carry_it_are_refused(checkpoint, tmp_path) -> None:
    """Upstream writes auto_round (and other packed formats) with a rotation_config its loader reads as the
    per-linear transform backend: a checkpoint that loads and computes something else. fastround refuses every
    format but fake, naming it, before any work."""
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    for fmt in ("auto_round", "auto_gptq", "fake,auto_round"):
        ar = AutoRound(str(src), **COMMON, scheme="W4A16", rotation_config="hadamard")
        with pytest.raises(ValueError, match=f"format '{fmt.split(',')[-1]}'.*fake"):
            ar.quantize_and_save(str(tmp_path / "x"), format=fmt)
        assert ar.inplace_plan is None
    with pytest.raises(ValueError, match="format 'auto_awq'"):
        AutoRound(str(src), **COMMON, scheme="W4A16", rotation_config="hadamard", format="auto_awq")
    ar = AutoRound(str(src), **COMMON, scheme="W4A16", rotation_config="hadamard")
    ar.quantize()
    with pytest.raises(ValueError, match="format 'auto_round'"):
        ar.save_quantized(str(tmp_path / "y"), format="auto_round")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("form,group", [
    ("hadamard", 32),  # upstream's string: block_size 32
    ({"hadamard_type": "hadamard", "fuse_online_to_weight": True, "block_size": 16}, 16),
    ({"hadamard_type": "inplace_hadamard", "block_size": -1}, None),  # <= 0: full dimension
    ({"backend": "inplace", "hadamard_type": "random_hadamard", "block_size": 0}, None),
])
def test_config_forms_reach_the_inplace_backend(checkpoint, form, group) -> None:
    from fastround import AutoRound

    ar = AutoRound(str(checkpoint("qwen2_aligned")), **COMMON, scheme="W4A16", rotation_config=form)
    assert ar.rotation is None and ar.inplace is not None and not ar.inplace.hadamard_type.startswith("inplace_")
    from fastround.rotation_inplace import inplace_group_size

    assert inplace_group_size(ar.inplace.block_size, ar.scheme["group_size"]) == group


def test_refused_configurations(checkpoint) -> None:
    from fastround import AutoRound

    src = str(checkpoint("llama_aligned"))
    # upstream's QUIRK: unfused mode with allow_online_rotation=False rotates every weight and adds no hook
    with pytest.raises(ValueError, match="allow_online_rotation"):
        AutoRound(src, **COMMON, scheme="W4A16", rotation_config={
            "backend": "inplace", "hadamard_type": "hadamard", "fuse_online_to_weight": False,
            "allow_online_rotation": False})
    # a dict's unset block_size is the scheme's group_size (upstream's compressor): 128 does not divide 160
    ar = AutoRound(src, **COMMON, scheme="W4A16", rotation_config={"fuse_online_to_weight": True})
    with pytest.raises(ValueError, match="block_size 128 must divide hidden_size 160"):
        ar.quantize()
    # full fused mode needs a Hadamard order for the head count (5 has none; upstream fails an assert)
    ar = AutoRound(src, **COMMON, scheme="W4A16", rotation_config={"hadamard_type": "inplace_hadamard",
                                                                  "block_size": -1})
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        ar.quantize()
    with pytest.raises(ValueError, match="hadamard_type"):
        I.apply_inplace(_tiny("llama"), "walsh", None, True)
    with pytest.raises(ValueError, match="allow_online_rotation"):  # unfused by the caller's or the model's choice
        I.apply_inplace(_tiny("llama"), "hadamard", 16, False, allow_online=False)


def test_allow_online_rotation_false_is_ignored_when_fused() -> None:
    """As upstream: fused mode needs its hooks whatever allow_online_rotation says."""
    model = _tiny("llama")
    plan = I.apply_inplace(model, "hadamard", None, True, allow_online=False)
    assert len(plan.hooked) == 4


def test_signround_runs_through_the_hooks_and_is_deterministic(checkpoint, tmp_path) -> None:
    """SignRound (2 iterations) on the rotated model: the tuning wrappers run each layer's online hook (the tuned
    weights live in the rotated space), two runs give the same bytes, and the result differs from RTN's."""
    from fastround import AutoRound

    src = str(checkpoint("llama_aligned"))
    kw = dict(COMMON, iters=2, nsamples=2, seqlen=32, batch_size=2, disable_opt_rtn=None, scheme="W4A16",
              rotation_config="hadamard", dataset=_texts())
    folders = []
    for i in range(2):
        ar = AutoRound(src, **kw)
        _, folder = ar.quantize_and_save(str(tmp_path / f"sr{i}"), format="fake")
        folders.append(Path(folder))
    a, b = _fake_tensors(folders[0]), _fake_tensors(folders[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    rtn = AutoRound(src, **dict(kw, iters=0))
    _, folder = rtn.quantize_and_save(str(tmp_path / "rtn"), format="fake")
    c = _fake_tensors(Path(folder))
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("proj.weight"))


def test_tuning_wrapper_runs_the_hook() -> None:
    from fastround.tune_layers import run_pre_hooks

    model = _tiny("llama")
    I.apply_inplace(model, "hadamard", 16, True)
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, down.in_features)
    torch.testing.assert_close(run_pre_hooks(down, x), T.hadamard_transform(x, 16), rtol=0, atol=0)


def test_linear_rotation_refers_inplace_configs() -> None:
    with pytest.raises(ValueError, match="'inplace' backend"):
        R.LinearRotation(R.RotationConfig(hadamard_type="hadamard"), "int")
    with pytest.raises(ValueError, match="positive block_size"):
        R.LinearRotation(R.RotationConfig(block_size=-1), "mx_fp")


def test_cli_flags_reach_the_inplace_backend(checkpoint) -> None:
    from fastround import AutoRound
    from fastround.cli import build_parser, rotation_config_from_args

    args = build_parser().parse_args(["m", "--rotation_backend", "inplace", "--rotation_type", "quarot_hadamard",
                                      "--rotation_block_size", "16", "--fuse_online_to_weight",
                                      "--no-allow_online_rotation"])
    form = rotation_config_from_args(args)
    ar = AutoRound(str(checkpoint("qwen2_aligned")), **COMMON, scheme="W4A16", rotation_config=form)
    cfg = ar.inplace
    assert (cfg.hadamard_type, cfg.block_size, cfg.fuse_online_to_weight, cfg.allow_online_rotation) == (
        "quarot_hadamard", 16, True, False)


def test_upstreams_packed_inplace_checkpoints_are_refused_at_load() -> None:
    """Upstream's auto_round export of an inplace rotation writes rotation_config with the int data type; its loader
    reads it as the per-linear transform. fastround's loader refuses it by name."""
    from fastround.hf_quantizer import LayerPlan, apply_rotation_hooks

    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    written = {"algorithm": "hadamard", "layerwise": False, "backend": "auto", "block_size": 32,
               "hadamard_type": "hadamard", "fuse_online_to_weight": None, "allow_online_rotation": True}
    for data_type, rot in (("int", written), ("mx_fp", dict(written, fuse_online_to_weight=True))):
        with pytest.raises(ValueError, match="inplace backend"):
            apply_rotation_hooks(model, {"rotation_config": rot, "data_type": data_type}, {"0": LayerPlan("fp")})
    assert apply_rotation_hooks(model, {"rotation_config": written, "data_type": "mx_fp"}, {"0": LayerPlan("fp")})


def test_a_refused_format_leaves_the_model_unrotated(checkpoint, tmp_path) -> None:
    """QuaRot with a format that cannot carry it fails before the model-level rotation: the caller's model is left
    as it was, without hooks."""
    from transformers import AutoModelForCausalLM

    from fastround import AutoRound

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint("llama_aligned")), torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ar = AutoRound(model, **COMMON, scheme="W4A16", rotation_config="quarot")
    with pytest.raises(ValueError, match="cannot carry rotation_config"):
        ar.quantize_and_save(str(tmp_path / "x"), format="auto_gptq")
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m._forward_pre_hooks for m in model.modules())
