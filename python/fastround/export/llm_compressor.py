"""Format llm_compressor for MXFP, NVFP4 and NVFP4_E5M3 schemes (upstream export_to_llmcompressor/export_to_fp): the
same packed tensors as auto_round's layout, described by a compressed-tensors quantization_config (the config
compressed-tensors' MXFP4 / MXFP8 / NVFP4 presets serialise to, one config group per scheme when MXFP bits are
mixed; upstream's own fixed dict for NVFP4_E5M3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from fastround.export import NVFP4_E5M3_DATA_TYPE, ResolvedFormat
from fastround.export.common import lm_head_name
from fastround.export.config import standard_regex
from fastround.export.packing import save_packed
from fastround.quantized import ExportContext
from fastround.schemes import is_nvfp4

_GROUP_FORMAT = {4: "mxfp4-pack-quantized", 8: "mxfp8-quantized"}


def _args(bits: int, dynamic: bool) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of its MXFP presets: float, symmetric, groups of 32, E8M0 scales."""
    return {"num_bits": bits, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
            "dynamic": dynamic, "scale_dtype": "torch.uint8"}


def _group(bits: int, targets: list[str], fmt: str | None) -> dict[str, Any]:
    return {"targets": targets, "weights": _args(bits, False), "input_activations": _args(bits, True),
            "output_activations": None, "format": fmt}


def _config(groups: dict[str, Any], fmt: str, ignore: list[str]) -> dict[str, Any]:
    return {"config_groups": groups, "quant_method": "compressed-tensors", "kv_cache_scheme": None, "format": fmt,
            "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore,
            "moe_sparsity_config": None, "provider": "auto-round"}


def ignore_list(ctx: ExportContext) -> list[str]:
    """Regex entries and configured layers above 8 bits, then an unconfigured lm_head."""
    ignore = ["re:" + standard_regex(k) for k, c in ctx.regex_config.items() if int(c.get("bits", 16)) > 8]
    ignore += [name for name, c in ctx.layer_config.items() if int(c.get("bits", 16)) > 8]
    head = lm_head_name(ctx.model, ctx.all_block_names or ctx.block_names)
    if head and head not in ctx.layer_config and head not in ignore:
        ignore.append(head)
    return ignore


def _mx_bits(bits: int, data_type: str, where: str) -> int:
    if not data_type.startswith("mx_fp") or bits not in _GROUP_FORMAT:
        raise ValueError(f"format llm_compressor: {where} has bits={bits} data_type={data_type}; fastround writes "
                         "MXFP4 / MXFP8 layers only in this format")
    return bits


def _nvfp4_args(activations: bool) -> dict[str, Any]:
    """compressed-tensors' NVFP4 preset args: float E2M1, symmetric, groups of 16 under a global scale
    (tensor_group), E4M3 group scales; the activations' scales are computed per batch under the static
    calibrated global scale (dynamic "local", observer static_minmax)."""
    args: dict[str, Any] = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                            "strategy": "tensor_group", "dynamic": "local" if activations else False,
                            "scale_dtype": "torch.float8_e4m3fn"}
    if activations:
        args["observer"] = "static_minmax"
    return args


def _nvfp4_config(ignore: list[str]) -> dict[str, Any]:
    group = {"targets": ["Linear"], "weights": _nvfp4_args(False), "input_activations": _nvfp4_args(True),
             "output_activations": None, "format": None}
    return _config({"group_0": group}, "nvfp4-pack-quantized", ignore)


def _nvfp4_e5m3_args(dynamic: bool | str) -> dict[str, Any]:
    """The quantization args upstream writes for NVFP4_E5M3 (its own fixed dict, not a compressed-tensors
    preset): float E2M1, symmetric, groups of 16, tensor_group strategy, no global scale."""
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": 16, "num_bits": 4,
            "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor_group", "symmetric": True,
            "type": "float"}


