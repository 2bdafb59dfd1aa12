"""Format fake (upstream FakeFormat): the model with its quantize-dequantized weights, saved by transformers'
save_pretrained. No quantization_config, except with activation quantization, where an auto_round:fake one
records the scheme for loaders, and the shards are written again the way upstream renames its wrapped layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastround.export.common import (
    attached_quantization_config,
    post_save_source_fixes,
    save_tokenizer,
    staged_output,
)
from fastround.export.config import filter_quantization_config, serialization_dict
from fastround.quantized import ExportContext

_WRAPPED = ".orig_layer."  # upstream's RTN leaves activation-quantized layers inside a WrapperWALayer


def _jsonable(value: Any) -> Any:
    """torch dtypes (regex_config's scale_dtype) as their names, the way upstream's fake writer serialises them."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def quantization_config(ctx: ExportContext) -> dict[str, Any] | None:
    act_bits = ctx.scheme.get("act_bits")
    if act_bits is None or int(act_bits) > 8:
        return None
    config = _jsonable(serialization_dict(ctx))
    config["quant_method"] = "auto-round"
    config["packing_format"] = "auto_round:fake"
    config["block_name_to_quantize"] = config.pop("to_quant_block_names", None)
    return filter_quantization_config(config)


def wrapped_layers(ctx: ExportContext) -> list[str]:
    """Layers upstream saves as `<layer>.orig_layer.<param>`: RTN wraps every layer that quantizes activations."""
    return [n for n, c in ctx.layer_config.items() if int(c["act_bits"] if c.get("act_bits") is not None else 16) <= 8]


def _wrapped_name(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return prefix[:-1] + _WRAPPED + name[len(prefix):]
    return name


def resave_unwrapped(stage: Path, layers: list[str]) -> None:
    """Upstream's fake writer with activation quantization saves the wrapped names, then loads every shard that
    holds one and saves it again under the plain names with safetensors' save_file (no metadata, its own
    tensor order); a sharded index is then dumped again in the wrapped names' sorted order."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    prefixes = tuple(f"{n}." for n in layers)
    rewrote = False
    for path in sorted(stage.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            wrapped = any(k.startswith(prefixes) for k in f.keys())
        if wrapped:
            save_file(load_file(str(path)), str(path))
            rewrote = True
    index = stage / "model.safetensors.index.json"
    if rewrote and index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data.get("weight_map", {})
        data["weight_map"] = {k: weight_map[k] for k in sorted(weight_map, key=lambda k: _wrapped_name(k, prefixes))}
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")


def save(ctx: ExportContext, output_dir: Path) -> None:
    config = quantization_config(ctx)
    with staged_output(output_dir, ctx.source_dir) as stage:
        with attached_quantization_config(ctx.model, config):
            ctx.model.save_pretrained(str(stage))
        if config is not None:
            resave_unwrapped(stage, wrapped_layers(ctx))
        post_save_source_fixes(ctx.source_dir, stage)
        save_tokenizer(ctx.tokenizer, stage)


__all__ = ["quantization_config", "save"]
