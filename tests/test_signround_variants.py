"""SignRound's variants against auto-round 0.16.1 (eager, CPU): AdamRound (`enable_adam`), norm/bias tuning
(`enable_norm_bias_tuning`) and tuning the quantized layers outside the blocks (`quant_lm_head=True`, iters > 0).

Whole checkpoints are compared byte for byte. AdamRound's steps scale with the gradient, so the one place where
fastround's gradient may differ from torch autograd's (the range factors' group sums, added in another order, can
differ in their last fp16 bit) can move a scale by one fp16 step; `test_adam_differs_only_by_factor_sum_order`
holds that to the measured bound.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import oracle
import pytest
import torch
from test_cli import assert_ok, run_cli, snapshot
from test_opt_rtn_flow import _texts
from test_signround import COMMON, _config, _run, assert_same_checkpoint


@pytest.fixture(scope="module")
def biased(checkpoint, tmp_path_factory) -> Path:
    """llama_aligned's shapes with biases on every Linear and norm weights away from 1: what norm/bias tuning moves
    (the shared tiny kinds have no Llama with biases, and the Qwen2 ones get a tokenizer that knows no words)."""
    from transformers import AutoConfig, LlamaForCausalLM

    src = checkpoint("llama_aligned")
    cfg = AutoConfig.from_pretrained(src)
    cfg.attention_bias = cfg.mlp_bias = True
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    out = tmp_path_factory.mktemp("llama_biased")
    model.to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


def _tuned_lines(text: str) -> dict[str, tuple[float, int, float]]:
    """label -> (loss at iteration 0, best iteration, its loss) from fastround's log."""
    number = r"([0-9.e+-]+)"
    pattern = rf"INFO\s+fastround:\S*\s*([\w.,]+): tuned.*?loss iter 0: {number} -> iter (\d+): {number}"
    found = re.findall(pattern, text)
    return {label: (float(a), int(k), float(b)) for label, a, k, b in found}


CASES = [
    ("llama_aligned", "auto_round", {"scheme": "W4A16", "iters": 10, "lr": 0.002, "enable_adam": True,
                                     "quant_lm_head": True}),
    ("biased", "auto_round", {"scheme": "W4A16", "iters": 8, "lr": 0.02, "enable_norm_bias_tuning": True,
                              "quant_lm_head": True}),
    ("biased", "auto_round", {"scheme": "W2A16G64", "iters": 10, "lr": 0.005, "enable_adam": True,
                              "enable_norm_bias_tuning": True}),
    ("llama_aligned", "auto_round", {"scheme": "W4A16", "iters": 6, "lr": 0.02, "quant_lm_head": True,
                                     "enable_quanted_input": False, "gradient_accumulate_steps": 2,
                                     "batch_size": 2}),
]


@pytest.mark.parametrize("kind,fmt,kwargs", CASES, ids=["adam-lm_head", "normbias-lm_head", "adam-normbias-w2",
                                                         "lm_head-fp_inputs-gas2"])
