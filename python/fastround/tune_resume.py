"""Resume for SignRound: each tuned block's results are committed to `<output_dir>/.fastround-tune/` as soon as
the block is done (safetensors written to a temp name, fsynced, renamed; then the manifest), together with the
Python RNG state the batch sampler continues from. A rerun of the same command replays the finished blocks
(their quantized weights, no tuning) and tunes the rest, so its output is byte-identical to an uninterrupted
run. A changed option or source starts over, naming what changed. The folder goes once the output is saved."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("fastround")

FOLDER = ".fastround-tune"
_MANIFEST = "manifest.json"
_VERSION = 1


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(model: torch.nn.Module, source_dir: str | None) -> dict[str, Any]:
    """What identifies the model: its config and, for a folder, its weight files' names, sizes and mtimes."""
    config = getattr(model, "config", None)
    out: dict[str, Any] = {"config": _digest(config.to_dict() if config is not None else type(model).__name__)}
    if source_dir and os.path.isdir(source_dir):
        files = sorted(p for p in Path(source_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        out["weights"] = _digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    else:
        out["weights"] = _digest(sum(p.numel() for p in model.parameters()))
    return out


def _dataset_key(dataset: Any) -> Any:
    if isinstance(dataset, str) or dataset is None:
        return dataset
    try:
        return _digest([d if not isinstance(d, torch.Tensor) else d.tolist() for d in dataset])
    except TypeError:
        return type(dataset).__name__


class TuneResume:
    """The committed blocks of one tuning run."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.units: dict[str, dict[str, Any]] = {}  # unit key -> {"file": ..., "rng": ...}

    @classmethod
    def open(cls, output_dir: str, fingerprint: dict[str, Any]) -> TuneResume:
        folder = Path(output_dir) / FOLDER
        state = cls(folder, fingerprint)
        manifest = folder / _MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = {}
            before = old.get("fingerprint", {})
            changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
            if old.get("version") == _VERSION and not changed:
                state.units = {k: v for k, v in old.get("units", {}).items() if (folder / v["file"]).is_file()}
                if state.units:
                    logger.info("resuming SignRound: %d block(s) already tuned in %s", len(state.units), folder)
            else:
                logger.warning("not resuming the tuning state in %s: %s changed since it was written", folder,
                               ", ".join(changed) or "its format")
                shutil.rmtree(folder, ignore_errors=True)
        return state

    def done(self, key: str) -> bool:
        return key in self.units

    def load(self, key: str) -> tuple[dict[str, tuple[torch.Tensor, ...]], Any, dict[str, torch.Tensor]]:
        """The unit's results (name -> qdq, codes, scales, zeros), the RNG state after it and its other tuned
        tensors (norm weights, biases) by parameter path."""
        from safetensors.torch import load_file

        entry = self.units[key]
        tensors = load_file(str(self.folder / entry["file"]))
        results = {}
        for name in entry["layers"]:
            results[name] = tuple(tensors[f"{name}.{part}"] for part in ("qdq", "codes", "scales", "zeros"))
        params = {path: tensors[f"param:{path}"] for path in entry.get("params", [])}
        return results, _rng_from_json(entry["rng"]), params

    def commit(self, key: str, results: dict[str, tuple[torch.Tensor, ...]], rng: Any,
               params: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{part}": t.detach().to("cpu").contiguous()
                   for name, parts in results.items()
                   for part, t in zip(("qdq", "codes", "scales", "zeros"), parts)}
        params = params or {}
        tensors.update({f"param:{path}": t.detach().to("cpu").contiguous() for path, t in params.items()})
        fname = f"unit-{len(self.units):05d}.safetensors"
        _fsync_write(self.folder / fname, save(tensors))
        self.units[key] = {"file": fname, "layers": list(results), "params": list(params), "rng": _rng_to_json(rng)}
        manifest = {"version": _VERSION, "fingerprint": self.fingerprint, "units": self.units}
        _fsync_write(self.folder / _MANIFEST, json.dumps(manifest, indent=1).encode())

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _rng_to_json(state: Any) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(value: list) -> Any:
    return (value[0], tuple(value[1]), value[2])


def run_fingerprint(comp: Any) -> dict[str, Any]:
    """Every option that changes what tuning produces, plus the source."""
    s = comp.signround
    options = {
        "scheme": comp.scheme, "layer_config": comp.layer_config, "dataset": _dataset_key(comp.dataset),
        "nsamples": comp.nsamples, "seqlen": comp.seqlen, "batch_size": comp.batch_size, "seed": comp.seed,
        "amp": comp.amp, "signround": {k: str(v) for k, v in vars(s).items()},
        "rotation": str(comp.rotation.config.model_dump()) if getattr(comp, "rotation", None) is not None else None,
        "quarot": str(getattr(comp, "quarot", None)),
    }
    if getattr(comp, "inplace", None) is not None:  # only then: earlier runs' fingerprints stay valid
        options["inplace_rotation"] = str(comp.inplace.model_dump())
    fp = {k: _digest(v) for k, v in options.items()}
    fp.update(source_fingerprint(comp.model, comp.source_dir))
    return fp


__all__ = ["TuneResume", "FOLDER", "run_fingerprint", "source_fingerprint"]
