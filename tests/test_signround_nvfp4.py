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


def test_nvfp4_gaps_are_refused(checkpoint) -> None:
    """What is not built is refused by name: a tuned NVFP4 lm_head and formats other than auto_round (RTN's
    gaps: tests/test_rtn_nvfp4.py)."""
    from fastround import AutoRound
    from test_signround import COMMON

    ar = AutoRound(str(checkpoint("llama_aligned")), scheme="NVFP4", iters=2, quant_lm_head=True, **COMMON)
    with pytest.raises(NotImplementedError, match="outside the blocks .*lm_head"):
        ar.quantize()
    from fastround.export import resolve_format
    from fastround.compressor import resolve_scheme

    scheme, _ = resolve_scheme("NVFP4", {})
    for fmt in ("llm_compressor", "fake", "auto_gptq"):
        with pytest.raises(ValueError, match="auto_round only"):
            resolve_format(fmt, scheme)
