"""QuantizationScheme as upstream defines it; presets and validation live in the C++ scheme table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from fastround import _C


@dataclass
class QuantizationScheme:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int | None = None
    act_group_size: int | None = None
    act_sym: bool | None = None
    act_data_type: str | None = None
    act_dynamic: bool | None = None
    super_bits: int | None = None
    super_group_size: int | None = None
    rotation_config: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> QuantizationScheme:
        names = {f.name for f in fields(cls)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"QuantizationScheme: unknown field(s) {sorted(unknown)}")
        return cls(**config)

    @classmethod
    def preset(cls, name: str) -> QuantizationScheme:
        text = _C.preset(name)
        if text is None:
            raise ValueError(f"Unknown scheme '{name}'. Available: {preset_names()}")
        return cls(**json.loads(text))

    def to_fields(self) -> dict[str, Any]:
        """Non-None fields, the form the C++ core and quantization configs use."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if out.pop("rotation_config", None):
            raise ValueError("QuantizationScheme.rotation_config is not supported by model-free mode")
        return out


def is_nvfp4(data_type: str, bits: int) -> bool:
    """NVFP4 weights (E2M1 codes, E4M3 group-16 scales, a global scale): data_type nv_fp or nv_fp4 at 4 bits; the
    one rule every path (encodings, formats, tuning, llm_compressor config) asks."""
    return str(data_type) in ("nv_fp", "nv_fp4") and int(bits) == 4


def preset_names() -> list[str]:
    return list(_C.preset_names())


SchemeLike = str | dict | QuantizationScheme


def scheme_to_job(scheme: SchemeLike) -> str | dict[str, Any]:
    """A user scheme as the job carries it: a preset name, or a dict of fields."""
    if isinstance(scheme, str):
        return scheme
    if isinstance(scheme, QuantizationScheme):
        return scheme.to_fields()
    if isinstance(scheme, dict):
        return dict(scheme)
    raise TypeError(f"scheme must be a preset name, a dict or a QuantizationScheme, got {type(scheme).__name__}")


def layer_config_to_job(layer_config: dict | None) -> dict[str, Any]:
    """layer_config values as JSON: QuantizationScheme objects become their fields; C++ resolves the rest."""
    if layer_config is None:
        return {}
    if not isinstance(layer_config, dict):
        raise TypeError(f"layer_config must be a dict, got {type(layer_config).__name__}")
    out: dict[str, Any] = {}
    for key, value in layer_config.items():
        if isinstance(value, QuantizationScheme):
            value = value.to_fields()
        elif isinstance(value, dict) and isinstance(value.get("scheme"), QuantizationScheme):
            rest = {k: v for k, v in value.items() if k != "scheme"}
            value = {**value["scheme"].to_fields(), **rest}
        elif not isinstance(value, (str, dict)):
            raise TypeError(
                f"layer_config['{key}'] must be a scheme name, a dict or a QuantizationScheme, "
                f"got {type(value).__name__}"
            )
        out[str(key)] = value
    return out
