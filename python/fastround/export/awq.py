"""Standalone auto_awq format (upstream export_to_awq): AWQ GEMM words, quant_method "awq", version "gemm", the
unquantized modules listed in modules_to_not_convert, fp16 declared in config.json. Mixed bits cannot be
expressed, so only 4-bit layers are written (format resolution refuses the rest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastround.export import ResolvedFormat
from fastround.export.config import block_names_to_str, filter_quantization_config, is_quantized, serialization_dict
from fastround.export.packing import save_packed
from fastround.quantized import ExportContext


def _quantizable(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear or type(module).__name__ in ("Conv1D", "FP8Linear", "CompressedLinear")


def modules_to_not_convert(ctx: ExportContext, to_quant_block_names: Any, regex_config: dict[str, Any]) -> list[str]:
    """Unquantized blocks, unquantized configured layers (unless inside an unquantized block), quantizable
    layers outside every block that have no config, and regex entries above 8 bits. Upstream returns a set's
    iteration order; this list is sorted."""
    skip: set[str] = set()
    all_blocks = ctx.all_block_names or ctx.block_names
    if to_quant_block_names:
        wanted = to_quant_block_names.split(",") if isinstance(to_quant_block_names, str) else to_quant_block_names
        skip.update(set(block_names_to_str(all_blocks).split(",")) - set(wanted))
    in_blocks: set[str] = set()
    for group in all_blocks:
        for block_name in group:
            for rel, module in ctx.model.get_submodule(block_name).named_modules():
                if _quantizable(module):
                    in_blocks.add(f"{block_name}.{rel}" if rel else block_name)
    from_config = {name for name, cfg in ctx.layer_config.items()
                   if not is_quantized(cfg) and not any(s in name for s in skip)}
    skip.update(from_config)
    for name, module in ctx.model.named_modules():
        if _quantizable(module) and name not in ctx.layer_config and name not in in_blocks:
            skip.add(name)
    for name, cfg in regex_config.items():
        bits = cfg.get("bits")
        if bits and int(bits) > 8:
            skip.add(name)
    return sorted(skip)


def quantization_config(ctx: ExportContext) -> dict[str, Any]:
    config = serialization_dict(ctx)
    regex_config = config.pop("regex_config", None) or {}
    skip = modules_to_not_convert(ctx, config.get("to_quant_block_names"), regex_config)
    config["provider"] = "auto-round"
    config["quant_method"] = "awq"
    config["zero_point"] = not config["sym"]
    config["version"] = "gemm"
    config["modules_to_not_convert"] = skip
    return filter_quantization_config(config)


def save(ctx: ExportContext, output_dir: Path, fmt: ResolvedFormat, *, shard_writer: bool) -> None:
    config = quantization_config(ctx)
    save_packed(ctx, output_dir, fmt, config, torch.float16, shard_writer=shard_writer)


__all__ = ["modules_to_not_convert", "quantization_config", "save"]
