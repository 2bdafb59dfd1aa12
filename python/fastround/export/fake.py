"""Format fake (upstream FakeFormat): the model with its quantize-dequantized weights, saved by transformers'
save_pretrained. No quantization_config, except with activation quantization, where an auto_round:fake one
records the scheme for loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastround.export.common import (
    attached_quantization_config,
    post_save_source_fixes,
    save_tokenizer,
    staged_output,
)
from fastround.export.config import filter_quantization_config, serialization_dict
from fastround.quantized import ExportContext


def quantization_config(ctx: ExportContext) -> dict[str, Any] | None:
    act_bits = ctx.scheme.get("act_bits")
    if act_bits is None or int(act_bits) > 8:
        return None
    config = serialization_dict(ctx)
    config["quant_method"] = "auto-round"
    config["packing_format"] = "auto_round:fake"
    config["block_name_to_quantize"] = config.pop("to_quant_block_names", None)
    return filter_quantization_config(config)


def save(ctx: ExportContext, output_dir: Path) -> None:
    config = quantization_config(ctx)
    with staged_output(output_dir, ctx.source_dir) as stage:
        with attached_quantization_config(ctx.model, config):
            ctx.model.save_pretrained(str(stage))
        post_save_source_fixes(ctx.source_dir, stage)
        save_tokenizer(ctx.tokenizer, stage)


__all__ = ["quantization_config", "save"]
