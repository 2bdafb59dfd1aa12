"""Per-layer configs for a model in memory: upstream's resolution order (ignore_layers, user entries, bits
inferred from data_type, defaults filled, patterns expanded, lm_head, shape skips, block membership). The
pattern language itself is the C++ matcher's, shared with model-free."""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from fastround import _C
from fastround.modeling import find_block_names, is_quantizable, lm_head_name, quantizable_layers, weight_out_in
from fastround.schemes import QuantizationScheme

logger = logging.getLogger("fastround")

SCHEME_KEYS = tuple(f.name for f in fields(QuantizationScheme))
_ENTRY_KEYS = SCHEME_KEYS + ("scale_dtype", "fixed_by_user")
_DTYPE_FAMILIES = ("int", "mx_fp", "mx_int", "nv_fp", "fp", "nvfp4_v2", "float")
_FP_FAMILIES = ("mx_fp", "nv_fp", "nvfp4_v2")


def is_quantized(cfg: dict[str, Any]) -> bool:
    """upstream check_to_quantized: weight bits <= 8 or activation bits <= 8."""
    bits = cfg.get("bits")
    act = cfg.get("act_bits")
    return int(bits if bits is not None else 16) <= 8 or int(act if act is not None else 16) <= 8


def quantizes_weight(cfg: dict[str, Any]) -> bool:
    """Whether the layer's weight is encoded (bits <= 8). A layer that quantizes only its activations keeps its
    weight as it is, as upstream's qdq does for bits >= 16."""
    bits = cfg.get("bits")
    return int(bits if bits is not None else 16) <= 8


def infer_bits(data_type: str | None) -> int | None:
    """Digits right after the dtype family: mx_fp8 -> 8, int4 -> 4."""
    if data_type is None:
        return 16
    for family in ("int", "mx_fp", "mx_int", "nv_fp", "fp", "float"):
        rest = data_type[len(family):] if data_type.startswith(family) else ""
        m = re.match(r"\d{1,2}", rest)
        if m:
            return int(m.group(0))
    return None


def preset_fields(name: str) -> dict[str, Any]:
    return asdict(QuantizationScheme.preset(name.upper()))


@dataclass
class LayerPlan:
    layer_config: dict[str, dict[str, Any]]  # every configured layer -> full scheme dict + bookkeeping
    regex_config: dict[str, dict[str, Any]]  # user pattern keys (and unsupported ignore names) as given
    block_names: list[list[str]]  # quantized blocks per group
    lm_head: str | None
    has_outside: bool  # a quantized layer outside the blocks (lm_head)
    unmatched: list[str] = field(default_factory=list)  # user keys that matched no layer

    def quantized(self) -> list[str]:
        return [n for n, c in self.layer_config.items() if is_quantized(c)]


