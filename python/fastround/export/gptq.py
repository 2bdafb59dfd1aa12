"""Standalone auto_gptq format (upstream export_to_autogptq): GPTQ v1 words (zero points minus one) with g_idx,
quant_method "gptq", mixed bits as `dynamic` regex overrides, fp16 declared in config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastround.export import ResolvedFormat
from fastround.export.config import (
    differing_keys,
    filter_quantization_config,
    is_quantized,
    matches_any_pattern,
    serialization_dict,
    standard_regex,
    starts_with_block,
)
from fastround.export.packing import save_packed
from fastround.quantized import ExportContext

GPTQ_KEYS = ("bits", "group_size", "sym")


def to_dynamic(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """AutoGPTQ's `dynamic`: `+:<regex>` with bits/group_size/sym for a quantized override, `-:<regex>` for a
    layer left in 16 bits."""
    out: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        bits = cfg.get("bits")
        if bits is None:
            continue
        regex = standard_regex(name)
        if bits < 16:
            out[f"+:{regex}"] = {key: cfg[key] for key in GPTQ_KEYS}
        else:
            out[f"-:{regex}"] = {}
    return out


def modules_in_block_to_quantize(ctx: ExportContext, block_names: list[list[str]]) -> list[list[str]] | None:
    """Per block group, the sorted block-relative names of its quantized layers; None when every configured
    layer in the blocks is quantized (upstream then leaves the key out)."""
    groups: list[list[str]] = []
    complete = True
    for group in block_names:
        quantized: set[str] = set()
        for block_name in group:
            block = ctx.model.get_submodule(block_name)
            for rel, _ in block.named_modules():
                full = f"{block_name}.{rel}" if rel else block_name
                cfg = ctx.layer_config.get(full)
                if cfg is None:
                    continue
                if is_quantized(cfg):
                    quantized.add(rel)
                else:
                    complete = False
        groups.append(sorted(quantized))
    return None if complete else groups


def quantization_config(ctx: ExportContext) -> dict[str, Any]:
    config = serialization_dict(ctx)
    block_names = config.get("quant_block_list") or ctx.all_block_names or ctx.block_names
    config.pop("to_quant_block_names", None)
    regex_config = config.pop("regex_config", None) or {}
    block_prefixes = config.get("block_name_to_quantize")  # never set here: upstream pops the block names first
    overrides: dict[str, dict[str, Any]] = {}
    lm_head_quantized = False
    for name, cfg in ctx.layer_config.items():
        bits = int(cfg.get("bits", 16))
        in_blocks = cfg.get("in_blocks", False)
        if not in_blocks and bits <= 8:
            lm_head_quantized = True
            overrides[name] = {key: cfg[key] for key in GPTQ_KEYS}
            continue
        if in_blocks or starts_with_block(name, block_prefixes):
            if differing_keys(cfg, config) and not matches_any_pattern(name, regex_config):
                overrides[name] = {key: cfg[key] for key in GPTQ_KEYS}
    dynamic = {**to_dynamic(regex_config), **to_dynamic(overrides)}
    if dynamic:
        config["dynamic"] = dynamic
    modules = modules_in_block_to_quantize(ctx, block_names)
    config["lm_head"] = lm_head_quantized
    config["provider"] = "auto-round"
    config["quant_method"] = "gptq"
    config.pop("dataset", None)
    config["desc_act"] = False
    config["true_sequential"] = False
    config["damp_percent"] = 0.01
    if modules is not None:
        config["modules_in_block_to_quantize"] = modules
    return filter_quantization_config(config)


def save(ctx: ExportContext, output_dir: Path, fmt: ResolvedFormat, *, shard_writer: bool) -> None:
    config = quantization_config(ctx)
    save_packed(ctx, output_dir, fmt, config, torch.float16, shard_writer=shard_writer)


__all__ = ["modules_in_block_to_quantize", "quantization_config", "save", "to_dynamic"]
