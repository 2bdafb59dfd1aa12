"""Format writers of the regular flow (fastround.export) against upstream auto-round 0.16.1's own exports.

Each parity case runs upstream's regular RTN flow (iters=0, plain RTN, CPU) on a tiny checkpoint, builds the
ExportContext our quantization would hand over from upstream's quantized model (its layer_config, and each
layer's codes from its scale / zero point, as upstream's packers derive them), writes it with
fastround.export and compares every file with upstream's output: tensors byte for byte, configs key for key.

Two upstream paths write different bytes and both are covered: quantize_and_save with one format streams the
weights through upstream's ShardWriter (`shard_writer=True` here), save_quantized goes through
transformers' save_pretrained."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import oracle
from fastround import export
from fastround.export.config import SCHEME_KEYS
from fastround.quantized import ExportContext, QuantizedLayer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_RUN = {"iters": 0, "disable_opt_rtn": True, "enable_torch_compile": False, "amp": False, "device_map": "cpu",
        "disable_model_free": True}


def upstream_quantized(src: Path, **kwargs: Any) -> Any:
    """Upstream's compressor after quantize() (qdq weights, per-layer scale / zp attributes)."""
    from auto_round import AutoRound

    ar = AutoRound(model=str(src), **{**_RUN, **kwargs})
    ar.quantize()
    return ar


def layer_codes(module: torch.nn.Module, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in] uint8, scales [out, G] fp16, zeros [out, G] int32) as upstream's packers derive them
    from the qdq weight: round(W / scale + zp) clamped to the level range."""
    w = module.weight.data  # [out, in]
    bits, gs = int(cfg["bits"]), int(cfg["group_size"])
    gs = w.shape[1] if gs <= 0 else gs
    scale = module.scale  # [out, G]
    zp = module.zp
    rep_scale = scale.repeat_interleave(gs, 1)[:, : w.shape[1]]
    if isinstance(zp, torch.Tensor):
        zeros = zp.to(torch.float32).round().to(torch.int32)
        rep_zp = zp.repeat_interleave(gs, 1)[:, : w.shape[1]]
    else:
        zeros = torch.full(scale.shape, int(zp), dtype=torch.int32)
        rep_zp = zp
    codes = torch.round(w / rep_scale + rep_zp).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale.to(torch.float16), zeros


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mx_layer_codes(module: torch.nn.Module, cfg: dict[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(encoding, codes [out, in] uint8, E8M0 scales [out, in/32] uint8) as upstream's MX packer derives them:
    W / 2^exponent per group of 32, then the nearest E2M1 value with the sign in bit 3 (MXFP4) or the E4M3
    byte (MXFP8)."""
    w = module.weight.data  # [out, in]
    exponent = module.scale  # [out, in/32]
    scaled = (w.reshape(-1, 32) / (2 ** exponent.reshape(-1, 1))).reshape(w.shape)
    scales = (exponent + 127).clamp(0, 255).to(torch.uint8)
    if int(cfg["bits"]) == 8:
        return "mxfp8", scaled.to(torch.float8_e4m3fn).view(torch.uint8), scales
    nearest = torch.argmin((scaled.abs().unsqueeze(-1) - _E2M1.to(scaled.dtype)).abs(), dim=-1)
    return "mxfp4", (nearest + (torch.signbit(scaled).to(torch.long) << 3)).to(torch.uint8), scales


def context_from_upstream(ar: Any, src: Path, user_layer_config: dict | None = None) -> ExportContext:
    # upstream wraps activation-quantized layers for its qdq forward; its packers unwrap them when saving, its fake
    # writer saves them wrapped. Our writers get a plain copy, upstream's keeps its own model as quantize() left it.
    model = copy.deepcopy(ar.model)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "WrapperWALayer":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.orig_layer)
    layer_config = copy.deepcopy(ar.layer_config)
    layers: dict[str, QuantizedLayer] = {}
    for name, cfg in layer_config.items():
        if int(cfg["bits"]) > 8:  # weights kept (activation-only quantization has nothing to pack)
            continue
        module = model.get_submodule(name)
        zeros: torch.Tensor | None = None
        if str(cfg["data_type"]).startswith("mx_fp"):
            enc, codes, scales = mx_layer_codes(module, cfg)
        else:
            enc, (codes, scales, zeros) = "int_gptq", layer_codes(module, cfg)
        layers[name] = QuantizedLayer(
            name=name, encoding=enc, scheme={k: cfg.get(k) for k in SCHEME_KEYS}, codes=codes, scales=scales,
            zeros=zeros, bias=None if module.bias is None else module.bias.data.clone(),
        )
    scheme = {k: getattr(ar, k, None) for k in SCHEME_KEYS}
    settings = {"iters": 0, "nsamples": 128, "seqlen": 2048, "batch_size": 8, "dataset": "NeelNanda/pile-10k",
                "amp": ar.amp, "low_gpu_mem_usage": ar.low_gpu_mem_usage, "disable_opt_rtn": True,
                "enable_quanted_input": False}
    return ExportContext(
        model=model, tokenizer=ar.tokenizer, layers=layers, layer_config=layer_config, scheme=scheme,
        block_names=[list(g) for g in ar.quant_block_list], settings=settings, source_dir=str(src),
        user_layer_config=dict(user_layer_config or {}), regex_config=copy.deepcopy(ar.regex_config or {}),
    )


