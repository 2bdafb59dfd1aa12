"""Transformers glue for the regular flow: loading a model, and finding its blocks and quantizable layers from
the module tree (never from a list of model names), as upstream auto-round does."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger("fastround")

# Module-list names that hold non-text towers; their blocks are skipped unless non-text quantization is asked.
_VISION_KEYS = ("vision", "visual", "image", "img")
_AUDIO_KEYS = ("audio", "speech", "wav", "waveform")


def conv1d_type() -> type | None:
    """transformers' GPT-2 style Conv1D (weight stored [in, out]), when transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of the regular flow
        return None
    return Conv1D


def quantizable_types() -> tuple[type, ...]:
    conv = conv1d_type()
    return (torch.nn.Linear,) + ((conv,) if conv is not None else ())


def is_quantizable(module: torch.nn.Module) -> bool:
    # Exact types, as upstream: a Linear subclass (e.g. an already-quantized wrapper) is not a target.
    return type(module) in quantizable_types()


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if name and is_quantizable(m)}


def weight_out_in(module: torch.nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    w = module.weight
    if type(module) is conv1d_type():
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


class _Expert(torch.nn.Module):
    """One expert of a fused experts module as three Linear layers (the per-expert checkpoint names)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Any) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    # A view of the fused tensor, not a copy: a clone of every expert would hold the experts twice until the
    # fused tensors go, and the view's storage goes once the last expert of the module is quantized.
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    return layer


class SplitExperts(torch.nn.ModuleList):
    """transformers 5 keeps MoE experts fused as 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    quantization needs one Linear per expert projection, as upstream's unfused modeling and the per-expert
    checkpoint names have. Same routing contract as the fused module: (tokens, top-k index, top-k weights)."""

    def __init__(self, fused: torch.nn.Module) -> None:
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        inter = gate_up.shape[1] // 2
        super().__init__(
            _Expert(gate_up[e, :inter], gate_up[e, inter:], down[e], fused.act_fn) for e in range(gate_up.shape[0])
        )
        self.num_experts = len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for e in range(self.num_experts):
            pos, tokens = torch.where(hit[e])
            if tokens.numel() == 0:
                continue
            y = self[e](hidden_states[tokens]) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def split_fused_experts(model: torch.nn.Module) -> int:
    """Replace every fused experts module (3-D gate_up_proj / down_proj parameters) by SplitExperts; returns
    how many were split. Recognised by structure, not by model name."""
    targets = []
    for name, m in model.named_modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if (isinstance(gu, torch.nn.Parameter) and isinstance(dn, torch.nn.Parameter) and gu.dim() == 3
                and dn.dim() == 3 and hasattr(m, "act_fn") and gu.shape[0] == dn.shape[0]):
            targets.append(name)
    for name in targets:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, SplitExperts(holder.get_submodule(attr)))
    if targets:
        logger.info("split %d fused MoE expert module(s) into per-expert Linear layers", len(targets))
    return len(targets)


def find_block_names(model: torch.nn.Module, quant_nontext_module: bool = False) -> list[list[str]]:
    """Block groups: every ModuleList reached depth-first (the search does not enter it) is one group whose
    children are the blocks, e.g. [["model.layers.0", "model.layers.1", ...]]."""
    found: list[tuple[str, torch.nn.Module]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            kind = type(child).__name__
            if "NgramEmbedding" in kind:
                continue
            if "ModuleList" in kind:
                found.append((full, child))
            else:
                visit(full, child)

    visit("", model)
    groups = []
    for name, mlist in found:
        low = name.lower()
        if not quant_nontext_module and any(k in low for k in _VISION_KEYS + _AUDIO_KEYS):
            continue
        groups.append([f"{name}.{child}" for child, _ in mlist.named_children()])
    return [g for g in groups if g]


def lm_head_name(model: torch.nn.Module) -> str | None:
    """The last leaf module outside every block (upstream's rule), usually "lm_head"."""
    last = None
    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            last = name
    blocks = {b for group in find_block_names(model, True) for b in group}
    if last is None or last in blocks:
        return None
    return last


def block_of(layer: str, blocks: list[str]) -> str | None:
    for b in blocks:
        if layer == b or layer.startswith(b + "."):
            return b
    return None


def is_moe_model(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if getattr(text, key, None):
            return True
    return any(".experts." in name for name, _ in model.named_modules())


_FLOAT_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def float_dtype(value: str | torch.dtype, option: str) -> torch.dtype:
    """A float16 / bfloat16 / float32 dtype from a torch dtype or a name ("bf16", "torch.float16", ...); a
    ValueError naming `option` otherwise."""
    if isinstance(value, torch.dtype) and value in _FLOAT_DTYPES.values():
        return value
    key = str(value).replace("torch.", "").lower()
    if key not in _FLOAT_DTYPES:
        raise ValueError(f"{option} must be one of {sorted(_FLOAT_DTYPES)}, got {value!r}")
    return _FLOAT_DTYPES[key]


def _model_dtype_arg(model_dtype: str | torch.dtype | None) -> Any:
    if model_dtype is None:
        return "auto"
    if isinstance(model_dtype, torch.dtype):
        return model_dtype
    return float_dtype(model_dtype, "model_dtype")


def load_model(
    model: str,
    tokenizer: Any = None,
    *,
    platform: str = "hf",
    trust_remote_code: bool = True,
    model_dtype: str | torch.dtype | None = None,
) -> tuple[torch.nn.Module, Any, str]:
    """A hub id or local folder -> (model on the CPU, tokenizer, local folder the weights came from)."""
    from fastround._hf import resolve_model_folder

    folder = resolve_model_folder(model, platform=platform)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError("the regular AutoRound flow needs transformers: pip install 'fastround[hf]'") from exc
    logger.info("loading %s", model)
    net = AutoModelForCausalLM.from_pretrained(
        folder, dtype=_model_dtype_arg(model_dtype), trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
    )
    net.eval()
    _flag_sampling(net)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as exc:
            # Plain RTN needs no tokenizer; data-driven runs say so when they need one.
            logger.warning("no tokenizer found in %s (%s)", folder, exc)
            tokenizer = None
    return net, tokenizer, os.fspath(folder)


def _flag_sampling(model: torch.nn.Module) -> None:
    """Upstream's loader sets do_sample when any sampling knob is not neutral. An unset knob (None) counts as
    not neutral, so with transformers 5 defaults every loaded model gets do_sample: true; reproduced for the
    same generation_config.json."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    for knob, neutral in (("top_p", 1.0), ("top_k", 0), ("temperature", 1.0)):
        if hasattr(gen, knob) and getattr(gen, knob) != neutral:
            gen.do_sample = True


def _float_tensors(module: torch.nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse))
            if t.is_floating_point() or t.is_complex()]


def cast_module(module: torch.nn.Module, dtype: torch.dtype, recurse: bool = True) -> None:
    """`module.to(dtype)` (floating and complex tensors; with recurse=False the module's own only), then the
    pages of the checkpoint mapping the originals were read from go back (see fastround.mapped)."""
    from fastround.mapped import PageReleaser, span

    release = PageReleaser()
    sources = release.mapped(t.detach() for t in _float_tensors(module, recurse))
    if recurse:
        module.to(dtype)
    else:
        module._apply(lambda t: t.to(dtype) if t.is_floating_point() or t.is_complex() else t, recurse=False)
    release([s for s in map(span, sources) if s is not None])


def cast_outside_blocks(model: torch.nn.Module, blocks: set[str], dtype: torch.dtype) -> None:
    """`model.to(dtype)` for everything but the named blocks, which the block loop casts one at a time: an fp32
    checkpoint quantized in bf16 (or the reverse) never holds a second copy of the whole model."""

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if prefix in blocks:
            return
        if not any(b.startswith(prefix + ".") for b in blocks) and prefix:
            cast_module(module, dtype)
            return
        cast_module(module, dtype, recurse=False)  # an ancestor of blocks (the model, its ModuleList)
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)


def amp_dtype(model: torch.nn.Module, amp: bool, device: torch.device) -> torch.dtype:
    """Upstream's tuning dtype: fp32 without amp; else bf16 on CPU, and the model's own 16-bit dtype on GPUs."""
    if not amp:
        return torch.float32
    current = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if device.type == "cpu":
        return torch.bfloat16
    if current != torch.float32:
        return current
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    return torch.bfloat16
