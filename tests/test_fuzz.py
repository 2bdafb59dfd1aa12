"""Seeded fuzzing of model-free quantization through the public API.

Valid checkpoints of every source kind the other tests build are mutated (dtypes, shapes, rank, data
offsets, overlapping ranges, truncation, header length, scale dtypes and shapes, NaN/Inf values, missing
tensors, config.json and index fields) and quantized under several schemes. Every case must end in either
an output that loads, or an exception of the types the binding maps to (fastround.CheckpointError,
ValueError, OSError, FileNotFoundError) whose message names the file and tensor at fault. Never a signal,
a hang, a changed source, or an output folder that looks complete.

Cases run in a subprocess worker (fastround imports without torch, so it starts fast), so a crash or a
hang is reported with the case that caused it instead of killing pytest. A failing case is reproduced with
FASTROUND_FUZZ_ONLY=<case index> (same FASTROUND_FUZZ_SEED); FASTROUND_FUZZ_CASES scales the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

SEED = int(os.environ.get("FASTROUND_FUZZ_SEED", "20261202"))
CASES = int(os.environ.get("FASTROUND_FUZZ_CASES", "300"))
ONLY = os.environ.get("FASTROUND_FUZZ_ONLY")
CASE_TIMEOUT_S = float(os.environ.get("FASTROUND_FUZZ_TIMEOUT", "60"))
STAGING = ".fastround-partial"

# ----------------------------------------------------------------------------------------------
# source checkpoints


def _llama(dtype: str) -> Callable[[Any, Path], Path]:
    return lambda checkpoint, path: shutil.copytree(checkpoint("llama_aligned", dtype), path)


def _source(builder: str, *args: Any) -> Callable[[Any, Path], Path]:
    def build(checkpoint: Any, path: Path) -> Path:
        import source_checkpoints as sc

        return getattr(sc, builder)(path, *args)

    return build


BASES: dict[str, Callable[[Any, Path], Path]] = {
    "bf16": _llama("bfloat16"),
    "fp16": _llama("float16"),
    "fp32": _llama("float32"),
    "moe_fused": lambda checkpoint, path: shutil.copytree(checkpoint("qwen3_moe_aligned_fused"), path),
    "moe_fused_names": _source("build_moe_fused"),
    "fp8_block": _source("build_fp8"),
    "fp8_ue8m0": _source("build_fp8", True, False),
    "fp8_noblock": _source("build_fp8_variant", "noblock"),
    "mxfp": _source("build_mxfp"),
    "nvfp4_legacy": _source("build_nvfp4", "legacy"),
    "nvfp4_ct": _source("build_nvfp4", "ct"),
    "modelopt_bare": _source("build_modelopt_bare"),
    "int4_kimi": _source("build_kimi_int4"),
    "deepseek_v4": _source("build_deepseek", "v4"),
    "deepseek_v32": _source("build_deepseek", "v32"),
}

# (label, AutoRound keyword arguments)
SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("W4A16", {"scheme": "W4A16"}),
    ("W2A16G64", {"scheme": "W2A16G64"}),
    ("W8A16 asym", {"scheme": "W8A16", "sym": False}),
    ("MXFP4", {"scheme": "MXFP4"}),
    ("MXFP8", {"scheme": "MXFP8"}),
    ("NVFP4_E5M3", {"scheme": "NVFP4_E5M3"}),
]

# ----------------------------------------------------------------------------------------------
# safetensors by hand: the fuzzer must be able to write what the safetensors package refuses to

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4,
}  # fmt: skip
SAME_WIDTH = {bits: [d for d, b in DTYPE_BITS.items() if b == bits] for bits in set(DTYPE_BITS.values())}
# Non-finite encodings per dtype (little-endian bytes of one element): NaN and +/-Inf where they exist.
NONFINITE = {
    "F32": [struct.pack("<I", 0x7FC00000), struct.pack("<I", 0x7F800000), struct.pack("<I", 0xFF800000)],
    "F64": [struct.pack("<Q", 0x7FF8000000000000), struct.pack("<Q", 0x7FF0000000000000)],
    "BF16": [struct.pack("<H", 0x7FC0), struct.pack("<H", 0x7F80), struct.pack("<H", 0xFF80)],
    "F16": [struct.pack("<H", 0x7E00), struct.pack("<H", 0x7C00), struct.pack("<H", 0xFC00)],
    "F8_E4M3": [b"\x7f", b"\xff"],
    "F8_E8M0": [b"\xff"],
    "U8": [b"\xff"],  # an E8M0 NaN when the byte is an MX scale
}


class Shard:
    """A parsed safetensors file: header entries in file order plus each tensor's bytes."""

    def __init__(self, path: Path) -> None:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        self.metadata = header.pop("__metadata__", None)
        data = raw[8 + n :]
        self.entries: dict[str, dict[str, Any]] = {}
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            b, end = e["data_offsets"]
            self.entries[name] = {"dtype": e["dtype"], "shape": list(e["shape"]), "data": bytearray(data[b:end])}

    def header_and_data(self) -> tuple[dict[str, Any], bytes]:
        header: dict[str, Any] = {}
        data = bytearray()
        for name, e in self.entries.items():
            header[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [len(data), len(data) + len(e["data"])]}
            data += e["data"]
        if self.metadata is not None:
            header["__metadata__"] = self.metadata
        return header, bytes(data)

    def write(self, path: Path) -> None:
        header, data = self.header_and_data()
        write_raw(path, header, data)


