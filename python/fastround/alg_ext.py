"""SignRoundV2, upstream's algorithm extension (enable_alg_ext=True, signround.md §2.12), for INT sym schemes.

What changes against plain SignRound (signround.py), as auto-round 0.16.1's SignRoundV2Quantizer does it:
- While the FP block computes its targets, hooks sum x^2 per input channel of every quantized layer (fp32, over all
  tokens, not normalised): the imatrix.
- Each layer's scale starts from OPT-RTN's imatrix-weighted search (the C++ kernel of the iters=0 flow, fed the
  imatrix as collected, zeros kept) and trains as init_scale * max_scale, max_scale in [0, 2]; min_scale takes no
  part. The qdq and its gradient are the C++ int_qdq op with an init scale; the bound is the sign-SGD op's.
- For bits < 4 or act_bits <= 4 the loss drops the 0.1 % largest |error| elements of each micro-batch and takes the
  mean square of the rest (outlier_loss).
Upstream's other branches: an asym scheme keeps plain SignRound (its wrapper is only swapped for sym schemes);
enable_adam wins over enable_alg_ext (tune_settings); MXFP / NVFP and GGUF double-quant schemes are refused here
(fastround does not tune them with the extension)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from fastround import tune_ops
from fastround.tune_layers import TunedLinear
from fastround.tune_settings import SignRoundSettings

if TYPE_CHECKING:
    from fastround.compressor import Compressor

logger = logging.getLogger("fastround")

FACTOR_MAX = 2.0  # upstream's SignRoundOptimizedWrapperLinear.minmax_scale_bound upper end


def uses_init_scale(comp: Compressor) -> bool:
    """Whether the run takes the SignRoundV2 path: the global scheme is INT sym without double quant (upstream
    decides on the global scheme, not per layer)."""
    s = comp.scheme
    return (str(s.get("data_type", "int")).startswith("int") and s.get("sym") is not False
            and s.get("super_group_size") is None)


def _is_wint4aint4(s: dict[str, Any]) -> bool:
    act_dt, dt = str(s.get("act_data_type") or ""), str(s.get("data_type") or "")
    act4 = "int4" in act_dt or ("int" in act_dt and int(s.get("act_bits") or 16) == 4)
    w4 = "int4" in dt or ("int" in dt and int(s.get("bits") or 16) == 4)
    return act4 and w4


def outlier_loss_applies(comp: Compressor) -> bool:
    """Upstream's switch to the outlier-suppressed loss: act_bits <= 4 or bits < 4 (of the global scheme)."""
    s = comp.scheme
    return int(s.get("act_bits") or 16) <= 4 or int(s["bits"]) < 4


def check(comp: Compressor) -> None:
    """Refuses what fastround's SignRoundV2 does not do, before any block is tuned; logs upstream's notes."""
    s = comp.scheme
    dt = str(s.get("data_type", "int"))
    if dt.endswith("dq") or s.get("super_group_size") is not None:
        raise NotImplementedError(
            f"enable_alg_ext with the double-quant data_type={dt} (GGUF) is not implemented in fastround")
    if not dt.startswith("int"):
        raise NotImplementedError(
            f"enable_alg_ext with data_type={dt} is not implemented in fastround (INT sym schemes are)")
    if not uses_init_scale(comp):
        logger.warning("enable_alg_ext with an asym scheme tunes as plain SignRound, as upstream does")
        return
    for name, cfg in comp.layer_config.items():
        if int(cfg.get("bits", 16)) >= 16:
            continue
        if not str(cfg.get("data_type", "int")).startswith("int"):
            raise NotImplementedError(
                f"layer {name}: enable_alg_ext with data_type={cfg['data_type']} is not implemented in fastround")
        if cfg.get("sym") is False and cfg.get("in_blocks"):
            # Upstream would quantize this layer with the sym init scale and still export it as asym.
            raise NotImplementedError(
                f"layer {name}: enable_alg_ext with an asym layer in a sym scheme is not supported (upstream "
                "quantizes such a layer symmetrically but exports it as asym); drop sym=False for it or the extension")
    logger.info("SignRoundV2 (enable_alg_ext): imatrix-searched init scales, max_scale in [0, %g], %s loss",
                FACTOR_MAX, "outlier-suppressed" if outlier_loss_applies(comp) else "MSE")
    if int(s["bits"]) > 2:
        logger.warning("algorithm extension has only undergone limited validation on W2A16, INT4, MXFP4 and NVFP4 "
                       "(upstream's note); use with caution")


