"""The regular flow's outputs load with upstream's own loader back to the weights the flow quantize-dequantized.

fastround's `AutoRound(model, iters=0, ...).quantize()` leaves every quantized layer's qdq weight in the model;
a second, identical run saves it with `quantize_and_save`. transformers + auto-round 0.16.1 then load that
folder, and each QuantLinear's weight (forward on eye(in), tests/test_loader.py) must be the same value:

* for the exact e = scale * (q - zp) of each weight (the scale is fp16, or OPT-RTN's bf16 scale, which fp16
  holds exactly; e is exact in fp32), the qdq weight is bf16(e) and the loader's fp16(e), both bit for bit;
* so, directly, bf16(loader) == qdq, except where fp16(e) lands exactly halfway between two bf16 values
  (double rounding; about 4% of W8 weights): there qdq must be one of those two bf16 neighbours;
* layers kept at 16 bits load as plain nn.Linear with the source weights (the loader casts them to fp16);
* the loader reports no missing key (nothing randomly initialised) and no unexpected key, save auto_gptq's
  g_idx, which upstream's own auto_gptq output carries too and whose torch backend has no buffer for; the test
  checks it is the trivial i // group_size, so nothing is lost.

auto_awq, and auto_gptq with asym, have no CPU kernel in upstream's loader without gptqmodel / auto-round-lib: it
falls back to a float stand-in with random weights. Their tensors are read back with upstream's own unpacking
instead (auto_awq's `dequantize_gemm`, the torch_zp QuantLinear fed the checkpoint's buffers), and the loader's
fallback is pinned on output equal to upstream's. auto_gptq stores clamp(zp - 1, 0, 2^bits - 1), so under asym a
group whose zero point is 0 reads back with zero point 1, one scale low (upstream's bytes, docs/compatibility.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import oracle
from test_loader import _load, _loaded_weight, _source_weight
from test_opt_rtn_flow import _texts
from test_regular_flow_models import _build as _build_family

COMMON = {"iters": 0, "disable_model_free": True, "device_map": "cpu", "nsamples": 4, "seqlen": 32, "batch_size": 2}

# One layer kept in full precision, one at 8 bits, inside a lower-bit model.
LLAMA_MIX = {"model.layers.0.mlp.down_proj": {"bits": 16}, "model.layers.1.self_attn.o_proj": {"bits": 8}}
KEEP_ONE = {"model.layers.0.mlp.down_proj": {"bits": 16}}  # auto_awq stores 4 bits only
QWEN2_MIX = {"model.layers.1.self_attn.k_proj": {"bits": 16}, "model.layers.0.self_attn.q_proj": {"bits": 8}}


@dataclass
class Quantized:
    """What fastround's regular flow left in memory, per layer; weights [out, in] (Conv1D transposed)."""

    qdq: dict[str, torch.Tensor]  # quantized layer -> the model's qdq weight (bf16)
    codes: dict[str, tuple[torch.Tensor, ...]]  # quantized layer -> (scale, q, zp) per weight, float32
    bias: dict[str, torch.Tensor]  # quantized layer -> its bias, where it has one
    kept: dict[str, torch.Tensor]  # every other Linear (16 bits, lm_head) -> its weight
    layer_config: dict[str, Any]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_family("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2")


def _quantize(src: Path, **kwargs: Any) -> Quantized:
    from fastround import AutoRound

    comp = AutoRound(str(src), **COMMON, **kwargs)
    model, layer_config = comp.quantize()
    modules = dict(model.named_modules())
    run = Quantized({}, {}, {}, {}, layer_config)
    for name, layer in comp.layers.items():
        mod = modules[name]
        w = mod.weight.detach()
        run.qdq[name] = (w.t() if layer.conv1d else w).clone()  # Conv1D keeps [in, out]
        gs = int(layer_config[name]["group_size"])
        per_weight = [t.float().repeat_interleave(gs, dim=1) for t in (layer.scales, layer.zeros)]  # [out, G]
        run.codes[name] = (per_weight[0], layer.codes.float(), per_weight[1])
        if getattr(mod, "bias", None) is not None:
            run.bias[name] = mod.bias.detach().clone()
    for name, mod in modules.items():  # layer_config's 16-bit entries, and lm_head, which it leaves out
        if isinstance(mod, torch.nn.Linear) and name not in run.qdq:
            run.kept[name] = mod.weight.detach().clone()
    assert run.qdq and set(run.qdq) == {n for n, c in layer_config.items() if int(c["bits"]) < 16}
    return run