def _sort_skip_list(directory: Path) -> None:
    """upstream's awq modules_to_not_convert is a set's iteration order (hash-seeded); sort it as we do."""
    for name in ("config.json", "quantization_config.json"):
        path = directory / name
        data = json.loads(path.read_text(encoding="utf-8"))
        qc = data.get("quantization_config", data)
        if isinstance(qc.get("modules_to_not_convert"), list) and len(qc["modules_to_not_convert"]) > 1:
            qc["modules_to_not_convert"] = sorted(qc["modules_to_not_convert"])
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)


def assert_same(ours: Path, theirs: Path) -> None:
    if (theirs / "quantization_config.json").is_file():
        _sort_skip_list(theirs)
    diff = oracle.compare_checkpoints(ours, theirs)
    assert not diff, "\n".join(diff)
    assert not diff.order, "\n".join(diff.order)


def save_quantized_pair(src: Path, tmp: Path, fmt: str, layer_config: dict | None = None, **kwargs: Any) -> None:
    """upstream quantize() + save_quantized(fmt) against our writer on the same quantized model."""
    kw = dict(kwargs)
    if layer_config is not None:
        kw["layer_config"] = copy.deepcopy(layer_config)
    ar = upstream_quantized(src, **kw)
    ctx = context_from_upstream(ar, src, layer_config)
    export.save(ctx, tmp / "ours", fmt)
    ar.save_quantized(str(tmp / "theirs"), format=fmt)
    assert_same(tmp / "ours", tmp / "theirs")


@pytest.fixture(scope="module")
def llama(checkpoint: Any) -> Path:
    return checkpoint("llama_aligned")


@pytest.fixture(scope="module")
def qwen2(checkpoint: Any) -> Path:
    return checkpoint("qwen2_aligned")


# ------------------------------------------------------------------------------------------------------------
# quantize_and_save (one format): upstream's ShardWriter layout
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "scheme"),
    [
        ("auto_round", {"scheme": "W4A16"}),
        ("auto_round", {"scheme": "W2A16", "sym": False}),
        # upstream's save_quantized cannot pack AWQ words (its QuantLinear lookup passes an argument
        # WQLinear_GEMM lacks); only quantize_and_save, which packs block by block, writes them
        ("auto_round", {"scheme": "W4A16", "sym": False, "group_size": 32}),
        ("auto_round:auto_awq", {"scheme": "W4A16", "group_size": 32}),
        ("auto_gptq", {"scheme": "W4A16"}),
        ("auto_awq", {"scheme": "W4A16", "group_size": 32}),
        ("auto_round", {"scheme": "MXFP4"}),
        ("llm_compressor", {"scheme": "MXFP8"}),
    ],
)
def test_quantize_and_save_layout(llama: Path, tmp_path: Path, fmt: str, scheme: dict[str, Any]) -> None:
    theirs = oracle.run_upstream_regular(llama, tmp_path / "theirs", format=fmt, **scheme)
    ar = upstream_quantized(llama, **scheme)
    ctx = context_from_upstream(ar, llama)
    formats = export.resolve_formats(fmt, ctx.scheme, ctx.layer_config, ctx.regex_config)
    assert export.uses_shard_writer(formats, ctx)
    export.save(ctx, tmp_path / "ours", formats[0], shard_writer=True)
    assert_same(tmp_path / "ours", theirs)


@pytest.mark.parametrize("kind", ["llama_tied", "llama"])
def test_quantize_and_save_skipped_layers(checkpoint: Any, tmp_path: Path, kind: str) -> None:
    """Unaligned dims: upstream keeps those layers in 16 bits (extra_config says so); a tied lm_head is not
    written twice."""
    src = checkpoint(kind)
    theirs = oracle.run_upstream_regular(src, tmp_path / "theirs", format="auto_round", scheme="W4A16")
    ctx = context_from_upstream(upstream_quantized(src, scheme="W4A16"), src)
    export.save(ctx, tmp_path / "ours", "auto_round", shard_writer=True)
    assert_same(tmp_path / "ours", theirs)


