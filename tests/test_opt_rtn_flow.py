"""OPT-RTN on loaded models (iters=0 with calibration data) against auto-round 0.16.1 on the same models and
data: the same integer codes for at least 99.9% of weights and fp16 scales within one ulp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import oracle

COMMON = {"iters": 0, "disable_model_free": True, "device_map": "cpu", "nsamples": 8, "seqlen": 32, "batch_size": 4}


def _texts(n: int = 12) -> list[str]:
    rng = np.random.default_rng(7)
    # The test checkpoints' tokenizer knows the words w0..w39; each text is > seqlen tokens.
    return [" ".join(f"w{int(i)}" for i in rng.integers(0, 40, size=int(rng.integers(40, 60)))) for _ in range(n)]


def _run(which: str, src: Path, out: Path, **kwargs: Any) -> Path:
    if which == "upstream":
        from auto_round import AutoRound

        ar = AutoRound(str(src), enable_torch_compile=False, dataset=_texts(), **COMMON, **kwargs)
    else:
        from fastround import AutoRound

        ar = AutoRound(str(src), dataset=_texts(), **COMMON, **kwargs)
    _, folder = ar.quantize_and_save(str(out), format="auto_round")
    return Path(folder)


def _codes(qweight: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ qweight [in*bits/32, out] int32 -> codes [in, out]."""
    words = qweight.view(np.uint32)
    per = 32 // bits
    lanes = [(words >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1) for j in range(per)]
    return np.stack(lanes, axis=1).reshape(-1, words.shape[1])


def _f16_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ia = a.view(np.int16).astype(np.int32)
    ib = b.view(np.int16).astype(np.int32)
    ia = np.where(ia < 0, -32768 - ia, ia)  # monotone integer order for negative halves
    ib = np.where(ib < 0, -32768 - ib, ib)
    return np.abs(ia - ib)


@pytest.mark.parametrize(
    "kind,scheme",
    [("llama_aligned", {"scheme": "W4A16"}), ("llama_aligned", {"scheme": "W2A16G64"}),
     ("llama_aligned", {"scheme": "W8A16", "disable_opt_rtn": False}), ("qwen3_moe_aligned", {"scheme": "W4A16", "group_size": 64})],
)
def test_opt_rtn_codes_match_upstream(checkpoint, tmp_path, kind, scheme) -> None:
    src = checkpoint(kind)
    theirs = oracle.read_checkpoint(_run("upstream", src, tmp_path / "up", **scheme))
    ours = oracle.read_checkpoint(_run("fastround", src, tmp_path / "fr", **scheme))
    _assert_codes_close(ours, theirs, {"W2": 2, "W8": 8}.get(scheme["scheme"][:2], 4))


@pytest.mark.parametrize("scheme,bits", [("W4A16", 4), ("W2A16G64", 2)])
def test_opt_rtn_on_a_float32_checkpoint_matches_upstream(checkpoint, tmp_path, scheme, bits) -> None:
    """The model is cast to bf16 for the calibration forward passes (fastround: each block when the loop
    reaches it; upstream: the whole model at load)."""
    src = checkpoint("llama_aligned", "float32")
    theirs = oracle.read_checkpoint(_run("upstream", src, tmp_path / "up", scheme=scheme))
    ours = oracle.read_checkpoint(_run("fastround", src, tmp_path / "fr", scheme=scheme))
    _assert_codes_close(ours, theirs, bits)


def _assert_codes_close(ours: dict, theirs: dict, bits: int) -> None:
    """The same tensors; >= 99.9% of the codes equal, fp16 scales within one ulp, everything else exact."""
    assert set(ours) == set(theirs)
    total = same = 0
    for name, rec in theirs.items():
        if name.endswith(".qweight"):
            a = _codes(np.frombuffer(ours[name][2], np.int32).reshape(ours[name][1]), bits)
            b = _codes(np.frombuffer(rec[2], np.int32).reshape(rec[1]), bits)
            total += a.size
            same += int((a == b).sum())
        elif name.endswith(".scales"):
            a = np.frombuffer(ours[name][2], np.float16)
            b = np.frombuffer(rec[2], np.float16)
            assert int(_f16_ulps(a, b).max()) <= 1, name
        else:
            assert ours[name] == rec, name
    assert total > 0
    assert same / total >= 0.999, f"{same}/{total} codes agree"


