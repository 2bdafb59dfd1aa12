"""SignRound's arguments (signround.md §1.1, §2.14): parsed and checked once, with upstream's defaults, and the
learning-rate schedule they imply."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fastround.modeling import float_dtype

logger = logging.getLogger("fastround")

_NOT_BUILT = ("enable_lfq",)


@dataclass
class SignRoundSettings:
    """The SignRound arguments of AutoRound(...), with upstream's defaults (signround.md §1.1, §2.14)."""

    iters: int = 200
    lr: float | None = None  # None: 1/iters (2/iters for layers of <= 3 bits when iters >= 1000), per layer
    minmax_lr: float | None = None  # None: the layer's lr
    momentum: float = 0.0
    nblocks: int = 1
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    not_use_best_mse: bool = False
    dynamic_max_gap: int = -1
    gradient_accumulate_steps: int = 1
    scale_dtype: torch.dtype = torch.float16
    deterministic: bool = False  # enable_deterministic_algorithms: torch raises on nondeterministic ops
    compile: bool = False  # enable_torch_compile: the block's forward and loss go through torch.compile
    enable_adam: bool = False  # AdamRound: a torch optimizer (AdamW) instead of sign-SGD, no x1000 loss scaling
    optimizer: str = "AdamW"  # the torch.optim class enable_adam uses
    enable_norm_bias_tuning: bool = False  # also tune norm weights and quantized layers' biases (experimental)
    enable_alg_ext: bool = False  # SignRoundV2 (alg_ext.py): imatrix-searched init scale, max_scale in [0, 2]

    @classmethod
    def from_kwargs(cls, iters: int, kwargs: dict[str, Any]) -> SignRoundSettings:
        """Takes the SignRound keys out of `kwargs`; refuses variants fastround does not build yet."""
        s = cls(iters=iters)
        for key in _NOT_BUILT:
            if kwargs.pop(key, False):
                raise NotImplementedError(f"{key}=True is not implemented in fastround's SignRound yet")
        if kwargs.pop("lr_scheduler", None) is not None:
            raise NotImplementedError("a custom lr_scheduler is not supported; the default linear decay is used")
        s.enable_adam = bool(kwargs.pop("enable_adam", False))
        s.enable_norm_bias_tuning = bool(kwargs.pop("enable_norm_bias_tuning", False))
        s.enable_alg_ext = bool(kwargs.pop("enable_alg_ext", False))
        if s.enable_alg_ext and s.enable_adam:
            # upstream's config resolution picks AdamRound first and never looks at enable_alg_ext
            logger.warning("enable_alg_ext is ignored with enable_adam (AdamRound takes precedence, as upstream)")
            s.enable_alg_ext = False
        optimizer = kwargs.pop("optimizer", None)
        if optimizer is not None and not s.enable_adam:
            logger.warning("optimizer= is ignored: SignRound uses sign-SGD, as upstream (enable_adam=True takes one)")
        elif optimizer is not None:
            s.optimizer = _optimizer_name(optimizer)
        if s.enable_norm_bias_tuning:
            logger.warning("enable_norm_bias_tuning is experimental (upstream supports it for few models)")
        s.compile = bool(kwargs.pop("enable_torch_compile", False))
        s.deterministic = bool(kwargs.pop("enable_deterministic_algorithms", False))
        for key in ("lr", "minmax_lr"):
            value = kwargs.pop(key, None)
            if value is not None:
                if not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"{key} must be a positive number, got {value!r}")
                setattr(s, key, float(value))
        for key, kind in (("momentum", float), ("nblocks", int), ("dynamic_max_gap", int),
                          ("gradient_accumulate_steps", int)):
            value = kwargs.pop(key, None)
            if value is not None:
                setattr(s, key, kind(value))
        for key in ("enable_minmax_tuning", "enable_quanted_input", "not_use_best_mse"):
            value = kwargs.pop(key, None)
            if value is not None:
                setattr(s, key, bool(value))
        sd = kwargs.pop("scale_dtype", None)
        if sd is not None:
            s.scale_dtype = float_dtype(sd, "scale_dtype")
        if s.nblocks < 1:
            raise ValueError(f"nblocks must be >= 1, got {s.nblocks}")
        if s.gradient_accumulate_steps < 1:
            raise ValueError(f"gradient_accumulate_steps must be >= 1, got {s.gradient_accumulate_steps}")
        if not 0 <= s.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {s.momentum}")
        if s.enable_adam and s.momentum:
            logger.warning("momentum=%s is ignored with enable_adam (the optimizer keeps its own moments)", s.momentum)
        return s

    def lr_for(self, bits: int | None) -> float:
        """The rounding lr of a layer of `bits` (None: a norm, which has no bit width)."""
        if self.lr is not None:
            return self.lr
        return (2.0 if bits is not None and bits <= 3 and self.iters >= 1000 else 1.0) / self.iters

    def minmax_lr_for(self, bits: int) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.lr_for(bits)

    def scale_thresh(self) -> float:
        return 1e-8 if self.scale_dtype == torch.float32 else 1e-5

    def record(self, global_bits: int) -> dict[str, Any]:
        """The values quantization_config records (upstream writes the global lr, not per-layer ones)."""
        return {"lr": self.lr_for(global_bits), "minmax_lr": self.minmax_lr_for(global_bits),
                "enable_minmax_tuning": self.enable_minmax_tuning, "enable_quanted_input": self.enable_quanted_input,
                "gradient_accumulate_steps": self.gradient_accumulate_steps,
                "enable_norm_bias_tuning": self.enable_norm_bias_tuning}


def _optimizer_name(optimizer: Any) -> str:
    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", repr(optimizer))
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or (
            not isinstance(optimizer, str) and optimizer is not cls):
        raise ValueError(f"optimizer={optimizer!r} is not a torch.optim optimizer (e.g. 'AdamW')")
    return name


def linear_lr(lr: float, iters: int) -> list[float]:
    """The lr of each step under upstream's schedule: torch's LinearLR (1 -> 0 over iters) on an fp32 tensor lr,
    which updates recursively, lr_t = fp32(lr_(t-1) * fp32(1 - 1 / (iters - t + 1))), not lr * (1 - t / iters)."""
    import numpy as np

    out, cur = [], np.float32(lr)
    for t in range(iters):
        if t > 0:
            cur = np.float32(cur * np.float32(1.0 + (-1.0) / (iters * 1.0 + (t - 1) * (-1.0))))
        out.append(float(cur))
    return out