def test_variant_checkpoint_equals_upstream(checkpoint, biased, tmp_path, caplog, kind, fmt, kwargs) -> None:
    src = biased if kind == "biased" else checkpoint(kind)
    theirs = _run("upstream", src, tmp_path / "up", fmt, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastround"):
        ours = _run("fastround", src, tmp_path / "fr", fmt, **kwargs)
    b = assert_same_checkpoint(theirs, ours)
    lines = _tuned_lines(caplog.text)
    if kwargs.get("quant_lm_head"):
        first, best_iter, best = lines["lm_head"]  # tuned, not RTN: the best iteration is a later one
        assert best_iter > 0 and best < first
        assert "lm_head.qweight" in b
    if kwargs.get("enable_norm_bias_tuning"):
        source = oracle.read_checkpoint(src)
        moved = [k for k in source if k.endswith(("layernorm.weight", ".bias")) and source[k] != b[k]]
        assert len(moved) >= 10, moved  # the tuned norms and biases are exported, not the source's
        assert _config(ours)["enable_norm_bias_tuning"] is True


def _fp16_steps(a: bytes, b: bytes) -> np.ndarray:
    """Distance in fp16 steps between two fp16 arrays (same sign: their bit patterns are ordered)."""
    x, y = np.frombuffer(a, dtype=np.int16).astype(np.int32), np.frombuffer(b, dtype=np.int16).astype(np.int32)
    assert ((x < 0) == (y < 0)).all()
    return np.abs(x - y)


def test_adam_differs_only_by_factor_sum_order(checkpoint, tmp_path) -> None:
    """A run where the factor-gradient order matters once: measured, one scale of one layer one fp16 step away;
    every code, every other scale and the config equal. The bound allows a few such scales, never a larger step."""
    kwargs = {"scheme": "W4A16", "iters": 8, "lr": 0.003, "enable_adam": True}
    src = checkpoint("llama_aligned")
    a = oracle.read_checkpoint(_run("upstream", src, tmp_path / "up", **kwargs))
    b = oracle.read_checkpoint(_run("fastround", src, tmp_path / "fr", **kwargs))
    assert sorted(a) == sorted(b)
    differing = [k for k in a if a[k] != b[k]]
    assert all(k.endswith(".scales") and a[k][0] == "F16" for k in differing), differing
    steps = np.concatenate([_fp16_steps(a[k][2], b[k][2]) for k in differing] or [np.zeros(0, dtype=np.int32)])
    assert int((steps > 0).sum()) <= 3 and int(steps.max(initial=0)) <= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("thresh", [1e-5, 1e-8])
def test_rounding_free_qdq_equals_upstream(dtype, thresh) -> None:
    """The norm/bias qdq and its gradient in v, bit for bit, including clipped elements and an all-positive
    tensor (its range starts at 0)."""
    from auto_round.data_type.int import quant_tensor_asym_wo_round
    from fastround.tune_layers import rounding_free_qdq

    gen = torch.Generator().manual_seed(5)
    for t in (torch.randn(160, generator=gen), torch.rand(96, generator=gen) + 0.5):
        t = t.to(dtype)
        v0 = torch.randn(t.shape, generator=gen) * 3  # some elements leave the 4-bit range and clip
        grad = torch.randn(t.shape, generator=gen).to(dtype)
        v_up, v_fr = v0.clone().requires_grad_(), v0.clone().requires_grad_()
        up = quant_tensor_asym_wo_round(t, bits=4, group_size=-1, v=v_up, q_scale_thresh=thresh)[0]
        fr = rounding_free_qdq(t, v_fr, thresh)
        assert fr.dtype == up.dtype and torch.equal(fr.view(torch.uint8), up.view(torch.uint8))
        (up * grad).sum().backward()
        (fr * grad).sum().backward()
        assert v_up.grad is not None and v_fr.grad is not None
        assert torch.equal(v_fr.grad, v_up.grad) and bool((v_up.grad == 0).any())


@pytest.mark.parametrize("kind", ["rms", "layer_norm"])
def test_tuned_norm_equals_upstream_wrapper(kind) -> None:
    """TunedNorm's forward, gradient and exported weight against upstream's WrapperLlamaNorm / WrapperLayerNorm."""
    from auto_round.wrapper import WrapperLayerNorm, WrapperLlamaNorm
    from fastround.tune_settings import SignRoundSettings
    from fastround.tune_layers import TunedNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(9)
    orig = LlamaRMSNorm(160) if kind == "rms" else torch.nn.LayerNorm(160)
    with torch.no_grad():
        orig.weight.copy_(torch.rand(160, generator=gen) + 0.5)
    orig = orig.to(torch.bfloat16).requires_grad_(False)
    up = (WrapperLlamaNorm if kind == "rms" else WrapperLayerNorm)(orig, device="cpu")
    fr = TunedNorm(orig, SignRoundSettings(iters=10), torch.device("cpu"))
    v = torch.randn(160, generator=gen)
    with torch.no_grad():
        up.v.copy_(v)
        fr.v.copy_(v)
    x = torch.randn(4, 12, 160, generator=gen).to(torch.bfloat16)
    grad = torch.randn(4, 12, 160, generator=gen).to(torch.bfloat16)
    y_up, y_fr = up(x), fr(x)
    assert y_fr.dtype == y_up.dtype and torch.equal(y_fr.view(torch.uint8), y_up.view(torch.uint8))
    (y_up.float() * grad.float()).sum().backward()
    (y_fr.float() * grad.float()).sum().backward()
    assert torch.equal(fr.v.grad, up.v.grad)
    tuned = fr.tuned_tensors({"v": v})["weight"]
    up.unwrapper({"v": v})
    assert torch.equal(tuned.view(torch.uint8), orig.weight.view(torch.uint8))


def test_resume_keeps_tuned_norms_and_biases(tmp_path) -> None:
    """A committed unit replays its norm weights and biases with its layers."""
    from fastround.tune_resume import TuneResume

    state = TuneResume.open(str(tmp_path), {"run": "a"})
    layer = (torch.randn(4, 8), torch.randint(0, 15, (4, 8), dtype=torch.uint8), torch.rand(4, 1).half(),
             torch.full((4, 1), 8, dtype=torch.int32))
    params = {"m.layers.0.input_layernorm.weight": torch.rand(8).bfloat16(), "m.layers.0.q.bias": torch.randn(4)}
    state.commit("m.layers.0", {"m.layers.0.q": layer}, ("v", (1, 2), None), params)
    again = TuneResume.open(str(tmp_path), {"run": "a"})
    results, _, replayed = again.load("m.layers.0")
    assert all(torch.equal(x, y) for x, y in zip(results["m.layers.0.q"], layer))
    assert sorted(replayed) == sorted(params)
    assert all(torch.equal(replayed[k].view(torch.uint8), params[k].view(torch.uint8)) for k in params)


def test_optimizer_and_unbuilt_variants_are_clear(checkpoint) -> None:
    from fastround import AutoRound

    src = str(checkpoint("llama_aligned"))
    with pytest.raises(ValueError, match="optimizer"):
        AutoRound(src, iters=2, enable_adam=True, optimizer="NoSuchOptimizer", **COMMON)
    with pytest.raises(NotImplementedError, match="enable_lfq"):
        AutoRound(src, iters=2, enable_lfq=True, **COMMON)
    ar = AutoRound(src, iters=2, enable_adam=True, optimizer=torch.optim.AdamW, **COMMON)
    assert ar.signround is not None and ar.signround.optimizer == "AdamW"


def test_cli_variant_flags_equal_api(biased, tmp_path) -> None:
    """`--enable_adam --enable_norm_bias_tuning --quant_lm_head` (upstream's flags, with their --no- forms) give the
    API's output byte for byte."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    args: dict[str, Any] = {"iters": 6, "lr": 0.005, "nsamples": 8, "seqlen": 32, "batch_size": 4}
    out = tmp_path / "cli"
    flags = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    r = run_cli(str(biased), "--enable_adam", "--enable_norm_bias_tuning", "--quant_lm_head", *flags, "--dataset",
                str(data), "--disable_model_free", "--device", "cpu", "--output_dir", str(out), "--no_progress")
    assert_ok(r)
    from fastround import AutoRound

    api = tmp_path / "api"
    AutoRound(str(biased), dataset=str(data), enable_adam=True, enable_norm_bias_tuning=True, quant_lm_head=True,
              disable_model_free=True, device_map="cpu", **args).quantize_and_save(str(api))
    tok = "tokenizer_config.json"  # the CLI run records HF_HUB_OFFLINE as local_files_only there
    cli, ref = snapshot(out), snapshot(api)
    assert {k: v for k, v in cli.items() if not k.endswith(tok)} == {k: v for k, v in ref.items()
                                                                      if not k.endswith(tok)}
    assert json.loads(next(out.glob("*/config.json")).read_text())["quantization_config"]["enable_norm_bias_tuning"]
    r = run_cli("--help")
    assert r.returncode == 0 and "--no-enable_adam" in r.stdout and "--no-enable_norm_bias_tuning" in r.stdout
