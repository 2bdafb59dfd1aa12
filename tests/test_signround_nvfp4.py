"""SignRound (iters > 0) on the NVFP4 scheme against auto-round 0.16.1 (eager, CPU).

Upstream's NVFP4 (data_type nv_fp, E4M3 scales per 16 inputs under a per-tensor global scale) calibrates each
block before tuning it: the weights' global scales 448 * 6 / max|W| (q/k/v and gate/up share their minimum) and
each layer's max |input| over a forward of the block on the inputs it trains on, whose global scale the input
qdq (nv_fp4_with_static_gs) uses while tuning. fastround's C++ op equals nv_fp4 / nv_fp4_with_static_gs and their
autograd gradients bit for bit (tests/test_tune_nvfp4_ops.py), so the whole checkpoint comes out byte-identical:
packed codes, E4M3 scales, weight and input global scales, and the config. The best iteration is after 0 in every
block (iteration 0 is RTN), so the comparison covers moved parameters.
"""

from __future__ import annotations

import logging
import re

import pytest

from test_signround import _run, assert_same_checkpoint


def test_nvfp4_checkpoint_equals_upstream(checkpoint, tmp_path, caplog) -> None:
    src = checkpoint("llama_aligned")
    kwargs = {"scheme": "NVFP4", "iters": 5, "lr": 0.02}
    theirs = _run("upstream", src, tmp_path / "up", "auto_round", **kwargs)
    with caplog.at_level(logging.INFO, logger="fastround"):
        ours = _run("fastround", src, tmp_path / "fr", "auto_round", **kwargs)
    best_iters = [int(i) for i in re.findall(r"loss iter 0: [0-9.e+-]+ -> iter (\d+):", caplog.text)]
    assert len(best_iters) == 2 and min(best_iters) > 0, best_iters
    tensors = assert_same_checkpoint(theirs, ours)
    assert any(k.endswith("input_global_scale") for k in tensors)


def test_nvfp4_integer_layouts_are_refused() -> None:
    """GPTQ / AWQ words cannot hold NVFP4; every other format is written (tests/test_rtn_nvfp4.py compares them)."""
    from fastround.compressor import resolve_scheme
    from fastround.export import resolve_format

    scheme, _ = resolve_scheme("NVFP4", {})
    for fmt in ("auto_gptq", "auto_awq", "auto_round:auto_gptq", "auto_round:auto_awq"):
        with pytest.raises(ValueError, match=f"format {fmt} cannot store NVFP4"):
            resolve_format(fmt, scheme)
    assert resolve_format("llm_compressor", scheme).backend == "llm_compressor:nv_fp"
    assert resolve_format("fake", scheme).family == "fake"