def _save(src: Path, out: Path, fmt: str, **kwargs: Any) -> Path:
    from fastround import AutoRound

    _, folder = AutoRound(str(src), **COMMON, **kwargs).quantize_and_save(str(out), format=fmt)
    return Path(folder)


def _assert_same_value(name: str, loaded: torch.Tensor, qdq: torch.Tensor) -> None:
    """loaded: fp16(e) as float32; qdq: bf16(e): equal after bf16 rounding but for double-rounding ties."""
    assert loaded.shape == qdq.shape and qdq.dtype == torch.bfloat16, (name, loaded.shape, qdq.shape, qdq.dtype)
    same = loaded.to(torch.bfloat16) == qdq  # == treats -0.0 and 0.0 alike (RTN keeps the source's sign)
    bits = loaded.view(torch.int32)
    tie = (bits & 0xFFFF) == 0x8000  # exactly halfway between two bf16 values
    below = bits & ~0xFFFF  # the bf16 neighbour nearer zero; + 0x10000 the one farther
    q = qdq.float().view(torch.int32)
    bad = int((~(same | (tie & ((q == below) | (q == below + 0x10000))))).sum())
    assert bad == 0, f"{name}: {bad} of {qdq.numel()} weights differ from the qdq weight"


def _exact(run: Quantized, name: str, zp_floor: int = 0) -> torch.Tensor:
    """scale * (q - max(zp, zp_floor)) [out, in]: exact in float32 (an fp16/bf16 scale times a small integer)."""
    scale, q, zp = run.codes[name]
    return scale * (q - zp.clamp(min=zp_floor))


def _assert_reads_back(run: Quantized, name: str, loaded: torch.Tensor, zero_read_as_one: bool = False) -> int:
    """The loaded weight [out, in] (float32) against the run; returns how many weights read back one scale low.

    zero_read_as_one: auto_gptq asym, whose clamped zp - 1 reads a zero point of 0 back as 1."""
    qdq = run.qdq[name]
    assert torch.equal(qdq, _exact(run, name).to(torch.bfloat16)), f"{name}: the model's qdq weight is not bf16(e)"
    loader_e = _exact(run, name, 1 if zero_read_as_one else 0)
    assert torch.equal(loaded, loader_e.half().float()), f"{name}: the loaded weight is not fp16(e)"
    low = (run.codes[name][2] == 0) & zero_read_as_one
    _assert_same_value(name, loaded[~low], qdq[~low])
    return int(low.sum())


