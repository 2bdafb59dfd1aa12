"""SignRound's MXFP / NVFP4 tuning op (C++ kernels in cpp/fastround/tune/fp_qdq, registered by fastround._torch
as torch.ops.fastround.fp_qdq*): upstream's quant_mx (data_type "mx_fp"), nvfp4_v2 (NVFP4_E5M3, "nvfp4_v2") and
nv_fp4 / nv_fp4_with_static_gs (NVFP4, "nv_fp", under a per-tensor global scale) with trainable rounding offsets V
and a per-group range factor,
its straight-through backward, and the codes export packs. This module gives the ops typed signatures, fake kernels
(torch.compile / FakeTensor) and autograd; the same op quantizes a layer's input activations, whose gradient it
passes back to the previous layers."""

from __future__ import annotations

import torch

from fastround import _torch  # noqa: F401  (registers the ops)

_ops = torch.ops.fastround

MX_GROUP = 32
GROUP = {"mx_fp": 32, "nvfp4_v2": 16, "nv_fp": 16}  # inputs per scale, by the op's data_type

_E4M3_MAX_TIMES_E2M1_MAX = 448.0 * 6.0


def nv_global_scale(amax: torch.Tensor) -> float:
    """NVFP4's per-tensor global scale of a tensor's (or a calibrated) max |x|: upstream's calculate_gparam,
    448 * 6 * (1 / amax) in fp32 (0 for 0), as the fp32 value the op takes."""
    a = amax.detach().to(torch.float32).abs().max()
    recip = torch.where(a == 0, torch.zeros_like(a), 1.0 / a)
    return float(_E4M3_MAX_TIMES_E2M1_MAX * recip)


def mx_qdq(x: torch.Tensor, v: torch.Tensor | None, max_scale: torch.Tensor | None, bits: int,
           data_type: str = "mx_fp", global_scale: float = 0.0) -> torch.Tensor:
    """The quantize-dequantized `x` [..., in] in x's dtype (in a multiple of the group g: 32 MXFP, 16 NVFP4),
    differentiable in x, v [rows*in/g, g] and max_scale [rows, in/g] (None: 0 and 1), as upstream's quant_mx /
    nvfp4_v2 / nv_fp4 (NVFP4 under `global_scale`, nv_global_scale's value)."""
    shape = x.shape
    qdq, _ = _ops.fp_qdq(x.reshape(-1, shape[-1]), v, max_scale, bits, data_type, global_scale)
    return qdq.reshape(shape)


