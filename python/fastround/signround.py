"""SignRound (iters > 0), signround.md §2: per block, sign-gradient descent on the rounding offsets V and the range
factors of every quantized layer, so that the block's output on the quantized chain matches the FP block's output.
The numerics of a step live in C++ (tune_ops: the qdq and its straight-through gradient, the sign-SGD update);
this module wraps the layers, feeds batches, tracks the best iteration and hands the final codes to export."""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastround import tune_ops
from fastround.blockloop import block_forward as _forward
from fastround.modeling import conv1d_type, float_dtype

if TYPE_CHECKING:
    from fastround.compressor import Compressor

logger = logging.getLogger("fastround")

# Block kwargs that hold one value for the whole calibration set (upstream's shared keys): never split per sample.
_SHARED_KEYS = {"position_ids", "cache_position", "position_embeddings", "cu_seqlens"}
# None: device-side best-loss bookkeeping on accelerators only; tests set True to run that path on the CPU.
DEVICE_BOOKKEEPING: bool | None = None
_NOT_BUILT = ("enable_adam", "enable_norm_bias_tuning", "enable_alg_ext", "enable_lfq")


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

    @classmethod
    def from_kwargs(cls, iters: int, kwargs: dict[str, Any]) -> SignRoundSettings:
        """Takes the SignRound keys out of `kwargs`; refuses variants fastround does not build yet."""
        s = cls(iters=iters)
        for key in _NOT_BUILT:
            if kwargs.pop(key, False):
                raise NotImplementedError(f"{key}=True is not implemented in fastround's SignRound yet")
        if kwargs.pop("lr_scheduler", None) is not None:
            raise NotImplementedError("a custom lr_scheduler is not supported; the default linear decay is used")
        if kwargs.pop("optimizer", None) is not None:
            logger.warning("optimizer= is ignored: SignRound uses sign-SGD, as upstream")
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
        return s

    def lr_for(self, bits: int) -> float:
        if self.lr is not None:
            return self.lr
        return (2.0 if bits <= 3 and self.iters >= 1000 else 1.0) / self.iters

    def minmax_lr_for(self, bits: int) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.lr_for(bits)

    def scale_thresh(self) -> float:
        return 1e-8 if self.scale_dtype == torch.float32 else 1e-5

    def record(self, global_bits: int) -> dict[str, Any]:
        """The values quantization_config records (upstream writes the global lr, not per-layer ones)."""
        return {"lr": self.lr_for(global_bits), "minmax_lr": self.minmax_lr_for(global_bits),
                "enable_minmax_tuning": self.enable_minmax_tuning, "enable_quanted_input": self.enable_quanted_input,
                "gradient_accumulate_steps": self.gradient_accumulate_steps, "enable_norm_bias_tuning": False}


