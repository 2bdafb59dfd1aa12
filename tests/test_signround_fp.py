"""SignRound (iters > 0) on MXFP4 / MXFP8 schemes against auto-round 0.16.1 (eager, CPU).

Upstream tunes an MX layer's rounding offsets V and its max_scale factor through quant_mx, and with act_bits <= 8
also quantize-dequantizes the layer's input while tuning and in the quantized chain after it. fastround's C++ op
equals quant_mx's forward and its autograd gradients bit for bit (tests/test_tune_fp_ops.py), so whole checkpoints
come out byte-identical: every tensor and the config. Each configuration's best iteration is after 0 in every block
(iteration 0 is RTN: V = 0, factor 1), so the comparison covers moved parameters.
"""

from __future__ import annotations

import logging
import re

import pytest

from test_signround import _run, assert_same_checkpoint


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        ("auto_round", {"scheme": "MXFP4", "iters": 6, "lr": 0.02}),
        ("llm_compressor", {"scheme": "MXFP8", "iters": 5, "lr": 0.05}),
        # V alone; the lm_head tuned after the blocks on inputs from a pass through the tuned (act-quantizing) ones
        ("auto_round", {"scheme": "MXFP4", "iters": 4, "lr": 0.05, "enable_minmax_tuning": False,
                        "quant_lm_head": True}),
        ("auto_round", {"scheme": "NVFP4_E5M3", "iters": 5, "lr": 0.02}),
    ],
)
def test_mx_checkpoint_equals_upstream(checkpoint, tmp_path, caplog, fmt, kwargs) -> None:
    src = checkpoint("llama_aligned")
    theirs = _run("upstream", src, tmp_path / "up", fmt, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastround"):
        ours = _run("fastround", src, tmp_path / "fr", fmt, **kwargs)
    best_iters = [int(i) for i in re.findall(r"loss iter 0: [0-9.e+-]+ -> iter (\d+):", caplog.text)]
    assert len(best_iters) == 2 + bool(kwargs.get("quant_lm_head")) and min(best_iters) > 0, best_iters
    assert_same_checkpoint(theirs, ours)


def test_unsupported_variants_are_clear(checkpoint) -> None:
    """Static activations (and any data type without a tuning qdq) are refused by name at construction."""
    from fastround import AutoRound
    from fastround.tune_layers import fp_act_spec, require_tunable
    from test_signround import COMMON

    static = {"bits": 4, "group_size": 32, "data_type": "mx_fp", "act_bits": 4, "act_data_type": "mx_fp",
              "act_group_size": 32, "act_dynamic": False}
    with pytest.raises(NotImplementedError, match="act_dynamic=False"):
        AutoRound(str(checkpoint("llama_aligned")), scheme=static, iters=2, **COMMON)
    assert fp_act_spec({"act_bits": 16}) is None
    with pytest.raises(NotImplementedError, match="layer x: .*data_type=fp bits=8"):
        require_tunable({"data_type": "fp", "bits": 8}, "layer x")
    # NVFP4 activations only under NVFP4 weights (their global scale is the block calibration's)
    with pytest.raises(NotImplementedError, match="nv_fp4_with_static_gs"):
        fp_act_spec({"data_type": "mx_fp", "bits": 4, "act_bits": 4, "act_data_type": "nv_fp4_with_static_gs",
                     "act_group_size": 16})


def test_mx_resume_replays_a_block_byte_identically(checkpoint, tmp_path, monkeypatch, caplog) -> None:
    """A run stopped after block 0 (its committed tuning state kept, block 1's dropped) and started again replays
    block 0 from the state, its layers quantizing their inputs in the chain as when tuned, and tunes block 1 to the
    same bytes: the FP layers' records (no zero points) survive the commit."""
    import json
    import shutil

    import oracle
    from fastround.tune_resume import FOLDER, TuneResume

    src = checkpoint("llama_aligned")
    kwargs = {"scheme": "MXFP4", "iters": 4, "lr": 0.05}
    with monkeypatch.context() as m:
        m.setattr(TuneResume, "finish", lambda self: None)  # keep the state, as a run killed before saving would
        first = _run("fastround", src, tmp_path / "out", **kwargs)
    clean = oracle.read_checkpoint(first)
    shutil.rmtree(first)
    manifest_path = tmp_path / "out" / FOLDER / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert sorted(manifest["units"]) == ["model.layers.0", "model.layers.1"]
    del manifest["units"]["model.layers.1"]
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="fastround"):
        again = _run("fastround", src, tmp_path / "out", **kwargs)
    assert "resuming SignRound: 1 block(s)" in caplog.text
    assert re.search(r"model\.layers\.1: tuned 7 layers", caplog.text)
    assert not re.search(r"model\.layers\.0: tuned", caplog.text)
    assert oracle.read_checkpoint(again) == clean