def _nvfp4_e5m3_config(ignore: list[str]) -> dict[str, Any]:
    group = {"input_activations": _nvfp4_e5m3_args("local"), "output_activations": None, "targets": ["Linear"],
             "weights": _nvfp4_e5m3_args(False)}
    # Upstream falls back to ["lm_head"] when nothing is ignored.
    return {"config_groups": {"group_0": group}, "format": "nvfp4-e5m3-pack-quantized",
            "global_compression_ratio": None, "ignore": list(dict.fromkeys(ignore or ["lm_head"])),
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "provider": "auto-round"}


def quantization_config(ctx: ExportContext) -> dict[str, Any]:
    s = ctx.scheme
    if ctx.settings.get("static_kv_dtype") or ctx.settings.get("static_attention_dtype"):
        raise ValueError("format llm_compressor: static KV-cache / attention quantization is not supported by "
                         "fastround yet")
    bits, data_type = int(s["bits"]), str(s["data_type"])
    act_bits = s.get("act_bits") if s.get("act_bits") is not None else 16
    ignore = ignore_list(ctx)
    groups: dict[tuple[int, str, int], list[str]] = {}
    for name, cfg in ctx.layer_config.items():
        layer_bits = int(cfg.get("bits", bits))
        if layer_bits > 8:
            continue
        layer_act = cfg.get("act_bits")
        key = (layer_bits, str(cfg.get("data_type", data_type)), int(layer_act if layer_act is not None else act_bits))
        groups.setdefault(key, []).append(name)
    if data_type == NVFP4_E5M3_DATA_TYPE:
        other = [names[0] for (layer_bits, layer_dt, _), names in groups.items()
                 if (layer_bits, layer_dt) != (bits, data_type)]
        if other:
            raise ValueError(f"format llm_compressor: layer {other[0]} has a scheme other than NVFP4_E5M3; fastround "
                             "writes NVFP4_E5M3 in this format only with every quantized layer in NVFP4_E5M3")
        return _nvfp4_e5m3_config(ignore)
    if is_nvfp4(data_type, bits):
        # nv_fp and nv_fp4 name the same format: a layer counts as NVFP4 by the rule, not by its spelling
        other = [names[0] for (layer_bits, layer_dt, layer_act), names in groups.items()
                 if not is_nvfp4(layer_dt, layer_bits) or layer_act != int(act_bits)]
        if other:
            raise ValueError(f"format llm_compressor: layer {other[0]} has a scheme other than NVFP4; fastround "
                             "writes NVFP4 in this format only with every quantized layer in NVFP4")
        return _nvfp4_config(ignore)
    for (layer_bits, layer_dt, _), names in groups.items():
        _mx_bits(layer_bits, layer_dt, f"layer {names[0]}")
    if len(groups) > 1:
        default = (bits, data_type, int(act_bits))
        ordered = [k for k in groups if k != default] + [k for k in groups if k == default]
        config_groups = {
            f"group_{i}": _group(k[0], ["Linear"] if k == default else groups[k], _GROUP_FORMAT[k[0]])
            for i, k in enumerate(ordered)
        }
        return _config(config_groups, "mixed-precision", ignore)
    if bits >= 16:
        if not groups:
            raise ValueError("format llm_compressor needs quantized layers; the scheme and layer_config quantize none")
        (layer_bits, _, _), targets = next(iter(groups.items()))
        return _config({"group_0": _group(layer_bits, targets, None)}, _GROUP_FORMAT[layer_bits], ignore)
    _mx_bits(bits, data_type, "the scheme")
    return _config({"group_0": _group(bits, ["Linear"], None)}, _GROUP_FORMAT[bits], ignore)


def save(ctx: ExportContext, output_dir: Path, fmt: ResolvedFormat, *, shard_writer: bool) -> None:
    config = quantization_config(ctx)
    save_packed(ctx, output_dir, fmt, config, None, shard_writer=shard_writer)


__all__ = ["ignore_list", "quantization_config", "save"]