@contextmanager
def collect_imatrix(comp: Compressor, model: torch.nn.Module, names: list[str]
                    ) -> Iterator[dict[str, torch.Tensor] | None]:
    """Around the FP forward of a block (its targets): yields name -> imatrix [in] fp32, filled by hooks on the
    layers `names` while the body runs (upstream's register_fp_input_forward_hooks). None when the run does not take
    the SignRoundV2 path; an empty dict for W4A4 INT, where upstream collects none (the search weighs uniformly)."""
    settings: SignRoundSettings | None = comp.signround
    if settings is None or not settings.enable_alg_ext or not uses_init_scale(comp):
        yield None
        return
    if _is_wint4aint4(comp.scheme):
        yield {}
        return
    from fastround.blockloop import _Imatrix

    im = _Imatrix()
    for n in names:
        im.attach(n, model.get_submodule(n))
    try:
        yield im.sums
    finally:
        im.detach()


class AlgExtLinear(TunedLinear):
    """A Linear / Conv1D under SignRoundV2: the qdq's scale is init_scale * max_scale, init_scale [out, G] from the
    imatrix-weighted search of the layer's FP weight, max_scale trained in [0, FACTOR_MAX]."""

    def __init__(self, orig: torch.nn.Module, cfg: dict[str, Any], settings: SignRoundSettings,
                 device: torch.device, imatrix: torch.Tensor | None, tune_bias: bool = False) -> None:
        super().__init__(orig, cfg, settings, device, tune_bias=tune_bias)
        if not self.spec.sym:
            raise NotImplementedError("SignRoundV2's init scale needs a sym layer")
        init = tune_ops.int_init_scale(self.weight_q, self.spec.bits, self.spec.group_size, imatrix,
                                       self.spec.scale_thresh)
        # [out, G] fp32 holding the weight-dtype values exactly: upstream multiplies them by max_scale in fp32
        self.init_scale = init.to(torch.float32).contiguous()

    def qdq_weight(self) -> torch.Tensor:
        return tune_ops.int_qdq(self.weight_q, self.v, None, self.max_scale, self.wmin, self.wmax, self.spec,
                                self.init_scale)

    def lr_of(self, key: str) -> tuple[float, bool | float]:
        """As TunedLinear's, with the factors' upper bound in place of True."""
        lr, factor = super().lr_of(key)
        return (lr, FACTOR_MAX) if factor else (lr, False)

    def final(self, best: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        p = {k: (best[k] if best and k in best else t).detach().to(self.weight_q.device) for k, t in
             self.params().items()}
        return tune_ops.int_qdq_codes(self.weight_q, p["v"], None, p.get("max_scale"), self.wmin, self.wmax,
                                      self.spec, self.init_scale)


def outlier_loss(block: torch.nn.Module, x: torch.Tensor, kw: dict[str, Any], target: torch.Tensor,
                 mask: torch.Tensor | None, reduction: str, amp: torch.dtype | None) -> torch.Tensor:
    """Upstream's outlier-suppressed loss: the k = max(1, numel/1000) largest |out - target| elements (in the
    outputs' dtype) are dropped, then the mean in fp32 of (|out - target| * token mask * kept)^2 over every element.
    `reduction` is ignored: upstream takes the mean with gradient accumulation too. A torch expression, not a
    kernel: bit-equality needs torch's own topk ties and mean reduction order, and autograd flows through it."""
    from fastround.signround import _autocast_to
    from fastround.blockloop import block_forward

    with _autocast_to(x.device.type, amp):
        out = block_forward(block, x, kw)
    diff = torch.abs(out - target)
    flat = diff.view(-1)
    k = max(1, int(flat.numel() / 1000))
    _, top = torch.topk(torch.abs(flat), k)
    dropped = torch.zeros_like(flat, dtype=torch.bool)
    dropped[top] = True
    kept = (~dropped).view_as(diff)
    with _autocast_to(x.device.type, amp):
        err = torch.abs(out.to(torch.float32) - target.to(torch.float32))
        if mask is not None:
            err = err * mask.unsqueeze(-1)
        return torch.mean((err * kept) ** 2)


def loss_fn(comp: Compressor, plain: Any) -> Any:
    """The block loss of a SignRoundV2 run: outlier_loss where upstream switches to it, else `plain` (block_loss,
    never compiled: upstream's extension does not compile the block forward either)."""
    return outlier_loss if outlier_loss_applies(comp) else plain


__all__ = ["AlgExtLinear", "FACTOR_MAX", "check", "collect_imatrix", "loss_fn", "outlier_loss", "uses_init_scale"]