def _assert_trivial_g_idx(tensors: dict[str, oracle.TensorRecord], names: set[str], run: Quantized) -> None:
    for key in names:
        assert key.endswith(".g_idx"), key
        g_idx = np.frombuffer(tensors[key][2], dtype=np.int32)
        gs = int(run.layer_config[key[: -len(".g_idx")]]["group_size"])
        assert np.array_equal(g_idx, np.arange(g_idx.size) // gs), key


def _assert_kept(run: Quantized, src: Path, loaded: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Every layer left at 16 bits: fastround did not touch it and it loads as the source weight.

    loaded: layer -> (its source tensor name, the loaded weight); a tied lm_head names the embedding."""
    source = oracle.read_checkpoint(src)
    assert run.kept and set(loaded) == set(run.kept)
    for name, ours in run.kept.items():
        key, got = loaded[name]
        want = _source_weight(source[key])
        assert torch.equal(ours, want), f"{name}: fastround changed a kept layer"
        assert torch.equal(got.float(), want.to(got.dtype).float()), name


LOADER_CASES = [
    # kind, format, scheme kwargs, layer_config
    ("llama_aligned", "auto_round", {"scheme": "W4A16", "group_size": 32}, LLAMA_MIX),
    ("llama_aligned", "auto_round", {"scheme": "W2A16G32", "sym": False}, None),
    ("qwen2_aligned", "auto_round", {"scheme": "W8A16", "group_size": 32}, None),
    ("gpt2", "auto_round", {"scheme": "W2A16G32", "sym": False}, None),  # W4 asym is AWQ-packed: no Conv1D
    ("llama_aligned", "auto_gptq", {"scheme": "W2A16G32"}, None),
    ("qwen2_aligned", "auto_gptq", {"scheme": "W4A16", "group_size": 32}, QWEN2_MIX),
    ("gpt2", "auto_gptq", {"scheme": "W4A16", "group_size": 32}, None),
]


def _check_loaded(src: Path, folder: Path, fmt: str, run: Quantized) -> None:
    model, info = _load(folder, via_auto_round=fmt != "auto_round")
    assert not info["missing_keys"], info["missing_keys"]
    unexpected = set(info["unexpected_keys"])
    if fmt == "auto_gptq":
        assert unexpected == {f"{n}.g_idx" for n in run.qdq}
        _assert_trivial_g_idx(oracle.read_checkpoint(folder), unexpected, run)
    else:
        assert not unexpected, unexpected
    modules = dict(model.named_modules())
    for name in run.qdq:
        mod = modules[name]
        assert hasattr(mod, "qweight") and type(mod).__module__.startswith("auto_round_extension.torch."), (
            name, type(mod))
        assert mod.bits == int(run.layer_config[name]["bits"]), (name, mod.bits)
        _assert_reads_back(run, name, _loaded_weight(mod))
        assert (mod.bias is None) == (name not in run.bias), name
        if mod.bias is not None:  # the loader's bias is the source bias cast to fp16 once
            assert torch.equal(mod.bias.detach(), run.bias[name].to(mod.bias.dtype)), name
    param_names = {id(p): n for n, p in model.named_parameters()}  # a tied lm_head answers with the embedding
    kept = {}
    for name in run.kept:
        mod = modules[name]
        assert type(mod) is torch.nn.Linear, (name, type(mod))
        kept[name] = (param_names[id(mod.weight)], mod.weight.detach())
    _assert_kept(run, src, kept)


@pytest.mark.parametrize("kind,fmt,scheme,layer_config", LOADER_CASES)
def test_regular_flow_loads_back_to_qdq(checkpoint, gpt2, tmp_path, kind, fmt, scheme, layer_config) -> None:
    src = gpt2 if kind == "gpt2" else checkpoint(kind)
    kw = dict(scheme, layer_config=layer_config, disable_opt_rtn=True)
    run = _quantize(src, **kw)
    for name, cfg in (layer_config or {}).items():
        assert name in (run.kept if cfg["bits"] == 16 else run.qdq), name
    _check_loaded(src, _save(src, tmp_path / "out", fmt, **kw), fmt, run)


def test_opt_rtn_loads_back_to_qdq(checkpoint, tmp_path) -> None:
    """OPT-RTN (imatrix from calibration text): the searched bf16 scales survive the fp16 checkpoint."""
    src = checkpoint("llama_aligned")
    kw = {"scheme": "W4A16", "group_size": 32, "disable_opt_rtn": False, "dataset": _texts(),
          "layer_config": LLAMA_MIX}
    run = _quantize(src, **kw)
    _check_loaded(src, _save(src, tmp_path / "out", "auto_round", **kw), "auto_round", run)
    # The search really ran: plain RTN gives other weights for the same layers.
    rtn = _quantize(src, **{**kw, "disable_opt_rtn": True})
    assert any(not torch.equal(rtn.qdq[n], run.qdq[n]) for n in run.qdq)


# Formats upstream's loader has no CPU kernel for here (it needs gptqmodel or auto-round-lib): auto_awq, and
# auto_gptq with asym (its torch_zp backend declares sym only).
UNPACK_CASES = [
    ("llama_aligned", "auto_awq", {"scheme": "W4A16", "group_size": 32, "sym": False}, KEEP_ONE),
    ("qwen2_aligned", "auto_awq", {"scheme": "W4A16", "group_size": 32}, None),
    ("llama_aligned", "auto_gptq", {"scheme": "W4A16", "group_size": 32, "sym": False}, LLAMA_MIX),
]


def _unpacked(tensors: dict[str, oracle.TensorRecord], name: str, fmt: str, cfg: dict[str, Any]) -> torch.Tensor:
    """A layer's weight [out, in] as float32 through upstream's own unpacking of the checkpoint tensors."""

    def tensor(suffix: str, np_dtype: Any) -> torch.Tensor:
        rec = tensors[f"{name}.{suffix}"]
        return torch.from_numpy(np.frombuffer(rec[2], dtype=np_dtype).reshape(rec[1]).copy())

    bits, gs = int(cfg["bits"]), int(cfg["group_size"])
    qweight, qzeros, scales = tensor("qweight", np.int32), tensor("qzeros", np.int32), tensor("scales", np.float16)
    if fmt == "auto_awq":
        from auto_round.export.export_to_awq.utils import dequantize_gemm

        deq = dequantize_gemm(qweight, qzeros, scales, bits, gs)  # [in, out] fp16
        assert deq.dtype == torch.float16
        return deq.t().float()
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    # As the loader builds it: no g_idx buffer (that is its act-order path); the trivial g_idx is checked apart.
    mod = QuantLinear(bits, gs, qweight.shape[0] * 32 // bits, scales.shape[1], bias=False)
    mod.load_state_dict({"qweight": qweight, "qzeros": qzeros, "scales": scales})
    return _loaded_weight(mod)


@pytest.mark.parametrize("kind,fmt,scheme,layer_config", UNPACK_CASES)
def test_unpacked_tensors_equal_qdq(checkpoint, tmp_path, kind, fmt, scheme, layer_config) -> None:
    src = checkpoint(kind)
    kw = dict(scheme, layer_config=layer_config, disable_opt_rtn=True)
    run = _quantize(src, **kw)
    tensors = oracle.read_checkpoint(_save(src, tmp_path / "out", fmt, **kw))
    asym_gptq = fmt == "auto_gptq" and scheme.get("sym") is False
    if fmt == "auto_gptq":
        _assert_trivial_g_idx(tensors, {k for k in tensors if k.endswith(".g_idx")}, run)
    low = 0
    for name in run.qdq:
        low += _assert_reads_back(run, name, _unpacked(tensors, name, fmt, run.layer_config[name]), asym_gptq)
        if name in run.bias:
            assert torch.equal(_source_weight(tensors[f"{name}.bias"]), run.bias[name].half()), name
    # The checkpoints' planted all-positive rows give zero point 0 under asym.
    assert (low > 0) == asym_gptq, low
    _assert_kept(run, src, {n: (f"{n}.weight", _source_weight(tensors[f"{n}.weight"])) for n in run.kept})


@pytest.mark.parametrize(
    "fmt,scheme",
    [("auto_awq", {"scheme": "W4A16", "group_size": 32}),
     ("auto_gptq", {"scheme": "W4A16", "group_size": 32, "sym": False})],
)
def test_upstream_loader_falls_back_to_fake(checkpoint, tmp_path, fmt, scheme) -> None:
    """Why those formats are read with the unpackers: on a CPU without gptqmodel / auto-round-lib upstream's loader
    picks its "auto_round:fake" backend, which takes float weights only (so the packed tensors are unexpected and
    the weights random), and whose forward fails on act_data_type None. The checkpoint is upstream's own, tensor
    for tensor and config key for key (no act_* fields), so this is the loader's gap, not fastround's writer."""
    from test_regular_flow import _assert_same, _upstream

    src = checkpoint("llama_aligned")
    ours = _save(src, tmp_path / "fr", fmt, **scheme, disable_opt_rtn=True)
    sizes = {k: COMMON[k] for k in ("nsamples", "seqlen", "batch_size")}
    _assert_same(ours, _upstream(src, tmp_path / "up", fmt, **scheme, **sizes))
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert not any(k.startswith("act_") for k in config)

    model, info = _load(ours, via_auto_round=True)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
    assert "model.layers.0.self_attn.q_proj.qweight" in info["unexpected_keys"]
    mod = dict(model.named_modules())["model.layers.0.self_attn.q_proj"]
    assert type(mod).__name__ == "FakeActQuantLinear" and mod.config.act_data_type is None
    with pytest.raises(TypeError):
        mod(torch.zeros(1, mod.in_features, dtype=mod.weight.dtype))
