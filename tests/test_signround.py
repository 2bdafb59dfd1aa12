"""SignRound (iters > 0) on loaded models against auto-round 0.16.1 (eager, CPU), and its own guarantees.

Upstream's tuning is deterministic on the CPU: same sampler (Python's random), same qdq, same loss. fastround's
C++ qdq equals upstream's forward bit for bit and its gradient up to the fp16 rounding order of the range factors'
partial sums, so on small models whole checkpoints come out byte-identical: every tensor and the config. A tiny
model tuned end to end lowers every block's loss below RTN's (iteration 0); two runs with one seed write the same
bytes; a run killed with SIGKILL and started again writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import oracle
from test_opt_rtn_flow import _texts

COMMON = {"disable_model_free": True, "device_map": "cpu", "nsamples": 8, "seqlen": 32, "batch_size": 4}


def _run(which: str, src: Path, out: Path, fmt: str = "auto_round", **kwargs: Any) -> Path:
    args = {**COMMON, **kwargs}
    if which == "upstream":
        from auto_round import AutoRound

        ar = AutoRound(str(src), enable_torch_compile=False, dataset=_texts(), **args)
    else:
        from fastround import AutoRound

        ar = AutoRound(str(src), dataset=_texts(), **args)
    _, folder = ar.quantize_and_save(str(out), format=fmt)
    return Path(folder)


def _config(folder: Path) -> dict[str, Any] | None:
    return json.loads((folder / "config.json").read_text()).get("quantization_config")  # fake writes none


def assert_same_checkpoint(theirs: Path, ours: Path) -> dict[str, oracle.TensorRecord]:
    """Every tensor and the quantization_config byte for byte; returns our tensors."""
    a, b = oracle.read_checkpoint(theirs), oracle.read_checkpoint(ours)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if a[k] != b[k]]
    assert not differing, differing[:5]
    assert _config(ours) == _config(theirs)
    return b


# Each configuration's tuning must move (a best iteration after 0 in every block, checked below): at iteration 0
# the parameters are RTN's, so a run whose best iteration is 0 would compare RTN with RTN.
@pytest.mark.parametrize(
    "kind,fmt,kwargs",
    [
        ("llama_aligned", "auto_round", {"scheme": "W4A16", "iters": 12}),
        ("llama_aligned", "auto_round", {"scheme": "W4A16", "iters": 10, "lr": 0.02, "enable_minmax_tuning": False,
                                         "enable_quanted_input": False}),
        ("llama_aligned", "fake", {"scheme": "W8A16", "iters": 3, "not_use_best_mse": True,
                                   "gradient_accumulate_steps": 2, "batch_size": 2}),
        ("llama_aligned", "auto_round", {"scheme": "W2A16G64", "iters": 4, "lr": 0.02, "momentum": 0.5}),
        ("qwen3_moe_aligned", "auto_round", {"scheme": "W4A16", "iters": 8, "lr": 0.02}),
    ],
)
def test_checkpoint_equals_upstream(checkpoint, tmp_path, caplog, kind, fmt, kwargs) -> None:
    src = checkpoint(kind)
    theirs = _run("upstream", src, tmp_path / "up", fmt, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastround"):
        ours = _run("fastround", src, tmp_path / "fr", fmt, **kwargs)
    best_iters = [int(i) for i in re.findall(r"loss iter 0: [0-9.e+-]+ -> iter (\d+):", caplog.text)]
    assert best_iters and min(best_iters) > 0, best_iters
    assert_same_checkpoint(theirs, ours)


def test_asym_checkpoint_close_to_upstream(checkpoint, tmp_path) -> None:
    """Asym tuning: the range factors' gradient has fp32 terms (the zero point's path) that torch sums per group in
    its vectorised order, so a factor gradient within a few ulps of 0 can take the other sign and move that factor
    the other way (docs/compatibility.md). Measured on this configuration: block 0 byte-identical, 34 of 110 592
    codes and 20 of 3 456 scales differ in block 1. The bound keeps that order of magnitude."""
    import numpy as np

    src = checkpoint("llama_aligned")
    kwargs = {"scheme": "W4A16", "iters": 10, "sym": False, "group_size": 32, "lr": 0.02}
    a = oracle.read_checkpoint(_run("upstream", src, tmp_path / "up", "auto_gptq", **kwargs))
    b = oracle.read_checkpoint(_run("fastround", src, tmp_path / "fr", "auto_gptq", **kwargs))
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a if ".layers.0." in k or ".layers." not in k)
    codes = same_codes = scales = same_scales = 0
    for k in a:
        if k.endswith("qweight"):  # int32 words of eight 4-bit codes
            x, y = (np.frombuffer(r[2], dtype=np.uint32) for r in (a[k], b[k]))
            for shift in range(0, 32, 4):
                codes += x.size
                same_codes += int(((x >> shift) & 15 == (y >> shift) & 15).sum())
        elif k.endswith("scales"):
            x, y = (np.frombuffer(r[2], dtype=np.uint16) for r in (a[k], b[k]))
            scales += x.size
            same_scales += int((x == y).sum())
    assert codes - same_codes <= codes * 1e-3, (codes - same_codes, codes)
    assert scales - same_scales <= scales * 0.02, (scales - same_scales, scales)


def test_nblocks_tunes_blocks_jointly(checkpoint, tmp_path, caplog) -> None:
    """Upstream 0.16.1 drops nblocks passed to AutoRound (its compressor reads a default of 1); fastround honours
    it (docs/compatibility.md): two blocks tuned as one unit give one log line and other weights than one at a
    time."""
    src = checkpoint("llama_aligned")
    args = {"scheme": "W4A16", "iters": 10, "lr": 0.02, "enable_quanted_input": False}
    with caplog.at_level(logging.INFO, logger="fastround"):
        joint = oracle.read_checkpoint(_run("fastround", src, tmp_path / "joint", nblocks=2, **args))
    assert re.search(r"model\.layers\.0,model\.layers\.1: tuned 14 layers", caplog.text)
    single = oracle.read_checkpoint(_run("fastround", src, tmp_path / "single", **args))
    assert sorted(joint) == sorted(single)
    assert any(joint[k] != single[k] for k in joint if k.endswith("qweight"))


def test_tuning_lowers_every_block_loss(checkpoint, tmp_path, caplog) -> None:
    """Iteration 0 is RTN (V = 0, factors 1); the best iteration's loss must be lower for every block, and the
    codes must move away from RTN's somewhere."""
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    with caplog.at_level(logging.INFO, logger="fastround"):
        tuned, _ = AutoRound(str(src), dataset=_texts(), iters=12, **COMMON).quantize()
    losses = re.findall(r"loss iter 0: ([0-9.e+-]+) -> iter (\d+): ([0-9.e+-]+)", caplog.text)
    assert len(losses) == 2
    for first, best_iter, best in losses:
        assert int(best_iter) > 0 and float(best) < float(first)
    rtn, _ = AutoRound(str(src), iters=0, disable_opt_rtn=True, **COMMON).quantize()
    moved = sum(int((a.weight != b.weight).sum()) for (n, a), (_, b) in
                zip(tuned.named_modules(), rtn.named_modules()) if n.endswith("proj"))
    assert moved > 0


