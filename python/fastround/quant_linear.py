"""The layers a quantized checkpoint loads into: `QuantLinear` for packed INT weights (GPTQ words as auto_round,
auto_gptq and gptqmodel write them, AWQ GEMM words) and `FPQuantLinear` for MXFP4 / MXFP8 / NVFP4_E5M3 in the
compressed-tensors layout fastround writes.

Each module's buffers are the checkpoint's tensors under the checkpoint's names, in the checkpoint's shapes and
dtypes (model-free pads in_features to whole groups, the regular flow does not; both load). The forward:

- INT: `torch.ops.fastround.woq_linear(x, qweight, qzeros, scales, bias, bits, group_size, layout)` when that op
  exists (checked once, at import) and takes the layer; else the reference: unpack and dequantize to an fp32 weight
  [out, in] (the C++ encoding table's `dequantize_ref` through `torch.ops.fastround.dequantize_packed`), then one fp32
  matmul. `FASTROUND_WOQ_REFERENCE=1` forces the reference; a GPTQ act-order `g_idx` (inputs not in group order)
  always takes it, the groups looked up per input.
  On the CPU a GPTQ layer whose out_features is a multiple of 64 reorders its qweight once, at its first forward
  (the load's last step), into the op's tiled word order ("gptq_tiled" / "gptq_v2_tiled", `infer_ops.
  woq_tile_qweight`): a permutation of the same size that the decode GEMV streams contiguously. The buffer keeps its
  checkpoint shape; state_dict(), dequantize() and device / dtype moves see the checkpoint's order.
  `FASTROUND_WOQ_TILE=0` keeps the checkpoint's order (to time both).
- FP: always the reference (dequantize, fp32 matmul). The layer has no activation quantizer: a checkpoint that
  declares activation quantization (MXFP4 is W4A4 upstream) runs weight-only here, except where a rotated MXFP4
  checkpoint's load hook (rotation.MXFP4ActHook, upstream's fused fast path; on CUDA by default) hands it
  activations already rotated and MXFP4 quantize-dequantized.

The C++ dequantizers read CPU tensors; a module on another device copies its packed words to the CPU for that step
(a correctness path, not a fast one).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn

from fastround import ops as fr_ops

logger = logging.getLogger("fastround")

_ops = torch.ops.fastround
HAS_WOQ_LINEAR: bool = hasattr(_ops, "woq_linear")
HAS_WOQ_LINEAR_ROTATED: bool = hasattr(_ops, "woq_linear_rotated")
WOQ_TILE = 64  # outputs per tile (fastround.infer_ops.WOQ_TILE, without importing the extension here)
_TILE_LOCK = threading.Lock()  # two threads' first forwards must not tile one buffer twice

LAYOUTS = ("gptq", "gptq_v2", "awq")
FP_ENCODINGS = {"mxfp4": 32, "mxfp8": 32, "nvfp4_e5m3": 16, "nvfp4": 16}  # encoding -> fixed group
# E2M1 value of each 4-bit code (bit 3 the sign): NVFP4's elements, decoded in Python since its scales are E4M3
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.lru_cache(maxsize=None)
def _e2m1_table(device: torch.device) -> torch.Tensor:
    """The 16 E2M1 values on `device` [16] fp32, made once per device (not a host copy every forward)."""
    return torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=device)


def reference_forced() -> bool:
    """FASTROUND_WOQ_REFERENCE=1 keeps every layer on the dequantize-and-matmul reference."""
    return os.environ.get("FASTROUND_WOQ_REFERENCE", "").strip().lower() not in ("", "0", "false", "no")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _gptq_group(in_features: int, group_size: int, pack: int) -> tuple[int, int]:
    """(group length, groups) of the GPTQ layout; per channel the group is in_features rounded up to whole words."""
    if group_size == -1:
        return _ceil_div(in_features, pack) * pack, 1
    return group_size, _ceil_div(in_features, group_size)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise ValueError(f"packed tensor has {t.shape[0]} rows, more than the {rows} its layer's shape allows")
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[1] == cols:
        return t
    if t.shape[1] > cols:
        raise ValueError(f"packed tensor has {t.shape[1]} columns, more than the {cols} its layer's shape allows")
    return torch.cat([t, t.new_zeros((t.shape[0], cols - t.shape[1]))], dim=1)


class _PackedBuffers(nn.Module):
    """Keeps the packed tensors' dtypes through model.to(dtype) / .half(): a cast would round fp16 scales to bf16
    or turn FP8 codes into floats. Device moves apply as usual; the bias follows the model's dtype."""

    _packed: tuple[str, ...] = ()

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        before = {n: self._buffers[n] for n in self._packed if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class QuantLinear(_PackedBuffers):
    """A Linear whose weight is packed INT codes.

    layout "gptq": GPTQ words, zero points stored minus one (auto_gptq, auto_round:auto_gptq);
           "gptq_v2": GPTQ words, zero points as they are (auto_round asym, auto_round:gptqmodel);
           "awq": AWQ GEMM words (4-bit, auto_awq, auto_round:auto_awq).
    Buffers (GPTQ): qweight [in_p/pf, out] int32 (pf = 32/bits, in_p = in or in padded to whole groups),
    qzeros [groups, out_p/pf] int32, scales [groups, out] fp16, optional g_idx [in] int32;
    (AWQ): qweight [in, out/8] int32, qzeros [groups, out/8] int32, scales [groups, out] fp16. bias [out].
    """

    _packed = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool, layout: str,
                 bias: bool = False, g_idx: bool = False, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]
                 | None = None, device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"QuantLinear: layout must be one of {LAYOUTS}, got {layout!r}")
        if bits not in (2, 4, 8) or (layout == "awq" and bits != 4):
            raise ValueError(f"QuantLinear: layout {layout} cannot hold {bits}-bit weights")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"QuantLinear: group_size must be -1 or positive, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.layout = bits, group_size, sym, layout
        pack = 32 // bits
        if layout == "awq":
            gs = in_features if group_size == -1 else group_size
            groups = in_features // gs
            default = {"qweight": (torch.int32, (in_features, out_features // 8)),
                       "qzeros": (torch.int32, (groups, out_features // 8)),
                       "scales": (torch.float16, (groups, out_features))}
        else:
            _, groups = _gptq_group(in_features, group_size, pack)
            default = {"qweight": (torch.int32, (_ceil_div(in_features, pack), out_features)),
                       "qzeros": (torch.int32, (groups, _ceil_div(out_features, pack))),
                       "scales": (torch.float16, (groups, out_features))}
            if g_idx:
                default["g_idx"] = (torch.int32, (in_features,))
        if bias:
            default["bias"] = (bias_dtype, (out_features,))
        shapes = {**default, **{k: v for k, v in (shapes or {}).items() if k in default}}
        for name, (dtype, shape) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        if not bias:
            self.register_buffer("bias", None)
        if not g_idx:
            self.register_buffer("g_idx", None)
        self._trivial_g_idx: bool | None = None
        # The online rotation of a rotated checkpoint's input (transform_ops.BlockRotation, set by attach_rotation):
        # applied at the start of forward, fused with woq_linear into one op call where the op takes the layer
        self.input_rotation: Any = None
        self._woq_ok = True
        self._tiled = False  # qweight holds the tiled word order (see the module docstring)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, layout={self.layout}")

    # ---- the tiled word order of the CPU op ----

    def _tile_qweight(self) -> None:
        """Reorders a CPU GPTQ qweight into tiles, once; the old tensor (often a view of the checkpoint's mapped
        file) is dropped, not written."""
        q = self.qweight
        if (self._tiled or not hasattr(_ops, "woq_tile_qweight") or self.layout == "awq" or q.device.type != "cpu"
                or q.dtype != torch.int32 or q.dim() != 2 or q.shape[1] % WOQ_TILE or torch.compiler.is_compiling()
                or os.environ.get("FASTROUND_WOQ_TILE", "").strip() == "0"):
            return
        with _TILE_LOCK, torch.inference_mode(False):  # a plain tensor, usable outside inference mode too
            if not self._tiled:
                self._buffers["qweight"] = _ops.woq_tile_qweight(self.qweight.detach(), False)
                self._tiled = True

    def _untile_qweight(self) -> None:
        with _TILE_LOCK, torch.inference_mode(False):
            if self._tiled:
                self._buffers["qweight"] = _ops.woq_tile_qweight(self.qweight.detach(), True)
                self._tiled = False

    def _plain_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint's order (a reordered copy while the buffer is tiled)."""
        return _ops.woq_tile_qweight(self.qweight.detach().cpu(), True) if self._tiled else self.qweight

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # Moves and casts see the checkpoint's order; the next CPU forward tiles again.
        self._untile_qweight()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tiled:
            destination[prefix + "qweight"] = self._plain_qweight()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._untile_qweight()  # loaded words arrive in the checkpoint's order
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ---- the reference path ----

    def _group_len(self) -> int:
        if self.layout == "awq":
            return self.in_features if self.group_size == -1 else self.group_size
        return _gptq_group(self.in_features, self.group_size, 32 // self.bits)[0]

    def _g_idx_is_trivial(self) -> bool:
        """Whether g_idx (if any) says input i is in group i // group: the layout the packed kernels assume."""
        if self._trivial_g_idx is None:
            g = self.g_idx
            if g is None:
                self._trivial_g_idx = True
            elif g.device.type == "meta":  # not loaded yet: decide once the tensor is there
                return False
            else:
                expected = torch.arange(self.in_features, device=g.device, dtype=torch.int64) // self._group_len()
                self._trivial_g_idx = bool(torch.equal(g.to(torch.int64), expected))
        return self._trivial_g_idx

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the packed tensors hold (the C++ reference dequantizer), on this module's
        device."""
        device = self.qweight.device
        rows, cols = self.out_features, self.in_features
        qweight, qzeros, scales = (t.detach().cpu() for t in (self._plain_qweight(), self.qzeros, self.scales))
        scales = scales.to(torch.float16)
        if self.layout == "awq":
            w = fr_ops.dequantize_packed([qweight, qzeros, scales], "int_awq", rows, cols, 4, self.group_size,
                                       self.sym, 0)
            return w.to(device)
        pack = 32 // self.bits
        gs, groups = _gptq_group(cols, self.group_size, pack)
        zero_offset = 1 if self.layout == "gptq" else 0
        if not self._g_idx_is_trivial():
            return self._dequantize_g_idx(qweight, qzeros, scales, zero_offset).to(device)
        # The C++ row reads the padded (model-free) layout; the regular flow's tensors are its prefixes.
        qweight = _pad_rows(qweight, groups * gs // pack)
        qzeros = _pad_cols(qzeros, _ceil_div(rows, pack))
        w = fr_ops.dequantize_packed([qweight.contiguous(), qzeros.contiguous(), scales.contiguous()], "int_gptq",
                                   rows, cols, self.bits, self.group_size, self.sym, zero_offset)
        return w.to(device)

    def _dequantize_g_idx(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          zero_offset: int) -> torch.Tensor:
        """Act-order GPTQ: input i belongs to group g_idx[i], not i // group_size."""
        codes = _unpack_words(qweight, self.in_features, self.bits)  # [out, in]
        zeros = _unpack_words(qzeros.t(), self.out_features, self.bits) + zero_offset  # [groups, out]
        g = self.g_idx.detach().cpu().to(torch.int64)  # [in]
        return (codes - zeros.t()[:, g]) * scales.float().t()[:, g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rot = self.input_rotation
        if HAS_WOQ_LINEAR and self._woq_ok and not reference_forced() and self._g_idx_is_trivial():
            try:
                if x.device.type == "cpu":
                    self._tile_qweight()
                layout = self.layout + "_tiled" if self._tiled else self.layout
                if rot is None:
                    return _ops.woq_linear(x, self.qweight, self.qzeros, self.scales, self.bias, self.bits,
                                           self.group_size, layout)
                if HAS_WOQ_LINEAR_ROTATED and rot.fusable(x):
                    hk, sg = rot.operands(x.device)
                    return _ops.woq_linear_rotated(x, self.qweight, self.qzeros, self.scales, self.bias, self.bits,
                                                   self.group_size, layout, rot.block_size, hk, sg, rot.transpose,
                                                   rot.signs_first)
                return _ops.woq_linear(rot(x), self.qweight, self.qzeros, self.scales, self.bias, self.bits,
                                       self.group_size, layout)
            except (ValueError, NotImplementedError) as exc:
                # A shape, dtype or device the op refuses (ValueError / no kernel for the device): this layer
                # takes the reference from now on.
                self._woq_ok = False
                self._untile_qweight()
                logger.info("woq_linear refused %s (%s); it runs the reference dequantize-and-matmul", self, exc)
        if rot is not None:
            x = rot(x)
        return _reference_linear(x, self.dequantize(), self.bias)


def attach_rotation(module: nn.Module, hook: Callable[..., Any], rotation: Any = None) -> None:
    """Gives `module` an online input rotation: a QuantLinear without forward pre-hooks or a rotation yet holds
    `rotation` (default: hook.block_rotation, a transform_ops.BlockRotation) as its input_rotation, which its forward
    fuses with woq_linear (no module hook, no Python wrapper, one op call); any other module, or a rotation that is
    no BlockRotation, gets `hook` as its first forward pre-hook, as before. Either way the layer's input is rotated
    first, with the same bits.
    One difference to keep in mind: a forward pre-hook added to a fused QuantLinear afterwards (with or without
    prepend=True) sees the unrotated input, because the rotation now runs inside forward; with the pre-hook path such
    a hook would see the rotated input unless prepended. No caller adds one; one that must see the rotated input
    should attach its own hook before the rotation, or call module.input_rotation(x) itself."""
    rotation = rotation if rotation is not None else getattr(hook, "block_rotation", None)
    if (isinstance(module, QuantLinear) and rotation is not None and module.input_rotation is None
            and not module._forward_pre_hooks):
        module.input_rotation = rotation
        return
    module.register_forward_pre_hook(hook, prepend=True)


def online_rotation_count(module: nn.Module) -> int:
    """Online rotations a layer applies to its input: its forward pre-hooks and a QuantLinear's fused one."""
    return len(module._forward_pre_hooks) + (getattr(module, "input_rotation", None) is not None)


def _unpack_words(words: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """GPTQ words [ceil(count/pf), m] int32 (word k, lane j: element k*pf + j) -> codes [m, count] float32, through
    the C++ int_gptq dequantizer with unit scales and zero points 0 in one group per row."""
    pack = 32 // bits
    m = words.shape[1]
    ones = torch.ones((1, m), dtype=torch.float16)
    no_zeros = torch.zeros((1, _ceil_div(m, pack)), dtype=torch.int32)
    return fr_ops.dequantize_packed([_pad_rows(words, _ceil_div(count, pack)).contiguous(), no_zeros, ones],
                                  "int_gptq", m, count, bits, -1, True, 0)


def _reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b in fp32, returned in x's dtype."""
    y = torch.matmul(x.float(), weight.t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class FPQuantLinear(_PackedBuffers):
    """A Linear whose weight is MXFP4 / MXFP8 / NVFP4_E5M3 / NVFP4 codes in the compressed-tensors layout.

    mxfp4 / nvfp4_e5m3 / nvfp4: weight_packed [out, in/2] uint8 (two E2M1 codes a byte, element 2k low);
    mxfp8: weight [out, in] float8_e4m3fn; weight_scale [out, in/group] uint8 (E8M0; UE5M3 for nvfp4_e5m3;
    float8_e4m3fn for nvfp4). nvfp4 also has weight_global_scale [1] fp32, a divisor as in compressed-tensors
    (w = e2m1 * (1 / weight_global_scale) * scale, upstream's NVFP4QuantLinear order), and, when the checkpoint has
    it, input_global_scale [1] fp32.
    Activations: with act_nvfp4 (an NVFP4 W4A4 checkpoint) the inputs are quantize-dequantized as NVFP4 under
    input_global_scale before the matmul, as upstream's loader does in every forward; otherwise weight-only,
    whatever the checkpoint's act_bits say.
    """

    _packed = ("weight", "weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")

    def __init__(self, in_features: int, out_features: int, encoding: str, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float16,
                 act_nvfp4: bool = False, input_global_scale: bool = False):
        super().__init__()
        if encoding not in FP_ENCODINGS:
            raise ValueError(f"FPQuantLinear: encoding must be one of {sorted(FP_ENCODINGS)}, got {encoding!r}")
        group = FP_ENCODINGS[encoding]
        if in_features % group:
            raise ValueError(f"FPQuantLinear: in_features {in_features} is not a multiple of {encoding}'s group {group}")
        if act_nvfp4 and not (encoding == "nvfp4" and input_global_scale):
            raise ValueError("FPQuantLinear: act_nvfp4 needs encoding 'nvfp4' with an input_global_scale")
        self.in_features, self.out_features, self.encoding = in_features, out_features, encoding
        self.act_nvfp4 = act_nvfp4
        if encoding == "mxfp8":
            self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.float8_e4m3fn,
                                                       device=device))
        else:
            self.register_buffer("weight_packed", torch.zeros((out_features, in_features // 2), dtype=torch.uint8,
                                                              device=device))
        scale_dtype = torch.float8_e4m3fn if encoding == "nvfp4" else torch.uint8
        self.register_buffer("weight_scale", torch.zeros((out_features, in_features // group), dtype=scale_dtype,
                                                         device=device))
        if encoding == "nvfp4":
            self.register_buffer("weight_global_scale", torch.zeros((1,), dtype=torch.float32, device=device))
            if input_global_scale:
                self.register_buffer("input_global_scale", torch.zeros((1,), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros((out_features,), dtype=bias_dtype, device=device) if bias else None)

    def extra_repr(self) -> str:
        act = ", act=nvfp4" if self.act_nvfp4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, encoding={self.encoding}{act}"

    def _dequantize_nvfp4(self) -> torch.Tensor:
        packed = self.weight_packed
        table = _e2m1_table(packed.device)
        codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(self.out_features, self.in_features)
        gs = self.weight_global_scale.to(torch.float32)
        # upstream's get_reciprocal: a zero global scale dequantizes to zeros, not inf
        recip = torch.where(gs == 0, torch.zeros_like(gs), 1.0 / gs)
        w = (table[codes.long()] * recip).reshape(self.out_features, -1, 16)
        return (w * self.weight_scale.to(torch.float32).unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] (the C++ reference dequantizer; torch ops for nvfp4), on this module's
        device."""
        if self.encoding == "nvfp4":
            return self._dequantize_nvfp4()
        codes = self.weight if self.encoding == "mxfp8" else self.weight_packed
        device = codes.device
        w = fr_ops.dequantize_packed([codes.detach().cpu().contiguous(), self.weight_scale.detach().cpu().contiguous()],
                                   self.encoding, self.out_features, self.in_features,
                                   8 if self.encoding == "mxfp8" else 4, FP_ENCODINGS[self.encoding], True, 0)
        return w.to(device)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x quantize-dequantized as NVFP4 (groups of 16 along in) under input_global_scale, in x's dtype: upstream's
        nv_fp4_with_static_gs on the fp32 input, through fastround's fp_qdq op."""
        from fastround.tune_fp_ops import mx_qdq

        return mx_qdq(x.float(), None, None, 4, "nv_fp", self._input_scale()).to(x.dtype)

    def _input_scale(self) -> float:
        """input_global_scale as a Python float, read from the device once and again only when the buffer is
        replaced or written in place (a load, .to(), copy_; writes through .data bypass the version counter, as
        everywhere in torch): reading it every forward would wait for the GPU each layer. A buffer made under
        inference_mode has no version counter and is read every call."""
        buf = self.input_global_scale
        if torch.is_inference(buf):
            return float(buf.float().reshape(()))
        cached = getattr(self, "_input_scale_cache", None)  # (weakref to the buffer, its version, the value)
        if cached is None or cached[0]() is not buf or cached[1] != buf._version:
            cached = self._input_scale_cache = (weakref.ref(buf), buf._version, float(buf.float().reshape(())))
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_nvfp4:
            x = self.quantize_input(x)
        return _reference_linear(x, self.dequantize(), self.bias)


__all__ = ["FPQuantLinear", "HAS_WOQ_LINEAR", "LAYOUTS", "QuantLinear", "attach_rotation", "online_rotation_count",
           "reference_forced"]
