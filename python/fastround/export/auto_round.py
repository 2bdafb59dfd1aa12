"""The auto_round format family (upstream export_to_autoround): packing_format auto_round:auto_gptq (GPTQ words,
zero points minus one), auto_round:gptqmodel (plus g_idx, zero points as-is), auto_round (asym, zero points
as-is), auto_round:auto_awq (AWQ GEMM words) and, for MXFP schemes, compressed-tensors-like tensors under
packing_format auto_round:llm_compressor (NVFP4_E5M3: auto_round:llm_compressor_nvfp4_e5m3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastround.export import NVFP4_E5M3_PACKING, ResolvedFormat
from fastround.export.config import (
    block_prefix_list,
    extra_config,
    filter_quantization_config,
    serialization_dict,
)
from fastround.export.packing import save_packed
from fastround.quantized import ExportContext


def quantization_config(ctx: ExportContext, fmt: ResolvedFormat) -> dict[str, Any]:
    """config.json's quantization_config (and quantization_config.json) for auto_round."""
    config = serialization_dict(ctx)
    config["block_name_to_quantize"] = config.pop("to_quant_block_names", None)
    config["quant_method"] = "auto-round"
    config["packing_format"] = fmt.packing_format
    extra = extra_config(ctx, config, block_prefix_list(config["block_name_to_quantize"]))
    config.pop("regex_config", None)
    if extra:
        config["extra_config"] = extra
    config = filter_quantization_config(config)
    if ctx.rotation is not None:
        config["rotation_config"] = ctx.rotation.config.model_dump()  # upstream adds it after the filter
    if ctx.quarot is not None:
        config["spinquant_config"] = ctx.quarot[1].spinquant_config(ctx.quarot[0])
    return config


def export_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """bf16 with activation quantization; fp16 for AWQ words (vLLM's AWQ kernel is fp16-only); else the model's.
    Upstream's MXFP / NVFP4_E5M3 writer keeps the model's dtype whatever the activations."""
    if config.get("packing_format") in ("auto_round:llm_compressor", NVFP4_E5M3_PACKING):
        return None
    if config.get("act_bits", 16) <= 8:
        return torch.bfloat16
    if "awq" in config.get("packing_format", "auto_round:auto_gptq"):
        return torch.float16
    return None


def save(ctx: ExportContext, output_dir: Path, fmt: ResolvedFormat, *, shard_writer: bool) -> None:
    config = quantization_config(ctx, fmt)
    save_packed(ctx, output_dir, fmt, config, export_dtype(config), shard_writer=shard_writer)


__all__ = ["export_dtype", "quantization_config", "save"]
