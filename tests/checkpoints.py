"""Deterministic tiny sharded checkpoints for parity tests.

Every builder writes a HuggingFace-style directory (config.json, several
safetensors shards, index, side files) whose tensor bytes depend only on
(kind, dtype). Shapes are chosen so that in_features are not multiples of
32/64/128 and several out_features are not multiples of 8, which exercises
group padding and packing edge cases.

Kinds:
  llama            LlamaForCausalLM, untied lm_head
  qwen2            Qwen2ForCausalLM with q/k/v biases
  qwen3_moe        Qwen3MoeForCausalLM as written by transformers 5
                   save_pretrained (per-expert 2-D `experts.{i}.*_proj.weight`)
  qwen3_moe_fused  same weights, re-saved with the in-memory fused 3-D expert
                   tensors (`experts.gate_up_proj` [E,2I,H], `experts.down_proj`
                   [E,H,I]) so upstream's fused-MoE splitting is exercised
  llama_tied       LlamaForCausalLM with tie_word_embeddings=True (no
                   lm_head.weight is written)
  qwen2_aligned    Qwen2ForCausalLM with q/k/v biases and every Linear dim a multiple of 32
                   (hidden 128, intermediate 96), for the regular flow's exports
  llama_aligned    LlamaForCausalLM with every Linear dim a multiple of 32
                   (but in_features 160/96 not of 128). The regular
                   (model-loading) flow silently keeps any Linear with a dim
                   not divisible by 32 in full precision, so only this kind
                   is useful for cross-checking against it.
  llama_pow2       LlamaForCausalLM with hidden 128 (a power of two, so QuaRot's default full-size online R1 is
                   on; hidden 160 turns it off). Not in KINDS: only the QuaRot tests build it.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Callable

import torch

KINDS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3_moe",
    "qwen3_moe_fused",
    "llama_tied",
    "llama_aligned",
    "llama_aligned4",
    "qwen3_moe_aligned",
    "qwen3_moe_aligned_fused",
    "qwen2_aligned",
)
DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")

_SEED = 20240917
_TARGET_SHARDS = 4
_MIN_SHARDS, _MAX_SHARDS = 3, 6


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}") from None


def _generator(name: str) -> torch.Generator:
    # Seed per tensor name so values do not depend on parameter iteration order
    # or on which other tensors a model happens to have.
    return torch.Generator().manual_seed(_SEED ^ zlib.crc32(name.encode()))


def _plant_edge_rows(w: torch.Tensor, gen: torch.Generator) -> None:
    """Overwrite a few leading rows of a logical 2-D weight in place.

    row 0: all zeros            -> scale clamp path, sym and asym
    row 1: first 32 cols > 0    -> an all-positive group at group_size 32 (asym zp == 0)
    row 2: whole row > 0        -> all-positive at any group size, incl. -1/padded groups
    row 3: whole row < 0        -> |min| > max branch of the sym scale
    row 4: constant value       -> max == min (zero range) for asym
    """
    rows, cols = w.shape
    if rows < 5:
        return
    w[0].zero_()
    w[1, : min(32, cols)].abs_()
    w[2].abs_()
    w[3] = -w[3].abs()
    w[4].fill_(0.0625 + 0.01 * float(torch.rand((), generator=gen)))


def _fill_parameters(model: torch.nn.Module, moe_intermediate: int | None = None) -> None:
    """Replace every parameter with seeded, realistically scaled values (fp32 math, then cast)."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            gen = _generator(name)
            shape = tuple(param.shape)
            if param.dim() == 1:
                if name.endswith("norm.weight"):
                    values = 1.0 + 0.05 * torch.randn(shape, generator=gen)
                else:  # biases
                    values = 0.02 * torch.randn(shape, generator=gen)
            else:
                # Spread std over 0.02..0.1 so scales differ between tensors.
                std = 0.02 + 0.08 * ((zlib.crc32(name.encode()) % 1000) / 999.0)
                values = std * torch.randn(shape, generator=gen)
                if values.dim() == 2:
                    _plant_edge_rows(values, gen)
                else:
                    for expert in values:
                        # gate_up_proj stacks gate rows then up rows; plant in both halves
                        # so the split gate_proj and up_proj both carry edge rows.
                        if name.endswith("gate_up_proj") and moe_intermediate:
                            _plant_edge_rows(expert[:moe_intermediate], gen)
                            _plant_edge_rows(expert[moe_intermediate:], gen)
                        else:
                            _plant_edge_rows(expert, gen)
            param.copy_(values.to(param.dtype))


