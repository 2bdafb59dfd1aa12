"""Inference on packed INT checkpoints: torch.ops.fastround.woq_linear (C++ kernels in cpp/fastround/infer,
registered for CPU tensors by fastround._torch) reads the GPTQ / gptq_v2 / AWQ words in place. This module gives
the op a typed signature and the fake kernel that lets torch.compile / FakeTensor trace it."""

from __future__ import annotations

import torch

from fastround import _torch  # noqa: F401  (registers the op)

_ops = torch.ops.fastround

LAYOUTS = ("gptq", "gptq_v2", "awq", "gptq_tiled", "gptq_v2_tiled")
WOQ_TILE = 64  # outputs per tile of the "_tiled" layouts (cpp/fastround/infer/woq_layout.h kWoqTile)


def woq_out_features(qweight: torch.Tensor, bits: int, layout: str) -> int:
    """out_features of a packed layer: GPTQ qweight is [in/pf, out], AWQ qweight [in, out/pf] (pf = 32 / bits)."""
    return qweight.shape[1] * (32 // bits) if layout == "awq" else qweight.shape[1]


def woq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    layout: str,
) -> torch.Tensor:
    """y [..., out] in x's dtype = x [..., in] @ W^T + bias, W[o, k] = (q - z) * s of the packed words.

    layout "gptq": qweight [in*bits/32, out] int32 packed along in, qzeros [G, out*bits/32] int32 storing z - 1
    (auto_gptq, auto_round); "gptq_v2": the same storing z (gptqmodel v2, auto_round asym); "awq": qweight
    [in, out*bits/32] and qzeros [G, out*bits/32] with AWQ's 0,2,4,6,1,3,5,7 nibble order (4 bits only).
    scales [G, out] fp16 / bf16 / fp32; G = ceil(in / group_size), 1 for group_size -1. bits 2, 4 or 8.
    Trivial g_idx only (input k in group k // group_size). CPU tensors; x float32, float16 or bfloat16.
    "gptq_tiled" / "gptq_v2_tiled": qweight is woq_tile_qweight's reordering of the GPTQ words (out a multiple of
    WOQ_TILE), which the decode GEMV streams contiguously.
    """
    return _ops.woq_linear(x, qweight, qzeros, scales, bias, bits, group_size, layout)


def woq_tile_qweight(qweight: torch.Tensor, untile: bool = False) -> torch.Tensor:
    """GPTQ qweight [rows, out] int32 in the "_tiled" layouts' order: each WOQ_TILE outputs' words of all rows
    back to back (same shape and size); untile=True reverses it."""
    return _ops.woq_tile_qweight(qweight, untile)


@torch.library.register_fake("fastround::woq_linear")
def _woq_linear_fake(x, qweight, qzeros, scales, bias, bits, group_size, layout):
    torch._check(layout in LAYOUTS, lambda: f"[fastround.woq_linear] layout: unknown {layout!r}")
    torch._check(bits in (2, 4, 8), lambda: f"[fastround.woq_linear] bits: {bits} is not served")
    out = woq_out_features(qweight, bits, layout)
    return x.new_empty((*x.shape[:-1], out))


if hasattr(_ops, "woq_linear_rotated"):

    @torch.library.register_fake("fastround::woq_linear_rotated")
    def _woq_linear_rotated_fake(x, qweight, qzeros, scales, bias, bits, group_size, layout, block_size,
                                 hadamard_k=None, signs=None, transpose=False, signs_first=False):
        return _woq_linear_fake(x, qweight, qzeros, scales, bias, bits, group_size, layout)


@torch.library.register_fake("fastround::woq_tile_qweight")
def _woq_tile_qweight_fake(qweight, untile=False):
    torch._check(qweight.dim() == 2 and qweight.shape[1] % WOQ_TILE == 0,
                 lambda: f"[fastround.woq_tile_qweight] qweight: out_features must be a multiple of {WOQ_TILE}")
    return torch.empty_like(qweight)