# ------------------------------------------------------------------------------------------------------------
# save_quantized: transformers' save_pretrained layout
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme",
    [
        {"scheme": "W4A16"},
        {"scheme": "W2A16"},
        {"scheme": "W2A16", "sym": False},
        {"scheme": "W8A16"},
        {"scheme": "W4A16", "group_size": 32},
        {"scheme": "W4A16", "group_size": -1},
        {"scheme": "BF16"},
    ],
)
def test_auto_round(llama: Path, tmp_path: Path, scheme: dict[str, Any]) -> None:
    save_quantized_pair(llama, tmp_path, "auto_round", **scheme)


@pytest.mark.parametrize("fmt", ["auto_round:auto_gptq", "auto_round:gptqmodel"])
def test_auto_round_explicit_backends(qwen2: Path, tmp_path: Path, fmt: str) -> None:
    save_quantized_pair(qwen2, tmp_path, fmt, scheme="W4A16", group_size=32, sym=False)


@pytest.mark.parametrize("sym", [True, False])
def test_auto_gptq(qwen2: Path, tmp_path: Path, sym: bool) -> None:
    save_quantized_pair(qwen2, tmp_path, "auto_gptq", scheme="W4A16", sym=sym)


def test_auto_awq_with_biases(qwen2: Path, tmp_path: Path) -> None:
    save_quantized_pair(qwen2, tmp_path, "auto_awq", scheme="W4A16", group_size=32, sym=False)


@pytest.mark.parametrize("fmt", ["auto_round", "llm_compressor"])
@pytest.mark.parametrize("scheme", ["MXFP4", "MXFP8"])
def test_mxfp(qwen2: Path, tmp_path: Path, fmt: str, scheme: str) -> None:
    save_quantized_pair(qwen2, tmp_path, fmt, scheme=scheme)


def test_mxfp_mixed_llm_compressor(llama: Path, tmp_path: Path) -> None:
    lc = {"k_proj": {"bits": 8, "data_type": "mx_fp", "act_bits": 8}, "model.layers.0.mlp.down_proj": {"bits": 16}}
    save_quantized_pair(llama, tmp_path, "llm_compressor", layer_config=lc, scheme="MXFP4")


@pytest.mark.parametrize("scheme", ["W4A16", "MXFP4"])
def test_fake(llama: Path, tmp_path: Path, scheme: str) -> None:
    """qdq weights via save_pretrained; with activation quantization (MXFP4 is W4A4) an auto_round:fake config."""
    save_quantized_pair(llama, tmp_path, "fake", scheme=scheme)


# mixed bits: a pattern, an exact layer, a 16-bit layer and a quantized lm_head
_MIXED = {"k_proj": {"bits": 8}, "model.layers.1.mlp.up_proj": {"bits": 2, "group_size": 32},
          "model.layers.0.mlp.down_proj": {"bits": 16}, "lm_head": {"bits": 4}}


@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq"])
def test_mixed_bits(llama: Path, tmp_path: Path, fmt: str) -> None:
    save_quantized_pair(llama, tmp_path, fmt, layer_config=_MIXED, scheme="W4A16")


def test_mixed_bits_asym_leaves_awq(llama: Path, tmp_path: Path) -> None:
    """An asym 4-bit run with an 8-bit layer cannot use AWQ words: auto_round picks its own packing."""
    lc = {"k_proj": {"bits": 8, "sym": True}, "model.layers.0.mlp.down_proj": {"bits": 16}}
    save_quantized_pair(llama, tmp_path, "auto_round", layer_config=lc, scheme="W4A16", sym=False)


def test_awq_skip_list(llama: Path, tmp_path: Path) -> None:
    lc = {"model.layers.0.mlp.down_proj": {"bits": 16}, "o_proj": {"bits": 16}}
    save_quantized_pair(llama, tmp_path, "auto_awq", layer_config=lc, scheme="W4A16", group_size=32)