class TunedLinear(torch.nn.Module):
    """A Linear / Conv1D during tuning: its weight goes through the C++ qdq with this layer's V and factors."""

    def __init__(self, orig: torch.nn.Module, cfg: dict[str, Any], settings: SignRoundSettings,
                 device: torch.device) -> None:
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

    def qdq_weight(self) -> torch.Tensor:
        return tune_ops.int_qdq(self.weight_q, self.v, self.min_scale, self.max_scale, self.wmin, self.wmax,
                                self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conv1D computes x @ W[in, out] + b: the same product as linear with the [out, in] qdq weight.
        return torch.nn.functional.linear(x, self.qdq_weight(), self.orig.bias)

    def params(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v}
        if self.min_scale is not None and self.max_scale is not None:
            out["min_scale"], out["max_scale"] = self.min_scale, self.max_scale
        return out

    def final(self, best: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """(qdq, codes, scales, zeros) from the best parameters (or the current ones)."""
        p = {k: (best[k] if best and k in best else t).detach().to(self.weight_q.device) for k, t in
             self.params().items()}
        return tune_ops.int_qdq_codes(self.weight_q, p["v"], p.get("min_scale"), p.get("max_scale"), self.wmin,
                                      self.wmax, self.spec)


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


class IndexSampler:
    """Upstream's sampler: a shuffled 0..n-1 (Python's global random), B indices per call; when fewer than B
    remain, reshuffle and start over (the tail is dropped)."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch, self.pos = n, batch, 0
        self.order = list(range(n))
        random.shuffle(self.order)

    def next(self) -> list[int]:
        if self.pos + self.batch > self.n:
            random.shuffle(self.order)
            self.pos = 0
        out = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return out


@dataclass
class Samples:
    """The calibration set at one block's input, one entry per sample."""

    hidden: list[torch.Tensor]  # each [1, L, H]: the first block's inputs, until the block loop takes them
    per_sample: list[dict[str, torch.Tensor]]  # kwargs with a batch dimension, split per sample
    shared: dict[str, Any]  # kwargs that hold for every sample (position ids / embeddings, flags)
    masks: list[torch.Tensor] | None  # each [1, L] 0/1: positions the loss counts (upstream's -100 ids excluded)

    def batch(self, idx: list[int], device: torch.device, hidden: list[torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Samples `idx` of `hidden` (a block's inputs along the chain) with their kwargs, on `device`."""
        x = torch.cat([hidden[i] for i in idx], dim=0).to(device)
        kwargs = dict(self.shared)
        for key in self.per_sample[0] if self.per_sample else ():
            kwargs[key] = torch.cat([self.per_sample[i][key] for i in idx], dim=0).to(device)
        return x, kwargs


def split_samples(stored: list[tuple[torch.Tensor, dict[str, Any]]], ids: list[torch.Tensor] | None,
                  nsamples: int) -> Samples:
    """Per-sample lists from the captured batches (upstream caches per sample too)."""
    hidden: list[torch.Tensor] = []
    per: list[dict[str, torch.Tensor]] = []
    shared: dict[str, Any] = {}
    masks: list[torch.Tensor] | None = [] if ids is not None else None
    for bi, (h, extra) in enumerate(stored):
        b = h.shape[0]
        split_keys = [k for k, v in extra.items() if k not in _SHARED_KEYS and isinstance(v, torch.Tensor)
                      and v.dim() > 0 and v.shape[0] == b]
        if bi == 0:
            shared = {k: v for k, v in extra.items() if k not in split_keys}
        for j in range(b):
            hidden.append(h[j:j + 1])
            per.append({k: extra[k][j:j + 1] for k in split_keys})
            if masks is not None and ids is not None:
                masks.append((ids[bi][j:j + 1] != -100).to(torch.long))
    n = min(nsamples, len(hidden))
    return Samples(hidden[:n], per[:n], shared, masks[:n] if masks is not None else None)


class Blocks(torch.nn.Module):
    """nblocks > 1: consecutive blocks tuned as one, the hidden state piped through with the same kwargs."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        for b in self.blocks:
            out = b(hidden, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return hidden


def _amp(comp: Compressor, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of tuning forwards, None for none (amp off, or an fp32 model)."""
    return dtype if comp.amp and dtype != torch.float32 else None


def _autocast(comp: Compressor, device: torch.device, dtype: torch.dtype) -> Any:
    amp = _amp(comp, dtype)
    return torch.autocast(device_type=device.type, dtype=amp) if amp is not None else nullcontext()


def block_outputs(comp: Compressor, block: torch.nn.Module, samples: Samples, hidden: list[torch.Tensor],
                  cache: torch.device, dtype: torch.dtype, in_place: bool = False) -> list[torch.Tensor]:
    """The block's output for every sample, batch_size at a time, no gradient. `in_place`: each output replaces
    its input in `hidden` (returned), so the chain never holds a block's inputs and outputs whole at once."""
    outs: list[torch.Tensor] = hidden if in_place else []
    bs = comp.batch_size
    with torch.no_grad(), _autocast(comp, comp.device, dtype):
        for start in range(0, len(hidden), bs):
            idx = list(range(start, min(start + bs, len(hidden))))
            x, kw = samples.batch(idx, comp.device, hidden)
            y = _forward(block, x, kw).to(cache)
            if in_place:
                outs[start:start + len(idx)] = [y[j:j + 1] for j in range(y.shape[0])]
            else:
                outs.extend(y[j:j + 1] for j in range(y.shape[0]))
    return outs


def block_loss(block: torch.nn.Module, x: torch.Tensor, kw: dict[str, Any], target: torch.Tensor,
               mask: torch.Tensor | None, reduction: str, amp: torch.dtype | None) -> torch.Tensor:
    """Upstream's loss (§2.6): MSE in fp32 of the block's output against the FP target, masked positions zeroed
    in both; `amp` the autocast dtype (None: none)."""
    ctx = torch.autocast(device_type=x.device.type, dtype=amp) if amp is not None else nullcontext()
    with ctx:
        out = _forward(block, x, kw)
    if mask is not None:
        m = mask.unsqueeze(-1)
        out, target = out * m, target * m
    return torch.nn.functional.mse_loss(out.float(), target.float(), reduction=reduction)


_compiled_loss: Any = None
COMPILE_BACKEND = "inductor"  # tests trace with "aot_eager": the same graph, no code generation


def _loss_fn(settings: SignRoundSettings) -> Any:
    """block_loss, compiled once per process when enable_torch_compile (the elementwise work of the block and the
    loss fuse; the C++ qdq op enters the graph through its fake kernel and autograd registration)."""
    global _compiled_loss
    if not settings.compile:
        return block_loss
    if _compiled_loss is None:
        _compiled_loss = torch.compile(block_loss, dynamic=False, backend=COMPILE_BACKEND)
    return _compiled_loss


def _parent(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def _wrap(root: torch.nn.Module, names: list[str], comp: Compressor, settings: SignRoundSettings
          ) -> dict[str, TunedLinear]:
    wrapped: dict[str, TunedLinear] = {}
    for name in names:
        parent, attr = _parent(root, name)
        tl = TunedLinear(getattr(parent, attr), comp.layer_config[name], settings, comp.device)
        setattr(parent, attr, tl)
        wrapped[name] = tl
    return wrapped


def _unwrap(root: torch.nn.Module, wrapped: dict[str, TunedLinear]) -> None:
    for name, tl in wrapped.items():
        parent, attr = _parent(root, name)
        setattr(parent, attr, tl.orig)


def tune_block(comp: Compressor, root: torch.nn.Module, block: torch.nn.Module, label: str, names: list[str],
               samples: Samples, train_in: list[torch.Tensor], targets: list[torch.Tensor],
               settings: SignRoundSettings, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tunes the layers `names` (module paths in `root`) of `block`; returns name -> (qdq, codes, scales, zeros)
    of the best iteration. The block's own modules are restored afterwards."""
    t0 = time.perf_counter()
    wrapped = _wrap(root, names, comp, settings)
    try:
        groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
        for tl in wrapped.values():
            for key, p in tl.params().items():
                minmax = key != "v"
                groups.setdefault((tl.minmax_lr if minmax else tl.lr, minmax), []).append(p)
        bufs = {id(p): torch.zeros_like(p) for ps in groups.values() for p in ps} if settings.momentum else {}
        schedules = {lr: linear_lr(lr, settings.iters) for lr, _ in groups}
        n = len(train_in)
        bs = min(comp.batch_size, n)
        gbs = min(n, bs * settings.gradient_accumulate_steps)
        reduction = "mean" if settings.gradient_accumulate_steps == 1 else "sum"
        sampler = IndexSampler(n, gbs)
        dev = comp.device
        loss_fn = _loss_fn(settings)
        amp = _amp(comp, dtype)
        # On the device once: a pageable host-to-device copy per step would wait for the queued work.
        masks = [m.to(dev) for m in samples.masks] if samples.masks is not None else None
        valid = [int(m.sum()) for m in samples.masks] if samples.masks is not None else []  # tokens the loss counts
        best_loss, best_iter, init_loss, last_loss = math.inf, 0, None, math.inf
        best: dict[str, dict[str, torch.Tensor]] | None = None
        cache = torch.device("cpu") if comp.low_gpu_mem_usage else dev

        def snapshot() -> dict[str, dict[str, torch.Tensor]]:
            return {name: {k: p.detach().to(cache, copy=True) for k, p in tl.params().items()}
                    for name, tl in wrapped.items()}

        # On an accelerator the losses (fp64 sums, as upstream's Python floats), the best-loss comparison and the
        # snapshot stay on the device, so an iteration needs no host sync; early stopping needs the host.
        on_device = (dev.type != "cpu" if DEVICE_BOOKKEEPING is None else DEVICE_BOOKKEEPING) and not (
            settings.dynamic_max_gap > 0 and not settings.not_use_best_mse)
        if on_device:
            f64 = {"dtype": torch.float64, "device": dev}
            best_t, best_iter_t = torch.full((), math.inf, **f64), torch.zeros((), dtype=torch.long, device=dev)
            init_t, last_t = torch.zeros((), **f64), torch.zeros((), **f64)
            snap = {name: {k: p.detach().clone() for k, p in tl.params().items()} for name, tl in wrapped.items()}
            last_flags = {flag: torch.tensor(flag, device=dev) for flag in (False, True)}
        for it in range(settings.iters):
            idx = sampler.next()
            num_elm = 1
            if masks is not None:
                num_elm = max(1, sum(valid[i] for i in idx))
            total: Any = torch.zeros((), **f64) if on_device else 0.0
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                x, kw = samples.batch(chunk, dev, train_in)
                target = torch.cat([targets[i] for i in chunk], dim=0).to(dev)
                m = torch.cat([masks[i] for i in chunk], dim=0) if masks is not None else None
                loss = loss_fn(block, x, kw, target, m, reduction, amp)
                if on_device:
                    total = total + loss.detach().double() / num_elm
                else:
                    total += float(loss.detach()) / num_elm
                (loss * 1000).backward()
            if on_device:
                if it == 0:
                    init_t = total
                last_t = total
                keep = (total < best_t) if not settings.not_use_best_mse else last_flags[it == settings.iters - 1]
                best_t = torch.where(total < best_t, total, best_t)
                best_iter_t = torch.where(keep, it, best_iter_t)
                for name, tl in wrapped.items():
                    for k, p in tl.params().items():
                        torch.where(keep, p.detach(), snap[name][k], out=snap[name][k])
            else:
                logger.debug("%s iter %d loss: %.3e", label, it, total)
                if it == 0:
                    init_loss = total
                last_loss = total
                if total < best_loss:
                    best_loss = total
                    if not settings.not_use_best_mse:
                        best, best_iter = snapshot(), it
                if settings.not_use_best_mse and it == settings.iters - 1:
                    best, best_iter = snapshot(), it
                if not settings.not_use_best_mse and 0 < settings.dynamic_max_gap <= it - best_iter:
                    break
            for (lr, minmax), ps in groups.items():
                with_grad = [p for p in ps if p.grad is not None]
                tune_ops.sign_sgd_step_(with_grad, [p.grad for p in with_grad],
                                        [bufs[id(p)] for p in with_grad] if bufs else [], schedules[lr][it],
                                        settings.momentum, it == 0, minmax)
                for p in with_grad:
                    p.grad = None
        if on_device and settings.iters > 0:
            best = snap  # the parameters of the best iteration (the last one with not_use_best_mse)
            init_loss, last_loss, best_loss = float(init_t), float(last_t), float(best_t)
            best_iter = int(best_iter_t)
        results = {}
        with torch.no_grad():
            for name, tl in wrapped.items():
                results[name] = tl.final(best[name] if best is not None else None)
        shown_loss = best_loss if not settings.not_use_best_mse else last_loss
        if settings.not_use_best_mse:
            best_iter = settings.iters  # upstream's log names the last parameters so
        logger.info("%s: tuned %d layers, loss iter 0: %.3e -> iter %d: %.3e, %.1f s", label, len(wrapped),
                    init_loss if init_loss is not None else float("nan"), best_iter, shown_loss,
                    time.perf_counter() - t0)
        return results
    finally:
        _unwrap(root, wrapped)


__all__ = ["SignRoundSettings", "TunedLinear", "IndexSampler", "Samples", "Blocks", "split_samples", "tune_block",
           "block_outputs"]
