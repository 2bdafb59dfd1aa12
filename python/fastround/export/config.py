"""The quantization_config every format starts from: upstream's serialization of the run (SerializedCompressorConfig
read off the compressor), its default filter, and the per-layer `extra_config` of the auto_round family."""

from __future__ import annotations

import re
from typing import Any

import torch

from fastround import _C
from fastround.quantized import ExportContext
from fastround.layer_plan import is_quantized  # one owner of upstream's check_to_quantized

SCHEME_KEYS = (
    "bits", "group_size", "sym", "data_type", "act_bits", "act_group_size", "act_sym", "act_data_type",
    "act_dynamic", "super_bits", "super_group_size", "rotation_config",
)
# SerializedCompressorConfig's fields in their order, with the value written when the run has none.
# supported_types and rotation_configs are left out: upstream's filter always drops them.
_SERIALIZED_SCHEME = (
    "bits", "act_bits", "data_type", "act_data_type", "group_size", "act_group_size", "sym", "act_sym", "act_dynamic",
)
_SERIALIZED_RUN: tuple[tuple[str, Any], ...] = (
    ("amp", None), ("batch_size", None), ("enable_minmax_tuning", True), ("enable_norm_bias_tuning", False),
    ("enable_quanted_input", True), ("gradient_accumulate_steps", None), ("iters", None), ("lr", None),
    ("low_gpu_mem_usage", None), ("minmax_lr", None), ("nsamples", None),
)
# Attributes only upstream's SignRound compressor has: an RTN run (iters=0) serialises their defaults.
_SIGNROUND_ONLY = frozenset({
    "batch_size", "enable_minmax_tuning", "enable_norm_bias_tuning", "gradient_accumulate_steps", "iters", "lr",
    "minmax_lr", "nsamples", "seqlen",
})
_CALIBRATION_KEYS = frozenset({"nsamples", "batch_size"})
_FILTER_DEFAULTS: dict[str, Any] = {
    "amp": True, "batch_size": 8, "dataset": "NeelNanda/pile-10k", "enable_minmax_tuning": True,
    "enable_norm_bias_tuning": False, "enable_quanted_input": True, "gradient_accumulate_steps": 1, "iters": 200,
    "low_gpu_mem_usage": False, "nsamples": 128, "scale_dtype": "torch.float16", "seqlen": 2048,
}


def common_prefix(names: list[str]) -> str:
    """Dot-component prefix shared by all names (upstream get_common_prefix)."""
    parts = names[0].split(".")
    for other in names[1:]:
        parts = [a for a, b in zip(parts, other.split(".")) if a == b]
    return ".".join(parts)


def block_names_to_str(block_names: list[list[str]]) -> str:
    return ",".join(common_prefix(group) for group in block_names if group)


def standard_regex(pattern: str) -> str:
    """upstream to_standard_regex (the C++ matcher's translation, shared with model-free)."""
    return _C.pattern_to_regex(pattern)


def _scale_dtype_str(value: Any) -> str:
    """upstream writes str(torch dtype), e.g. "torch.float16"."""
    return str(torch.float16 if value is None else value)


def serialization_dict(ctx: ExportContext) -> dict[str, Any]:
    """What upstream's save_quantized reads off the compressor for one format, in SerializedCompressorConfig
    order, with autoround_version appended."""
    s = ctx.settings
    rtn = not s.get("iters")
    out: dict[str, Any] = {key: ctx.scheme.get(key) for key in _SERIALIZED_SCHEME}
    for key, default in _SERIALIZED_RUN:
        if key == "enable_quanted_input":
            # RTN never feeds quantized inputs forward; upstream's RTN compressor reports False.
            out[key] = s.get(key, False if rtn else default)
        elif rtn and key in _SIGNROUND_ONLY:
            out[key] = default
        elif key in _CALIBRATION_KEYS:
            out[key] = None  # 0.16.1's SignRound keeps these in its calibration context: they serialise as None
        else:
            out[key] = s.get(key, default)
    out["quant_block_list"] = [list(g) for g in ctx.block_names]
    out["regex_config"] = {name: dict(cfg) for name, cfg in ctx.regex_config.items()}
    out["scale_dtype"] = _scale_dtype_str(s.get("scale_dtype"))
    out["seqlen"] = None
    for key, default in (("static_attention_dtype", None), ("static_kv_dtype", None),
                         ("static_attention_granularity", "tensor"), ("static_kv_granularity", "tensor")):
        out[key] = s.get(key, default)
    out["super_bits"] = ctx.scheme.get("super_bits")
    out["super_group_size"] = ctx.scheme.get("super_group_size")
    names = s.get("to_quant_block_names")
    out["to_quant_block_names"] = names if isinstance(names, str) and names else (
        block_names_to_str(ctx.block_names) if ctx.block_names else None)
    out["autoround_version"] = _C.AUTOROUND_COMPAT_VERSION
    return out


