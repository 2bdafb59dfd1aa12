"""The block loop: capture the first block's inputs (positional and keyword: attention mask, position ids and
embeddings; no cache), then run each block once on the device, collecting the imatrix of its layers, and
quantize them through the C++ kernels. Only one block is on the device at a time."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fastround.layer_plan import quantizes_weight
from fastround.modeling import is_moe_model

if TYPE_CHECKING:
    from fastround.compressor import Compressor

logger = logging.getLogger("fastround")


class _StopForward(Exception):
    """Raised by the capture hook: once the first block's inputs are stored, the rest of the model is skipped."""


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def _targets(comp: Compressor, block: str) -> list[str]:
    cfg = comp.layer_config
    return [n for n in cfg if cfg[n].get("in_blocks") and n.startswith(block + ".") and quantizes_weight(cfg[n])]


class _Imatrix:
    """Per-layer sum of squared inputs per channel (fp32) and the number of rows (batch dim) seen, as upstream."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.handles: list[Any] = []

    def attach(self, name: str, module: torch.nn.Module) -> None:
        def hook(mod: torch.nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if isinstance(args, (tuple, list)) else args
            sq = x.reshape(-1, x.shape[-1]).to(torch.float32).pow(2).sum(dim=0)
            if name in self.sums:
                self.sums[name] += sq.to(self.sums[name].device)
                self.count[name] += int(x.shape[0])
            else:
                self.sums[name] = sq
                self.count[name] = int(x.shape[0])

        self.handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def mean(self, name: str) -> torch.Tensor | None:
        if name not in self.sums:
            return None
        return (self.sums[name] / self.count[name]).to("cpu").contiguous()


def _capture(comp: Compressor, model: torch.nn.Module, first_block: str, outside: list[str]) -> tuple[list, _Imatrix]:
    """Run the calibration batches through the model until the first block; keep its inputs per batch."""
    from fastround.calib import clamp_seqlen, get_calibration_batches

    if comp.tokenizer is None and _needs_tokenizer(comp.dataset):
        raise ValueError("calibration data given as text needs a tokenizer: pass tokenizer= to AutoRound")
    comp.seqlen = clamp_seqlen(comp.seqlen, model, comp.tokenizer)
    batches, bs = get_calibration_batches(
        comp.dataset, comp.tokenizer, seqlen=comp.seqlen, nsamples=comp.nsamples, batch_size=comp.batch_size,
        seed=comp.seed,
    )
    comp.batch_size = bs
    cache_dev = torch.device("cpu") if comp.low_gpu_mem_usage else comp.device
    block = _module(model, first_block)
    stored: list[tuple[torch.Tensor, dict[str, Any]]] = []
    imatrix = _Imatrix()

    def pre_hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        for i, a in enumerate(args[1:]):
            extra[f"__arg{i + 1}"] = a
        stored.append((hidden.detach().to(cache_dev), _to(extra, cache_dev)))
        if not outside:
            raise _StopForward

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for name in outside:
        imatrix.attach(name, _module(model, name))
    # Everything but the blocks goes to the device for this pass; blocks move one at a time later.
    blocks = {b for g in comp.plan.block_names for b in g}  # type: ignore[union-attr]
    moved = _move_non_blocks(model, blocks, comp.device)
    from tqdm.auto import tqdm

    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", leave=False):
                try:
                    model(**_to(batch, comp.device), use_cache=False)
                except _StopForward:
                    pass
                seen += int(batch["input_ids"].shape[0])
                if seen >= comp.nsamples:
                    break
    finally:
        handle.remove()
        imatrix.detach()
        _move_back(moved)
    if not stored:
        raise ValueError(f"no calibration sample reached the first block (dataset {comp.dataset!r})")
    return stored, imatrix


def _needs_tokenizer(dataset: Any) -> bool:
    if isinstance(dataset, str):
        return True
    if isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], str):
        return True
    return False


def _move_non_blocks(model: torch.nn.Module, blocks: set[str], device: torch.device) -> list:
    if device.type == "cpu":
        return []
    moved = []
    for name, mod in model.named_modules():
        if name in blocks or any(name.startswith(b + ".") for b in blocks):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if p.device != device:
                moved.append((mod, pname, p.device))
                setattr_tensor(mod, pname, p.to(device))
    return moved


def setattr_tensor(mod: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    if name in mod._parameters:
        mod._parameters[name].data = value
    else:
        mod._buffers[name] = value


def _move_back(moved: list) -> None:
    for mod, pname, dev in moved:
        t = mod._parameters.get(pname) if pname in mod._parameters else mod._buffers.get(pname)
        if t is not None:
            setattr_tensor(mod, pname, t.to(dev))


def _block_forward(block: torch.nn.Module, hidden: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
    args = [hidden] + [extra[k] for k in sorted(k for k in extra if k.startswith("__arg"))]
    kwargs = {k: v for k, v in extra.items() if not k.startswith("__arg")}
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run(comp: Compressor, model: torch.nn.Module, fmt: str) -> None:
    """Quantize every planned layer: zero-shot block by block, or with an imatrix from calibration data."""
    from tqdm.auto import tqdm

    from fastround.compressor import layer_opt_rtn, record_layer

    plan = comp.plan
    assert plan is not None
    moe = is_moe_model(model)
    cfg = comp.layer_config
    outside = [n for n in cfg if not cfg[n].get("in_blocks") and quantizes_weight(cfg[n])]
    groups = [g for g in plan.block_names if g]
    data_driven = comp.use_imatrix
    stored: list = []
    outside_imatrix = None
    if data_driven:
        stored, outside_imatrix = _capture(comp, model, groups[0][0], outside)
    cache_dev = torch.device("cpu") if comp.low_gpu_mem_usage else comp.device
    total = sum(len(g) for g in groups)
    bar = tqdm(total=total, desc="quantizing blocks")
    try:
        for gi, group in enumerate(groups):
            for block_name in group:
                bar.set_postfix_str(block_name, refresh=False)
                names = _targets(comp, block_name)
                imatrix = _Imatrix()
                if data_driven and gi == 0:
                    block = _module(model, block_name)
                    home = next(block.parameters()).device
                    block.to(comp.device)
                    for n in names:
                        imatrix.attach(n, _module(model, n))
                    outputs = []
                    with torch.no_grad():
                        for hidden, extra in stored:
                            out = _block_forward(block, hidden.to(comp.device), _to(extra, comp.device))
                            outputs.append((out.detach().to(cache_dev), extra))
                    imatrix.detach()
                    block.to(home)
                    stored = outputs  # the FP chain feeds the next block (no quantized-input chain for RTN)
                for n in names:
                    record_layer(comp, n, _module(model, n), cfg[n], fmt, imatrix.mean(n), layer_opt_rtn(comp, n, moe))
                bar.update(1)
    finally:
        bar.close()
    for n in outside:
        im = outside_imatrix.mean(n) if outside_imatrix is not None else None
        record_layer(comp, n, _module(model, n), cfg[n], fmt, im, layer_opt_rtn(comp, n, moe))