def test_same_seed_same_bytes(checkpoint, tmp_path) -> None:
    src = checkpoint("llama_aligned")
    a = oracle.read_checkpoint(_run("fastround", src, tmp_path / "a", iters=12))
    b = oracle.read_checkpoint(_run("fastround", src, tmp_path / "b", iters=12))
    assert a == b
    c = oracle.read_checkpoint(_run("fastround", src, tmp_path / "c", iters=12, seed=7))
    assert a != c  # the seed orders the batches: a real input to the result


def test_compiled_block_loss_equals_eager(checkpoint, tmp_path, monkeypatch) -> None:
    """enable_torch_compile traces the block, the C++ qdq op and the loss through Dynamo and AOTAutograd; with the
    aot_eager backend the graph runs the same kernels, so the checkpoint must not change by a bit."""
    from fastround import signround

    src = checkpoint("llama_aligned")
    eager = oracle.read_checkpoint(_run("fastround", src, tmp_path / "eager", iters=4))
    monkeypatch.setattr(signround, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(signround, "_compiled_loss", None)
    compiled = oracle.read_checkpoint(_run("fastround", src, tmp_path / "compiled", iters=4,
                                           enable_torch_compile=True))
    assert signround._compiled_loss is not None  # the compiled path ran
    assert compiled == eager


@pytest.mark.parametrize("kwargs", [{"iters": 12}, {"iters": 5, "not_use_best_mse": True, "lr": 0.05},
                                    {"iters": 6, "lr": 0.003, "enable_adam": True, "quant_lm_head": True}])
def test_device_side_bookkeeping_equals_host(checkpoint, tmp_path, monkeypatch, kwargs) -> None:
    """The accelerator path keeps losses, the best-iteration choice and the snapshot on the device (no sync per
    step); run on the CPU it must pick the same iterations and write the same bytes as the host path."""
    from fastround import signround

    src = checkpoint("llama_aligned")
    host = oracle.read_checkpoint(_run("fastround", src, tmp_path / "host", **kwargs))
    monkeypatch.setattr(signround, "DEVICE_BOOKKEEPING", True)
    device = oracle.read_checkpoint(_run("fastround", src, tmp_path / "device", **kwargs))
    assert host == device


_RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_opt_rtn_flow import _texts
from fastround import AutoRound
ar = AutoRound({src!r}, dataset=_texts(), iters={iters}, disable_model_free=True, device_map="cpu", nsamples=8,
               seqlen=32, batch_size=4, lr={lr})
ar.quantize_and_save({out!r}, format="auto_round")
"""


def _resume_run(src: Path, out: Path, iters: int, lr: float = 0.05) -> subprocess.Popen:
    code = _RESUME_SCRIPT.format(tests=str(Path(__file__).parent), src=str(src), out=str(out), iters=iters, lr=lr)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _manifest_units(out: Path) -> int:
    try:
        return len(json.loads((out / ".fastround-tune" / "manifest.json").read_text())["units"])
    except (OSError, ValueError, KeyError):
        return 0


def test_resume_after_sigkill_is_byte_identical(checkpoint, tmp_path) -> None:
    from fastround.tune_resume import FOLDER

    src = checkpoint("llama_aligned4")
    clean = oracle.read_checkpoint(_run("fastround", src, tmp_path / "clean", iters=40, lr=0.05))
    out = tmp_path / "killed"
    proc = _resume_run(src, out, iters=40)
    deadline = time.time() + 300
    while _manifest_units(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted: " + proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    units = _manifest_units(out)
    assert 1 <= units < 4
    assert not any(p.name != FOLDER for p in out.iterdir()), "a killed run must leave no output that looks complete"
    again = _resume_run(src, out, iters=40)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming SignRound" in err
    folders = [p for p in out.iterdir()]
    assert [p.name for p in folders] == [p.name for p in (tmp_path / "clean").iterdir()]
    assert oracle.read_checkpoint(folders[0]) == clean
    assert not (out / FOLDER).exists()


def test_changed_option_restarts_and_says_what(checkpoint, tmp_path) -> None:
    src = checkpoint("llama_aligned4")
    out = tmp_path / "changed"
    proc = _resume_run(src, out, iters=40)
    deadline = time.time() + 300
    while _manifest_units(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = _resume_run(src, out, iters=40, lr=0.02)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "not resuming" in err and "signround" in err and "resuming SignRound" not in err


def test_unbuilt_variants_and_bad_values_are_clear(checkpoint) -> None:
    from fastround import AutoRound

    src = str(checkpoint("llama_aligned"))
    with pytest.raises(NotImplementedError, match="enable_lfq"):
        AutoRound(src, iters=2, enable_lfq=True, **COMMON)
    with pytest.raises(ValueError, match="lr"):
        AutoRound(src, iters=2, lr=-1, **COMMON)
    with pytest.raises(ValueError, match="scale_dtype"):
        AutoRound(src, iters=2, scale_dtype="int8", **COMMON)


def test_trained_model_matches_upstream_perplexity() -> None:
    """The repo's trained model at reduced settings (6 iterations, 8 x 128 tokens): the tuned weights equal
    upstream's bit for bit, so held-out perplexity is the same number (the issue's bar is <= 1.01x upstream)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastround.eval import perplexity

    repo = Path(__file__).resolve().parents[1] / "models" / "fastround-llama-tiny"
    tok = AutoTokenizer.from_pretrained(repo)
    kwargs = {"scheme": "W4A16", "iters": 6, "nsamples": 8, "seqlen": 128, "batch_size": 4, "device_map": "cpu",
              "dataset": str(repo / "calibration.jsonl"), "disable_model_free": True}
    models = {}
    for which in ("fastround", "upstream"):
        model = AutoModelForCausalLM.from_pretrained(repo, dtype="auto")
        if which == "upstream":
            from auto_round import AutoRound

            ar = AutoRound(model, tokenizer=tok, enable_torch_compile=False, **kwargs)
        else:
            from fastround import AutoRound

            ar = AutoRound(model, tokenizer=tok, **kwargs)
        models[which], _ = ar.quantize()
    ours, theirs = (dict(m.state_dict()) for m in (models["fastround"], models["upstream"]))
    tuned = [k for k in ours if k.endswith("proj.weight")]
    assert len(tuned) == 42
    assert all(torch.equal(ours[k].view(torch.int16), theirs[k].view(torch.int16)) for k in tuned)
    text = (repo / "validation.txt").read_text(encoding="utf-8")[:40000]
    p_ours, p_theirs = (perplexity(models[w], text, seqlen=256, tokenizer=tok, device="cpu")
                        for w in ("fastround", "upstream"))
    assert p_ours <= p_theirs * 1.01
