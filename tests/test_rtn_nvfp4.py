"""RTN (iters=0) on the NVFP4 scheme in the regular flow against auto-round 0.16.1 (eager, CPU).

Upstream needs calibration data even here: NVFP4's activations (nv_fp4_with_static_gs) take a global scale from
each layer's max |input| over an FP forward of its block, the forward that also collects OPT-RTN's imatrix. The
weights' global scales are 448 * 6 / max|W| with q/k/v and gate/up sharing their minimum. OPT-RTN (the default)
searches each group's range factor over 0.50 .. 1.51, weighted by the imatrix, under the weight's own global scale;
plain RTN (disable_opt_rtn=True) is the qdq at factor 1. Both checkpoints must be byte-identical: packed codes, E4M3
scales, weight and input global scales, and the config.
"""

from __future__ import annotations

import pytest

from test_signround import _run, assert_same_checkpoint

FAST = {"nsamples": 2, "seqlen": 32, "batch_size": 2}


@pytest.mark.parametrize("disable_opt_rtn", [True, None], ids=["rtn", "opt_rtn"])
def test_nvfp4_rtn_checkpoint_equals_upstream(checkpoint, tmp_path, disable_opt_rtn) -> None:
    src = checkpoint("llama_aligned")
    kwargs = {"scheme": "NVFP4", "iters": 0, "disable_opt_rtn": disable_opt_rtn, **FAST}
    theirs = _run("upstream", src, tmp_path / "up", "auto_round", **kwargs)
    ours = _run("fastround", src, tmp_path / "fr", "auto_round", **kwargs)
    tensors = assert_same_checkpoint(theirs, ours)
    scales = [k for k in tensors if k.endswith("input_global_scale")]
    assert scales and len(scales) == len([k for k in tensors if k.endswith("weight_global_scale")])


# Upstream writes NVFP4 in llm_compressor (both names: the auto_round tensors under compressed-tensors'
# nvfp4-pack-quantized config) and fake (the qdq weights, an auto_round:fake config), for RTN and SignRound alike,
# and quantizes an NVFP4 lm_head: its own weight global scale, the input's from the max |input| over its cached
# inputs (the quantized model's when SignRound uses quantized inputs), OPT-RTN's search without an imatrix.
@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        ("llm_compressor", {"iters": 0, "disable_opt_rtn": True}),
        ("fake", {"iters": 0, "disable_opt_rtn": True}),
        ("auto_round", {"iters": 0, "quant_lm_head": True}),
        ("auto_round:llm_compressor", {"iters": 2, "lr": 0.02, "quant_lm_head": True}),
    ],
    ids=["llm_compressor_rtn", "fake_rtn", "lm_head_opt_rtn", "ar_llm_compressor_lm_head_tuned"],
)
def test_nvfp4_formats_equal_upstream(checkpoint, tmp_path, caplog, fmt, kwargs) -> None:
    import json
    import logging
    import re

    src = checkpoint("llama_aligned")
    theirs = _run("upstream", src, tmp_path / "up", fmt, scheme="NVFP4", **kwargs, **FAST)
    with caplog.at_level(logging.INFO, logger="fastround"):
        ours = _run("fastround", src, tmp_path / "fr", fmt, scheme="NVFP4", **kwargs, **FAST)
    if kwargs["iters"]:  # the tuned lm_head must move, or its parity would compare RTN with RTN
        assert re.search(r"lm_head: tuned, loss iter 0: [0-9.e+-]+ -> iter [1-9]", caplog.text), caplog.text[-2000:]
    tensors = assert_same_checkpoint(theirs, ours)
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    head = kwargs.get("quant_lm_head", False)
    assert ("lm_head.input_global_scale" in tensors) == head
    if fmt == "fake":
        assert config["packing_format"] == "auto_round:fake" and config["data_type"] == "nv_fp"
        assert not any(k.endswith("global_scale") for k in tensors)
    elif fmt == "auto_round":
        assert config["packing_format"] == "auto_round:llm_compressor" and "lm_head" in config["extra_config"]
    else:
        assert config["format"] == "nvfp4-pack-quantized" and config["ignore"] == ([] if head else ["lm_head"])
        assert json.loads((ours / "quantization_config.json").read_text()) == config
        assert any(k.endswith("input_global_scale") for k in tensors)