def _write_side_files(path: Path) -> None:
    """A real (tiny) tokenizer plus nested files that model-free must copy verbatim.

    The tokenizer must actually load: the regular (model-loading) oracle flow
    instantiates it with AutoTokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Non-ASCII token so copied JSON side files are checked byte for byte.
    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(40)), "caf\u00e9"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=64,
    )
    tokenizer.save_pretrained(str(path))
    sub = path / "original"
    sub.mkdir(exist_ok=True)
    (sub / "params.json").write_text('{"dim": 0, "note": "nested side file"}\n')
    (sub / "notes.txt").write_bytes(b"binary-ish \x00\x01\x02 side file\n")


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def _shard_count(path: Path) -> int:
    return sum(1 for _ in path.glob("*.safetensors"))


def _save_sharded(model: torch.nn.Module, path: Path) -> None:
    """save_pretrained with a max_shard_size that yields 3-6 shards."""
    total = _state_bytes(model)
    # transformers' greedy packing overshoots/undershoots the target a little;
    # nudge the limit until the count lands in range.
    limit = math.ceil(total / _TARGET_SHARDS)
    for _ in range(12):
        for old in path.glob("*.safetensors"):
            old.unlink()
        model.save_pretrained(str(path), max_shard_size=limit)
        n = _shard_count(path)
        if _MIN_SHARDS <= n <= _MAX_SHARDS:
            return
        limit = int(limit * (1.25 if n > _MAX_SHARDS else 0.8))
    raise RuntimeError(f"could not shard {path} into {_MIN_SHARDS}-{_MAX_SHARDS} files (last: {n})")


def _save_manual(model: torch.nn.Module, path: Path) -> None:
    """Write the in-memory state dict (fused experts kept 3-D) as our own shards + index."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = sorted(state)
    total = sum(state[n].numel() * state[n].element_size() for n in names)
    target = math.ceil(total / _TARGET_SHARDS)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if groups[-1] and size + nbytes > target and len(groups) < _MAX_SHARDS:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) < _MIN_SHARDS:
        raise RuntimeError(f"manual sharding produced only {len(groups)} shards")
    # Number shards in reverse so processing order (first appearance in the
    # sorted weight_map) differs from file-name order, as in real checkpoints.
    n = len(groups)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{n - i:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k] for k in group}, str(path / fname), metadata={"format": "pt"})
        for k in group:
            weight_map[k] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(str(path))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(path))


def _make_llama(tied: bool) -> tuple[torch.nn.Module, int | None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tied:
        # hidden 136: not a multiple of 32; kv out = 2*34 = 68 (not a multiple of 8)
        cfg = LlamaConfig(
            vocab_size=100,
            hidden_size=136,
            intermediate_size=90,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    else:
        # hidden 104: in_features not a multiple of 32; kv out = 2*26 = 52
        cfg = LlamaConfig(
            vocab_size=96,
            hidden_size=104,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    return LlamaForCausalLM(cfg), None


def _make_llama_aligned(layers: int = 2) -> tuple[torch.nn.Module, int | None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=160,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=5,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg), None


def _make_llama_pow2() -> tuple[torch.nn.Module, int | None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg), None


def _make_qwen2(aligned: bool = False) -> tuple[torch.nn.Module, int | None]:
    """aligned: every Linear dim a multiple of 32, so the regular flow quantizes all of them (biases included)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # hidden 200 (two groups at gs128, the second padded); kv out = 1*50; intermediate 90
    cfg = Qwen2Config(
        vocab_size=112,
        hidden_size=128 if aligned else 200,
        intermediate_size=96 if aligned else 90,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg), None


def _original_moe_block() -> None:
    """Upstream's regular flow replaces transformers' Qwen3MoeSparseMoeBlock and its checkpoint-conversion
    mapping process-wide (its unfused modeling); undo that so every build gets transformers' own layout."""
    for holder, attr, original in _ORIGINALS:
        if original is _MISSING:
            if hasattr(holder, attr):
                delattr(holder, attr)
        elif getattr(holder, attr) is not original:
            setattr(holder, attr, original)


def _remember_originals() -> list:
    try:
        import transformers.modeling_utils as mu
        import transformers.models.qwen3_moe.modeling_qwen3_moe as mod
        from transformers import conversion_mapping as cm
    except ImportError:  # pragma: no cover - transformers is a test dependency
        return []
    return [(mod, "Qwen3MoeSparseMoeBlock", mod.Qwen3MoeSparseMoeBlock),
            (cm, "get_checkpoint_conversion_mapping", getattr(cm, "get_checkpoint_conversion_mapping", _MISSING)),
            (mu, "get_checkpoint_conversion_mapping", getattr(mu, "get_checkpoint_conversion_mapping", _MISSING))]


_MISSING = object()
_ORIGINALS = _remember_originals()


def _make_qwen3_moe(aligned: bool = False) -> tuple[torch.nn.Module, int | None]:
    """aligned: every in_features a multiple of 32, so MXFP/NVFP4 quantize the experts too."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    _original_moe_block()

    moe_intermediate = 32 if aligned else 40
    cfg = Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=128 if aligned else 104,
        intermediate_size=64 if aligned else 72,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32 if aligned else 26,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(cfg), moe_intermediate


_FACTORIES: dict[str, Callable[[], tuple[torch.nn.Module, int | None]]] = {
    "llama": lambda: _make_llama(tied=False),
    "llama_tied": lambda: _make_llama(tied=True),
    "llama_aligned": _make_llama_aligned,
    "llama_aligned4": lambda: _make_llama_aligned(layers=4),  # SignRound resume: killed between blocks
    "llama_pow2": _make_llama_pow2,
    "qwen2": _make_qwen2,
    "qwen2_aligned": lambda: _make_qwen2(aligned=True),
    "qwen3_moe": _make_qwen3_moe,
    "qwen3_moe_fused": _make_qwen3_moe,
    "qwen3_moe_aligned": lambda: _make_qwen3_moe(aligned=True),
    "qwen3_moe_aligned_fused": lambda: _make_qwen3_moe(aligned=True),
}


def build(kind: str, path: str | Path, dtype: str | torch.dtype = "bfloat16") -> Path:
    """Build checkpoint `kind` in `dtype` into directory `path` (created if needed)."""
    if kind not in _FACTORIES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    torch_dtype = _torch_dtype(dtype)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model, moe_intermediate = _FACTORIES[kind]()
    model = model.to(torch_dtype)
    # config.json records the dtype; keep it consistent with the stored tensors.
    model.config.dtype = torch_dtype
    model.eval()
    _fill_parameters(model, moe_intermediate)
    if kind.endswith("_fused"):  # transformers' in-memory layout: fused 3-D expert tensors
        _save_manual(model, out)
    else:
        _save_sharded(model, out)
    _write_side_files(out)
    return out


__all__ = ["KINDS", "DTYPES", "build"]