def zero_shot(ctx: ExportContext) -> bool:
    """Whether upstream quantized without calibration data (plain RTN): its block loop then saves each block's
    unquantized leaves before the rest of the block, which moves shard boundaries."""
    s = ctx.settings
    return bool(s.get("zero_shot", s.get("disable_opt_rtn", True))) and not s.get("iters")


def filter_quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    """upstream filter_quantization_config: drop defaults, Nones, inert static granularities, act_* without
    activation quantization, and list-valued bookkeeping."""
    defaults = dict(_FILTER_DEFAULTS)
    iters = config.get("iters") or 0
    defaults["lr"] = 1.0 / iters if iters > 0 else 5e-3
    defaults["minmax_lr"] = defaults["lr"]
    for key, value in defaults.items():
        if key in config and config[key] == value:
            config.pop(key)
    for key in [k for k, v in config.items() if v is None]:
        config.pop(key)
    for dtype_key, gran_key in (("static_kv_dtype", "static_kv_granularity"),
                                ("static_attention_dtype", "static_attention_granularity")):
        if config.get(dtype_key) is None:
            config.pop(gran_key, None)
    if config.get("act_bits", 16) >= 16:
        for key in ("act_bits", "act_data_type", "act_dynamic", "act_sym", "act_group_size"):
            config.pop(key, None)
    for key in list(config):
        value = config[key]
        if isinstance(value, (list, tuple)) and len(value) == 0:
            config.pop(key)
        elif key in ("supported_types", "quant_block_list", "rotation_configs"):
            config.pop(key, None)
    return config


def differing_keys(cfg: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """upstream check_neq_config: scheme keys whose layer value is set and differs from the global one."""
    return [k for k in SCHEME_KEYS if cfg.get(k) not in (expected.get(k), None)]


def starts_with_block(name: str, prefixes: list[str] | None) -> bool:
    return bool(prefixes) and any(name.startswith(p) for p in prefixes or [])


def extra_config(ctx: ExportContext, config: dict[str, Any], block_prefixes: list[str] | None) -> dict[str, Any]:
    """auto_round's per-layer overrides: a quantized layer outside the blocks gets its whole scheme, a layer in
    the blocks the fields that differ from the global config, and each user pattern its differing fields
    under its standard regex."""
    out: dict[str, Any] = {}
    for name, cfg in ctx.layer_config.items():
        if not cfg.get("in_blocks") and int(cfg.get("bits", 16)) <= 8:
            out[name] = {k: cfg.get(k) for k in SCHEME_KEYS}
        elif cfg.get("in_blocks") or starts_with_block(name, block_prefixes):
            neq = differing_keys(cfg, config)
            if neq:
                out[name] = {k: cfg[k] for k in neq if cfg.get(k) is not None}
    for name, cfg in ctx.regex_config.items():
        neq = differing_keys(cfg, config)
        if neq:
            out[standard_regex(name)] = {k: cfg[k] for k in neq if cfg.get(k) is not None}
    return out


def block_prefix_list(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if isinstance(value, list):
        return [common_prefix(v).rstrip(".") if isinstance(v, list) else v for v in value]
    return None


def matches_any_pattern(name: str, patterns: dict[str, Any]) -> bool:
    """upstream matches_any_regex: the keys as given (a `+:`/`-:` prefix stripped) searched in the name."""
    for pattern in patterns:
        raw = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
        try:
            if re.search(raw, name):
                return True
        except re.error:
            continue
    return False


__all__ = [
    "SCHEME_KEYS",
    "block_names_to_str",
    "block_prefix_list",
    "common_prefix",
    "differing_keys",
    "extra_config",
    "filter_quantization_config",
    "is_quantized",
    "matches_any_pattern",
    "serialization_dict",
    "standard_regex",
    "starts_with_block",
    "zero_shot",
]