def mx_qdq_codes(weight: torch.Tensor, v: torch.Tensor | None, max_scale: torch.Tensor | None, bits: int,
                 data_type: str = "mx_fp", global_scale: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qdq [out, in], codes [out, in] uint8 E2M1 nibbles / E4M3 bytes, scales [out, in/g] uint8 E8M0 / UE5M3 /
    E4M3) of the final parameters: what the MXFP / NVFP4 packers take."""
    return _ops.fp_qdq_codes(weight, v, max_scale, bits, data_type, global_scale)


def nv_opt_rtn_range(weight: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """OPT-RTN's per-group range factor [out, in/16] (fp32) of an NVFP4 weight [out, in], as upstream's
    opt_rtn_nv_fp4: the factor 1 and each of 0.50 .. 1.51 (step 0.01) through the NVFP4 qdq at V = 0 under the
    weight's own global scale (not the fused one: upstream's search computes it), kept where the group's
    imatrix-weighted squared error is strictly lower. The loss is computed with upstream's ops in its order, so
    ties and sums round as its do."""
    x = weight.detach().to(torch.float32).contiguous()
    rows, cols = x.shape
    gs = nv_global_scale(x)
    target = x.reshape(-1, GROUP["nv_fp"])
    qw: torch.Tensor | float = 1.0
    if imatrix is not None:
        qw = imatrix.to(torch.float32).reshape(1, cols).expand(rows, cols).reshape(target.shape)
        if bool(qw.min() == 0):
            qw = _nv_fix_zero_imatrix(qw, weight.detach().reshape(target.shape))

    def loss(factor: torch.Tensor | None) -> torch.Tensor:
        diff = mx_qdq(x, None, factor, 4, "nv_fp", gs).reshape(target.shape) - target
        diff = diff * diff
        return (diff * qw).sum(dim=-1)

    best_loss = loss(None)
    best = torch.ones_like(best_loss)
    factor = torch.empty_like(best_loss)
    for k in range(50, 152):
        if k == 100:
            continue
        factor.fill_(k / 100.0)
        cand = loss(factor.reshape(rows, -1))
        better = cand < best_loss
        best_loss[better] = cand[better]
        best[better] = factor[better]
    return best.reshape(rows, -1)


def _nv_fix_zero_imatrix(qw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upstream's _imatrix_handle_zero on 16-groups ([groups, 16], the weight in its own dtype), in its ops: a
    group with more than 8 entries <= 1e-30 takes |w| + sqrt(sum(w^2) / 32); then, if any group has 1..8 of them,
    every exact zero left takes its group's sum / (16 - count)."""
    qw = qw.clone()
    g = qw.shape[-1]
    small = torch.sum(qw <= 1e-30, dim=-1)
    mostly = small > g // 2
    if torch.sum(mostly) > 0:
        fill = (torch.abs(w) + torch.sqrt(torch.sum(torch.pow(w, 2), dim=-1, keepdim=True) / 32)).to(qw.dtype)
        qw[mostly, :] = fill[mostly, :]
    some = (small > 0) & (small <= g // 2)
    if torch.sum(some) > 0:
        mean = (torch.sum(qw, dim=-1) / (g - small)).view(-1, 1).expand(-1, g)
        zero = qw == 0
        qw[zero] = mean[zero]
    return qw


@torch.library.register_fake("fastround::fp_qdq")
def _fp_qdq_fake(x, v, max_scale, bits, data_type="mx_fp", global_scale=0.0):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[1] // GROUP[data_type]), dtype=torch.float32)


@torch.library.register_fake("fastround::fp_qdq_codes")
def _fp_qdq_codes_fake(x, v, max_scale, bits, data_type="mx_fp", global_scale=0.0):
    rows, cols = x.shape
    return (torch.empty_like(x), x.new_empty((rows, cols), dtype=torch.uint8),
            x.new_empty((rows, cols // GROUP[data_type]), dtype=torch.uint8))


@torch.library.register_fake("fastround::fp_qdq_backward")
def _fp_qdq_backward_fake(grad, x, v, max_scale, bits, need_v, need_max, need_x, data_type="mx_fp",
                          global_scale=0.0):
    g = GROUP[data_type]
    ng = x.shape[0] * (x.shape[1] // g)
    f32 = torch.float32
    return (x.new_empty((ng, g) if need_v else (0,), dtype=f32),
            x.new_empty((ng,) if need_max else (0,), dtype=f32),
            torch.empty_like(x) if need_x else x.new_empty((0,)))


def _setup_fp_qdq(ctx, inputs, output):
    x, v, max_scale, bits, *rest = inputs
    ctx.save_for_backward(x, v, max_scale)
    ctx.bits = bits
    ctx.data_type = rest[0] if rest else "mx_fp"
    ctx.global_scale = rest[1] if len(rest) > 1 else 0.0
    ctx.mark_non_differentiable(output[1])


def _fp_qdq_backward(ctx, grad_qdq, grad_exponent):
    x, v, max_scale = ctx.saved_tensors
    need_x, need_v, need_max = (bool(ctx.needs_input_grad[i]) for i in range(3))
    gv, gmax, gx = _ops.fp_qdq_backward(grad_qdq.contiguous(), x, v, max_scale, ctx.bits, need_v and v is not None,
                                        need_max and max_scale is not None, need_x, ctx.data_type,
                                        ctx.global_scale)
    return (gx if need_x else None, gv if need_v and v is not None else None,
            gmax.view_as(max_scale) if need_max and max_scale is not None else None, None, None, None)


torch.library.register_autograd("fastround::fp_qdq", _fp_qdq_backward, setup_context=_setup_fp_qdq)
