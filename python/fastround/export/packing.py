"""Each quantized layer's tensors in a format's layout. The bits are packed by the C++ encoding table through
fastround.ops.pack_codes; this module only picks the table row and the zero-point convention, and orders
and names the tensors as upstream's QuantLinear classes register them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from fastround.export.common import Entry
from fastround.quantized import NVFP4_ENCODING, ExportContext, QuantizedLayer

if TYPE_CHECKING:
    from fastround.export import ResolvedFormat

logger = logging.getLogger("fastround")

# Registration order of upstream's packed modules' buffers (decides state_dict order, hence shard splits).
_GPTQ_V1_ORDER = ("qweight", "g_idx", "qzeros", "scales", "bias")  # qlinear_torch_zp.QuantLinear
_GPTQ_V2_ORDER = ("qweight", "qzeros", "scales", "bias", "g_idx")  # qlinear_torch.QuantLinear
_AWQ_ORDER = ("qweight", "qzeros", "scales", "bias")  # WQLinear_GEMM
_MX_ORDER = ("weight", "weight_packed", "weight_scale", "bias")  # qlinear_fp.QuantLinear
_NV_ORDER = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "bias")  # its NVFP4 form


class LayerPacker:
    """Packs ctx.layers on demand in one format's layout (a common.Packer)."""

    def __init__(self, ctx: ExportContext, int_layout: str | None, zero_offset: int = 0, g_idx: bool = False,
                 *, conv1d_ok: bool = True, format_name: str = "", check: bool = True, nvfp4_ok: bool = False,
                 nv_fp_ok: bool = False) -> None:
        self.layers = ctx.layers
        self.int_layout = int_layout
        self.nvfp4_ok = nvfp4_ok  # the format was resolved for an NVFP4_E5M3 run (its config describes such layers)
        self.nv_fp_ok = nv_fp_ok  # ... for an NVFP4 run
        self.zero_offset = zero_offset
        self.g_idx = g_idx
        self.conv1d_ok = conv1d_ok
        self.format_name = format_name
        self.progress: tqdm | None = None
        self.rotation = ctx.rotation
        self.quarot = ctx.quarot
        if check:  # off while the flow packs layer by layer (immediate packing), before every layer exists
            check_layers(ctx)

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __call__(self, name: str) -> list[Entry]:
        layer = self.layers[name]
        out = layer.packed if layer.packed is not None else self.pack(layer)
        if self.progress is not None:
            self.progress.update(1)
        return out

    def encoding(self, layer: QuantizedLayer) -> tuple[str, int, tuple[str, ...]]:
        """(encoding-table row, zero offset, tensor order) for one layer."""
        if layer.encoding.startswith("int"):
            if self.int_layout is None:
                raise ValueError(f"format {self.format_name} cannot store integer layer {layer.name}")
            if self.int_layout == "awq":
                return "int_awq", 0, _AWQ_ORDER
            return "int_gptq", self.zero_offset, _GPTQ_V1_ORDER if self.zero_offset else _GPTQ_V2_ORDER
        if layer.encoding == NVFP4_ENCODING:
            if not self.nv_fp_ok:
                raise ValueError(f"format {self.format_name} cannot store NVFP4 layer {layer.name} in a run whose "
                                 "scheme is not NVFP4 (fastround packs NVFP4 layers in NVFP4 runs only)")
            return layer.encoding, 0, _NV_ORDER
        if layer.encoding in ("mxfp4", "mxfp8") or (layer.encoding == "nvfp4_e5m3" and self.nvfp4_ok):
            return layer.encoding, 0, _MX_ORDER
        if layer.encoding == "nvfp4_e5m3":
            raise ValueError(f"format {self.format_name} cannot store NVFP4_E5M3 layer {layer.name} in a run whose "
                             "scheme is not NVFP4_E5M3; use fake")
        raise ValueError(f"format {self.format_name} cannot store layer {layer.name} (encoding {layer.encoding})")

    def pack(self, layer: QuantizedLayer) -> list[Entry]:
        from fastround import ops

        row, zero_offset, order = self.encoding(layer)
        bits = int(layer.scheme["bits"])
        group_size = int(layer.scheme["group_size"])
        sym = layer.scheme.get("sym") is not False
        out_features, in_features = layer.codes.shape  # codes [out, in]
        if layer.conv1d and not self.conv1d_ok:
            raise ValueError(f"format {self.format_name} cannot store HF Conv1D layer {layer.name}")
        if row == "int_awq":
            gs = in_features if group_size <= 0 else group_size
            if in_features % gs or out_features % 8:
                raise ValueError(
                    f"format {self.format_name}: layer {layer.name} [{out_features}, {in_features}] does not fit "
                    f"the AWQ GEMM layout (in_features must be a multiple of group_size {gs}, out_features of 8)")
        if row == NVFP4_ENCODING:
            tensors = _nvfp4_tensors(layer)
        else:
            tensors = dict(ops.pack_codes(layer.codes, layer.scales, layer.zeros, row, bits, group_size, sym,
                                          zero_offset, False, from_qdq=True))
        if self.g_idx and row == "int_gptq":
            gs = in_features if group_size <= 0 else group_size
            tensors["g_idx"] = torch.arange(in_features, dtype=torch.int32) // gs  # [in]: group of each input
        if layer.bias is not None:
            tensors["bias"] = layer.bias.detach().to("cpu", torch.float16)
        unknown = set(tensors) - set(order)
        if unknown:
            raise RuntimeError(f"pack_codes returned unexpected tensors {sorted(unknown)} for row {row}")
        out = [(f"{layer.name}.{suffix}", tensors[suffix]) for suffix in order if suffix in tensors]
        if self.quarot is not None:
            out += [(f"{layer.name}.{k}", v) for k, v in self.quarot[1].layer_buffers(layer.name).items()]
        matrix = self.rotation.export_buffer(layer.name) if self.rotation is not None else None
        if matrix is not None:
            out.append((f"{layer.name}.hadamard_matrix", matrix))  # [b, b] fp32: the load-time hook's M
        return out


