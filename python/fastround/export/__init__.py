"""Format writers of the regular AutoRound flow: which formats a run may be saved as (upstream 0.16.1's format
resolution, scheme checks and folder naming) and `save`, which hands an ExportContext to the writer of one
resolved format. The writers live in one module per format family."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastround.export.common import check_output_dir
from fastround.quantized import ExportContext
from fastround.schemes import is_nvfp4

logger = logging.getLogger("fastround")

# Names upstream accepts that fastround's regular flow cannot write yet.
_UPSTREAM_ONLY = ("fp8", "auto_round:fp8", "mlx", "auto_round:mlx", "svdquant_nunchaku")
SUPPORTED_FORMATS = (
    "auto_round", "auto_round:auto_gptq", "auto_round:gptqmodel", "auto_round:auto_awq",
    "auto_round:llm_compressor", "auto_gptq", "auto_awq", "llm_compressor", "fake",
)
# What `fastround list format` prints: the preset schemes each format takes in fastround (fake: all).
_INT_WOQ = ["W4A16", "W2A16", "W8A16", "W2A16G64", "W2A16G32", "W4A16_MIXED"]
FORMAT_SCHEMES: dict[str, list[str]] = {
    "auto_round": _INT_WOQ + ["MXFP4", "MXFP8", "NVFP4", "NVFP4_E5M3", "BF16"],
    "auto_round:auto_gptq": list(_INT_WOQ),
    "auto_round:gptqmodel": list(_INT_WOQ),
    "auto_round:auto_awq": ["W4A16"],
    "auto_round:llm_compressor": ["MXFP4", "MXFP8", "NVFP4", "NVFP4_E5M3"],
    "auto_gptq": list(_INT_WOQ),
    "auto_awq": ["W4A16"],
    "llm_compressor": ["MXFP4", "MXFP8", "NVFP4", "NVFP4_E5M3"],
    "fake": ["All schemes"],
}
NVFP4_E5M3_DATA_TYPE = "nvfp4_v2"  # upstream's data_type of the NVFP4_E5M3 preset
NVFP4_E5M3_PACKING = "auto_round:llm_compressor_nvfp4_e5m3"
_INT_BITS = (2, 4, 8)  # what the C++ int_gptq row packs (upstream also takes 3)


@dataclass(frozen=True)
class ResolvedFormat:
    """One requested format after upstream's resolution against the scheme."""

    name: str  # as requested, e.g. "auto_round"
    family: str  # writer: auto_round | auto_gptq | auto_awq | llm_compressor | fake
    backend: str  # upstream get_backend_name(), e.g. "auto_round:auto_gptq"; names the multi-format subfolder
    packing_format: str = ""  # quantization_config.packing_format (auto_round family)
    int_layout: str | None = None  # gptq (GPTQ words) | awq (AWQ GEMM words) for int layers
    zero_offset: int = 0  # 1: zero points stored minus one (GPTQ v1)
    g_idx: bool = False  # write g_idx beside the GPTQ tensors

    @property
    def folder(self) -> str:
        """Subfolder when several formats are requested (upstream: ':' and '_' become '-')."""
        return self.backend.replace(":", "-").replace("_", "-")


def parse_formats(format: str | None, bits: int | None = None) -> list[str]:
    """upstream's normalisation of a comma list: lower case, no spaces, `q*_` -> `q<bits>_`, duplicates and
    empty items dropped, GGUF not mixed with another real format."""
    text = (format or "auto_round").lower().replace(" ", "")
    if bits is not None:
        text = text.replace("q*_", f"q{bits}_")
    names = list(dict.fromkeys(n for n in text.split(",") if n))
    if not names:
        raise ValueError(f"format {format!r} names no format; choose from {', '.join(SUPPORTED_FORMATS)}")
    if any(n.startswith("gguf") for n in names) and any(n != "fake" and not n.startswith("gguf") for n in names):
        raise ValueError(f"GGUF format is not compatible with other formats, but got {names}; choose one of them")
    return names


def _is_int(dt: str) -> bool:
    return "int" in dt and "mx" not in dt


