"""SignRound (iters > 0), signround.md §2: per block, sign-gradient descent on the rounding offsets V and the range
factors of every quantized layer, so that the block's output on the quantized chain matches the FP block's output.
The numerics of a step live in C++ (tune_ops: the qdq and its straight-through gradient, the sign-SGD update);
this module wraps the layers, feeds batches, tracks the best iteration and hands the final codes to export."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastround import tune_ops
from fastround.blockloop import block_forward as _forward
from fastround.tune_layers import TunedFPLinear, TunedLinear, TunedNorm, _tunes_norm, tuned_layer
from fastround.tune_settings import SignRoundSettings, linear_lr

if TYPE_CHECKING:
    from fastround.compressor import Compressor

logger = logging.getLogger("fastround")

# Block kwargs that hold one value for the whole calibration set (upstream's shared keys): never split per sample.
_SHARED_KEYS = {"position_ids", "cache_position", "position_embeddings", "cu_seqlens"}
# None: device-side best-loss bookkeeping on accelerators only; tests set True to run that path on the CPU.
DEVICE_BOOKKEEPING: bool | None = None


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


def amp_of(comp: Compressor, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of tuning forwards, None for none (amp off, or an fp32 model)."""
    return dtype if comp.amp and dtype != torch.float32 else None


def _autocast_to(device_type: str, amp: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device_type, dtype=amp) if amp is not None else nullcontext()


def _autocast(comp: Compressor, device: torch.device, dtype: torch.dtype) -> Any:
    return _autocast_to(device.type, amp_of(comp, dtype))


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
    with _autocast_to(x.device.type, amp):
        out = _forward(block, x, kw)
    return _masked_mse(out, target, mask.unsqueeze(-1) if mask is not None else None, reduction)


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


Tuned = TunedLinear | TunedFPLinear | TunedNorm


def _wrap(root: torch.nn.Module, block: torch.nn.Module, names: list[str], comp: Compressor,
          settings: SignRoundSettings, imatrix: dict[str, torch.Tensor] | None = None) -> dict[str, Tuned]:
    """Wraps the layers `names` (paths in `root`) and, with norm/bias tuning, the norms of `block` in place.
    `imatrix` (SignRoundV2, alg_ext.collect_imatrix): the layers start from its searched init scales."""
    from fastround.alg_ext import AlgExtLinear

    wrapped: dict[str, Tuned] = {}
    for name in names:
        parent, attr = _parent(root, name)
        if imatrix is not None:
            wrapped[name] = AlgExtLinear(getattr(parent, attr), comp.layer_config[name], settings, comp.device,
                                         imatrix.get(name), tune_bias=settings.enable_norm_bias_tuning)
            continue
        wrapped[name] = tuned_layer(getattr(parent, attr), comp.layer_config[name], settings, comp.device,
                                    tune_bias=settings.enable_norm_bias_tuning)
    if settings.enable_norm_bias_tuning:
        inside = {id(m) for m in block.modules()}
        for name, mod in root.named_modules():
            if id(mod) in inside and name not in wrapped and _tunes_norm(mod):
                wrapped[name] = TunedNorm(mod, settings, comp.device)
    for name, tm in wrapped.items():
        parent, attr = _parent(root, name)
        setattr(parent, attr, tm)
    return wrapped


def _unwrap(root: torch.nn.Module, wrapped: dict[str, Tuned]) -> None:
    for name, tm in wrapped.items():
        parent, attr = _parent(root, name)
        setattr(parent, attr, tm.orig)


def _masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Upstream's loss: both sides masked (mask [B, L, 1] 0/1) in their own dtype, then MSE in fp32."""
    if mask is not None:
        out, target = out * mask, target * mask
    return torch.nn.functional.mse_loss(out.float(), target.float(), reduction=reduction)