def _nvfp4_tensors(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """An NVFP4 layer as upstream's qlinear_fp writes it: two E2M1 codes a byte (element 2k in the low nibble),
    the E4M3 group scales, and the global scales as calibrated. The codes are already the packer's (tune/fp_qdq
    derives them from the qdq weight as upstream's pack does)."""
    codes = layer.codes
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % 16:
        raise ValueError(f"NVFP4 layer {layer.name}: codes must be uint8 [out, in] with in a multiple of 16, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if "weight_global_scale" not in layer.global_scales:
        raise ValueError(f"NVFP4 layer {layer.name} has no weight_global_scale")
    out = {"weight_packed": (codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4),
           "weight_scale": layer.scales.contiguous().view(torch.float8_e4m3fn)}
    out.update({k: v.to(torch.float32).reshape(1) for k, v in layer.global_scales.items()})
    return out


def format_packer(ctx: ExportContext, fmt: ResolvedFormat, *, check: bool = True) -> LayerPacker:
    """The packer of one resolved format: the only place that maps a format family to its layer layout."""
    if fmt.family == "auto_gptq":
        return LayerPacker(ctx, "gptq", 1, True, format_name=fmt.name, check=check)
    if fmt.family == "auto_awq":
        return LayerPacker(ctx, "awq", conv1d_ok=False, format_name=fmt.name, check=check)
    nvfp4_ok = fmt.backend.endswith(":nvfp4_v2")
    nv_fp_ok = fmt.backend.endswith((":nv_fp", ":nv_fp4"))  # resolved for an NVFP4 run (auto_round or llm_compressor)
    if fmt.family == "llm_compressor":
        return LayerPacker(ctx, None, format_name=fmt.name, check=check, nvfp4_ok=nvfp4_ok, nv_fp_ok=nv_fp_ok)
    return LayerPacker(ctx, fmt.int_layout, fmt.zero_offset, fmt.g_idx, conv1d_ok=fmt.int_layout != "awq",
                       format_name=fmt.name, check=check, nvfp4_ok=nvfp4_ok,
                       nv_fp_ok=nv_fp_ok)


def save_packed(ctx: ExportContext, output_dir: Path, fmt: ResolvedFormat, config: dict[str, Any],
                dtype: torch.dtype | None, *, shard_writer: bool) -> None:
    """Every packed format's save: its packer over the layers (with a progress bar), then the checkpoint files."""
    from fastround.export.common import write_packed_checkpoint
    from fastround.export.config import zero_shot

    packer = format_packer(ctx, fmt)
    with tqdm(total=len(ctx.layers), desc="packing", leave=True) as bar:
        packer.progress = bar
        write_packed_checkpoint(
            ctx.model, ctx.tokenizer, ctx.source_dir, ctx.block_names, output_dir, packer, config, dtype,
            shard_writer=shard_writer, leaf_first=zero_shot(ctx),
        )


def check_layers(ctx: ExportContext) -> None:
    """Every layer whose weights the config quantizes must have its codes, and no codes may belong to an unknown
    layer. (A layer quantizing activations only keeps its weights.)"""
    missing = [n for n, c in ctx.layer_config.items() if int(c.get("bits", 16)) <= 8 and n not in ctx.layers
               and _is_module(ctx.model, n)]
    if missing:
        raise ValueError(f"layer_config quantizes {missing[:5]} but the export context holds no codes for them")
    for name in ctx.layers:
        if not _is_module(ctx.model, name):
            raise ValueError(f"quantized layer {name} is not a module of the model")


def _is_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def packing_progress(names: Iterable[str]) -> tqdm:
    return tqdm(total=len(list(names)), desc="packing", leave=True)


__all__ = ["LayerPacker", "check_layers", "format_packer", "packing_progress", "save_packed"]