def _check_int_bits(name: str, scheme: dict[str, Any], bits: int, allowed: tuple[int, ...]) -> None:
    dt = str(scheme.get("data_type"))
    if not _is_int(dt):
        raise ValueError(f"format {name} stores integer weights, but the scheme has data_type={dt}; "
                         "use fake or auto_round")
    if scheme.get("super_bits") or scheme.get("super_group_size"):
        raise ValueError(f"format {name} cannot store double quantization (super_bits/super_group_size)")
    if bits not in allowed and bits < 16:
        raise ValueError(f"format {name} cannot store {bits}-bit weights (it takes bits {list(allowed)}); "
                         "use fake for other widths")


def _awq_allowed(scheme: dict[str, Any], layer_configs: list[dict[str, Any]]) -> bool:
    bits = int(scheme["bits"])
    return all(int(c.get("bits", bits)) == bits or int(c.get("bits", bits)) >= 16 for c in layer_configs)


def _unsupported_act(scheme: dict[str, Any]) -> bool:
    act_bits = scheme.get("act_bits")
    return act_bits is not None and int(act_bits) <= 8


def resolve_format(
    name: str, scheme: dict[str, Any], layer_config: dict[str, dict[str, Any]] | None = None,
    regex_config: dict[str, dict[str, Any]] | None = None,
) -> ResolvedFormat:
    """Resolve one normalised format name against the global scheme (and, for auto_round's AWQ choice, every
    layer's bits) as upstream's OutputFormat classes do; raise a ValueError naming the format when fastround
    cannot write it."""
    bits = int(scheme.get("bits") or 16)
    dt = str(scheme.get("data_type") or "int")
    sym = scheme.get("sym") is not False
    if name.startswith("gguf") or name in _UPSTREAM_ONLY:
        raise ValueError(f"format {name} is not supported by fastround's regular flow yet; "
                         f"choose from {', '.join(SUPPORTED_FORMATS)}")
    if name not in SUPPORTED_FORMATS:
        raise ValueError(f"format {name} is not supported; choose from {', '.join(SUPPORTED_FORMATS)}")
    if is_nvfp4(dt, bits):
        return _resolve_nvfp4(name, dt)
    if name == "fake":
        return ResolvedFormat("fake", "fake", "fake")
    fp8 = (dt.startswith("fp") and bits == 8) or (
        str(scheme.get("act_data_type") or "").startswith("fp") and scheme.get("act_bits") == 8)
    if fp8:
        raise ValueError(f"format {name}: FP8 schemes are not supported by fastround's regular flow yet; use fake")
    configs = list((layer_config or {}).values()) + list((regex_config or {}).values())
    if dt == NVFP4_E5M3_DATA_TYPE:
        return _resolve_nvfp4_e5m3(name)
    mx = dt.startswith("mx_fp")
    if mx and name in ("auto_round", "llm_compressor", "auto_round:llm_compressor"):
        # MX formats carry the activation scheme in their config; upstream never resets them to fake
        if bits not in (4, 8):
            raise ValueError(f"format {name}: fastround writes MXFP4 / MXFP8 only, got {bits}-bit {dt}")
        if name == "auto_round":
            return ResolvedFormat(name, "auto_round", f"auto_round:{dt}", "auto_round:llm_compressor")
        backend = "llm_compressor:mx_fp" if name == "llm_compressor" else "auto_round:llm_compressor:mx_fp"
        return ResolvedFormat(name, "llm_compressor", backend)
    if _unsupported_act(scheme) and _is_int(dt):
        if name == "auto_round" and not sym and bits != 4:
            raise ValueError("AutoRound format does not support exporting for the current quantization "
                             "configuration, please change to `fake` format for research purpose")
        logger.warning("%s format does not support the current activation quantization configuration, "
                       "reset to fake format and save.", name)
        return ResolvedFormat("fake", "fake", "fake")
    w8_asym_allowed = os.environ.get("AR_ALLOW_W8_ASYM", "0").lower() in ("1", "true", "yes")
    if _is_int(dt) and bits == 8 and not sym and "llm_compressor" not in name and not w8_asym_allowed:
        raise ValueError(
            f"8-bit asymmetric weight quantization is not supported for format '{name}': vLLM serves W8 "
            "GPTQ-format weights symmetric-only and Marlin supports zero points at 4 bits only. Use a symmetric "
            "8-bit scheme, an asymmetric width of 7 bits or fewer, or set AR_ALLOW_W8_ASYM=1 to skip this check.")
    if name in ("llm_compressor", "auto_round:llm_compressor"):
        raise ValueError(f"format {name} is written by fastround for MXFP schemes only, got data_type={dt}; "
                         "use auto_round or auto_gptq for integer schemes")
    if name == "auto_round":
        if bits >= 16:  # nothing quantized by default (BF16); per-layer overrides still pack as GPTQ words
            return ResolvedFormat(name, "auto_round", "auto_round", "auto_round:auto_gptq" if sym else "auto_round",
                                  "gptq", 1 if sym else 0)
        if sym and _is_int(dt):
            _check_int_bits(name, scheme, bits, _INT_BITS)
            return ResolvedFormat(name, "auto_round", "auto_round:auto_gptq", "auto_round:auto_gptq", "gptq", 1)
        if bits == 4 and not sym and _is_int(dt) and _awq_allowed(scheme, configs):
            return ResolvedFormat(name, "auto_round", "auto_round:auto_awq", "auto_round:auto_awq", "awq")
        if dt.startswith(("nv_fp", "nvfp4", "mx_int")):
            raise ValueError(f"format {name}: data_type={dt} is not supported by fastround's regular flow yet")
        _check_int_bits(name, scheme, bits, _INT_BITS)
        return ResolvedFormat(name, "auto_round", "auto_round", "auto_round", "gptq")
    if name in ("auto_round:auto_gptq", "auto_gptq", "auto_round:gptqmodel"):
        _check_int_bits(name, scheme, bits, _INT_BITS)
        if not sym:
            logger.warning("the asymmetrical kernel of the GPTQ format may result in a noticeable accuracy drop, "
                           "particularly for 2-bit quantization and smaller models. We recommend exporting to "
                           "either the AutoAWQ format (only 4 bits) or the AutoRound format(2/3/4/5/6/7/8 bits).")
        if name == "auto_gptq":
            return ResolvedFormat(name, "auto_gptq", "auto_gptq", "", "gptq", 1, g_idx=True)
        if name == "auto_round:gptqmodel":
            return ResolvedFormat(name, "auto_round", name, name, "gptq", 0, g_idx=True)
        return ResolvedFormat(name, "auto_round", name, name, "gptq", 1)
    # auto_awq / auto_round:auto_awq: the AWQ GEMM layout holds 4-bit words only
    _check_int_bits(name, scheme, bits, (4,))
    for cfg in configs:
        layer_bits = int(cfg.get("bits", bits))
        if layer_bits != 4 and layer_bits < 16:
            raise ValueError(f"format {name} cannot store {layer_bits}-bit layers (AWQ is 4-bit only); "
                             "use auto_round or auto_gptq for mixed bits")
    if name == "auto_awq":
        return ResolvedFormat(name, "auto_awq", "auto_awq", "", "awq")
    return ResolvedFormat(name, "auto_round", name, name, "awq")