def _normalize_entry(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        cfg = preset_fields(value)
    elif isinstance(value, QuantizationScheme):
        cfg = asdict(value)
    elif isinstance(value, dict):
        item = {k: v for k, v in value.items() if k != "in_blocks"}
        scheme = item.pop("scheme", None)
        if isinstance(scheme, QuantizationScheme):
            cfg = asdict(scheme)
        else:
            cfg = preset_fields(scheme) if scheme is not None else {}
        bad = set(item) - set(_ENTRY_KEYS)
        if bad:
            raise ValueError(f"layer_config['{key}']: invalid key(s) {sorted(bad)}; allowed: {list(_ENTRY_KEYS)}")
        cfg.update(item)
    else:
        raise TypeError(
            f"layer_config['{key}'] must be a scheme name, a dict or a QuantizationScheme, got {type(value).__name__}"
        )
    cfg = {k: v for k, v in cfg.items() if v is not None}
    cfg["fixed_by_user"] = True
    return cfg


def _to_quant_blocks(model: torch.nn.Module, to_quant_block_names: Any, quant_nontext: bool) -> list[list[str]]:
    if to_quant_block_names is None:
        groups = find_block_names(model, quant_nontext)
    else:
        if isinstance(to_quant_block_names, str):
            prefixes = [p for p in to_quant_block_names.replace(" ", "").split(",") if p]
        else:
            prefixes = [str(p) for p in to_quant_block_names]
        mods = dict(model.named_modules())
        groups = []
        for prefix in prefixes:
            if prefix not in mods:
                raise ValueError(f"to_quant_block_names: '{prefix}' is not a module of the model")
            target = mods[prefix]
            if "ModuleList" in type(target).__name__:
                groups.append([f"{prefix}.{n}" for n, _ in target.named_children()])
            else:
                groups.append([prefix])
    if not any(groups):
        raise ValueError(
            "the model has no block list (no torch.nn.ModuleList of decoder layers was found); "
            "pass to_quant_block_names to name the blocks to quantize"
        )
    return groups


def _moe_router_gates(model: torch.nn.Module) -> list[str]:
    """Upstream's regular-flow fallback when no model-family rule applies: on a MoE model (its config's text
    mentions moe or expert) every module named `*.gate` / `*.shared_expert_gate` (the routers) stays in full
    precision. Only Linear-like routers are named: transformers' own TopKRouter (what fastround's loading keeps,
    where upstream swaps in a Linear router) is no quantization target either way, and naming it would add a regex
    entry to extra_config that upstream's Linear router does not get. Model-free has no such fallback."""
    config = getattr(model, "config", None)
    try:
        text = str(config).lower()
    except Exception:  # a config whose repr fails: upstream falls back to its dict
        text = str(config.to_dict()).lower() if hasattr(config, "to_dict") else ""
    if "moe" not in text and "expert" not in text:
        return []
    return [n for n, m in model.named_modules() if n.endswith((".gate", ".shared_expert_gate")) and is_quantizable(m)]


def plan_layers(
    model: torch.nn.Module,
    scheme: dict[str, Any],
    layer_config: dict[str, Any] | None,
    *,
    ignore_layers: str = "",
    quant_lm_head: bool = False,
    to_quant_block_names: Any = None,
    quant_nontext_module: bool = False,
    scale_dtype: Any = torch.float16,
    w8_asym_allowed: bool = False,
) -> LayerPlan:
    """Resolve every quantizable layer's scheme. `scheme`: the global scheme with all fields (act_* resolved)."""
    layers = quantizable_layers(model)
    module_names = [n for n, _ in model.named_modules()]
    blocks = _to_quant_blocks(model, to_quant_block_names, quant_nontext_module)
    flat_blocks = [b for g in blocks for b in g]
    config = dict(getattr(model, "config", {}).to_dict()) if hasattr(getattr(model, "config", None), "to_dict") else {}
    predefined = [
        n for n in _C.predefined_ignore_layers(json.dumps(config, default=str)) or _moe_router_gates(model)
        if any(n.startswith(p) for p in flat_blocks) or not any(p.startswith(n.split(".")[0]) for p in flat_blocks)
    ]
    if predefined:
        logger.info("using predefined ignore_layers: %s", ",".join(predefined))
        ignore_layers = ",".join(([ignore_layers] if ignore_layers else []) + predefined)

    user = copy.deepcopy(layer_config or {})
    patterns: set[str] = set()
    # 1. ignore_layers: substrings (a trailing block index only matches that block) forced to 16 bits.
    if ignore_layers:
        names = [n for n in ignore_layers.replace(" ", "").split(",") if n]
        names = [n + "." if n[-1].isdigit() and any(n + "." in m for m in module_names) else n for n in names]
        patterns = set(names)
        hits = []
        for token in names:
            hits += [token] if token in layers else [ln for ln in layers if token in ln]
        for name in hits + names:
            user[name] = {"bits": 16, "act_bits": 16, "data_type": "float", "act_data_type": "float",
                          "fixed_by_user": True}
    # 2-3. normalise entries; bits from the data_type when only that was given.
    resolved = {k: _normalize_entry(v, k) for k, v in user.items()}
    explicit_sym = {k for k, c in resolved.items() if "sym" in c}
    for cfg in resolved.values():
        if "data_type" in cfg and "bits" not in cfg and (b := infer_bits(cfg["data_type"])) is not None:
            cfg["bits"] = b
        if "act_data_type" in cfg and "act_bits" not in cfg and (b := infer_bits(cfg["act_data_type"])) is not None:
            cfg["act_bits"] = b
    # 4. defaults from the global scheme.
    default = {k: scheme.get(k) for k in SCHEME_KEYS}
    default["scale_dtype"] = scale_dtype
    for cfg in resolved.values():
        for key in SCHEME_KEYS + ("scale_dtype",):
            cfg.setdefault(key, copy.deepcopy(default.get(key)))
    # 8-bit asym int cannot be served outside llm_compressor: explicit requests fail, inherited ones pin sym.
    for name, cfg in resolved.items():
        if cfg.get("data_type") == "int" and cfg.get("bits") == 8 and cfg.get("sym") is False and not w8_asym_allowed:
            if name in explicit_sym:
                raise ValueError(
                    f"layer_config['{name}'] asks for 8-bit asymmetric int, which this format cannot store; "
                    "use sym=True or format llm_compressor"
                )
            cfg["sym"] = True
    # 5-6. expand patterns onto layers; keep the pattern entries for export.
    regex_config: dict[str, dict[str, Any]] = {}
    unmatched = []
    for key in list(resolved):
        if key in layers:
            continue
        if key in module_names:
            mod = dict(model.named_modules())[key]
            if not any(True for _ in mod.children()):
                val = resolved.pop(key)
                if key in patterns:
                    regex_config[key] = val
                else:
                    logger.warning("'%s' is in the model but is not a quantizable layer; its layer_config is ignored", key)
                continue
        rx = re.compile(_C.pattern_to_regex(key))
        matched = [ln for ln in layers if rx.search(ln)]
        if not matched:
            unmatched.append(key)
            logger.warning("layer_config key '%s' matches no quantizable layer; it is ignored", key)
        val = resolved.pop(key)
        regex_config[key] = copy.deepcopy(val)  # as given: later per-layer edits must not show here
        for ln in matched:
            resolved[ln] = val
    # lm_head: only when asked (explicitly or by an entry), and never when tied to the embeddings.
    head = lm_head_name(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if head in resolved:
        quant_lm_head = True
    if quant_lm_head and tied:
        quant_lm_head = False
        logger.warning("quant_lm_head reset to False: lm_head shares its weight with the embeddings")
    if head is not None and head not in resolved and quant_lm_head:
        resolved[head] = copy.deepcopy(default)
    if not quant_lm_head and head is not None:
        resolved.pop(head, None)
    # Shape skips: int weight-only needs both dims % 32; MX/NV FP need in % group_size.
    dt = default["data_type"] or "int"
    act_bits = default.get("act_bits") if default.get("act_bits") is not None else 16
    for name, mod in layers.items():
        out_f, in_f = weight_out_in(mod)
        if dt == "int" and act_bits >= 16 and (out_f % 32 or in_f % 32):
            resolved.setdefault(name, copy.deepcopy(default))
            resolved[name].update({"bits": 16, "data_type": "fp", "fixed_by_user": True})
        elif dt.startswith(_FP_FAMILIES) and in_f % int(default["group_size"]):
            resolved.setdefault(name, copy.deepcopy(default))
            resolved[name].update(
                {"bits": 16, "data_type": "fp", "act_bits": 16, "act_data_type": "fp", "fixed_by_user": True}
            )
    # Block membership: every layer inside a quantized block gets a config.
    in_block = [ln for ln in layers if any(ln.startswith(b + ".") for b in flat_blocks)]
    for name in in_block:
        if name not in resolved:
            resolved[name] = copy.deepcopy(default)
            resolved[name]["fixed_by_user"] = False
        resolved[name]["in_blocks"] = True
    has_outside = False
    for cfg in resolved.values():
        cfg.setdefault("in_blocks", False)
        if not cfg["in_blocks"] and is_quantized(cfg):
            has_outside = True
    # Layers matched by one pattern share its dict during resolution (as upstream); not afterwards.
    resolved = {k: dict(v) for k, v in resolved.items()}
    return LayerPlan(resolved, regex_config, blocks, head, has_outside, unmatched)
