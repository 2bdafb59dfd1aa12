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