def _resolve_nvfp4(name: str, dt: str) -> ResolvedFormat:
    """NVFP4 (E2M1 codes, E4M3 group scales, fp32 weight and input global scales): auto_round writes the
    compressed-tensors tensors under packing_format auto_round:llm_compressor, both llm_compressor names the same
    tensors under compressed-tensors' nvfp4-pack-quantized config, fake the qdq weights (upstream keeps all four;
    its static activation scheme is not reset to fake). Integer layouts cannot hold it."""
    if name == "auto_round":
        return ResolvedFormat(name, "auto_round", f"auto_round:{dt}", "auto_round:llm_compressor")
    if name in ("llm_compressor", "auto_round:llm_compressor"):
        return ResolvedFormat(name, "llm_compressor", f"{name}:{dt}")
    if name == "fake":
        return ResolvedFormat("fake", "fake", "fake")
    raise ValueError(f"format {name} cannot store NVFP4 (data_type={dt}): it holds integer codes; use auto_round, "
                     "llm_compressor or fake")


def _resolve_nvfp4_e5m3(name: str) -> ResolvedFormat:
    """NVFP4_E5M3 (E2M1 codes, UE5M3 group scales, no global scale) has one tensor layout: auto_round writes it
    under packing_format auto_round:llm_compressor_nvfp4_e5m3, both llm_compressor names under a
    compressed-tensors config. Integer layouts cannot hold it (upstream refuses them too)."""
    if name == "auto_round":
        return ResolvedFormat(name, "auto_round", "auto_round:nvfp4_v2", NVFP4_E5M3_PACKING)
    if name in ("llm_compressor", "auto_round:llm_compressor"):
        return ResolvedFormat(name, "llm_compressor", "llm_compressor:nvfp4_v2")
    raise ValueError(f"format {name} cannot store NVFP4_E5M3 (data_type={NVFP4_E5M3_DATA_TYPE}): it holds integer "
                     "weights only; use auto_round, llm_compressor or fake")