class _SignSGD:
    """SignRound's optimizer: the C++ sign-SGD step per lr group on 1000 x loss, lr decayed as torch's LinearLR."""

    def __init__(self, groups: dict[tuple[float, bool], list[torch.Tensor]], settings: SignRoundSettings,
                 momentum: float) -> None:
        self.groups, self.momentum = groups, momentum
        self.bufs = {id(p): torch.zeros_like(p) for ps in groups.values() for p in ps} if momentum else {}
        self.schedules = {lr: linear_lr(lr, settings.iters) for lr, _ in groups}

    def backward(self, loss: torch.Tensor) -> None:
        (loss * 1000).backward()  # fewer bf16 gradients underflow to 0 (no move under sign-SGD)

    def step(self, it: int) -> None:
        # minmax: False for rounding offsets, else the factors' upper bound (True: 1; SignRoundV2's max_scale: 2)
        for (lr, minmax), ps in self.groups.items():
            with_grad = [p for p in ps if p.grad is not None]
            tune_ops.sign_sgd_step_(with_grad, [p.grad for p in with_grad],
                                    [self.bufs[id(p)] for p in with_grad] if self.bufs else [], self.schedules[lr][it],
                                    self.momentum, it == 0, bool(minmax), float(minmax) if minmax else 1.0)
            for p in with_grad:
                p.grad = None


class _TorchOptimizer:
    """AdamRound (enable_adam): torch's optimizer (AdamW by default) as upstream builds it, one group per lr with a
    tensor lr, weight_decay 0, torch's LinearLR to 0; the loss unscaled, or through a GradScaler (init 1024) with
    AMP on an accelerator. Range factors are clamped to [0, 1] after each step, where upstream clamps them before
    the next forward: the same values reach the qdq, the snapshot and the next step."""

    def __init__(self, groups: dict[tuple[float, bool], list[torch.Tensor]], settings: SignRoundSettings,
                 device: torch.device, amp: bool) -> None:
        cls = getattr(torch.optim, settings.optimizer)
        order = sorted(groups, key=lambda k: k[1])  # rounding groups first, as upstream lists them
        self.opt = cls([{"params": groups[k], "lr": torch.tensor(k[0])} for k in order], weight_decay=0)
        self.schedule = torch.optim.lr_scheduler.LinearLR(self.opt, start_factor=1.0, end_factor=0.0,
                                                          total_iters=settings.iters)
        self.factors = [p for (_, minmax), ps in groups.items() if minmax for p in ps]
        self.scaler = (torch.amp.GradScaler(device.type, init_scale=1024, growth_interval=100000)
                       if amp and device.type != "cpu" else None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, it: int) -> None:
        if self.scaler is not None:
            self.scaler.step(self.opt)
        else:
            self.opt.step()
        self.opt.zero_grad()
        self.schedule.step()
        if self.scaler is not None:
            self.scaler.update()
        with torch.no_grad():
            for p in self.factors:
                p.clamp_(0.0, 1.0)


