"""The regular flow's kernels on CPU torch tensors: encode a weight to unpacked codes, pack codes into a format's
tensors, dequantize codes to the weight the model keeps, and read a checkpoint's packed tensors back to float
(dequantize_packed, what fastround.quant_linear's reference path runs). Each is a dispatcher op,
torch.ops.fastround.<name> (registered by fastround._torch, which runs the C++ encoding table without the GIL); this
module gives them typed signatures and the fake kernels that let torch.compile / FakeTensor trace them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastround import _torch

_ops = torch.ops.fastround

_FIXED_GROUP = {"mxfp4": 32, "mxfp8": 32, "nvfp4_e5m3": 16}
_DTYPES = {"I32": torch.int32, "F16": torch.float16, "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn}


class Encoded(NamedTuple):
    """A layer's unpacked codes: what every producer hands the packers (quantized.QuantizedLayer's fields)."""

    codes: torch.Tensor  # [out, in] uint8: INT q + zero point; E2M1 nibbles (mxfp4, nvfp4); E4M3 bytes (mxfp8)
    # INT [out, G] float16 (OPT-RTN: the weight's dtype, cast to fp16 only when packed); mxfp [out, in/32] uint8
    # E8M0; nvfp4_e5m3 [out, in/16] uint8 UE5M3
    scales: torch.Tensor
    zeros: torch.Tensor | None  # INT [out, G] int32 zero points; None for FP encodings


def encode_weight(
    weight: torch.Tensor,
    encoding: str,
    bits: int,
    group_size: int,
    sym: bool,
    opt_rtn: bool = False,
    imatrix: torch.Tensor | None = None,
) -> Encoded:
    """Quantize `weight` [out, in] (float32 / float16 / bfloat16, CPU) as upstream's regular flow does.

    INT: RTN with the rounding of torch ops in the weight's dtype; with opt_rtn and sym, OPT-RTN (the
    imatrix-weighted scale search; imatrix [in] float32, None for uniform weights). Asym ignores opt_rtn and
    plain RTN ignores the imatrix, as upstream. MXFP / NVFP4: the model-free kernels (opt_rtn: their scale
    search); MXFP with opt_rtn and an imatrix weighs that search by it, as upstream's quant_mx_opt_rtn (NVFP4
    refuses an imatrix). G = 1 when group_size is -1 or above in_features, else ceil(in / group_size).
    """
    codes, scales, zeros = _ops.encode_weight(weight, encoding, bits, group_size, sym, opt_rtn, imatrix)
    return Encoded(codes, scales, zeros if zeros.numel() else None)


def pack_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    encoding: str,
    bits: int,
    group_size: int,
    sym: bool,
    zero_offset: int,
    pad_partial_groups: bool,
    from_qdq: bool = False,
) -> list[tuple[str, torch.Tensor]]:
    """The encoding's checkpoint tensors as (suffix, tensor), in its layout order.

    int_gptq: qweight, qzeros (zero points minus zero_offset: 1 where the format stores zp-1), scales fp16;
    pad_partial_groups=False gives upstream's regular-flow shapes (qweight [in*bits/32, out], in a multiple of 32;
    qzeros [G, (out//32)*bits]), True model-free's (in padded to whole groups, out to whole words).
    int_awq: AWQ GEMM layout. mxfp4 / nvfp4_e5m3: weight_packed, weight_scale; mxfp8: weight, weight_scale.
    from_qdq: pack as upstream's regular flow, which re-derives the codes from the qdq weight (nvfp4_e5m3: zeros
    lose their sign and a zero-scale group packs as 0; no effect on the other encodings).
    """
    names = _torch.packed_tensors(encoding, codes.shape[0], codes.shape[1], bits, group_size, sym, zero_offset,
                                  pad_partial_groups)
    tensors = _ops.pack_codes(codes, scales, zeros, encoding, bits, group_size, sym, zero_offset, pad_partial_groups,
                              from_qdq)
    return [(name, t) for (name, _, _), t in zip(names, tensors, strict=True)]


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    encoding: str,
    bits: int,
    group_size: int,
    sym: bool,
    dtype: torch.dtype,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The quantize-dequantized weight [out, in] in `dtype`, as upstream's qdq leaves it in the model:
    dtype(scale * (code - zero)) for INT (the product in fp32), dtype(value * scale) for MXFP / NVFP4.

    Codes carry no sign for an INT sym value that rounds to 0: RTN's and OPT-RTN's round(w / s) * s keeps the sign
    of w there; pass the source `weight` [out, in] for those -0.0 bit for bit. Without it a zero is 0 * scale, as
    quant_tensor_sym (SignRound's qdq, whose round_ste gives +0) leaves it."""
    return _ops.dequantize_codes(codes, scales, zeros, encoding, bits, group_size, sym, dtype, weight)


def dequantize_packed(
    packed: list[torch.Tensor],
    encoding: str,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    sym: bool,
    zero_offset: int,
) -> torch.Tensor:
    """A checkpoint's packed tensors (pack_codes' outputs with pad_partial_groups=True, in its layout order, on the
    CPU) back to the float32 weight [rows, cols]: the encoding row's reference dequantizer. int_gptq: qzeros lanes
    hold zp - zero_offset (1: GPTQ v1, 0: zero points as they are)."""
    return _ops.dequantize_packed(packed, encoding, rows, cols, bits, group_size, sym, zero_offset)


def _groups(encoding: str, cols: int, group_size: int) -> int:
    if encoding in _FIXED_GROUP:
        return cols // _FIXED_GROUP[encoding]
    if group_size == -1 or cols < group_size:
        return 1
    return -(-cols // group_size)


@torch.library.register_fake("fastround::encode_weight")
def _encode_weight_fake(weight, encoding, bits, group_size, sym, opt_rtn, imatrix=None):
    rows, cols = weight.shape
    groups = _groups(encoding, cols, group_size)
    codes = weight.new_empty((rows, cols), dtype=torch.uint8)
    if encoding in _FIXED_GROUP:
        scales = weight.new_empty((rows, groups), dtype=torch.uint8)
        zeros = weight.new_empty((0,), dtype=torch.int32)
    else:
        scale_dtype = weight.dtype if (opt_rtn and sym) else torch.float16
        scales = weight.new_empty((rows, groups), dtype=scale_dtype)
        zeros = weight.new_empty((rows, groups), dtype=torch.int32)
    return codes, scales, zeros


@torch.library.register_fake("fastround::pack_codes")
def _pack_codes_fake(codes, scales, zeros, encoding, bits, group_size, sym, zero_offset, pad_partial_groups,
                     from_qdq=False):
    specs = _torch.packed_tensors(encoding, codes.shape[0], codes.shape[1], bits, group_size, sym, zero_offset,
                                  pad_partial_groups)
    return [codes.new_empty(shape, dtype=_DTYPES[dt]) for _, dt, shape in specs]


@torch.library.register_fake("fastround::dequantize_codes")
def _dequantize_codes_fake(codes, scales, zeros, encoding, bits, group_size, sym, dtype, weight=None):
    return codes.new_empty(tuple(codes.shape), dtype=dtype)


@torch.library.register_fake("fastround::dequantize_packed")
def _dequantize_packed_fake(packed, encoding, rows, cols, bits, group_size, sym, zero_offset):
    return packed[0].new_empty((rows, cols), dtype=torch.float32)