def resolve_formats(
    format: str | list[str] | None, scheme: dict[str, Any], layer_config: dict[str, dict[str, Any]] | None = None,
    regex_config: dict[str, dict[str, Any]] | None = None,
) -> list[ResolvedFormat]:
    """Every requested format resolved; one that falls back to fake is dropped when fake was asked for too."""
    names = format if isinstance(format, list) else parse_formats(format, scheme.get("bits"))
    out: list[ResolvedFormat] = []
    for name in names:
        fmt = resolve_format(name, scheme, layer_config, regex_config)
        if fmt.family == "fake" and name != "fake" and "fake" in names:
            continue
        if any(f.backend == fmt.backend for f in out):
            continue
        out.append(fmt)
    return out


def check_format(format: str, scheme: dict[str, Any], scheme_name: str = "") -> None:
    """Fail before quantizing when `format` cannot hold `scheme` (raises ValueError naming both)."""
    try:
        resolve_formats(format, scheme)
    except ValueError as exc:
        label = scheme_name or {k: v for k, v in scheme.items() if v is not None}
        raise ValueError(f"{exc} (scheme {label})") from exc


def format_folder(format: str | ResolvedFormat, ctx: ExportContext) -> str:
    """The subfolder upstream gives a format when several are requested, e.g. auto-round-auto-gptq."""
    fmt = format if isinstance(format, ResolvedFormat) else resolve_format(
        parse_formats(format)[0], ctx.scheme, ctx.layer_config, ctx.regex_config)
    return fmt.folder


def output_folder_name(model_name: str, scheme: dict[str, Any], formats: list[str] | str | None = None) -> str:
    """upstream quantize_and_save's folder under output_dir: `<model>-w4g128`, `<model>-mxfp-w4g32`,
    `<model>-w8afp8` for group_size <= 0, `<model>-w8g128x128` for block groups, `<model>-gguf`."""
    fmt_text = ",".join(formats) if isinstance(formats, list) else (formats or "")
    name = (model_name or "").rstrip("/")
    gs = scheme.get("group_size")
    bits = scheme.get("bits")
    dt = scheme.get("data_type") or "int"
    act_bits = scheme.get("act_bits") or 16
    act_dt = scheme.get("act_data_type") or "float"
    gguf = "gguf" in fmt_text
    last = name.split("/")[-1].strip(".")
    act_suffix = f"afp{act_bits}" if "fp" in act_dt else f"a{act_bits}"
    if last == "":
        if gguf:
            return ""
        return f"w{bits}{act_suffix if int(gs) <= 0 else f'g{gs}'}"
    if gguf:
        return name.split("/")[-1] + "-gguf"
    if isinstance(gs, (list, tuple)):
        if len(gs) != 2:
            raise ValueError(f"group_size {gs}: only 2-D block groups are supported")
        suffix = f"g{gs[0]}x{gs[1]}"
    elif int(gs) <= 0:
        suffix = act_suffix
    else:
        suffix = f"g{gs}"
    prefix = dt.lower().replace("_", "") if "int" not in dt or "mx" in dt else ""
    return name.split("/")[-1] + (f"-{prefix}" if prefix else "") + f"-w{bits}{suffix}"


