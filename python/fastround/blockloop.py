"""The block loop: capture the first block's inputs (positional and keyword: attention mask, position ids and
embeddings; no cache), then run each block once on the device, collecting the imatrix of its layers, and
quantize them through the C++ kernels. Only one block is on the device at a time."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from fastround.layer_plan import quantizes_weight
from fastround.modeling import conv1d_type, is_moe_model

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


def _capture(comp: Compressor, model: torch.nn.Module, first_block: str | None, outside: list[str],
             ids: list[torch.Tensor] | None = None, layer_inputs: dict[str, list[torch.Tensor]] | None = None
             ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the calibration batches through the model until the first block; keep its inputs per batch (and, in
    `ids`, each batch's token ids with upstream's loss-excluded positions set to -100). With `outside` layers
    the whole model runs (for the caller's hooks on them) and, given `layer_inputs`, their inputs are kept there
    per sample (SignRound tunes them on those). No `first_block`: only the outside layers are captured."""
    from fastround.calib import clamp_seqlen, get_calibration_batches, loss_input_ids

    if comp.tokenizer is None and _needs_tokenizer(comp.dataset):
        raise ValueError("calibration data given as text needs a tokenizer: pass tokenizer= to AutoRound")
    comp.seqlen = clamp_seqlen(comp.seqlen, model, comp.tokenizer)
    batches, bs = get_calibration_batches(
        comp.dataset, comp.tokenizer, seqlen=comp.seqlen, nsamples=comp.nsamples, batch_size=comp.batch_size,
        seed=comp.seed,
    )
    comp.batch_size = bs
    cache_dev = torch.device("cpu") if comp.low_gpu_mem_usage else comp.device
    block = _module(model, first_block) if first_block is not None else None
    stored: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def pre_hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        for i, a in enumerate(args[1:]):
            extra[f"__arg{i + 1}"] = a
        stored.append((hidden.detach().to(cache_dev), _to(extra, cache_dev)))
        if not outside:
            raise _StopForward

    def keep_input(name: str) -> Any:
        def hook(mod: torch.nn.Module, args: tuple, output: Any) -> None:
            assert layer_inputs is not None
            layer_inputs.setdefault(name, []).extend(args[0].detach().to(cache_dev).split(1, dim=0))

        return hook

    handles = [block.register_forward_pre_hook(pre_hook, with_kwargs=True)] if block is not None else []
    if layer_inputs is not None:
        handles += [_module(model, name).register_forward_hook(keep_input(name)) for name in outside]
    # Everything but the blocks goes to the device for this pass; blocks move one at a time later (all of it when
    # the outside layers' inputs are kept: the pass runs the tuned blocks too).
    blocks = {b for g in comp.plan.block_names for b in g} if layer_inputs is None else set()  # type: ignore
    moved = _move_non_blocks(model, blocks, comp.device)
    from tqdm.auto import tqdm

    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", leave=False):
                before = len(stored)
                try:
                    model(**_to(batch, comp.device), use_cache=False)
                except _StopForward:
                    pass
                if ids is not None and len(stored) > before:
                    ids.append(loss_input_ids(batch["input_ids"], comp.tokenizer))
                seen += int(batch["input_ids"].shape[0])
                if seen >= comp.nsamples:
                    break
    finally:
        for h in handles:
            h.remove()
        _move_back(moved)
    if not stored and block is not None:
        raise ValueError(f"no calibration sample reached the first block (dataset {comp.dataset!r})")
    return stored


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


