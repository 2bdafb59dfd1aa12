"""In-process runners for the upstream auto-round oracle, and checkpoint diffing.

Upstream model-free runs shards in a spawn-based ProcessPoolExecutor: that
costs ~15 s of interpreter start-up per run and breaks without a __main__
guard under pytest. We swap it for a single-thread executor, which also makes
shard completion order (and so weight_map / block_name_to_quantize order)
deterministic and equal to submission order.

The checkpoint readers here deliberately avoid torch so that comparisons do
not depend on torch's safetensors loader.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

# The oracle must never reach the network; sources are always local dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------
# Upstream patching
# ---------------------------------------------------------------------------


class _InlineShardExecutor(cf.ThreadPoolExecutor):
    """Drop-in for ProcessPoolExecutor(max_workers, mp_context): one worker thread."""

    def __init__(self, max_workers: int | None = None, mp_context: Any = None, **kwargs: Any) -> None:
        del max_workers, mp_context, kwargs  # a single worker keeps completion order fixed
        super().__init__(max_workers=1)


_patch_lock = threading.Lock()
_patched = False


def patch_upstream() -> None:
    """Idempotently make upstream model-free run its shard workers in-process."""
    global _patched
    with _patch_lock:
        if _patched:
            return
        import auto_round.compressors.model_free as mf

        mf.ProcessPoolExecutor = _InlineShardExecutor
        # Upstream's cleanup terminates worker processes and shuts down with
        # wait=False; a thread pool must be joined so outputs are complete.
        mf._force_cleanup_process_pool = lambda pool: pool and pool.shutdown(wait=True)
        _patched = True


# ---------------------------------------------------------------------------
# Cached oracle runs
# ---------------------------------------------------------------------------

_cache: dict[str, Path] = {}
_failures: dict[str, Exception] = {}
_cache_root: Path | None = None


def _freeze(value: Any) -> str:
    # Key order of user dicts (layer_config) affects upstream's extra_config
    # order, so it must be part of the key: no sort_keys.
    return json.dumps(value, default=repr)


def _cache_dir() -> Path:
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="fastround_oracle_"))
    return _cache_root


def _prepare_out(out: PathLike | None) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix="run_", dir=_cache_dir()))
    path = Path(out)
    # Upstream resumes from a manifest left in an existing output dir, so a
    # stale dir could silently change what it does.
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"oracle output dir {path} is not empty")
    return path


def _cached_run(key: str, out: PathLike | None, runner: Callable[[Path], None]) -> Path:
    """Run `runner(path)` once per key; later callers get a copy at their `out`.

    Failures are cached too, so a configuration upstream rejects is not
    re-run by every test that touches it.
    """
    failure = _failures.get(key)
    if failure is not None:
        raise failure
    hit = _cache.get(key)
    if hit is not None:
        if out is None or Path(out).resolve() == hit.resolve():
            return hit
        target = _prepare_out(out)
        shutil.copytree(hit, target, dirs_exist_ok=True)
        return target
    target = _prepare_out(out)
    target.mkdir(parents=True, exist_ok=True)
    try:
        runner(target)
    except Exception as exc:
        _failures[key] = exc
        raise
    _cache[key] = target
    return target


def run_upstream_api(src: PathLike, out: PathLike | None = None, format: str = "auto_round", **kwargs: Any) -> Path:
    """AutoRound(model=src, model_free=True, ...).quantize_and_save(out, format=format).

    Note: a scheme string like "W4A16_MIXED" is normalised by the AutoRound
    entry before model-free sees it, so its mixed recipe is NOT applied here;
    use run_upstream_core for that.
    """
    src = str(Path(src).resolve())
    key = _freeze(["api", src, format, kwargs])

    def runner(target: Path) -> None:
        patch_upstream()
        from auto_round import AutoRound

        opts = {"enable_torch_compile": False, **kwargs}
        compressor = AutoRound(model=src, model_free=True, **opts)
        compressor.quantize_and_save(str(target), format=format)

    return _cached_run(key, out, runner)


def run_upstream_core(src: PathLike, out: PathLike | None = None, scheme: Any = "W4A16", **kwargs: Any) -> Path:
    """Low-level _ModelFreeCompressorCore(...).run() with the literal scheme.

    This is the only path where scheme="W4A16_MIXED" applies its mixed recipe.
    kwargs: layer_config, ignore_layers, format, device, quant_lm_head,
    quant_nontext_module, enable_torch_compile (default False), disable_opt_rtn.
    """
    src = str(Path(src).resolve())
    key = _freeze(["core", src, scheme, kwargs])

    def runner(target: Path) -> None:
        patch_upstream()
        from auto_round.compressors.model_free import _ModelFreeCompressorCore

        opts = {"enable_torch_compile": False, **kwargs}
        _ModelFreeCompressorCore(model_name_or_path=src, output_dir=str(target), scheme=scheme, **opts).run()

    return _cached_run(key, out, runner)


def run_upstream_class(src: PathLike, out: PathLike | None = None, format: str = "auto_round", **kwargs: Any) -> Path:
    """ModelFreeCompressor(src, **kwargs).quantize_and_save(out, format=format): upstream's exported class.

    Unlike the AutoRound entry, the class takes scheme fields (bits, sym, ...) as keyword overrides and
    sets them on the bare preset, leaving unset act_* fields unset.
    """
    src = str(Path(src).resolve())
    key = _freeze(["class", src, format, kwargs])

    def runner(target: Path) -> None:
        patch_upstream()
        from auto_round.compressors.model_free import ModelFreeCompressor

        opts = {"enable_torch_compile": False, **kwargs}
        ModelFreeCompressor(src, **opts).quantize_and_save(str(target), format=format)

    return _cached_run(key, out, runner)


def run_upstream_regular(src: PathLike, out: PathLike | None = None, **kwargs: Any) -> Path:
    """The regular (model-loading) RTN flow on CPU, for cross-checking numerics.

    Caveats observed with auto-round 0.16.1 (compare quantized tensors only):
      - Any Linear with a dim not divisible by 32 is silently kept in full
        precision (only kind "llama_aligned" is fully quantized).
      - It does not pad in_features to whole groups: its qweight has
        in/(32/bits) rows where model-free has ceil(in/gs)*gs/(32/bits); the
        shared prefix, qzeros and scales match for sym.
      - amp=False (our default) loads fp32, so untouched tensors come back F32;
        amp=True would keep bf16 but turns fp16 sources into bf16 on CPU,
        which changes the scales.
      - Asym uses the native auto_round packing ([in, out/8]-shaped qweight),
        not model-free's gptq layout.
      - Its quantization_config has sorted keys and extra fields.
    """
    src = str(Path(src).resolve())
    fmt = kwargs.pop("format", "auto_round")
    key = _freeze(["regular", src, fmt, kwargs])

    def runner(target: Path) -> None:
        from auto_round import AutoRound

        opts: dict[str, Any] = {
            "iters": 0,
            "disable_opt_rtn": True,
            "enable_torch_compile": False,
            "amp": False,
            "device_map": "cpu",
            "disable_model_free": True,
            **kwargs,
        }
        # The regular flow exports into <output_dir>/<model-name>-w4g128; stage
        # it and flatten so callers get the checkpoint at `out` like the others.
        stage = Path(tempfile.mkdtemp(prefix=".regular_stage_", dir=target.parent))
        try:
            compressor = AutoRound(model=src, **opts)
            compressor.quantize_and_save(str(stage), format=fmt)
            export = _single_export_dir(stage)
            for entry in export.iterdir():
                shutil.move(str(entry), str(target / entry.name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    return _cached_run(key, out, runner)


def _single_export_dir(stage: Path) -> Path:
    if (stage / "config.json").is_file():
        return stage
    subdirs = [p for p in stage.iterdir() if p.is_dir()]
    if len(subdirs) != 1:
        raise RuntimeError(f"expected one export folder in {stage}, found {[p.name for p in subdirs]}")
    return subdirs[0]


def clear_cache() -> None:
    """Forget cached runs (their directories are left for the caller's tmp cleanup)."""
    _cache.clear()
    _failures.clear()


# ---------------------------------------------------------------------------
# safetensors reading without torch
# ---------------------------------------------------------------------------

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

TensorRecord = tuple[str, tuple[int, ...], bytes]


def read_safetensors_header(path: PathLike) -> tuple[dict[str, Any], int]:
    """Return (header dict in file order, absolute offset of the data area)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def read_safetensors(path: PathLike) -> dict[str, TensorRecord]:
    """Tensors of one file in header order: name -> (dtype, shape, raw bytes)."""
    header, base = read_safetensors_header(path)
    data = Path(path).read_bytes()
    out: dict[str, TensorRecord] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), data[base + begin : base + end])
    return out


def safetensors_files(directory: PathLike) -> list[str]:
    return sorted(p.name for p in Path(directory).glob("*.safetensors"))


def read_checkpoint(directory: PathLike) -> dict[str, TensorRecord]:
    """All tensors of every top-level *.safetensors file in `directory`."""
    tensors: dict[str, TensorRecord] = {}
    for name in safetensors_files(directory):
        for key, rec in read_safetensors(Path(directory) / name).items():
            if key in tensors:
                raise ValueError(f"tensor {key} appears in more than one shard of {directory}")
            tensors[key] = rec
    return tensors


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------


class CheckpointDiff(list[str]):
    """Substantive differences (the list itself) plus `.order`: ordering-only ones.

    Ordering-only differences (dict key order in JSON, item order inside
    block_name_to_quantize) can legitimately depend on shard completion order
    upstream, so tests may choose to tolerate them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []


def _first_diff_element(a: bytes, b: bytes, itemsize: int, shape: tuple[int, ...]) -> str:
    n = min(len(a), len(b)) // itemsize * itemsize
    va = np.frombuffer(a, dtype=np.uint8, count=n).reshape(-1, itemsize)
    vb = np.frombuffer(b, dtype=np.uint8, count=n).reshape(-1, itemsize)
    bad = np.flatnonzero((va != vb).any(axis=1))
    if bad.size == 0:
        return "lengths differ"
    flat = int(bad[0])
    where = f"flat {flat}"
    if shape and int(np.prod(shape)) * itemsize == len(a):
        where += f" = {tuple(int(i) for i in np.unravel_index(flat, shape))}"
    ea, eb = a[flat * itemsize : (flat + 1) * itemsize], b[flat * itemsize : (flat + 1) * itemsize]
    return f"{bad.size} element(s) differ; first at {where}: {ea.hex()} vs {eb.hex()}"


def _compare_tensors(a: dict[str, TensorRecord], b: dict[str, TensorRecord], diffs: list[str]) -> None:
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a:
        diffs.append(f"tensors only in A: {only_a}")
    if only_b:
        diffs.append(f"tensors only in B: {only_b}")
    for name in sorted(a.keys() & b.keys()):
        (da, sa, ba), (db, sb, bb) = a[name], b[name]
        if da != db:
            diffs.append(f"tensor {name}: dtype {da} vs {db}")
        if sa != sb:
            diffs.append(f"tensor {name}: shape {list(sa)} vs {list(sb)}")
        if ba != bb and da == db and sa == sb:
            diffs.append(f"tensor {name}: bytes differ ({_first_diff_element(ba, bb, DTYPE_SIZES.get(da, 1), sa)})")


def _same_json(a: Any, b: Any) -> bool:
    # bool/int/float distinctions change the serialised bytes, so compare types too.
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b


def _compare_json(a: Any, b: Any, where: str, diffs: list[str], order: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() - b.keys():
            diffs.append(f"{where}.{k}: only in A ({json.dumps(a[k])[:200]})")
        for k in b.keys() - a.keys():
            diffs.append(f"{where}.{k}: only in B ({json.dumps(b[k])[:200]})")
        common_a = [k for k in a if k in b]
        common_b = [k for k in b if k in a]
        if common_a != common_b:
            order.append(f"{where}: key order differs:\n  A: {common_a}\n  B: {common_b}")
        for k in common_a:
            _compare_json(a[k], b[k], f"{where}.{k}", diffs, order)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_json(x, y, f"{where}[{i}]", diffs, order)
        return
    if where.endswith(".block_name_to_quantize") and isinstance(a, str) and isinstance(b, str) and a != b:
        if sorted(a.split(",")) == sorted(b.split(",")):
            order.append(f"{where}: item order differs: {a!r} vs {b!r}")
            return
    if not _same_json(a, b):
        diffs.append(f"{where}: {json.dumps(a)[:300]} vs {json.dumps(b)[:300]}")


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _compare_json_file(name: str, pa: Path, pb: Path, result: CheckpointDiff) -> None:
    ja, jb = _load_json(pa), _load_json(pb)
    n_diffs, n_order = len(result), len(result.order)
    _compare_json(ja, jb, name, result, result.order)
    if len(result) == n_diffs and len(result.order) == n_order and pa.read_bytes() != pb.read_bytes():
        # Same content and order, so only serialisation (indent, escapes,
        # float repr, trailing newline) differs: still not byte-identical.
        result.append(f"{name}: same JSON content but file bytes differ (formatting)")


def _relative_entries(directory: Path, ignore: Iterable[str]) -> set[str]:
    """Relative paths of files and directories (the latter with a trailing '/')."""
    skip = set(ignore)
    entries: set[str] = set()
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if rel.parts[0] in skip:
            continue
        entries.add(rel.as_posix() + ("/" if p.is_dir() else ""))
    return entries


# Order-only differences the parity tests tolerate: upstream derives these orders from shard completion
# (and its processing order), fastround from source order (docs/compatibility.md).
ORDER_ONLY_DIFFS = (
    "model.safetensors.index.json.weight_map: key order differs",
    "config.json.quantization_config.extra_config: key order differs",
    "quantization_config.json.extra_config: key order differs",
    "config.json.quantization_config.block_name_to_quantize: item order differs",
    "quantization_config.json.block_name_to_quantize: item order differs",
)


def compare_checkpoints(
    a_dir: PathLike, b_dir: PathLike, ignore: Iterable[str] = (".cache", "fastround_summary.json")
) -> CheckpointDiff:
    """Human-readable differences between two checkpoint directories (A vs B).

    The returned list holds substantive differences; `.order` holds
    ordering-only differences (JSON key order, block_name_to_quantize order,
    weight_map order). Empty list and empty `.order` means every file matches,
    byte for byte where bytes are checked.

    `ignore` names top-level entries to leave out: upstream 0.16.1 leaves an
    empty `.cache/` (its resume-manifest folder) in every output dir; fastround adds its
    accounting summary `fastround_summary.json` (checked by its own tests).
    """
    a, b = Path(a_dir), Path(b_dir)
    result = CheckpointDiff()

    files_a, files_b = _relative_entries(a, ignore), _relative_entries(b, ignore)
    if files_a != files_b:
        result.append(f"file list: only in A {sorted(files_a - files_b)}, only in B {sorted(files_b - files_a)}")

    _compare_tensors(read_checkpoint(a), read_checkpoint(b), result)

    for name in sorted(set(safetensors_files(a)) & set(safetensors_files(b))):
        ba, bb = (a / name).read_bytes(), (b / name).read_bytes()
        if ba != bb:
            off = next((i for i, (x, y) in enumerate(zip(ba, bb)) if x != y), min(len(ba), len(bb)))
            (ha, base_a), (hb, _) = read_safetensors_header(a / name), read_safetensors_header(b / name)
            part = "header" if off < base_a else "data"
            detail = "" if list(ha) == list(hb) else " (tensor order differs)"
            result.append(
                f"{name}: file bytes differ at offset {off} in {part}{detail}; sizes {len(ba)} vs {len(bb)}"
            )

    index = "model.safetensors.index.json"
    if (a / index).is_file() and (b / index).is_file():
        _compare_json_file(index, a / index, b / index, result)

    for cfg in ("config.json", "quantization_config.json"):
        if (a / cfg).is_file() and (b / cfg).is_file():
            _compare_json_file(cfg, a / cfg, b / cfg, result)

    handled = {index, "config.json", "quantization_config.json"}
    for rel in sorted(files_a & files_b):
        if rel in handled or rel.endswith("/") or (rel.endswith(".safetensors") and "/" not in rel):
            continue
        if (a / rel).read_bytes() != (b / rel).read_bytes():
            result.append(f"{rel}: file bytes differ")

    return result


__all__ = [
    "CheckpointDiff",
    "DTYPE_SIZES",
    "clear_cache",
    "compare_checkpoints",
    "patch_upstream",
    "read_checkpoint",
    "read_safetensors",
    "read_safetensors_header",
    "run_upstream_api",
    "run_upstream_class",
    "run_upstream_core",
    "run_upstream_regular",
    "safetensors_files",
]
