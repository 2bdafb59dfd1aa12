"""File handling shared by the regular flow's format writers: the output folder (staged beside the target and
renamed into place), upstream's two weight layouts, configs, tokenizer and the files copied from the source.

Upstream 0.16.1 writes weights one of two ways, and the bytes differ:
  * quantize_and_save with one real format streams packed blocks through its ShardWriter (no safetensors
    metadata, tensors in their in-memory dtype, its own 5 GiB sharding and index);
  * save_quantized, several formats, and fake go through transformers' save_pretrained ({"format": "pt"}
    metadata, float32 tensors cast to the export dtype for gptq/awq).
Both are reproduced here; the caller says which one upstream would have used."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from fastround.mapped import release_file_pages

logger = logging.getLogger("fastround")

SHARD_WRITER_MAX_BYTES = 5 * 1024**3  # ShardWriter parses "5GB" with 1024-based units
SAVE_PRETRAINED_MAX_SHARD = "5GB"
# Scales and zero points keep their dtype when save_pretrained casts float32 tensors to the export dtype.
QUANT_PARAM_SUFFIXES = ("_scale", "_scales", "_scale_inv", "_zero_point", "_zeros", "_zp")
# Side files upstream copies from the source folder besides remote-code *.py files.
EXTRA_MODEL_FILES = frozenset({"spk_dict.pt", "llm_config.json", "vit_config.json", "preprocessor_config.json"})
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_PARTIAL_TAG = ".fastround-partial-"

Entry = tuple[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# output folder
# ---------------------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None) -> None:
    """Refuse an output folder that is, or lies inside, the source model folder (publishing would overwrite or
    remove the source's own weight files)."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a folder")
    if not source_dir or not Path(source_dir).is_dir():
        return
    src = Path(source_dir).expanduser().resolve()
    if out == src or src in out.parents:
        raise ValueError(
            f"output_dir {out} is inside the source model folder {src}; choose a folder outside the source"
        )


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike[str], source_dir: str | None = None) -> Iterator[Path]:
    """Yield an empty folder beside `output_dir`; on success its content replaces `output_dir`'s, on failure it
    is removed and `output_dir` is left as it was, so nothing half-written ever looks like a checkpoint."""
    check_output_dir(output_dir, source_dir)
    target = Path(output_dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL_TAG}", dir=target.parent))
    try:
        yield stage
        publish(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish(stage: Path, target: Path) -> None:
    """Move a finished stage to `target`. An existing non-empty target keeps its other files, as upstream
    (which writes into it) does, except top-level weight files the new output lacks: a stale shard beside the
    new ones would be loaded with them. config.json goes first out and last in, so an interrupted publish
    does not look complete."""
    if not target.exists():
        os.rename(stage, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(stage, target)
        return
    logger.warning("%s already exists; replacing the files this export writes", target)
    new = {p.name for p in stage.iterdir()}
    with contextlib.suppress(FileNotFoundError):
        (target / "config.json").unlink()
    for old in sorted(target.iterdir()):
        if old.is_file() and old.name.endswith(_WEIGHT_FILE_SUFFIXES) and old.name not in new:
            logger.warning("removing stale weight file %s (not part of the new output)", old)
            old.unlink()
    entries = sorted(stage.iterdir(), key=lambda p: p.name == "config.json")
    for entry in entries:
        dest = target / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    stage.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# module walks
# ---------------------------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Packer(Protocol):
    """The quantized layers of an export: `name in packer` says a module is replaced, `packer(name)` packs it."""

    def __contains__(self, name: object) -> bool: ...

    def __call__(self, name: str) -> list[Entry]: ...


def state_entries(prefix: str, module: torch.nn.Module, packed: Packer) -> Iterator[Entry]:
    """`module.state_dict()` order (own parameters, persistent buffers, then children), with every module in
    `packed` replaced by its packed tensors, as upstream's QuantLinear swap does."""
    if prefix in packed:
        yield from packed(prefix)
        return
    for key, param in module._parameters.items():
        if param is not None:
            yield _join(prefix, key), param.detach()
    for key, buf in module._buffers.items():
        if buf is not None and key not in module._non_persistent_buffers_set:
            yield _join(prefix, key), buf.detach()
    for key, child in module._modules.items():
        if child is not None:
            yield from state_entries(_join(prefix, key), child, packed)


def tied_layer_names(model: torch.nn.Module) -> set[str]:
    keys: Any = getattr(model, "_tied_weights_keys", None) or []
    values = list(keys.values()) if isinstance(keys, dict) else list(keys)
    return {".".join(str(v).split(".")[:-1]) for v in values}


def lm_head_name(model: torch.nn.Module, block_names: list[list[str]]) -> str | None:
    """upstream get_lm_head_name: the last leaf module, unless it sits in a block."""
    last = None
    for name, module in model.named_modules():
        if not any(module.children()):
            last = name
    if last is not None and any(last in group for group in block_names):
        return None
    return last


def shard_writer_order(
    model: torch.nn.Module,
    block_names: list[list[str]],
    packed: Packer,
    *,
    leaf_first: bool,
) -> Iterator[Entry]:
    """The order in which upstream's ShardWriter receives tensors during quantize_and_save: block by block (in
    zero-shot RTN each block's unquantized leaves first, then the rest of the block), then whatever the model
    still holds, in state_dict order. Order decides where shards split and the index's weight_map order."""
    tied = tied_layer_names(model)
    for group in block_names:
        for block_name in group:
            block = model.get_submodule(block_name)
            if leaf_first:
                for name, leaf in block.named_modules(prefix=block_name):
                    if any(leaf.children()) or name in tied or name in packed:
                        continue
                    yield from state_entries(name, leaf, packed)
            yield from state_entries(block_name, block, packed)
    tie_embeddings = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    head = lm_head_name(model, block_names) if tie_embeddings else None
    for name, tensor in state_entries("", model, packed):
        if head is not None and name.rsplit(".", 1)[0] == head:
            continue  # upstream moves a tied lm_head to meta instead of saving it
        yield name, tensor


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------


class ShardWriterLayout:
    """upstream ShardWriter's files: tensors buffered up to 5 GiB per shard (a bigger one closes the shard it
    joins), written with safetensors' save_file (no metadata), renamed to model.safetensors or
    model-0000i-of-0000N.safetensors at the end; an index only when there is more than one shard."""

    def __init__(self, directory: Path, max_bytes: int = SHARD_WRITER_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.saved: set[str] = set()
        self.total_elems = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.saved or name in self.pending:
            return
        size = tensor.nbytes
        self.total_elems += tensor.numel()
        self.total_bytes += size
        tensor = tensor.detach().cpu()
        if size > self.max_bytes:
            self.pending[name] = tensor
            self.pending_bytes += size
            self.flush()
        elif self.pending_bytes + size > self.max_bytes and self.pending_bytes > 0:
            self.flush()
            self.pending[name] = tensor
            self.pending_bytes = size
        else:
            self.pending[name] = tensor
            self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        # Tied tensors in one shard share storage; upstream keeps the first name only.
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in self.pending.items():
            ptr = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
            if ptr in seen:
                continue
            seen.add(ptr)
            tensors[name] = tensor if tensor.is_contiguous() else tensor.contiguous()
        tmp = f"model-shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(tensors, str(self.directory / tmp))
        release_file_pages(tensors.values())  # source tensors read from the mapped checkpoint: written, let go
        self.shards.append((tmp, list(tensors)))
        self.saved.update(tensors)
        self.pending = {}
        self.pending_bytes = 0

    def finish(self) -> None:
        self.flush()
        if not self.shards:
            logger.warning("no tensors to save")
            return
        count = len(self.shards)
        weight_map: dict[str, str] = {}
        for idx, (tmp, names) in enumerate(self.shards, start=1):
            final = "model.safetensors" if count == 1 else f"model-{idx:05d}-of-{count:05d}.safetensors"
            os.rename(self.directory / tmp, self.directory / final)
            weight_map.update((name, final) for name in names)
        if count > 1:
            index = {
                "metadata": {
                    "format": "safetensors",
                    "total_shards": count,
                    "total_parameters": int(self.total_elems),
                    "total_size": int(self.total_bytes),
                },
                "weight_map": weight_map,
            }
            with open(self.directory / "model.safetensors.index.json", "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)


def write_shard_writer_layout(entries: Iterable[Entry], directory: Path) -> None:
    writer = ShardWriterLayout(directory)
    for name, tensor in entries:
        writer.add(name, tensor)
    writer.finish()


def export_dtype_state(
    model: torch.nn.Module, entries: Iterable[Entry], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The state dict upstream hands save_pretrained: float32 tensors cast to the export dtype (fp16 for
    gptq/awq, bf16 with activation quantization) unless they are scales/zero points or in a module the model
    keeps in float32."""
    state = dict(entries)
    if dtype not in (torch.bfloat16, torch.float16) or not any(t.dtype == torch.float32 for t in state.values()):
        return state
    keep: set[str] = set()
    for attribute in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        names = getattr(model, attribute, None) or []
        keep.update([names] if isinstance(names, str) else names)

    def cast(name: str, tensor: torch.Tensor) -> bool:
        if tensor.dtype != torch.float32 or name.endswith(QUANT_PARAM_SUFFIXES):
            return False
        return not any(module in name for module in keep)

    return {name: (t.to(dtype) if cast(name, t) else t) for name, t in state.items()}


def save_pretrained_weights(model: torch.nn.Module, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """transformers' save_pretrained with an explicit state dict: its sharding, metadata, config.json and
    generation_config.json, exactly as upstream's save_model calls it."""
    model.save_pretrained(
        str(directory), max_shard_size=SAVE_PRETRAINED_MAX_SHARD, safe_serialization=True, state_dict=state
    )
    release_file_pages(state.values())


# ---------------------------------------------------------------------------------------------------------------
# configs and side files
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def attached_quantization_config(model: torch.nn.Module, config: dict[str, Any] | None) -> Iterator[None]:
    """Put `config` on model.config while transformers serialises it (None removes any), then restore what the
    caller's model had: the writer leaves the in-memory model as it found it."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        yield
        return
    had = "quantization_config" in cfg.__dict__
    before = cfg.__dict__.get("quantization_config")
    if config is None:
        if had:
            delattr(cfg, "quantization_config")
    else:
        cfg.quantization_config = config
    try:
        yield
    finally:
        if had:
            cfg.quantization_config = before
        elif "quantization_config" in cfg.__dict__:
            delattr(cfg, "quantization_config")


def save_model_configs(model: torch.nn.Module, directory: Path) -> None:
    """config.json and generation_config.json as upstream writes them when the weights are already on disk."""
    config = getattr(model, "config", None)
    if config is not None:
        try:
            config.save_pretrained(str(directory))
        except (KeyError, TypeError):
            # Some third-party configs fail to diff against their defaults; upstream then writes them whole.
            (directory / "config.json").write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(directory))


def rewrite_config_dtype(model: torch.nn.Module, directory: Path, dtype: torch.dtype | None) -> None:
    """Declare the export dtype in config.json (upstream does it only when it differs from the model's)."""
    path = directory / "config.json"
    if dtype is None or dtype == getattr(model, "dtype", None) or not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).split(".")[-1]
    data["torch_dtype"] = name
    if "dtype" in data:
        data["dtype"] = name
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def write_quantization_config_json(directory: Path, config: dict[str, Any]) -> None:
    with open(directory / "quantization_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if tokenizer is None:
        logger.warning("Skipping tokenizer save: object is None.")
        return
    if not hasattr(tokenizer, "save_pretrained"):
        logger.warning("Skipping tokenizer save: object %r has no save_pretrained method.", tokenizer)
        return
    tokenizer.save_pretrained(str(directory))


def _tensor_files(directory: Path) -> dict[str, Path] | None:
    """tensor name -> shard path of a local checkpoint folder (index or single file), None without weights."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        out: dict[str, Path] = {}
        for name, shard in weight_map.items():
            path = (directory / shard).resolve()
            if directory.resolve() not in path.parents:
                raise ValueError(f"{index}: shard {shard!r} of tensor {name!r} points outside {directory}")
            out[name] = path
        return out
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {name: single for name in f.keys()}
    return None


def restore_fp32_tensors(source_dir: Path, directory: Path) -> None:
    """Tensors the source stores in float32 but the export wrote as fp16/bf16 (e.g. router correction biases)
    get their source values back, rewriting the shard with its metadata, as upstream does after saving."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, saved = _tensor_files(source_dir), _tensor_files(directory)
    if source is None or saved is None:
        return
    restore: dict[Path, dict[str, torch.Tensor]] = {}
    for name in source.keys() & saved.keys():
        with safe_open(str(source[name]), framework="pt", device="cpu") as f:
            if f.get_slice(name).get_dtype() != "F32":
                continue
            with safe_open(str(saved[name]), framework="pt", device="cpu") as g:
                if g.get_slice(name).get_dtype() not in ("F16", "BF16"):
                    continue
            restore.setdefault(saved[name], {})[name] = f.get_tensor(name)
    for shard, tensors in restore.items():
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            content = {name: f.get_tensor(name) for name in f.keys()}
        content.update(tensors)
        tmp = shard.with_name(f".restore_fp32_{shard.name}")
        save_file({k: v.contiguous() for k, v in content.items()}, str(tmp), metadata)
        os.replace(tmp, shard)
        logger.info("restored %d float32 tensor(s) from the source in %s", len(tensors), shard.name)


def restore_layer_types(source_dir: Path, directory: Path) -> None:
    """transformers renames legacy `layer_types` entries on load; put the source's strings back (top level and
    text_config) when the entry count still matches."""
    src_path, dst_path = source_dir / "config.json", directory / "config.json"
    if not src_path.is_file() or not dst_path.is_file():
        return
    source = json.loads(src_path.read_text(encoding="utf-8"))
    saved = json.loads(dst_path.read_text(encoding="utf-8"))
    changed = False
    for src_scope, dst_scope in ((source, saved), (source.get("text_config"), saved.get("text_config"))):
        if not isinstance(src_scope, dict) or not isinstance(dst_scope, dict):
            continue
        original, current = src_scope.get("layer_types"), dst_scope.get("layer_types")
        if not isinstance(original, list) or original == current:
            continue
        if isinstance(current, list) and len(current) != len(original):
            logger.warning("not restoring layer_types: the source has %d entries, the export %d",
                           len(original), len(current))
            continue
        dst_scope["layer_types"] = original
        changed = True
    if changed:
        with open(dst_path, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)


def copy_source_files(source_dir: Path, directory: Path) -> None:
    """Remote-code *.py files (overwriting) and the known extra model files (if absent) from the source."""
    for entry in sorted(source_dir.iterdir()):
        if not entry.is_file():
            continue
        if entry.name.endswith(".py"):
            shutil.copy(entry, directory)
        elif entry.name in EXTRA_MODEL_FILES and not (directory / entry.name).exists():
            shutil.copy(entry, directory)


def post_save_source_fixes(source_dir: str | None, directory: Path) -> None:
    """What upstream restores from the source checkpoint after save_pretrained (apply_post_save_source_fixes):
    float32 tensors, layer_types and remote-code files. Upstream's copy of tensors the loaded model lacks
    (MTP layers) is not reproduced."""
    if not source_dir or not Path(source_dir).is_dir():
        return
    src = Path(source_dir)
    # Best effort, as upstream: a source that cannot be read here was already read whole by the load.
    for step in (restore_fp32_tensors, restore_layer_types, copy_source_files):
        try:
            step(src, directory)
        except (OSError, ValueError) as exc:
            logger.warning("skipping %s from the source %s: %s", step.__name__, src, exc)


# ---------------------------------------------------------------------------------------------------------------
# one packed checkpoint
# ---------------------------------------------------------------------------------------------------------------


def write_packed_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    source_dir: str | None,
    block_names: list[list[str]],
    output_dir: Path,
    packer: Packer,
    quantization_config: dict[str, Any],
    dtype: torch.dtype | None,
    *,
    shard_writer: bool,
    leaf_first: bool = True,
) -> None:
    """upstream's save_model for a packed model: tokenizer, weights (either layout), config.json carrying
    `quantization_config`, generation config, the source fixes, the export dtype in config.json and
    quantization_config.json; all staged and published at once."""
    with staged_output(output_dir, source_dir) as stage:
        save_tokenizer(tokenizer, stage)
        with attached_quantization_config(model, quantization_config):
            if shard_writer:
                write_shard_writer_layout(shard_writer_order(model, block_names, packer, leaf_first=leaf_first),
                                          stage)
                save_model_configs(model, stage)
            else:
                state = export_dtype_state(model, state_entries("", model, packer), dtype)
                save_pretrained_weights(model, stage, state)
        post_save_source_fixes(source_dir, stage)
        rewrite_config_dtype(model, stage, dtype)
        write_quantization_config_json(stage, quantization_config)


__all__ = [
    "Entry",
    "Packer",
    "ShardWriterLayout",
    "attached_quantization_config",
    "check_output_dir",
    "export_dtype_state",
    "lm_head_name",
    "post_save_source_fixes",
    "publish",
    "rewrite_config_dtype",
    "save_model_configs",
    "save_pretrained_weights",
    "save_tokenizer",
    "shard_writer_order",
    "staged_output",
    "state_entries",
    "write_quantization_config_json",
    "write_packed_checkpoint",
    "write_shard_writer_layout",
]