def write_raw(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def elem_bits(dtype: str) -> int:
    return DTYPE_BITS.get(dtype, 8)


def numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


# ----------------------------------------------------------------------------------------------
# mutations: each edits the copied source folder and returns what it did and which names an error must
# mention: a list of groups, each satisfied by any one of its strings


class Ctx:
    def __init__(self, rng: random.Random, root: Path) -> None:
        self.rng = rng
        self.root = root
        self.files = sorted(p.name for p in root.glob("*.safetensors"))
        index = root / "model.safetensors.index.json"
        self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"] if index.exists() else {}

    def pick_file(self) -> str:
        return self.rng.choice(self.files)

    def pick_tensor(self, want: Callable[[str, dict], bool] | None = None) -> tuple[str, Shard, str] | None:
        """A (file, shard, tensor), preferring weights and their companions over norms and embeddings."""
        options = []
        for f in self.files:
            shard = Shard(self.root / f)
            for name, e in shard.entries.items():
                if want is None or want(name, e):
                    options.append((f, name))
        if not options:
            return None
        interesting = [o for o in options if "norm" not in o[1] and "embed" not in o[1]]
        f, name = self.rng.choice(interesting if interesting and self.rng.random() < 0.85 else options)
        return f, Shard(self.root / f), name

    def tensor_groups(self, f: str, name: str) -> list[list[str]]:
        """An error about tensor `name` of file `f` names that file (or the shard of another tensor of the
        same layer, e.g. the weight a donated scale belongs to) and the tensor or its layer."""
        layer = layer_of(name)
        files = {f} | {s for t, s in self.weight_map.items() if layer_of(t) == layer or t.startswith(name)}
        return [sorted(files), [name, layer]]


def is_scale(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return "scale" in last or "zero_point" in last or last in ("scale2",)


def m_dtype(ctx: Ctx, scales_only: bool = False) -> dict[str, Any] | None:
    picked = ctx.pick_tensor((lambda n, e: is_scale(n)) if scales_only else None)
    if picked is None:
        return None
    f, shard, name = picked
    e = shard.entries[name]
    bits = elem_bits(e["dtype"])
    same = [d for d in SAME_WIDTH.get(bits, []) if d != e["dtype"]]
    new = ctx.rng.choice(same) if same and ctx.rng.random() < 0.8 else ctx.rng.choice(sorted(DTYPE_BITS))
    old, e["dtype"] = e["dtype"], new
    shard.write(ctx.root / f)
    return {"what": f"{'scale ' if scales_only else ''}dtype of '{name}' in {f}: {old} -> {new}",
            "names": ctx.tensor_groups(f, name)}


def _reshapes(shape: list[int], rng: random.Random) -> list[list[int]]:
    n = numel(shape)
    out = [[n], shape + [1], [1] + shape]
    if len(shape) >= 2:
        out.append(list(reversed(shape)))
        out.append([shape[0] * shape[1]] + shape[2:])
        out.append(shape[:-2] + [shape[-2] * shape[-1]])
    for i, d in enumerate(shape):
        for k in (2, 4, 8, 16, 32):
            if d % k == 0 and d > k:
                out.append(shape[:i] + [k, d // k] + shape[i + 1 :])
    return [s for s in out if s != shape]


def m_reshape(ctx: Ctx, scales_only: bool = False) -> dict[str, Any] | None:
    """Same bytes, another shape of the same element count (rank changes included)."""
    picked = ctx.pick_tensor((lambda n, e: is_scale(n)) if scales_only else None)
    if picked is None:
        return None
    f, shard, name = picked
    e = shard.entries[name]
    choices = _reshapes(e["shape"], ctx.rng)
    if not choices:
        return None
    old, e["shape"] = e["shape"], ctx.rng.choice(choices)
    shard.write(ctx.root / f)
    return {"what": f"shape of '{name}' in {f}: {old} -> {e['shape']} (same bytes)", "names": ctx.tensor_groups(f, name)}


def m_scale_shape(ctx: Ctx) -> dict[str, Any] | None:
    """A scale companion rewritten with consistent bytes but a shape that does not fit its weight."""
    picked = ctx.pick_tensor(lambda n, e: is_scale(n))
    if picked is None:
        return None
    f, shard, name = picked
    e = shard.entries[name]
    shape, esize = e["shape"], max(1, elem_bits(e["dtype"]) // 8)
    data = bytes(e["data"])
    rng = ctx.rng
    how = rng.choice(["drop_row", "add_row", "drop_col", "add_col", "scalar", "empty"])
    if how in ("drop_col", "add_col") and len(shape) < 2:
        how = "drop_row"
    if how in ("drop_row", "add_row") and not shape:
        how = "add_row"
        shape, data = [1], data
    if how == "drop_row":
        row = numel(shape[1:]) * esize
        new_shape, new = [max(0, shape[0] - 1)] + shape[1:], data[: max(0, len(data) - row)]
    elif how == "add_row":
        row = numel(shape[1:]) * esize
        new_shape, new = [shape[0] + 1] + shape[1:], data + data[:row]
    elif how in ("drop_col", "add_col"):
        rows, cols = numel(shape[:-1]), shape[-1]
        keep = cols - 1 if how == "drop_col" else cols + 1
        pieces = []
        for r in range(rows):
            row = data[r * cols * esize : (r + 1) * cols * esize]
            pieces.append(row[: keep * esize] if how == "drop_col" else row + row[:esize])
        new_shape, new = shape[:-1] + [keep], b"".join(pieces)
    elif how == "scalar":
        new_shape, new = [1], data[:esize]
    else:
        new_shape, new = [0] + shape[1:], b""
    old, e["shape"], e["data"] = shape, new_shape, bytearray(new)
    shard.write(ctx.root / f)
    return {"what": f"scale '{name}' in {f} rewritten {how}: {old} -> {new_shape}", "names": ctx.tensor_groups(f, name)}


def header_edit(ctx: Ctx, edit: Callable[[dict[str, Any], int, random.Random], str]) -> dict[str, Any] | None:
    """Edits one tensor's header entry in place, leaving the data area as it is; `edit` says what it did."""
    picked = ctx.pick_tensor()
    if picked is None:
        return None
    f, shard, name = picked
    header, data = shard.header_and_data()
    what = edit(header[name], len(data), ctx.rng)
    write_raw(ctx.root / f, header, data)
    return {"what": f"'{name}' in {f}: {what}", "names": ctx.tensor_groups(f, name)}


def bad_shape(e: dict[str, Any], data_len: int, rng: random.Random) -> str:
    """A shape that disagrees with the byte count, or an empty tensor with huge other dimensions."""
    how = rng.choice(["plus_one", "minus_one", "zero", "empty_huge", "negative", "float"])
    shape = list(e["shape"]) or [1]
    i = rng.randrange(len(shape))
    if how == "plus_one":
        shape[i] += 1
    elif how == "minus_one":
        shape[i] = max(0, shape[i] - 1)
    elif how == "zero":
        shape[i] = 0
    elif how == "empty_huge":  # no bytes, so the header is consistent: [0, 2^40, ...]
        shape = [0] + [1 << 40] * max(1, len(shape) - 1)
        e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][0]]
    elif how == "negative":
        shape[i] = -shape[i] if shape[i] else -1
    else:
        shape[i] = shape[i] + 0.5
    old, e["shape"] = e["shape"], shape
    return f"shape {old} -> {shape} ({how})"


def bad_offsets(e: dict[str, Any], data_len: int, rng: random.Random) -> str:
    b, end = e["data_offsets"]
    how = rng.choice(["shift", "grow", "shrink", "beyond", "reversed", "negative", "string", "three"])
    if how == "shift":
        d = rng.choice([-8, -2, -1, 1, 2, 8])
        e["data_offsets"] = [max(0, b + d), max(0, end + d)]
    elif how == "grow":
        e["data_offsets"] = [b, end + rng.choice([1, 2, 64])]
    elif how == "shrink":
        e["data_offsets"] = [b, max(b, end - rng.choice([1, 2, 64]))]
    elif how == "beyond":
        e["data_offsets"] = [data_len + 8, data_len + 8 + (end - b)]
    elif how == "reversed":
        e["data_offsets"] = [end, b]
    elif how == "negative":
        e["data_offsets"] = [-1, end]
    elif how == "string":
        e["data_offsets"] = [str(b), str(end)]
    else:
        e["data_offsets"] = [b, end, end]
    return f"data_offsets {[b, end]} -> {e['data_offsets']}"


def m_overlap(ctx: Ctx) -> dict[str, Any] | None:
    """Two tensors share bytes: the same range, or a range that overlaps the neighbour's by a little."""
    f = ctx.pick_file()
    shard = Shard(ctx.root / f)
    if len(shard.entries) < 2:
        return None
    header, data = shard.header_and_data()
    a, b = ctx.rng.sample(sorted(shard.entries), 2)
    ea, eb = header[a], header[b]
    size_a = ea["data_offsets"][1] - ea["data_offsets"][0]
    start = max(0, min(eb["data_offsets"][0] + ctx.rng.choice([0, 1, 2]), len(data) - size_a))
    ea["data_offsets"] = [start, start + size_a]
    write_raw(ctx.root / f, header, data)
    return {"what": f"'{a}' in {f} moved onto '{b}''s bytes at {start}",
            "names": [[f], [a, b, layer_of(a), layer_of(b)]]}


def m_truncate(ctx: Ctx) -> dict[str, Any] | None:
    f = ctx.pick_file()
    p = ctx.root / f
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cut = ctx.rng.choice([0, 4, 8 + ctx.rng.randrange(max(1, n)), 8 + n + ctx.rng.randrange(max(1, len(raw) - 8 - n)), len(raw) - 1])
    p.write_bytes(raw[:cut])
    return {"what": f"{f} truncated from {len(raw)} to {cut} bytes", "names": [[f]]}


def m_header_len(ctx: Ctx) -> dict[str, Any] | None:
    f = ctx.pick_file()
    p = ctx.root / f
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    new = ctx.rng.choice([0, 1, n - 1, n + 1, n + 8, n - 8, len(raw) - 8, len(raw), 1 << 63, (1 << 64) - 1, 200 << 20])
    new = max(0, min(new, (1 << 64) - 1))
    p.write_bytes(struct.pack("<Q", new) + raw[8:])
    return {"what": f"header length of {f}: {n} -> {new}", "names": [[f]]}


def m_header_text(ctx: Ctx) -> dict[str, Any] | None:
    f = ctx.pick_file()
    p = ctx.root / f
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    how = ctx.rng.choice(["flip", "array", "null", "entry_not_object", "missing_key", "unknown_dtype"])
    if how == "flip":
        i = 8 + ctx.rng.randrange(n)
        raw[i] = ctx.rng.choice(b'{}[]":,0\x00\xff')
        p.write_bytes(bytes(raw))
        return {"what": f"header byte {i - 8} of {f} overwritten", "names": [[f]]}
    shard = Shard(p)
    header, data = shard.header_and_data()
    name = ctx.rng.choice(sorted(k for k in header if k != "__metadata__"))
    if how == "array":
        header = [header]  # type: ignore[assignment]
    elif how == "null":
        header = None  # type: ignore[assignment]
    elif how == "entry_not_object":
        header[name] = [header[name]["dtype"]]
    elif how == "missing_key":
        del header[name][ctx.rng.choice(["dtype", "shape", "data_offsets"])]
    else:
        header[name]["dtype"] = ctx.rng.choice(["F128", "f32", "", 5, None])
    write_raw(p, header, data)  # type: ignore[arg-type]
    groups = [[f]] if how in ("array", "null") else [[f], [name]]
    return {"what": f"header of {f}: {how} ({name})", "names": groups}


def m_nonfinite(ctx: Ctx) -> dict[str, Any] | None:
    picked = ctx.pick_tensor(lambda n, e: e["dtype"] in NONFINITE and len(e["data"]) > 0)
    if picked is None:
        return None
    f, shard, name = picked
    e = shard.entries[name]
    size = max(1, elem_bits(e["dtype"]) // 8)
    count = len(e["data"]) // size
    k = ctx.rng.choice([1, 1, 2, 7, count])
    chosen = ctx.rng.sample(range(count), min(k, count))
    for i in chosen:
        e["data"][i * size : (i + 1) * size] = ctx.rng.choice(NONFINITE[e["dtype"]])
    shard.write(ctx.root / f)
    return {"what": f"{len(chosen)} non-finite value(s) written into '{name}' ({e['dtype']}) in {f}",
            "names": ctx.tensor_groups(f, name), "nonfinite": len(chosen)}


def m_drop_tensor(ctx: Ctx) -> dict[str, Any] | None:
    """A companion (or any tensor) removed from its shard and from the index."""
    picked = ctx.pick_tensor(lambda n, e: is_scale(n)) or ctx.pick_tensor()
    if picked is None:
        return None
    f, shard, name = picked
    if len(shard.entries) < 2:
        return None
    del shard.entries[name]
    shard.write(ctx.root / f)
    index = ctx.root / "model.safetensors.index.json"
    if index.exists():
        j = json.loads(index.read_text())
        j["weight_map"].pop(name, None)
        index.write_text(json.dumps(j))
    return {"what": f"'{name}' removed from {f}", "names": [sorted(set(ctx.files)), [layer_of(name)]]}


CONFIG_EDITS: list[tuple[str, Any]] = [
    ("model_type", 5), ("model_type", None), ("model_type", ["llama"]), ("model_type", "deepseek_v4"),
    ("model_type", "deepseek_v32"), ("model_type", "kimi_k25"), ("model_type", "glm_moe_dsa"),
    ("architectures", 5), ("architectures", [5, None]), ("architectures", "LlamaForCausalLM"),
    ("architectures", ["Glm4MoeLiteForCausalLM"]), ("first_k_dense_replace", 1 << 31),
    ("first_k_dense_replace", -3), ("first_k_dense_replace", "2"),
    ("quantization_config", 5), ("quantization_config", []), ("quantization_config", None),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}),
    ("quantization_config.weight_block_size", ["a", 128]), ("quantization_config.weight_block_size", [0, 0]),
    ("quantization_config.weight_block_size", [-128, 128]), ("quantization_config.weight_block_size", [1 << 62, 1 << 62]),
    ("quantization_config.weight_block_size", [1.5, 128]), ("quantization_config.weight_block_size", 128),
    ("quantization_config.weight_block_size", [1, 1]), ("quantization_config.weight_block_size", [None, None]),
    ("quantization_config.scale_fmt", 5), ("quantization_config.scale_fmt", "ue8m0"),
    ("quantization_config.scale_fmt", None), ("quantization_config.quant_method", 5),
    ("quantization_config.fmt", []), ("quantization_config.group_size", 0), ("quantization_config.group_size", -1),
    ("quantization_config.group_size", 7), ("quantization_config.group_size", "x"),
    ("quantization_config.group_size", 1 << 40), ("quantization_config.weights", 5),
    ("quantization_config.weights", {"group_size": 0}), ("auto_map", {"AutoModel": "nope.Model"}),
    ("tie_word_embeddings", "yes"),
]  # fmt: skip
CONFIG_FILES = [b"[]", b"null", b'"text"', b"{", b"", b"\xff\xfe{}", b"5", b'{"model_type": "llama"}']


def m_config(ctx: Ctx) -> dict[str, Any] | None:
    p = ctx.root / "config.json"
    if ctx.rng.random() < 0.2:
        text = ctx.rng.choice(CONFIG_FILES)
        p.write_bytes(text)
        # Only a config that is an object can change how the shards read; anything else is config.json's fault.
        names = [["config.json", *ctx.files]] if text.startswith(b"{") and text.endswith(b"}") else [["config.json"]]
        return {"what": f"config.json replaced by {text!r}", "names": names}
    cfg = json.loads(p.read_text())
    key, value = ctx.rng.choice(CONFIG_EDITS)
    if "." in key:
        outer, inner = key.split(".", 1)
        if not isinstance(cfg.get(outer), dict):
            cfg[outer] = {}
        cfg[outer][inner] = value
    else:
        cfg[key] = value
    p.write_text(json.dumps(cfg))
    # The config changes how tensors read: an error may name config.json, or the shard and tensor it misreads.
    return {"what": f"config.json: {key} = {value!r}", "names": [["config.json", *ctx.files]]}


def m_index(ctx: Ctx) -> dict[str, Any] | None:
    p = ctx.root / "model.safetensors.index.json"
    if not p.exists():
        return None
    j = json.loads(p.read_text())
    name = ctx.rng.choice(sorted(j["weight_map"]))
    value = ctx.rng.choice([5, None, "missing.safetensors", "../model.safetensors", "/etc/passwd", "", ctx.rng.choice(ctx.files)])
    j["weight_map"][name] = value
    if ctx.rng.random() < 0.2:
        j = ctx.rng.choice([[], {"weight_map": []}, {}])
    p.write_text(json.dumps(j))
    return {"what": f"index: weight_map[{name!r}] = {value!r}", "names": [[p.name, "index", name] + ctx.files]}


MUTATIONS: list[tuple[str, Callable[..., dict[str, Any] | None], int]] = [
    ("dtype", m_dtype, 3),
    ("scale_dtype", lambda ctx: m_dtype(ctx, scales_only=True), 4),
    ("reshape", m_reshape, 3),
    ("scale_reshape", lambda ctx: m_reshape(ctx, scales_only=True), 2),
    ("scale_shape", m_scale_shape, 3),
    ("bad_shape", lambda ctx: header_edit(ctx, bad_shape), 2),
    ("offsets", lambda ctx: header_edit(ctx, bad_offsets), 2),
    ("overlap", m_overlap, 1),
    ("truncate", m_truncate, 1),
    ("header_len", m_header_len, 1),
    ("header_text", m_header_text, 1),
    ("nonfinite", m_nonfinite, 4),
    ("drop_tensor", m_drop_tensor, 2),
    ("config", m_config, 3),
    ("index", m_index, 1),
]
MUTATION_FNS = {name: fn for name, fn, _ in MUTATIONS}

# ----------------------------------------------------------------------------------------------
# the worker subprocess

WORKER = r"""
import json, os, sys, traceback
results = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # anything else printed to stdout goes to the log, not into the result stream
import logging
import fastround
logging.getLogger("fastround").setLevel(logging.ERROR)
ALLOWED = (fastround.CheckpointError, ValueError, OSError, FileNotFoundError)
for line in sys.stdin:
    case = json.loads(line)
    print("case", case["id"], case["what"], file=sys.stderr, flush=True)
    try:
        ar = fastround.AutoRound(case["src"], model_free=True, show_progress=False, **case["kwargs"])
        ar.quantize_and_save(case["out"], format=case["format"])
        res = {"ok": True}
    except BaseException as e:
        res = {"ok": False, "type": type(e).__module__ + "." + type(e).__qualname__,
               "allowed": type(e) in ALLOWED, "msg": str(e), "tb": traceback.format_exc()[-3000:]}
    results.write(json.dumps(res) + "\n")
    results.flush()
"""


class Worker:
    """One long-lived subprocess running cases; restarted after a crash or a hang."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="2")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env
        )
        self.buf = b""

    def _log_tail(self) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write((json.dumps(case) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                return {"hang": True, "log": self._log_tail()}
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                rc = self.proc.wait()
                self.proc = None
                return {"crash": rc, "log": self._log_tail()}
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ----------------------------------------------------------------------------------------------
# checks


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def check_output(out: Path) -> str | None:
    """None when `out` is a complete checkpoint that loads; otherwise what is wrong."""
    from safetensors import safe_open

    if (out / STAGING).exists():
        return f"{STAGING} left after success"
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json unreadable after success: {e}"
    if not isinstance(cfg, dict) or "quantization_config" not in cfg:
        return "config.json has no quantization_config"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    index = out / "model.safetensors.index.json"
    if index.exists():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        if not listed <= set(files):
            return f"index names missing shards {sorted(listed - set(files))}"
    elif files != ["model.safetensors"]:
        return f"weight files without an index: {files}"
    for name in files:
        try:
            with safe_open(str(out / name), "pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            return f"{name} does not load: {type(e).__name__}: {e}"
    return None


def check_failed_output(out: Path) -> str | None:
    """After an error: no output folder, or only the staging folder of finished shards (resume)."""
    if not out.exists():
        return None
    entries = sorted(p.name for p in out.iterdir())
    if entries != [STAGING]:
        return f"output folder holds {entries} after the error"
    staging = out / STAGING
    manifest = staging / "fastround-resume.json"
    if not manifest.exists():
        return f"{STAGING} left without a resume manifest: {sorted(p.name for p in staging.iterdir())}"
    done = sorted(r["output"] for r in json.loads(manifest.read_text())["shards"])
    kept = sorted(p.name for p in staging.glob("*.safetensors"))
    if not done or kept != done:
        return f"{STAGING} holds {kept}, its manifest {done}"
    return None


def check_message(msg: str, groups: list[list[str]]) -> str | None:
    for group in groups:
        if not any(s and s in msg for s in group):
            return f"message names none of {group}"
    return None


# ----------------------------------------------------------------------------------------------
# the suite


def make_case(i: int, base_names: list[str], bases: dict[str, Path], work: Path) -> dict[str, Any] | None:
    rng = random.Random(f"{SEED}:{i}")
    base = base_names[i % len(base_names)]
    label, kwargs = SCHEMES[rng.randrange(len(SCHEMES))]
    kwargs = dict(kwargs, threads=2, shard_parallelism=rng.choice([1, 2]))
    src = work / f"case{i:04d}-src"
    shutil.copytree(bases[base], src)
    ctx = Ctx(rng, src)
    names = [n for n, _, w in MUTATIONS for _ in range(w)]
    for _ in range(8):  # a mutation that does not apply to this checkpoint draws again
        kind = rng.choice(names)
        desc = MUTATION_FNS[kind](ctx)
        if desc is not None:
            break
    else:
        shutil.rmtree(src)
        return None
    return {
        "id": i,
        "base": base,
        "scheme": label,
        "mutation": kind,
        "what": desc["what"],
        "names": desc["names"],
        "src": str(src),
        "out": str(work / f"case{i:04d}-out"),
        "kwargs": kwargs,
        "format": "auto_round",
    }


def judge(case: dict[str, Any], res: dict[str, Any], before: dict[str, str]) -> str | None:
    src, out = Path(case["src"]), Path(case["out"])
    if "crash" in res:
        return f"worker died with exit status {res['crash']} (signal {-res['crash']} if negative)\n{res['log']}"
    if "hang" in res:
        return f"no result within {CASE_TIMEOUT_S:.0f} s (killed)\n{res['log']}"
    if snapshot(src) != before:
        return "the source folder changed"
    if res["ok"]:
        return check_output(out)
    if not res["allowed"]:
        return f"raised {res['type']}, not a mapped fastround error: {res['msg']}\n{res['tb']}"
    problem = check_failed_output(out) or check_message(res["msg"], case["names"])
    if problem:
        return f"{problem}; {res['type']}: {res['msg']}"
    return None


@pytest.fixture(scope="module")
def fuzz_env(checkpoint, tmp_path_factory):
    import fastround  # noqa: F401  (a broken build must fail here, not skip)

    # Every case fsyncs a few shards: on tmpfs that costs nothing, which halves the suite's time.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="fastround-fuzz-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("fuzz")
    bases = {}
    for name, build in BASES.items():
        bases[name] = build(checkpoint, root / "base" / name)
    worker = Worker(root / "worker.log")
    yield bases, worker, root
    worker.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("base", sorted(BASES))
def test_fuzz_model_free(fuzz_env, base):
    bases, worker, root = fuzz_env
    names = sorted(BASES)
    work = root / base
    work.mkdir()
    ids = [int(ONLY)] if ONLY is not None else range(CASES)
    failures, ran, outcomes = [], 0, {"ok": 0, "error": 0}
    for i in ids:
        if names[i % len(names)] != base:
            continue
        case = make_case(i, names, bases, work)
        if case is None:
            continue
        before = snapshot(Path(case["src"]))
        res = worker.run(case)
        ran += 1
        problem = judge(case, res, before)
        if problem:
            failures.append(
                f"case {i} (FASTROUND_FUZZ_SEED={SEED} FASTROUND_FUZZ_ONLY={i}) base={base} scheme={case['scheme']} "
                f"mutation={case['mutation']}: {case['what']}\n  -> {problem}"
            )
        else:
            outcomes["ok" if res.get("ok") else "error"] += 1
            shutil.rmtree(case["src"], ignore_errors=True)
            shutil.rmtree(case["out"], ignore_errors=True)
    print(f"{base}: {ran} cases, {outcomes['ok']} quantized, {outcomes['error']} refused with a clear error")
    assert ran or ONLY is not None, f"no case ran for {base}"
    assert not failures, f"{len(failures)} of {ran} fuzz cases failed:\n\n" + "\n\n".join(failures)
