"""SignRound's tuning ops (C++ kernels in cpp/fastround/tune, registered by fastround._torch as
torch.ops.fastround.*): the INT qdq with trainable rounding offsets and range factors, its straight-through
backward, and the sign-SGD step. This module gives them typed signatures, fake kernels (torch.compile /
FakeTensor) and autograd, so a wrapped layer is an ordinary differentiable function of V and the factors."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastround import _torch  # noqa: F401  (registers the ops)

_ops = torch.ops.fastround


class IntQdqSpec(NamedTuple):
    """A layer's INT scheme as the qdq op takes it."""

    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    scale_dtype: torch.dtype  # the scale is rounded to it inside the qdq (upstream's scale_dtype, fp16 default)
    scale_thresh: float  # |scale| floor: 1e-5, or 1e-8 for an fp32 scale_dtype (upstream's q_scale_thresh)


def group_layout(cols: int, group_size: int) -> tuple[int, int]:
    """(inputs per group incl. padding, groups per row) as upstream's reshape_pad_tensor_by_group_size splits."""
    if group_size == -1 or group_size >= cols:
        return cols, 1
    return group_size, -(-cols // group_size)


def group_extremes(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(wmin, wmax) [out, G] fp32: min(0, group min) and max(0, group max) of weight [out, in]."""
    return _ops.int_group_extremes(weight, group_size)


def int_qdq(
    weight: torch.Tensor,
    v: torch.Tensor,
    min_scale: torch.Tensor | None,
    max_scale: torch.Tensor | None,
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    spec: IntQdqSpec,
    init_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The quantize-dequantized weight [out, in] in weight's dtype, differentiable in v [out*G, group] and the
    factors [out, G] (None: fixed at 1), as upstream's quant_tensor_sym / quant_tensor_asym with tensor_min/max.
    With init_scale [out, G] fp32 (SignRoundV2, sym): the scale is init_scale * max_scale, as quant_tensor_sym with
    init_scale; min_scale and the extremes are then unused."""
    qdq, _ = _ops.int_qdq(weight, v, min_scale, max_scale, wmin, wmax, spec.bits, spec.group_size, spec.sym,
                          spec.scale_dtype, spec.scale_thresh, init_scale)
    return qdq


def int_qdq_codes(
    weight: torch.Tensor,
    v: torch.Tensor,
    min_scale: torch.Tensor | None,
    max_scale: torch.Tensor | None,
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    spec: IntQdqSpec,
    init_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qdq [out, in], codes [out, in] uint8, scales [out, G] in scale_dtype, zeros [out, G] int32) of the final
    parameters: what export packs (codes q + 2^(b-1) for sym, q for asym). init_scale as int_qdq."""
    return _ops.int_qdq_codes(weight, v, min_scale, max_scale, wmin, wmax, spec.bits, spec.group_size, spec.sym,
                              spec.scale_dtype, spec.scale_thresh, init_scale)


def int_init_scale(weight: torch.Tensor, bits: int, group_size: int, imatrix: torch.Tensor | None,
                   scale_thresh: float) -> torch.Tensor:
    """SignRoundV2's init scale [out, G] in weight's dtype: OPT-RTN's imatrix-weighted search of the sym scale
    (imatrix [in] fp32 as collected, zeros kept; None: uniform) floored at +-scale_thresh, as upstream's
    search_optimized_init_scale. The search runs on the CPU (once per layer); the result is on weight's device."""
    im = imatrix.to("cpu", torch.float32).contiguous() if imatrix is not None else None
    scales = _ops.int_init_scale(weight.detach().to("cpu"), bits, group_size, im, scale_thresh)
    return scales.to(weight.device)


def sign_sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    first: bool = True,
    clamp01: bool = False,
    clamp_hi: float = 1.0,
) -> None:
    """p <- p - lr * sign(g) (or sign of the momentum buffer) in place; clamp01 for range factors, which are then
    clamped to [0, clamp_hi] (2 for SignRoundV2's max_scale)."""
    _ops.sign_sgd_step_(params, grads, bufs, lr, momentum, first, clamp01, clamp_hi)


@torch.library.register_fake("fastround::int_qdq")
def _int_qdq_fake(weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym, scale_dtype, scale_thresh,
                  init_scale=None):
    _, groups = group_layout(weight.shape[1], group_size)
    return torch.empty_like(weight), weight.new_empty((weight.shape[0], groups), dtype=torch.float32)


@torch.library.register_fake("fastround::int_qdq_codes")
def _int_qdq_codes_fake(weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym, scale_dtype,
                        scale_thresh, init_scale=None):
    rows, cols = weight.shape
    _, groups = group_layout(cols, group_size)
    return (torch.empty_like(weight), weight.new_empty((rows, cols), dtype=torch.uint8),
            weight.new_empty((rows, groups), dtype=scale_dtype), weight.new_empty((rows, groups), dtype=torch.int32))


@torch.library.register_fake("fastround::int_qdq_backward")
def _int_qdq_backward_fake(grad, weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym, scale_dtype,
                           scale_thresh, factor_grads, init_scale=None):
    ng = wmin.numel()
    f = (lambda: v.new_empty((ng,))) if factor_grads else (lambda: v.new_empty((0,)))
    return torch.empty_like(v), f(), f()


@torch.library.register_fake("fastround::int_group_extremes")
def _int_group_extremes_fake(weight, group_size):
    _, groups = group_layout(weight.shape[1], group_size)
    shape = (weight.shape[0], groups)
    return weight.new_empty(shape, dtype=torch.float32), weight.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("fastround::sign_sgd_step_")
def _sign_sgd_step_fake(params, grads, bufs, lr, momentum, first, clamp01, clamp_hi=1.0):
    return None


@torch.library.register_fake("fastround::int_init_scale")
def _int_init_scale_fake(weight, bits, group_size, imatrix, scale_thresh):
    _, groups = group_layout(weight.shape[1], group_size)
    return weight.new_empty((weight.shape[0], groups))


def _setup_int_qdq(ctx, inputs, output):
    weight, v, min_scale, max_scale, wmin, wmax, *spec = inputs
    init_scale = spec[5] if len(spec) > 5 else None  # the optional trailing argument
    ctx.save_for_backward(weight, v, min_scale, max_scale, wmin, wmax, init_scale)
    ctx.spec = spec[:5]
    ctx.mark_non_differentiable(output[1])


def _int_qdq_backward(ctx, grad_qdq, grad_scale):
    weight, v, min_scale, max_scale, wmin, wmax, init_scale = ctx.saved_tensors
    need_factors = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    gv, gmin, gmax = _ops.int_qdq_backward(grad_qdq.contiguous(), weight, v, min_scale, max_scale, wmin, wmax,
                                           *ctx.spec, need_factors, init_scale)
    # With an init scale min_scale takes no part in the qdq: no gradient, as upstream's unused min_scale.
    gmin_out = (gmin.view_as(min_scale) if need_factors and min_scale is not None and init_scale is None
                else None)
    gmax_out = gmax.view_as(max_scale) if need_factors and max_scale is not None else None
    return (None, gv, gmin_out, gmax_out, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastround::int_qdq", _int_qdq_backward, setup_context=_setup_int_qdq)