# quant_lm_head=True: upstream collects OPT-RTN's imatrix inside the blocks only, so the lm_head's scale search is
# unweighted. A weighted one changes its codes and scales here (fastround did that before), so byte parity pins it.
@pytest.mark.parametrize("scheme", ["W4A16", "W2A16G64"])
def test_opt_rtn_lm_head_checkpoint_equals_upstream(checkpoint, tmp_path, scheme) -> None:
    from test_signround import assert_same_checkpoint

    src = checkpoint("llama_aligned")
    theirs = _run("upstream", src, tmp_path / "up", scheme=scheme, quant_lm_head=True)
    ours = _run("fastround", src, tmp_path / "fr", scheme=scheme, quant_lm_head=True)
    tensors = assert_same_checkpoint(theirs, ours)
    assert "lm_head.qweight" in tensors


def test_rtn_lm_head_is_packed_with_upstream_values(checkpoint, tmp_path) -> None:
    """Plain RTN (disable_opt_rtn=True) runs zero-shot, where upstream quantizes the lm_head after the blocks but
    never packs it: it writes the bf16 qdq weight under a config whose extra_config says 4 bits (a deliberate
    deviation, docs/compatibility.md). fastround packs it; its codes must dequantize to upstream's qdq values, and
    every other tensor and the config must be byte-identical."""
    import torch

    from test_signround import _config

    src = checkpoint("llama_aligned")
    kwargs = {"scheme": "W4A16", "quant_lm_head": True, "disable_opt_rtn": True}
    up, fr = _run("upstream", src, tmp_path / "up", **kwargs), _run("fastround", src, tmp_path / "fr", **kwargs)
    theirs, ours = oracle.read_checkpoint(up), oracle.read_checkpoint(fr)
    head = {"lm_head.qweight", "lm_head.qzeros", "lm_head.scales"}
    assert set(theirs) - {"lm_head.weight"} == set(ours) - head and head <= set(ours)
    assert [k for k in ours if k not in head and ours[k] != theirs[k]] == []
    assert _config(fr) == _config(up) and _config(fr)["extra_config"]["lm_head"]["bits"] == 4

    def lanes(rec: oracle.TensorRecord, axis: int) -> np.ndarray:  # unpack 4-bit lanes of int32 words along axis
        words = np.frombuffer(rec[2], np.int32).reshape(rec[1]).view(np.uint32)
        return np.stack([(words >> np.uint32(4 * j)) & np.uint32(15) for j in range(8)], axis=axis + 1).reshape(
            [s * 8 if i == axis else s for i, s in enumerate(rec[1])]).astype(np.int32)

    codes = lanes(ours["lm_head.qweight"], 0)  # [in, out]
    zeros = lanes(ours["lm_head.qzeros"], 1) + 1  # [groups, out], GPTQ v1: zp - 1 stored
    scales = np.frombuffer(ours["lm_head.scales"][2], np.float16).reshape(ours["lm_head.scales"][1])  # [groups, out]
    group = np.arange(codes.shape[0]) // 128
    w = torch.from_numpy(((codes - zeros[group]) * scales[group].astype(np.float32)).T.copy()).to(torch.bfloat16)
    dtype, shape, raw = theirs["lm_head.weight"]
    qdq = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape)
    assert dtype == "BF16" and torch.equal(w, qdq)
    assert len(torch.unique(qdq[:, :128])) < 0.5 * qdq[:, :128].numel()  # it is a qdq weight, not the source's