def _optimize(comp: Compressor, settings: SignRoundSettings, label: str, tuned: dict[str, Tuned], n: int,
              micro: int, global_batch: int, loss_of: Callable[[list[int]], torch.Tensor],
              num_elm_of: Callable[[list[int]], int], momentum: float
              ) -> tuple[dict[str, dict[str, torch.Tensor]] | None, str]:
    """The tuning loop shared by blocks and layers outside them: each iteration draws `global_batch` sample
    indices, accumulates gradients over micro-batches of `micro` (loss_of gives a micro-batch's loss), keeps the
    parameters of the best iteration and steps. Returns that snapshot (name -> param -> tensor) and the loss line."""
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    for tm in tuned.values():
        for key, p in tm.params().items():
            groups.setdefault(tm.lr_of(key), []).append(p)
    dev = comp.device
    opt: _SignSGD | _TorchOptimizer = (
        _TorchOptimizer(groups, settings, dev, comp.amp) if settings.enable_adam
        else _SignSGD(groups, settings, momentum))
    sampler = IndexSampler(n, global_batch)
    best_loss, best_iter, init_loss, last_loss = math.inf, 0, None, math.inf
    best: dict[str, dict[str, torch.Tensor]] | None = None
    cache = torch.device("cpu") if comp.low_gpu_mem_usage else dev

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: p.detach().to(cache, copy=True) for k, p in tm.params().items()}
                for name, tm in tuned.items()}

    # On an accelerator the losses (fp64 sums, as upstream's Python floats), the best-loss comparison and the
    # snapshot stay on the device, so an iteration needs no host sync; early stopping needs the host.
    on_device = (dev.type != "cpu" if DEVICE_BOOKKEEPING is None else DEVICE_BOOKKEEPING) and not (
        settings.dynamic_max_gap > 0 and not settings.not_use_best_mse)
    if on_device:
        f64 = {"dtype": torch.float64, "device": dev}
        best_t, best_iter_t = torch.full((), math.inf, **f64), torch.zeros((), dtype=torch.long, device=dev)
        init_t, last_t = torch.zeros((), **f64), torch.zeros((), **f64)
        snap = {name: {k: p.detach().clone() for k, p in tm.params().items()} for name, tm in tuned.items()}
        last_flags = {flag: torch.tensor(flag, device=dev) for flag in (False, True)}
    for it in range(settings.iters):
        idx = sampler.next()
        num_elm = num_elm_of(idx)
        total: Any = torch.zeros((), **f64) if on_device else 0.0
        for start in range(0, len(idx), micro):
            loss = loss_of(idx[start:start + micro])
            if on_device:
                total = total + loss.detach().double() / num_elm
            else:
                total += float(loss.detach()) / num_elm
            opt.backward(loss)
        if on_device:
            if it == 0:
                init_t = total
            last_t = total
            keep = (total < best_t) if not settings.not_use_best_mse else last_flags[it == settings.iters - 1]
            best_t = torch.where(total < best_t, total, best_t)
            best_iter_t = torch.where(keep, it, best_iter_t)
            for name, tm in tuned.items():
                for k, p in tm.params().items():
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
        opt.step(it)
    if on_device and settings.iters > 0:
        best = snap  # the parameters of the best iteration (the last one with not_use_best_mse)
        init_loss, last_loss, best_loss = float(init_t), float(last_t), float(best_t)
        best_iter = int(best_iter_t)
    shown_loss = best_loss if not settings.not_use_best_mse else last_loss
    if settings.not_use_best_mse:
        best_iter = settings.iters  # upstream's log names the last parameters so
    first = init_loss if init_loss is not None else float("nan")
    line = f"loss iter 0: {first:.3e} -> iter {best_iter}: {shown_loss:.3e}"
    return best, line


