"""The modules SignRound puts in place of a block's layers while it tunes them: each holds the trainable
parameters of one layer (rounding offsets V, range factors, norm/bias offsets) and computes its forward through the
C++ qdq ops, and turns the best parameters into the codes and tensors export writes."""

from __future__ import annotations

import logging
from typing import Any

import torch

from fastround import tune_fp_ops, tune_ops
from fastround.modeling import conv1d_type
from fastround.schemes import is_nvfp4
from fastround.tune_settings import SignRoundSettings

logger = logging.getLogger("fastround")

# Norm classes upstream's norm/bias tuning wraps by name (others whose name has "RMSNorm" get the RMS form too).
_KNOWN_RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Phi3RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm",
                              "Qwen3_5MoeRMSNorm"})


def rounding_free_qdq(t: torch.Tensor, v: torch.Tensor, thresh: float) -> torch.Tensor:
    """Upstream's norm/bias qdq (quant_tensor_asym_wo_round at 4 bits, one group over the 1-D tensor `t`): the
    zero point is not rounded and neither is t/scale + v, so the result is t moved by v*scale, clipped to the
    4-bit range of [min(t, 0), max(t, 0)]. The operations and their dtypes follow upstream's for equal bits: the
    range in t's dtype, the scale in fp16, the rest in fp32, the result back in t's dtype."""
    levels = 15
    lo, hi = t.min().clamp(max=0), t.max().clamp(min=0)
    scale = ((hi - lo) / levels).to(torch.float16).clamp(min=thresh)
    zero = -lo / scale
    scale, zero = scale.reshape(1), zero.reshape(1)
    q = (t / scale + v + zero).clamp(0, levels)
    return (scale * (q - zero)).to(t.dtype)


