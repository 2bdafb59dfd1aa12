"""fastround.ModelFreeCompressor against upstream's exported class, called directly (not through AutoRound).

Upstream's class takes every QuantizationScheme field as a keyword override and sets each non-None one on
the bare scheme (auto_round.utils.model_free_utils._apply_scheme_overrides); unset act_* fields stay unset,
unlike the AutoRound entry, which resolves them first. Parity is byte for byte, with the ordering-only
differences the other parity tests tolerate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import oracle

import fastround  # a broken build must fail here, not skip

_ORDER_OK = oracle.ORDER_ONLY_DIFFS


def _qs(side: str, **fields: Any) -> Any:
    if side == "upstream":
        from auto_round.schemes import QuantizationScheme
    else:
        from fastround import QuantizationScheme
    return QuantizationScheme(**fields)


# (id, kwargs for both classes, AR_ALLOW_W8_ASYM for upstream). The source is llama_aligned; its 160-wide
# inputs need pad_partial_groups=True on the fastround side at group sizes 64 and 128.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("W8A16-asym", {"scheme": "W8A16", "sym": False}, True),
    ("W8A16-bits4-g32", {"scheme": "W8A16", "bits": 4, "group_size": 32}, False),
    ("W4A16-asym-g64-lc", {"scheme": "W4A16", "sym": False, "group_size": 64, "layer_config": {"k_proj": {"bits": 8}}}, False),
    # A preset turned MXFP by overrides: upstream's MXFP preset-name check does not see the name any more.
    ("W8A16-to-mxfp4", {"scheme": "W8A16", "data_type": "mx_fp", "bits": 4, "group_size": 32}, False),
    ("QS-bits2", {"scheme": "QS", "bits": 2, "group_size": 32}, False),
    ("W4A16-act-unchanged", {"scheme": "W4A16", "act_bits": 16, "super_bits": None, "act_dynamic": None}, False),
]


def _kwargs(side: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if out.get("scheme") == "QS":
        out["scheme"] = _qs(side, bits=4, group_size=128, sym=True)
    return out


@pytest.mark.parametrize("case_id,kwargs,w8_asym", CASES, ids=[c[0] for c in CASES])
def test_class_overrides_match_upstream(
    case_id: str, kwargs: dict[str, Any], w8_asym: bool, checkpoint, oracle_tmp, monkeypatch
) -> None:
    src = checkpoint("llama_aligned")
    fast = oracle_tmp(f"class-fast-{case_id}")
    compressor = fastround.ModelFreeCompressor(
        str(src), show_progress=False, pad_partial_groups=True, **_kwargs("fastround", kwargs)
    )
    assert compressor.quantize_and_save(str(fast)) == (None, str(fast))
    if w8_asym:
        monkeypatch.setenv("AR_ALLOW_W8_ASYM", "1")
    upstream = oracle.run_upstream_class(src, oracle_tmp(f"class-up-{case_id}"), **_kwargs("upstream", kwargs))
    diff = oracle.compare_checkpoints(fast, upstream)
    assert list(diff) == [], "fastround (A) vs upstream (B):\n" + "\n".join(diff)
    assert [d for d in diff.order if not d.startswith(_ORDER_OK)] == []
    qc = json.loads((fast / "config.json").read_text())["quantization_config"]
    for field in ("bits", "group_size", "sym", "data_type"):
        if field in kwargs:
            assert qc[field] == kwargs[field], field


def test_sym_override_reaches_the_checkpoint(checkpoint, tmp_path) -> None:
    """The reported case: W8A16 with sym=False wrote `sym: true` and symmetric tensors."""
    out = tmp_path / "out"
    fastround.ModelFreeCompressor(
        str(checkpoint("llama_aligned")), scheme="W4A16", sym=False, group_size=32, show_progress=False
    ).quantize_and_save(str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, False)
    tensors = oracle.read_checkpoint(out)
    # asym packs raw zero points: not the constant sym word 0x77777777 (zp 8 stored as 7 per nibble)
    zeros = tensors["model.layers.0.self_attn.q_proj.qzeros"][2]
    assert len(set(zeros[i : i + 4] for i in range(0, len(zeros), 4))) > 1


def test_positional_output_dir_and_run(checkpoint, tmp_path) -> None:
    """Upstream's signature: (model, output_dir, scheme, layer_config, ignore_layers, format, device, ...)."""
    src = checkpoint("llama_aligned")
    out = tmp_path / "positional"
    compressor = fastround.ModelFreeCompressor(str(src), str(out), "W4A16", None, "", "auto_round", "cpu", group_size=32)
    compressor.show_progress = False
    assert compressor.run() == str(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scheme": "W8A16", "act_bits": 8}, "act_bits"),
        ({"scheme": "W4A16", "bits": 3}, "bits"),
        ({"scheme": "W4A16", "rotation_config": {"hadamard": True}}, "rotation_config"),
    ],
)
def test_rejected_overrides_fail_at_construction(kwargs: dict[str, Any], message: str, checkpoint) -> None:
    with pytest.raises(ValueError, match=message):
        fastround.ModelFreeCompressor(str(checkpoint("llama_aligned")), show_progress=False, **kwargs)


def test_upstream_rejects_act_bits_override_too(checkpoint, oracle_tmp) -> None:
    with pytest.raises(ValueError, match="act_bits"):
        oracle.run_upstream_class(checkpoint("llama_aligned"), oracle_tmp("class-up-act8"), scheme="W8A16", act_bits=8)


def test_autoround_entry_still_resolves_act_fields(checkpoint, oracle_tmp) -> None:
    """Through AutoRound, upstream fills act_data_type='float' first, so a preset made MXFP by overrides fails."""
    kwargs = {"scheme": "W8A16", "data_type": "mx_fp", "bits": 4, "group_size": 32}
    src = checkpoint("llama_aligned")
    with pytest.raises(ValueError, match="act_data_type"):
        fastround.AutoRound(str(src), model_free=True, **kwargs)
    with pytest.raises(ValueError, match="act_data_type"):
        oracle.run_upstream_api(src, oracle_tmp("api-up-mxfp-override"), **kwargs)