def tune_block(comp: Compressor, root: torch.nn.Module, block: torch.nn.Module, label: str, names: list[str],
               samples: Samples, train_in: list[torch.Tensor], targets: list[torch.Tensor],
               settings: SignRoundSettings, dtype: torch.dtype, imatrix: dict[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]:
    """Tunes the layers `names` (module paths in `root`) of `block`; returns name -> (qdq, codes, scales, zeros)
    of the best iteration and, with norm/bias tuning, the tuned norm weights and biases by parameter path. The
    block's own modules are restored afterwards. `imatrix`: SignRoundV2 (alg_ext), the layers' FP-input imatrix."""
    t0 = time.perf_counter()
    wrapped = _wrap(root, block, names, comp, settings, imatrix)
    try:
        n = len(train_in)
        bs = min(comp.batch_size, n)
        gas = settings.gradient_accumulate_steps
        reduction = "mean" if gas == 1 else "sum"
        dev = comp.device
        loss_fn = _loss_fn(settings)
        if imatrix is not None:
            from fastround import alg_ext

            loss_fn = alg_ext.loss_fn(comp, block_loss)
        amp = amp_of(comp, dtype)
        # On the device once: a pageable host-to-device copy per step would wait for the queued work.
        masks = [m.to(dev) for m in samples.masks] if samples.masks is not None else None
        valid = [int(m.sum()) for m in samples.masks] if samples.masks is not None else []  # tokens the loss counts

        def loss_of(chunk: list[int]) -> torch.Tensor:
            x, kw = samples.batch(chunk, dev, train_in)
            target = torch.cat([targets[i] for i in chunk], dim=0).to(dev)
            m = torch.cat([masks[i] for i in chunk], dim=0) if masks is not None else None
            return loss_fn(block, x, kw, target, m, reduction, amp)

        def num_elm_of(idx: list[int]) -> int:
            return max(1, sum(valid[i] for i in idx)) if masks is not None else 1

        best, line = _optimize(comp, settings, label, wrapped, n, bs, min(n, bs * gas), loss_of, num_elm_of,
                               settings.momentum)
        results: dict[str, tuple[torch.Tensor, ...]] = {}
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tm in wrapped.items():
                mine = best[name] if best is not None else None
                if isinstance(tm, (TunedLinear, TunedFPLinear)):
                    results[name] = tm.final(mine)
                tensors.update({f"{name}.{k}": t for k, t in tm.tuned_tensors(mine).items()})
        logger.info("%s: tuned %d layers, %s, %.1f s", label, len(names), line, time.perf_counter() - t0)
        return results, tensors
    finally:
        _unwrap(root, wrapped)


def tune_outside(comp: Compressor, name: str, layer: torch.nn.Module, fp_in: list[torch.Tensor],
                 q_in: list[torch.Tensor] | None, masks: list[torch.Tensor] | None, settings: SignRoundSettings,
                 dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Tunes a layer outside the blocks (lm_head) on its cached inputs, upstream's way (signround.md 2.11): the
    target is the FP layer on the FP inputs, the trained layer sees the quantized model's inputs (`q_in`, when
    enable_quanted_input) one sample per forward, with batch_size x gradient_accumulate_steps samples per step
    (so a summed loss) and the token count of the first such batch as the loss normaliser. Upstream passes no
    momentum here, and no norm/bias tuning. Returns (qdq, codes, scales, zeros) of the best iteration."""
    t0 = time.perf_counter()
    tl = tuned_layer(layer, comp.layer_config[name], settings, comp.device)
    dev = comp.device
    n = len(fp_in)
    gas = comp.batch_size * settings.gradient_accumulate_steps
    global_batch = min(n, gas)
    reduction = "mean" if gas == 1 else "sum"
    dev_masks = [m.to(dev) for m in masks] if masks is not None else None
    train = q_in if q_in is not None else fp_in
    num_elm = 1
    if gas != 1:
        first = range(global_batch)
        num_elm = (sum(int(masks[i].sum()) for i in first) if masks is not None
                   else sum(train[i].numel() for i in first))
    num_elm = max(num_elm, 1)

    def loss_of(chunk: list[int]) -> torch.Tensor:
        x = torch.cat([train[i] for i in chunk], dim=0).to(dev)
        with torch.no_grad():
            target = layer(torch.cat([fp_in[i] for i in chunk], dim=0).to(dev))
        with _autocast(comp, dev, dtype):
            out = tl(x)
        m = torch.cat([dev_masks[i] for i in chunk], dim=0).unsqueeze(-1) if dev_masks is not None else None
        return _masked_mse(out, target, m, reduction)

    best, line = _optimize(comp, settings, name, {name: tl}, n, 1, global_batch, loss_of, lambda idx: num_elm, 0.0)
    with torch.no_grad():
        result = tl.final(best[name] if best is not None else None)
    logger.info("%s: tuned, %s, %.1f s", name, line, time.perf_counter() - t0)
    return result


__all__ = ["IndexSampler", "Samples", "Blocks", "split_samples", "tune_block", "tune_outside", "block_outputs"]