def run_pre_hooks(orig: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The wrapped layer's forward pre-hooks on its input, in their order: the online rotations (per-linear
    transform backend, QuaRot's online R1 / R4) that the layer's weight was rotated for. A wrapper calls linear on
    the weight directly, so without this the tuned weight would meet unrotated inputs (upstream's WrapperLinear
    runs them too, before its activation qdq)."""
    for hook in orig._forward_pre_hooks.values():
        out = hook(orig, (x,))
        if out is not None:
            x = out[0] if isinstance(out, tuple) else out
    return x


class TunedLinear(torch.nn.Module):
    """A Linear / Conv1D during tuning: its weight goes through the C++ qdq with this layer's V and factors."""

    def __init__(self, orig: torch.nn.Module, cfg: dict[str, Any], settings: SignRoundSettings,
                 device: torch.device, tune_bias: bool = False) -> None:
        super().__init__()
        self.orig = orig
        self.conv1d = type(orig) is conv1d_type()
        w = orig.weight.data
        self.weight_q = (w.t() if self.conv1d else w).to(device).contiguous()  # [out, in], never updated
        bits, gs = int(cfg["bits"]), int(cfg["group_size"])
        self.spec = tune_ops.IntQdqSpec(bits, gs, bool(cfg["sym"]), settings.scale_dtype, settings.scale_thresh())
        group, groups = tune_ops.group_layout(self.weight_q.shape[1], gs)
        rows = self.weight_q.shape[0]
        self.wmin, self.wmax = tune_ops.group_extremes(self.weight_q, gs)
        f32 = {"dtype": torch.float32, "device": device}
        self.v = torch.nn.Parameter(torch.zeros(rows * groups, group, **f32))  # [out*G, group] rounding offsets
        self.min_scale: torch.nn.Parameter | None = None
        self.max_scale: torch.nn.Parameter | None = None
        if settings.enable_minmax_tuning:
            self.min_scale = torch.nn.Parameter(torch.ones(rows, groups, **f32))  # [out, G], clamped to [0, 1]
            self.max_scale = torch.nn.Parameter(torch.ones(rows, groups, **f32))
        self.lr = settings.lr_for(bits)
        self.minmax_lr = settings.minmax_lr_for(bits)
        self.bias_v: torch.nn.Parameter | None = None  # [out] offset of the rounding-free bias qdq
        self.bias_thresh = settings.scale_thresh()
        if tune_bias and getattr(orig, "bias", None) is not None:
            self.bias_v = torch.nn.Parameter(torch.zeros(orig.bias.shape, **f32))

    def qdq_weight(self) -> torch.Tensor:
        return tune_ops.int_qdq(self.weight_q, self.v, self.min_scale, self.max_scale, self.wmin, self.wmax,
                                self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conv1D computes x @ W[in, out] + b: the same product as linear with the [out, in] qdq weight.
        x = run_pre_hooks(self.orig, x)
        bias = self.orig.bias
        if self.bias_v is not None:
            bias = rounding_free_qdq(bias, self.bias_v, self.bias_thresh)
        return torch.nn.functional.linear(x, self.qdq_weight(), bias)

    def params(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v}
        if self.min_scale is not None and self.max_scale is not None:
            out["min_scale"], out["max_scale"] = self.min_scale, self.max_scale
        if self.bias_v is not None:
            out["bias_v"] = self.bias_v
        return out

    def lr_of(self, key: str) -> tuple[float, bool | float]:
        """(lr, is a range factor) of one of params(); a subclass may give the factors' upper bound in place of True
        (1), which the sign-SGD step clamps them to."""
        return (self.minmax_lr, True) if key in ("min_scale", "max_scale") else (self.lr, False)

    def tuned_tensors(self, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The layer's tuned bias (norm/bias tuning), by parameter name."""
        if self.bias_v is None or not best or "bias_v" not in best:
            return {}
        v = best["bias_v"].to(self.bias_v.device)
        return {"bias": rounding_free_qdq(self.orig.bias.detach(), v, self.bias_thresh).to("cpu")}

    def final(self, best: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """(qdq, codes, scales, zeros) from the best parameters (or the current ones)."""
        p = {k: (best[k] if best and k in best else t).detach().to(self.weight_q.device) for k, t in
             self.params().items()}
        return tune_ops.int_qdq_codes(self.weight_q, p["v"], p.get("min_scale"), p.get("max_scale"), self.wmin,
                                      self.wmax, self.spec)


def _fp_kind(data_type: str, bits: int) -> str | None:
    """The fp_qdq op's data_type of a scheme's (act_)data_type: "mx_fp" (MXFP4 / MXFP8), "nvfp4_v2" (NVFP4_E5M3),
    "nv_fp" (NVFP4 weights: nv_fp / nv_fp4)."""
    if data_type in ("mx_fp", f"mx_fp{bits}") and bits in (4, 8):
        return "mx_fp"
    if data_type == "nvfp4_v2" and bits == 4:
        return "nvfp4_v2"
    if is_nvfp4(data_type, bits):
        return "nv_fp"
    return None


class NvGlobalScales:
    """An NVFP4 layer's per-tensor scales, fixed before its block is tuned (upstream's block calibration):
    `weight` = 448 * 6 / max|W| (the minimum over fused projections), `act_max` = max |input| over the block's
    training inputs (a [1] tensor in the input dtype), whose global scale the input qdq uses while tuning."""

    def __init__(self, weight: float, act_max: torch.Tensor | None) -> None:
        self.weight = weight
        self.act_max = act_max

    def act(self) -> float:
        assert self.act_max is not None
        return tune_fp_ops.nv_global_scale(self.act_max)


NV_ATTR = "_fastround_nv_global_scales"  # where blockloop leaves a layer's NvGlobalScales


def fp_act_spec(cfg: dict[str, Any]) -> tuple[int, str] | None:
    """(bits, op data_type) a layer quantizes its input activations to while tuning and in the quantized chain
    (upstream's wrapper for act_bits <= 8: dynamic qdq per group), None when they stay in full precision."""
    act_bits = int(cfg.get("act_bits") or 16)
    if act_bits > 8:
        return None
    act_dt = str(cfg.get("act_data_type") or "")
    # NVFP4's activations are nv_fp4_with_static_gs: dynamic group scales under a calibrated global scale
    # (upstream's act_dynamic=True for them), which only an NVFP4 layer's block calibration provides
    nv_act = act_dt == "nv_fp4_with_static_gs" and act_bits == 4
    kind = "nv_fp" if nv_act else _fp_kind(act_dt, act_bits)
    if kind is None or kind == "nv_fp" and not nv_act or cfg.get("act_dynamic") is False or \
            int(cfg.get("act_group_size") or 0) != tune_fp_ops.GROUP[kind] or \
            nv_act != (_fp_kind(str(cfg.get("data_type")), int(cfg["bits"])) == "nv_fp"):
        raise NotImplementedError(
            f"SignRound tuning with act_bits={act_bits} act_data_type={act_dt} "
            f"act_group_size={cfg.get('act_group_size')} act_dynamic={cfg.get('act_dynamic')} is not implemented in "
            "fastround (dynamic MXFP activations in groups of 32, NVFP4_E5M3 ones in groups of 16 and NVFP4's "
            "nv_fp4_with_static_gs under NVFP4 weights are)")
    return act_bits, kind


def quantize_inputs(module: torch.nn.Module, cfg: dict[str, Any]) -> None:
    """After tuning, a layer with quantized activations quantize-dequantizes its input in every later forward (the
    quantized chain, the outside layers' calibration pass), as upstream's WrapperWALayer does."""
    spec = fp_act_spec(cfg) if _fp_kind(str(cfg.get("data_type", "int")), int(cfg["bits"])) else None
    if spec is None or getattr(module, "_fastround_act_hook", None) is not None:
        return
    bits, kind = spec

    def hook(mod: torch.nn.Module, args: tuple) -> tuple:
        # NVFP4: upstream's WrapperWALayer passes the calibrated max under a keyword nv_fp4_with_static_gs does
        # not read, so the chain's global scale is each call's own max |x|.
        with torch.no_grad():
            gs = tune_fp_ops.nv_global_scale(args[0]) if kind == "nv_fp" else 0.0
            return (tune_fp_ops.mx_qdq(args[0], None, None, bits, kind, gs),) + tuple(args[1:])

    module._fastround_act_hook = module.register_forward_pre_hook(hook)


class TunedFPLinear(torch.nn.Module):
    """An MXFP / NVFP4_E5M3 Linear / Conv1D during tuning: its weight goes through the C++ qdq with this layer's V
    and range factor (upstream's quant_mx / nvfp4_v2 use max_scale only: min_scale gets no gradient there), and with
    act_bits <= 8 its input goes through the same qdq without parameters, whose gradient reaches the layers before."""

    def __init__(self, orig: torch.nn.Module, cfg: dict[str, Any], settings: SignRoundSettings,
                 device: torch.device) -> None:
        super().__init__()
        self.orig = orig
        self.conv1d = type(orig) is conv1d_type()
        w = orig.weight.data
        self.weight_q = (w.t() if self.conv1d else w).to(device).contiguous()  # [out, in], never updated
        self.bits = int(cfg["bits"])
        kind = _fp_kind(str(cfg["data_type"]), self.bits)
        assert kind is not None
        self.kind = kind
        self.act = fp_act_spec(cfg)
        rows, cols = self.weight_q.shape
        group = tune_fp_ops.GROUP[kind]
        groups = cols // group
        f32 = {"dtype": torch.float32, "device": device}
        self.v = torch.nn.Parameter(torch.zeros(rows * groups, group, **f32))  # [out*G, group]
        self.max_scale: torch.nn.Parameter | None = None
        if settings.enable_minmax_tuning:
            self.max_scale = torch.nn.Parameter(torch.ones(rows, groups, **f32))  # [out, G], clamped to [0, 1]
        self.lr = settings.lr_for(self.bits)
        self.minmax_lr = settings.minmax_lr_for(self.bits)
        self.gs, self.act_gs = 0.0, 0.0  # NVFP4's global scales (weight, input); unused by the other kinds
        if kind == "nv_fp":
            scales = getattr(orig, NV_ATTR, None)
            if not isinstance(scales, NvGlobalScales):
                raise RuntimeError("an NVFP4 layer is tuned before its global scales were calibrated")
            self.gs = scales.weight
            self.act_gs = scales.act() if self.act is not None else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = tune_fp_ops.mx_qdq(self.weight_q, self.v, self.max_scale, self.bits, self.kind, self.gs)
        x = run_pre_hooks(self.orig, x)
        if self.act is not None:
            x = tune_fp_ops.mx_qdq(x, None, None, *self.act, self.act_gs)
        return torch.nn.functional.linear(x, w, self.orig.bias)

    def params(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v}
        if self.max_scale is not None:
            out["max_scale"] = self.max_scale
        return out

    def lr_of(self, key: str) -> tuple[float, bool]:
        return (self.minmax_lr, True) if key == "max_scale" else (self.lr, False)

    def tuned_tensors(self, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        return {}

    def final(self, best: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """(qdq, codes, scales, zeros) from the best parameters (or the current ones); zeros is empty (no zero
        points), so a committed block stores four tensors as INT ones do."""
        p = {k: (best[k] if best and k in best else t).detach().to(self.weight_q.device) for k, t in
             self.params().items()}
        qdq, codes, scales = tune_fp_ops.mx_qdq_codes(self.weight_q, p["v"], p.get("max_scale"), self.bits, self.kind,
                                                      self.gs)
        return qdq, codes, scales, torch.empty(0, dtype=torch.int32)


def require_tunable(cfg: dict[str, Any], what: str) -> None:
    """Refuses (NotImplementedError naming `what`) a scheme SignRound does not tune: INT, MXFP4 / MXFP8 and
    NVFP4_E5M3 weights are tuned, with activations in full precision or dynamically quantized as upstream's
    wrapper does for those data types."""
    dt = str(cfg.get("data_type", "int"))
    if dt != "int" and _fp_kind(dt, int(cfg["bits"])) is None:
        raise NotImplementedError(
            f"{what}: SignRound tuning (iters > 0) of data_type={dt} bits={cfg['bits']} is not implemented in "
            "fastround yet (INT, MXFP4, MXFP8, NVFP4 and NVFP4_E5M3 are); use iters=0 for RTN / OPT-RTN")
    if dt != "int":
        try:
            fp_act_spec(cfg)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{what}: {exc}") from None


def tuned_layer(orig: torch.nn.Module, cfg: dict[str, Any], settings: SignRoundSettings, device: torch.device,
                tune_bias: bool = False) -> TunedLinear | TunedFPLinear:
    """The tuning wrapper of a quantized layer, by its data type."""
    if _fp_kind(str(cfg.get("data_type", "int")), int(cfg["bits"])) is not None:
        if tune_bias:
            raise NotImplementedError("enable_norm_bias_tuning with MXFP / NVFP layers is not implemented in fastround")
        return TunedFPLinear(orig, cfg, settings, device)
    return TunedLinear(orig, cfg, settings, device, tune_bias=tune_bias)


class TunedNorm(torch.nn.Module):
    """A LayerNorm / RMSNorm during norm/bias tuning: its weight goes through the rounding-free qdq with a trainable
    offset, computed as upstream's wrappers do (RMS: in fp32, the weight applied in the input's dtype)."""

    def __init__(self, orig: torch.nn.Module, settings: SignRoundSettings, device: torch.device) -> None:
        super().__init__()
        self.orig = orig
        self.layer_norm = type(orig).__name__ == "LayerNorm"
        self.v = torch.nn.Parameter(torch.zeros(orig.weight.shape, dtype=torch.float32, device=device))  # [H]
        self.lr = settings.lr_for(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = rounding_free_qdq(self.orig.weight, self.v, 1e-5)
        if self.layer_norm:
            return torch.nn.functional.layer_norm(x, self.orig.normalized_shape, w, self.orig.bias, self.orig.eps)
        eps = getattr(self.orig, "variance_epsilon", None)
        eps = self.orig.eps if eps is None else eps
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def params(self) -> dict[str, torch.Tensor]:
        return {"v": self.v}

    def lr_of(self, key: str) -> tuple[float, bool]:
        return self.lr, False

    def tuned_tensors(self, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if not best:
            return {}
        return {"weight": rounding_free_qdq(self.orig.weight.detach(), best["v"].to(self.v.device), 1e-5).to("cpu")}


_warned_norms: set[str] = set()


def _tunes_norm(module: torch.nn.Module) -> bool:
    """Whether norm/bias tuning wraps this module (upstream's rule: by class name)."""
    name = type(module).__name__
    if "norm" not in name.lower() or isinstance(module, torch.nn.Linear) or type(module) is conv1d_type():
        return False
    known = name == "LayerNorm" or name in _KNOWN_RMS_NORMS
    if not known and name not in _warned_norms:
        _warned_norms.add(name)
        if "RMSNorm" in name:
            logger.warning("norm/bias tuning treats %s as LlamaRMSNorm, as upstream does; check its results", name)
        else:
            logger.warning("norm/bias tuning does not support %s; its weight is left as it is", name)
    return (known or "RMSNorm" in name) and getattr(module, "weight", None) is not None