def test_several_formats(llama: Path, tmp_path: Path) -> None:
    """Several formats: one subfolder each, named after the resolved backend, as upstream's save_quantized."""
    fmt = "auto_round,auto_gptq,fake"
    ar = upstream_quantized(llama, scheme="W4A16")
    ctx = context_from_upstream(ar, llama)
    formats = export.resolve_formats(fmt, ctx.scheme, ctx.layer_config, ctx.regex_config)
    assert not export.uses_shard_writer(formats, ctx)  # upstream packs at the end and uses save_pretrained
    assert not export.uses_shard_writer(export.resolve_formats("fake", ctx.scheme), ctx)
    folders = export.save_all(ctx, tmp_path / "ours", fmt)
    ar.save_quantized(str(tmp_path / "theirs"), format=fmt, inplace=False)
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert names == ["auto-gptq", "auto-round-auto-gptq", "fake"]
    assert sorted(Path(f).name for f in folders) == names
    for name in names:
        assert_same(tmp_path / "ours" / name, tmp_path / "theirs" / name)


@pytest.mark.parametrize(
    ("fmt", "scheme", "encoding"),
    [
        ("auto_round", {"scheme": "W4A16"}, "int_gptq"),
        ("auto_round", {"scheme": "W2A16", "sym": False}, "int_gptq"),
        ("auto_awq", {"scheme": "W4A16", "group_size": 32}, "int_awq"),
        ("auto_round", {"scheme": "MXFP4"}, "mxfp4"),
    ],
)
def test_kernel_codes_end_to_end(qwen2: Path, tmp_path: Path, fmt: str, scheme: dict[str, Any], encoding: str) -> None:
    """Codes from the C++ encoder (fastround.ops.encode_weight) on the unquantized weights, written by our
    writer, equal upstream's quantize + save_quantized: the whole RTN-to-file path without upstream's numbers."""
    from auto_round import AutoRound

    from fastround import ops

    ar = AutoRound(model=str(qwen2), **{**_RUN, **scheme})
    source_model = copy.deepcopy(ar.model)  # loaded weights, before upstream quantizes them in place
    ar.quantize()
    ctx = context_from_upstream(ar, qwen2)
    for name, layer in ctx.layers.items():
        weight = source_model.get_submodule(name).weight.data  # [out, in]
        bits, gs, sym = int(layer.scheme["bits"]), int(layer.scheme["group_size"]), bool(layer.scheme["sym"])
        enc = ops.encode_weight(weight, encoding, bits, gs, sym)
        layer.codes, layer.scales, layer.zeros = enc.codes, enc.scales, enc.zeros
        layer.encoding = encoding
    ctx.model = source_model
    export.save(ctx, tmp_path / "ours", fmt)
    ar.save_quantized(str(tmp_path / "theirs"), format=fmt)
    assert_same(tmp_path / "ours", tmp_path / "theirs")


# ------------------------------------------------------------------------------------------------------------
# format resolution, naming and refusals
# ------------------------------------------------------------------------------------------------------------


def _scheme(**fields: Any) -> dict[str, Any]:
    # the global scheme as upstream's compressor resolves W4A16 (act_* filled in)
    base = {"bits": 4, "group_size": 128, "sym": True, "data_type": "int", "act_bits": 16, "act_group_size": 128,
            "act_sym": True, "act_data_type": "float", "act_dynamic": True}
    return {**base, **fields}


@pytest.mark.parametrize(
    ("fields", "layer_config", "backend"),
    [
        ({}, None, "auto_round:auto_gptq"),
        ({"bits": 2}, None, "auto_round:auto_gptq"),
        ({"sym": False}, None, "auto_round:auto_awq"),
        ({"sym": False}, {"a": {"bits": 16}, "b": {"bits": 4}}, "auto_round:auto_awq"),
        ({"sym": False}, {"a": {"bits": 8}}, "auto_round"),
        ({"sym": False, "bits": 2}, None, "auto_round"),
        ({"bits": 4, "group_size": 32, "data_type": "mx_fp"}, None, "auto_round:mx_fp"),
    ],
)
def test_auto_round_picks_backend_like_upstream(fields: dict, layer_config: dict | None, backend: str) -> None:
    from auto_round.compressors.config_resolution import ResolvedScheme
    from auto_round.export.formats import resolve_formats
    from auto_round.schemes import QuantizationScheme

    scheme = _scheme(**fields)
    ours = export.resolve_format("auto_round", scheme, layer_config)
    assert ours.backend == backend
    theirs = resolve_formats(ResolvedScheme.from_scheme(QuantizationScheme.from_dict(scheme)), format="auto_round",
                             layer_config=copy.deepcopy(layer_config), model=torch.nn.Module())
    assert theirs.formats[0].get_backend_name() == ours.backend