def test_nvfp4_integer_formats_are_refused(checkpoint, tmp_path) -> None:
    """GPTQ / AWQ words cannot hold E2M1 codes under E4M3 scales: refused by name before quantizing."""
    from fastround import AutoRound
    from test_signround import COMMON

    ar = AutoRound(str(checkpoint("llama_aligned")), scheme="NVFP4", iters=0, **{**COMMON, **FAST})
    with pytest.raises(ValueError, match="format auto_gptq cannot store NVFP4"):
        ar.quantize_and_save(str(tmp_path / "out"), format="auto_gptq")


def test_nvfp4_llm_compressor_with_another_scheme_is_refused(checkpoint, tmp_path) -> None:
    """An int layer in an NVFP4 llm_compressor run has no place in the NVFP4-only config fastround writes: the
    layer is named and nothing is published, also when another format of the same call would be written first."""
    for i, fmt in enumerate(("llm_compressor", "auto_round,llm_compressor")):
        out = tmp_path / f"out{i}"
        with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj"):
            _run("fastround", checkpoint("llama_aligned"), out, fmt, scheme="NVFP4", iters=0,
                 disable_opt_rtn=True, layer_config={"model.layers.0.mlp.down_proj": "W4A16"}, **FAST)
        assert not any(out.rglob("*.safetensors")) and not any(out.rglob("config.json")), fmt


def test_opt_rtn_moves_range_factors(checkpoint, tmp_path) -> None:
    """The OPT-RTN search must change some groups' scales, or the parity above would not cover it."""
    src = checkpoint("llama_aligned")
    plain = _run("fastround", src, tmp_path / "rtn", "auto_round", scheme="NVFP4", iters=0, disable_opt_rtn=True,
                 **FAST)
    opt = _run("fastround", src, tmp_path / "opt", "auto_round", scheme="NVFP4", iters=0, **FAST)
    from oracle import read_checkpoint

    a, b = read_checkpoint(plain), read_checkpoint(opt)
    assert any(a[k] != b[k] for k in a if k.endswith(".weight_scale"))


@pytest.mark.parametrize("zeros", [0, 3, 12], ids=["no_zero", "few_zeros", "mostly_zero"])
def test_opt_rtn_search_equals_upstream(zeros) -> None:
    """The range-factor search alone, bit for bit with upstream's opt_rtn_nv_fp4 (under the fused global scale it
    is given), including both branches of its zero-imatrix fix-up: a 16-group with <= 8 zeros takes the group mean,
    one with more takes |w| + sqrt(sum(w^2) / 32)."""
    import torch
    from auto_round.data_type.nvfp import opt_rtn_fast_nvfp4

    from fastround import tune_fp_ops

    gen = torch.Generator().manual_seed(zeros)
    w = torch.randn(256, 64, generator=gen).to(torch.bfloat16)
    imatrix = torch.rand(64, generator=gen) + 0.05
    imatrix[16:16 + zeros] = 0.0
    fused = torch.tensor(tune_fp_ops.nv_global_scale(w) * 0.75, dtype=torch.float32)  # the search uses w's own
    gs = float(fused)
    theirs, _, _ = opt_rtn_fast_nvfp4(w, 4, 16, global_scale=fused, imatrix=imatrix)
    factor = tune_fp_ops.nv_opt_rtn_range(w, imatrix)
    ours, _, _ = tune_fp_ops.mx_qdq_codes(w, None, factor, 4, "nv_fp", gs)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    assert bool((factor != 1).any())