def uses_shard_writer(
    formats: list[ResolvedFormat], ctx: ExportContext, *, inplace: bool = True, low_cpu_mem_usage: bool = True,
    need_calib: bool = False, mllm: bool = False,
) -> bool:
    """Whether upstream's quantize_and_save would stream the weights through its ShardWriter (immediate saving)
    for this run, which decides the bytes of the weight files."""
    if len(formats) != 1 or formats[0].family == "fake" or not inplace or not low_cpu_mem_usage:
        return False
    outside = any(not c.get("in_blocks") and int(c.get("bits", 16)) <= 8 for c in ctx.layer_config.values())
    if outside and need_calib:
        return False
    model = ctx.model
    if not ("causallm" in type(model).__name__.lower() and not mllm):
        keys: Any = getattr(model, "_tied_weights_keys", None) or {}
        names = list(keys.keys()) if isinstance(keys, dict) else list(keys)
        if len(names) > 1 or (len(names) == 1 and "lm_head" not in names[0]):
            return False
    dt = str(ctx.scheme.get("data_type") or "int")
    return "int" in dt or dt.startswith(("nv_fp", "mx_fp"))


def list_formats() -> dict[str, list[str]]:
    """Format name -> the preset schemes fastround writes in it (what `fastround list format` prints)."""
    return {name: list(FORMAT_SCHEMES[name]) for name in sorted(FORMAT_SCHEMES)}


def format_support_text() -> str:
    return "".join(f"{name} support scheme:\n\t{', '.join(schemes)}\n" for name, schemes in list_formats().items())


def save(ctx: ExportContext, output_dir: str | os.PathLike[str], format: str | ResolvedFormat = "auto_round",
         *, shard_writer: bool = False) -> str:
    """Write `ctx` as one format into `output_dir` (staged beside it, renamed into place when complete) and
    return the folder. `shard_writer` reproduces quantize_and_save's streamed weight files (see
    uses_shard_writer); otherwise the files are save_quantized's."""
    if isinstance(format, ResolvedFormat):
        fmt = format
    else:
        names = parse_formats(format, ctx.scheme.get("bits"))
        if len(names) != 1:
            raise ValueError(f"save() writes one format, got {names}; use save_all for several")
        fmt = resolve_format(names[0], ctx.scheme, ctx.layer_config, ctx.regex_config)
    check_output_dir(output_dir, ctx.source_dir)
    if fmt.family == "fake":
        from fastround.export import fake

        fake.save(ctx, Path(output_dir))
    elif fmt.family == "auto_round":
        from fastround.export import auto_round

        auto_round.save(ctx, Path(output_dir), fmt, shard_writer=shard_writer)
    elif fmt.family == "auto_gptq":
        from fastround.export import gptq

        gptq.save(ctx, Path(output_dir), fmt, shard_writer=shard_writer)
    elif fmt.family == "auto_awq":
        from fastround.export import awq

        awq.save(ctx, Path(output_dir), fmt, shard_writer=shard_writer)
    else:
        from fastround.export import llm_compressor

        llm_compressor.save(ctx, Path(output_dir), fmt, shard_writer=shard_writer)
    return os.fspath(output_dir)


def save_all(ctx: ExportContext, output_dir: str | os.PathLike[str], format: str | None = "auto_round",
             *, shard_writer: bool = False) -> list[str]:
    """Every format of a comma list: one format goes to `output_dir`, several each to `<output_dir>/<backend>`
    (upstream's naming) and never through the shard writer."""
    formats = resolve_formats(format, ctx.scheme, ctx.layer_config, ctx.regex_config)
    if len(formats) == 1:
        return [save(ctx, output_dir, formats[0], shard_writer=shard_writer)]
    return [save(ctx, os.path.join(output_dir, f.folder), f) for f in formats]


__all__ = [
    "FORMAT_SCHEMES",
    "NVFP4_E5M3_DATA_TYPE",
    "NVFP4_E5M3_PACKING",
    "ResolvedFormat",
    "SUPPORTED_FORMATS",
    "check_format",
    "check_output_dir",
    "format_folder",
    "format_support_text",
    "list_formats",
    "output_folder_name",
    "parse_formats",
    "resolve_format",
    "resolve_formats",
    "save",
    "save_all",
    "uses_shard_writer",
]