def block_forward(block: torch.nn.Module, hidden: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
    """A block's output for captured inputs: extra positional args (`__argN`) back in place, output[0]."""
    args = [hidden] + [extra[k] for k in sorted(k for k in extra if k.startswith("__arg"))]
    kwargs = {k: v for k, v in extra.items() if not k.startswith("__arg")}
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run(comp: Compressor, model: torch.nn.Module, fmt: str, cast_to: torch.dtype | None = None) -> None:
    """Quantize every planned layer: zero-shot block by block, or with an imatrix from calibration data. With
    `cast_to`, the model is cast to that dtype on the way: each block just before its turn."""
    from tqdm.auto import tqdm

    from fastround.compressor import layer_opt_rtn, record_layer
    from fastround.mapped import PageReleaser
    from fastround.modeling import cast_module, cast_outside_blocks
    from fastround.tune_layers import fp_act_spec

    plan = comp.plan
    assert plan is not None
    moe = is_moe_model(model)
    cfg = comp.layer_config
    outside = [n for n in cfg if not cfg[n].get("in_blocks") and quantizes_weight(cfg[n])]
    groups = [g for g in plan.block_names if g]
    nv = _nv_rtn_layers(comp, model, groups, outside)
    # NVFP4's input global scales come from a calibration forward even for plain RTN, as upstream (act
    # nv_fp4_with_static_gs needs calibration)
    data_driven = comp.use_imatrix or any(fp_act_spec(cfg[n]) is not None for n in nv)
    # the calibration pass goes past the blocks only to reach the NVFP4 outside layers (their input maxima)
    past_blocks = [n for n in outside if n in nv]
    if cast_to is not None and data_driven and past_blocks:
        cast_module(model, cast_to)  # the calibration pass runs every block to reach the layers after them
        cast_to = None
    elif cast_to is not None:
        cast_outside_blocks(model, {b for g in groups for b in g}, cast_to)
    stored: list = []
    outside_act_max: dict[str, torch.Tensor] = {}  # NVFP4 outside layers' max |input| over the FP model's pass
    if data_driven:
        handles = _nv_act_max_hooks(comp, model, past_blocks, outside_act_max)
        try:
            stored = _capture(comp, model, groups[0][0], past_blocks)
        finally:
            for h in handles:
                h.remove()
    cache_dev = torch.device("cpu") if comp.low_gpu_mem_usage else comp.device
    total = sum(len(g) for g in groups)
    bar = tqdm(total=total, desc="quantizing blocks")
    try:
        for gi, group in enumerate(groups):
            for block_name in group:
                bar.set_postfix_str(block_name, refresh=False)
                if cast_to is not None:
                    cast_module(_module(model, block_name), cast_to)
                names = _targets(comp, block_name)
                for n in names:
                    comp.rotate_layer(n, _module(model, n))
                imatrix = _Imatrix()
                act_max: dict[str, torch.Tensor] = {}
                if data_driven and gi == 0:
                    block = _module(model, block_name)
                    home = next(block.parameters()).device
                    block.to(comp.device)
                    if comp.use_imatrix:
                        for n in names:
                            imatrix.attach(n, _module(model, n))
                    handles = _nv_act_max_hooks(comp, model, names, act_max)  # in the same FP forward, as upstream
                    outputs = []
                    try:
                        with torch.no_grad():
                            for hidden, extra in stored:
                                out = block_forward(block, hidden.to(comp.device), _to(extra, comp.device))
                                outputs.append((out.detach().to(cache_dev), extra))
                    finally:  # hooks off and the block home whether or not the forward raised
                        for h in handles:
                            h.remove()
                        imatrix.detach()
                        block.to(home)
                    stored = outputs  # the FP chain feeds the next block (no quantized-input chain for RTN)
                nv_names = [n for n in names if n in nv]
                nv_scales = _nv_global_scales(comp, model, [block_name], nv_names, act_max) if nv_names else {}
                release = PageReleaser()  # the mappings as they are now; one read for the block's layers
                for n in names:
                    if n in nv_scales:
                        _record_nv_rtn(comp, n, _module(model, n), cfg[n], fmt, nv_scales[n], imatrix.mean(n),
                                       layer_opt_rtn(comp, n, moe), release)
                        continue
                    record_layer(comp, n, _module(model, n), cfg[n], fmt, imatrix.mean(n), layer_opt_rtn(comp, n, moe),
                                 release)
                bar.update(1)
    finally:
        bar.close()
    # No imatrix outside the blocks, for any data type: upstream's OPT-RTN collects it inside them only, so these
    # layers' searches are unweighted.
    release = PageReleaser()
    for n in outside:
        comp.rotate_layer(n, _module(model, n))
        if n in nv:
            _record_nv_outside_rtn(comp, model, n, fmt, outside_act_max, layer_opt_rtn(comp, n, moe), release)
            continue
        record_layer(comp, n, _module(model, n), cfg[n], fmt, None, layer_opt_rtn(comp, n, moe), release)


def _nv_rtn_layers(comp: Compressor, model: torch.nn.Module, groups: list[list[str]], outside: list[str]
                   ) -> set[str]:
    """The NVFP4 layers RTN quantizes; refuses, by name, the cases fastround does not build yet."""
    cfg = comp.layer_config
    nv = {n for n in cfg if quantizes_weight(cfg[n]) and _is_nv_fp(cfg[n])}
    if not nv:
        return nv
    later = [n for g in groups[1:] for b in g for n in _targets(comp, b) if n in nv]
    if later:
        raise NotImplementedError(f"NVFP4 RTN of layers after the first group of blocks ({later[:3]}) is not "
                                  "implemented in fastround yet (their calibrated input maxima are not collected)")
    return nv


def _record_nv_rtn(comp: Compressor, name: str, module: torch.nn.Module, cfg: dict[str, Any], fmt: str,
                   global_scales: dict[str, torch.Tensor], imatrix: torch.Tensor | None, opt_rtn: bool,
                   release: PageReleaser | None = None) -> None:
    """An NVFP4 layer's RTN: the SignRound qdq at V = 0 under the block-calibrated weight global scale, with
    OPT-RTN's searched range factor unless plain RTN was asked for (upstream's opt_rtn_nv_fp4 / nv_fp4)."""
    from fastround import tune_fp_ops
    from fastround.compressor import record_codes
    from fastround.mapped import span

    conv = type(module) is conv1d_type()
    w = module.weight.data
    w2 = (w.t() if conv else w).detach().contiguous()  # [out, in]
    factor = tune_fp_ops.nv_opt_rtn_range(w2, imatrix) if opt_rtn else None
    qdq, codes, scales = tune_fp_ops.mx_qdq_codes(w2, None, factor, 4, "nv_fp",
                                                  float(global_scales["weight_global_scale"][0]))
    if comp._packer is None:
        _set_weight(module, qdq)
    record_codes(comp, name, module, cfg, fmt, codes, scales, torch.empty(0, dtype=torch.int32), global_scales)
    source = span(w)
    if release is not None and source is not None:
        release([source])  # as record_layer: the memory-mapped source's pages go back once the layer is recorded


def _record_nv_outside_rtn(comp: Compressor, model: torch.nn.Module, name: str, fmt: str,
                           act_max: dict[str, torch.Tensor], opt_rtn: bool, release: PageReleaser | None = None
                           ) -> None:
    """An NVFP4 layer outside the blocks by RTN, with no imatrix (as upstream): its own weight global scale
    (nothing to fuse with) and the input's from `act_max`, the FP calibration pass's maximum. One rule for RTN and
    for a layer SignRound's pass never reached: an activation-quantized layer without a maximum is refused."""
    from fastround.tune_layers import fp_act_spec

    cfg = comp.layer_config[name]
    if fp_act_spec(cfg) is not None and name not in act_max:
        raise ValueError(f"NVFP4 layer {name}: the calibration pass never reached it, so it has no input maximum "
                         "for its static input global scale (upstream fails at export)")
    scales = _nv_global_scales(comp, model, [], [name], act_max)[name]
    _record_nv_rtn(comp, name, _module(model, name), cfg, fmt, scales, None, opt_rtn, release)


def run_tuned(comp: Compressor, model: torch.nn.Module, fmt: str) -> None:
    """SignRound: per block (nblocks at a time), the FP block's outputs are the target, the block trains on the
    quantized chain's inputs (the FP ones for the first), then its quantized outputs feed the next block. Quantized
    layers outside the blocks (lm_head) are tuned last on their inputs from the calibration pass (FP model) and,
    with enable_quanted_input, from a second pass over the quantized model, as upstream does."""
    from tqdm.auto import tqdm

    from fastround import signround
    from fastround.alg_ext import check as alg_ext_check, collect_imatrix
    from fastround.compressor import record_codes

    settings = comp.signround
    plan = comp.plan
    assert plan is not None and settings is not None
    cfg = comp.layer_config
    from fastround.tune_layers import quantize_inputs, require_tunable

    for name in plan.quantized():
        require_tunable(cfg[name], f"layer {name}")
    outside = [n for n in cfg if not cfg[n].get("in_blocks") and quantizes_weight(cfg[n])]
    outside_in: dict[str, list[torch.Tensor]] = {}
    outside_ids: list[torch.Tensor] = []
    groups = [g for g in plan.block_names if g]
    model.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    cache = torch.device("cpu") if comp.low_gpu_mem_usage else comp.device
    bar = tqdm(total=sum(len(g) for g in groups), desc="tuning blocks")
    resume = None
    if comp.resume_dir is not None:
        from fastround.tune_resume import TuneResume, run_fingerprint

        resume = TuneResume.open(comp.resume_dir, run_fingerprint(comp))
        comp.tune_state = resume
    if settings.enable_alg_ext:
        alg_ext_check(comp)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        for gi, group in enumerate(groups):
            ids: list[torch.Tensor] = []
            # The first pass also keeps the outside layers' FP inputs (it then runs the whole model).
            keep = outside if gi == 0 else []
            stored = _capture(comp, model, group[0], keep, ids, outside_in if keep else None)
            if keep:
                outside_ids = list(ids)
            samples = signround.split_samples(stored, ids or None, comp.nsamples)
            del stored
            fp_in: list[torch.Tensor] = [h.to(cache) for h in samples.hidden]
            samples.hidden = []  # the chain lists own the hidden states now; this one would pin block 0's inputs
            q_in: list[torch.Tensor] | None = None
            for start in range(0, len(group), settings.nblocks):
                block_names = group[start:start + settings.nblocks]
                mods = [_module(model, b) for b in block_names]
                homes = [next(m.parameters()).device for m in mods]
                for m in mods:
                    m.to(comp.device)
                unit = mods[0] if len(mods) == 1 else signround.Blocks(mods)
                bar.set_postfix_str(",".join(block_names), refresh=False)
                names = [n for b in block_names for n in _targets(comp, b)]
                with collect_imatrix(comp, model, names) as imatrix:  # SignRoundV2 only: the FP forward's imatrix
                    targets = signround.block_outputs(comp, unit, samples, fp_in, cache, dtype)
                for n in names:
                    # After the FP targets, before the wrappers (upstream rotates at the first weight qdq of the
                    # tuning loop): the targets are the unrotated block's, the tuned weights are the rotated ones
                    # and the layer's online hook rotates their inputs, in tuning and in the chain after it.
                    comp.rotate_layer(n, _module(model, n))
                train_in = q_in if (q_in is not None and settings.enable_quanted_input) else fp_in
                nv_inputs = _nv_calibrate(comp, model, unit, block_names, names, samples, train_in, cache, dtype)
                if train_in is not fp_in:
                    fp_in = []  # only the targets needed them: free them before tuning, as upstream does
                results: dict[str, tuple[torch.Tensor, ...]] = {}
                tensors: dict[str, torch.Tensor] = {}  # tuned norm weights / biases (norm/bias tuning)
                key = ",".join(block_names)
                if resume is not None and resume.done(key):
                    results, rng, tensors = resume.load(key)  # tuned before an interruption: replay, do not tune
                    random.setstate(rng)
                elif names:
                    results, tensors = signround.tune_block(comp, model, unit, key, names, samples, train_in,
                                                            targets, settings, dtype, imatrix)
                    if resume is not None:
                        resume.commit(key, results, random.getstate(), tensors)
                for n, (qdq, _, _, _) in results.items():
                    _set_weight(_module(model, n), qdq)
                    quantize_inputs(_module(model, n), cfg[n])  # act_bits <= 8: the quantized chain sees qdq inputs
                for path, value in tensors.items():
                    mod_name, _, attr = path.rpartition(".")
                    t = getattr(_module(model, mod_name), attr)
                    t.data = value.to(t.device, t.dtype)
                if settings.enable_quanted_input:
                    # train_in is not needed after this block (fp_in becomes the targets): overwrite it.
                    q_in = signround.block_outputs(comp, unit, samples, train_in, cache, dtype, in_place=True)
                for n, (_, codes, scales, zeros) in results.items():
                    record_codes(comp, n, _module(model, n), cfg[n], fmt, codes, scales, zeros, nv_inputs.get(n))
                fp_in = targets
                for m, home in zip(mods, homes):
                    m.to(home)
                bar.update(len(mods))
    finally:
        bar.close()
        torch.use_deterministic_algorithms(was_deterministic)
    if outside:
        _tune_outside(comp, model, fmt, outside, outside_in, outside_ids, dtype)


# Projections that share one NVFP4 global scale (the minimum of theirs), as upstream's
# update_fused_layer_global_scales: attention q/k/v, MLP gate/up, MoE expert w1/w3.
_NV_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def _is_nv_fp(cfg: dict[str, Any]) -> bool:
    from fastround.tune_layers import _fp_kind

    return _fp_kind(str(cfg.get("data_type", "int")), int(cfg["bits"])) == "nv_fp"


def _nv_fused_min(model: torch.nn.Module, blocks: list[str], values: dict[str, float]) -> dict[str, float]:
    """`values` (per layer name) with each fused group of projections set to the group's minimum."""
    out = dict(values)
    for block in blocks:
        for sub, mod in _module(model, block).named_modules():
            prefix = f"{block}.{sub}" if sub else block
            for group in _NV_FUSED:
                if all(hasattr(mod, p) for p in group):
                    members = [f"{prefix}.{p}" for p in group if f"{prefix}.{p}" in values]
                    if members:
                        low = min(values[m] for m in members)
                        out.update({m: low for m in members})
                    break
    return out


# Upstream's expert projection names by MoE block class (get_expert_linear_names: a substring of the lower-case
# class name); any other MoE block is taken to name them w1 / w2 / w3.
_MOE_EXPERT_LINEARS = (
    (("qwen2moesparsemoeblock", "qwen3moesparsemoeblock", "deepseekmoe", "deepseekv2moe", "deepseekv3moe",
      "qwen3vlmoetextsparsemoeblock", "qwen3omnimoethinkertextsparsemoeblock", "qwen3omnimoetalkertextsparsemoeblock"),
     ("gate_proj", "down_proj", "up_proj")),
    (("mixtralmoesparsemoeblock",), ("linear_fc1", "linear_fc2")),
    (("dbrxmoesparsemoeblock",), ("w1_linear", "w2_linear", "v1_linear")),
)


def _moe_expert_linears(moe: torch.nn.Module) -> tuple[str, ...]:
    kind = type(moe).__name__.lower()
    for classes, linears in _MOE_EXPERT_LINEARS:
        if any(c in kind for c in classes):
            return linears
    return ("w1", "w2", "w3")


def _nv_fill_unreached_experts(model: torch.nn.Module, blocks: list[str], act_max: dict[str, torch.Tensor]
                               ) -> dict[str, torch.Tensor]:
    """`act_max` with upstream's set_amax_for_all_moe_layers applied to `blocks` before their global scales: in each
    MoE block (class name with "moe", or DbrxFFN) whose experts are a list, an expert projection no calibration
    token was routed to takes the largest max |input| of the same projection over the block's reached experts
    (experts.3.up_proj: the max over experts.*.up_proj). Reached experts keep their own maximum (upstream's
    AR_ENABLE_UNIFY_MOE_INPUT_SCALE, off by default, is not read)."""
    out = dict(act_max)
    for block in blocks:
        for sub, mod in _module(model, block).named_modules():
            kind = type(mod).__name__.lower()
            experts = getattr(mod, "experts", None)
            if not ("moe" in kind or "dbrxffn" in kind) or not isinstance(experts, torch.nn.Module) \
                    or not isinstance(experts, Iterable):
                continue
            prefix = f"{block}.{sub}.experts" if sub else f"{block}.experts"
            for proj in _moe_expert_linears(mod):
                members = [f"{prefix}.{e}.{proj}" for e, expert in experts.named_children() if hasattr(expert, proj)]
                reached = [out[m].reshape(-1) for m in members if m in out]
                if not reached:
                    continue
                top = torch.cat([r.to(reached[0].device) for r in reached]).max().reshape(1)
                out.update({m: top.clone() for m in members if m not in out})
    return out


def _nv_calibrate(comp: Compressor, model: torch.nn.Module, unit: torch.nn.Module, blocks: list[str],
                  names: list[str], samples: Any, train_in: list[torch.Tensor], cache: torch.device,
                  dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """NVFP4 layers' global scales before their block is tuned, as upstream's block calibration: each weight's
    448 * 6 / max|W| (fused projections take their minimum), and with act_bits <= 8 the max |input| over a
    forward of the block on the inputs it trains on. Leaves an NvGlobalScales on each layer (tune_layers reads
    it) and returns the tensors export writes per layer: weight_global_scale and input_global_scale ([1] fp32,
    the latter the fused minimum of the calibrated max's global scale)."""
    from fastround import signround

    cfg = comp.layer_config
    nv = [n for n in names if _is_nv_fp(cfg[n])]
    if not nv:
        return {}
    act_max: dict[str, torch.Tensor] = {}
    handles = _nv_act_max_hooks(comp, model, nv, act_max)
    try:
        if handles:
            signround.block_outputs(comp, unit, samples, train_in, cache, dtype)
    finally:
        for h in handles:
            h.remove()
    return _nv_global_scales(comp, model, blocks, nv, act_max)


def _nv_outside_scales(comp: Compressor, model: torch.nn.Module, name: str, inputs: list[torch.Tensor]
                       ) -> dict[str, torch.Tensor] | None:
    """An NVFP4 layer outside the blocks before SignRound tunes it, as upstream's outside-layer act_max: the weight
    global scale from its own weight, the input's from the max |input| over the samples it trains on (the quantized
    model's when enable_quanted_input). None for any other layer."""
    from fastround.tune_layers import fp_act_spec

    cfg = comp.layer_config[name]
    if not _is_nv_fp(cfg):
        return None
    act_max: dict[str, torch.Tensor] = {}
    if fp_act_spec(cfg) is not None and inputs:
        act_max[name] = torch.stack([x.detach().abs().amax().float() for x in inputs]).amax().reshape(1)
    return _nv_global_scales(comp, model, [], [name], act_max)[name]


def _nv_act_max_hooks(comp: Compressor, model: torch.nn.Module, names: list[str],
                      act_max: dict[str, torch.Tensor]) -> list:
    """Forward hooks keeping, in `act_max`, each NVFP4 layer's max |input| (layers whose activations are quantized)."""
    from fastround.tune_layers import fp_act_spec

    cfg = comp.layer_config

    def collect(name: str) -> Any:
        def hook(mod: torch.nn.Module, args: tuple, out: Any) -> None:
            x = args[0]
            if x.numel():
                m = x.detach().abs().amax().reshape(1)
                act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m.to(act_max[name]))
        return hook

    return [_module(model, n).register_forward_hook(collect(n)) for n in names
            if _is_nv_fp(cfg[n]) and fp_act_spec(cfg[n]) is not None]


def _nv_global_scales(comp: Compressor, model: torch.nn.Module, blocks: list[str], nv: list[str],
                      act_max: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Upstream's update_block_global_scale_if_needed for the NVFP4 layers `nv` of `blocks` (see _nv_calibrate),
    given their calibrated input maxima (none: no input_global_scale)."""
    from fastround import tune_fp_ops
    from fastround.tune_layers import NV_ATTR, NvGlobalScales, fp_act_spec

    if blocks:
        act_max = _nv_fill_unreached_experts(model, blocks, act_max)
        unreached = [n for n in nv if n not in act_max and fp_act_spec(comp.layer_config[n]) is not None]
        if unreached:
            raise ValueError(f"NVFP4 layers {unreached[:3]}: the calibration forward of their block never reached "
                             "them and no reached peer gives them an input maximum, so they have no static input "
                             "global scale (upstream fails at export)")
    weight = _nv_fused_min(model, blocks, {n: tune_fp_ops.nv_global_scale(_module(model, n).weight) for n in nv})
    act = _nv_fused_min(model, blocks, {n: tune_fp_ops.nv_global_scale(act_max[n]) for n in nv if n in act_max})
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n in nv:
        setattr(_module(model, n), NV_ATTR, NvGlobalScales(weight[n], act_max.get(n)))
        out[n] = {"weight_global_scale": torch.tensor([weight[n]], dtype=torch.float32)}
        if n in act:
            out[n]["input_global_scale"] = torch.tensor([act[n]], dtype=torch.float32)
    return out


def _set_weight(mod: torch.nn.Module, qdq: torch.Tensor) -> None:
    conv = type(mod) is conv1d_type()
    mod.weight.data = (qdq.t() if conv else qdq).to(mod.weight.device, mod.weight.dtype).contiguous()


def _tune_outside(comp: Compressor, model: torch.nn.Module, fmt: str, outside: list[str],
                  fp_in: dict[str, list[torch.Tensor]], ids: list[torch.Tensor], dtype: torch.dtype) -> None:
    """The outside layers after the blocks, on their cached inputs (signround.md 2.11)."""
    from fastround import signround
    from fastround.compressor import record_codes, record_layer

    settings = comp.signround
    assert settings is not None
    masks = [(t[j:j + 1] != -100).to(torch.long) for t in ids for j in range(t.shape[0])] if ids else None
    q_in: dict[str, list[torch.Tensor]] | None = None
    if settings.enable_quanted_input:
        q_in = {}
        _capture(comp, model, None, outside, None, q_in)  # the same batches through the quantized blocks
    for n in outside:
        mod = _module(model, n)
        comp.rotate_layer(n, mod)  # lm_head never is; another outside layer's target runs through its hook
        if n not in fp_in:  # the calibration pass never reached it: plain RTN, as upstream without inputs
            logger.info("%s: no cached inputs, quantized with RTN", n)
            if _is_nv_fp(comp.layer_config[n]):
                _record_nv_outside_rtn(comp, model, n, fmt, {}, False)
            else:
                record_layer(comp, n, mod, comp.layer_config[n], fmt, None, False)
            continue
        home = mod.weight.device
        mod.to(comp.device)
        train = q_in[n] if q_in is not None else None
        nv_scales = _nv_outside_scales(comp, model, n, train if train is not None else fp_in[n])
        qdq, codes, scales, zeros = signround.tune_outside(comp, n, mod, fp_in[n], train, masks, settings, dtype)
        _set_weight(mod, qdq)
        mod.to(home)
        record_codes(comp, n, mod, comp.layer_config[n], fmt, codes, scales, zeros, nv_scales)
        del fp_in[n]