def test_awq_layout_needs_whole_groups(small_ctx: ExportContext, tmp_path: Path) -> None:
    """in_features 160 at group_size 128 has no AWQ GEMM layout (upstream fails inside its packer)."""
    with pytest.raises(ValueError, match=r"auto_awq: layer model\.layers\.0\.self_attn\.q_proj \[160, 160\]"):
        export.save(small_ctx, tmp_path / "out", "auto_awq")
    assert list(tmp_path.iterdir()) == []


def test_awq_refuses_2_bit() -> None:
    with pytest.raises(ValueError, match=r"auto_awq.*2-bit"):
        export.resolve_format("auto_awq", _scheme(bits=2))
    with pytest.raises(ValueError, match=r"auto_round:auto_awq.*8-bit"):
        export.resolve_format("auto_round:auto_awq", _scheme(), {"x": {"bits": 8}})


def test_unknown_and_unsupported_formats() -> None:
    with pytest.raises(ValueError, match="format nope is not supported"):
        export.resolve_formats("auto_round,nope", _scheme())
    with pytest.raises(ValueError, match="gguf:q4_k_m is not supported by fastround"):
        export.resolve_format("gguf:q4_k_m", _scheme())
    with pytest.raises(ValueError, match="GGUF format is not compatible"):
        export.parse_formats("gguf:q4_0,auto_round")
    with pytest.raises(ValueError, match="8-bit asymmetric"):
        export.check_format("auto_round", _scheme(bits=8, sym=False), "W8A16")


def test_parse_formats_normalises() -> None:
    assert export.parse_formats(" Auto_Round , fake,auto_round,") == ["auto_round", "fake"]


def test_activation_quantization_falls_back_to_fake() -> None:
    scheme = _scheme(act_bits=8, act_data_type="int", act_dynamic=True)
    assert [f.backend for f in export.resolve_formats("auto_round", scheme)] == ["fake"]
    assert [f.backend for f in export.resolve_formats("auto_round,fake", scheme)] == ["fake"]


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("Qwen/Qwen3-0.6B", {}),
        ("/models/llama/", {"data_type": "mx_fp", "group_size": 32}),
        ("org/m", {"group_size": -1, "act_bits": 8, "act_data_type": "fp"}),
        ("org/m", {"group_size": 0, "act_bits": 8, "act_data_type": "int"}),
        ("org/m", {"group_size": (128, 128), "bits": 8, "data_type": "fp"}),
        (".", {}),
    ],
)
def test_output_folder_name_matches_upstream(name: str, fields: dict) -> None:
    from types import SimpleNamespace

    from auto_round.compressors.base import BaseOrchestrator

    scheme = _scheme(**fields)
    cfg = SimpleNamespace(**{k: scheme.get(k) for k in ("group_size", "bits", "data_type", "act_bits",
                                                         "act_data_type")})
    stub = SimpleNamespace(model_context=SimpleNamespace(model=SimpleNamespace(name_or_path=name)),
                           quantize_config=cfg, diffusion=False)
    theirs = BaseOrchestrator._get_export_dir(stub, "out", "auto_round")
    assert os.path.join("out", export.output_folder_name(name, scheme, ["auto_round"])) == theirs


def test_list_formats() -> None:
    listed = export.list_formats()
    assert listed["auto_awq"] == ["W4A16"]
    assert "W2A16" in listed["auto_gptq"] and "MXFP4" in listed["auto_round"]
    for name in listed:
        export.parse_formats(name)
    assert "auto_gptq support scheme:\n\tW4A16" in export.format_support_text()


# ------------------------------------------------------------------------------------------------------------
# folder guarantees
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ctx(llama: Path) -> ExportContext:
    return context_from_upstream(upstream_quantized(llama, scheme="W4A16"), llama)


def test_refuses_output_inside_source(small_ctx: ExportContext) -> None:
    src = Path(small_ctx.source_dir or "")
    with pytest.raises(ValueError, match=rf"{src / 'out'}.*inside the source model folder {src}"):
        export.save(small_ctx, src / "out", "auto_round")
    assert not (src / "out").exists()


def test_failure_leaves_nothing(small_ctx: ExportContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastround.export import common

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(common, "write_quantization_config_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.save(small_ctx, tmp_path / "out", "auto_round")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_keeps_other_files_drops_stale_shards(small_ctx: ExportContext, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    export.save(small_ctx, out, "auto_round")
    names = sorted(p.name for p in out.iterdir())
    assert "README.md" in names and "model-00001-of-00002.safetensors" not in names
    assert "model.safetensors" in names and "config.json" in names
    assert [p for p in tmp_path.iterdir() if p.name != "out"] == []
    shutil.rmtree(out)
