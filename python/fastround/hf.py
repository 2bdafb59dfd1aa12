"""Registration of fastround's quantizer with Hugging Face transformers.

transformers maps a checkpoint's `quantization_config.quant_method` to a quantizer class in
`transformers.quantizers.auto`. Its `auto-round` quantizer needs the auto_round package, its `gptq` and `awq`
quantizers need gptqmodel (or autoawq). fastround serves those three methods itself, on its own layers
(fastround.quant_linear), when the backend says so:

- `FASTROUND_HF_BACKEND=auto` (the default): fastround serves a method whose upstream package is not importable
  (`auto-round`: auto_round; `gptq`: gptqmodel; `awq`: gptqmodel or awq); upstream keeps what it can serve.
- `FASTROUND_HF_BACKEND=fastround`: fastround serves all three.
- `FASTROUND_HF_BACKEND=upstream`: transformers' own quantizers, untouched.

`fastround.hf.use(backend)` changes it at run time; `fastround.hf.serving()` says who serves each method.
`import fastround` installs it: at once if transformers is already imported, else right after
`transformers.quantizers.auto` is (so importing fastround alone imports neither torch nor transformers).
The method name `fastround` is registered through transformers' public registry; the public registry refuses
existing names, so for `auto-round`, `gptq` and `awq` fastround swaps the entries of transformers' mappings and
keeps the originals to restore them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("fastround")

BACKENDS = ("auto", "fastround", "upstream")
# quant_method -> the packages whose presence lets transformers' own quantizer serve it
UPSTREAM_PACKAGES: dict[str, tuple[str, ...]] = {
    "auto-round": ("auto_round",),
    "gptq": ("gptqmodel",),
    "awq": ("gptqmodel", "awq"),
}
_ENV = "FASTROUND_HF_BACKEND"

_originals: dict[str, tuple[Any, Any]] = {}  # quant_method -> (quantizer class, config class) of transformers
_backend: str | None = None  # None: not installed yet


def importable(package: str) -> bool:
    """Whether `import package` would find it (without importing it; a finder that blocks it counts as absent)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _check(backend: str) -> str:
    name = str(backend).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{_ENV} / fastround.hf.use: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return name


def _serves(method: str, backend: str) -> bool:
    if backend == "fastround":
        return True
    if backend == "upstream":
        return False
    return not any(importable(p) for p in UPSTREAM_PACKAGES[method])


def use(backend: str) -> dict[str, str]:
    """Route auto-round / gptq / awq checkpoints per `backend` ("auto", "fastround" or "upstream") from now on;
    returns serving()."""
    global _backend
    backend = _check(backend)
    from transformers.quantizers import auto

    from fastround.hf_quantizer import FastroundHfQuantizer, FastroundQuantConfig

    if "fastround" not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantization_config("fastround")(FastroundQuantConfig)
        auto.register_quantizer("fastround")(FastroundHfQuantizer)
    for method in UPSTREAM_PACKAGES:
        if method not in _originals:
            _originals[method] = (auto.AUTO_QUANTIZER_MAPPING.get(method), auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(method))
        if _serves(method, backend):
            auto.AUTO_QUANTIZER_MAPPING[method] = FastroundHfQuantizer
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = FastroundQuantConfig
        else:
            quantizer, config = _originals[method]
            for mapping, value in ((auto.AUTO_QUANTIZER_MAPPING, quantizer), (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config)):
                if value is None:
                    mapping.pop(method, None)
                else:
                    mapping[method] = value
    _backend = backend
    return serving()


def serving() -> dict[str, str]:
    """{quant_method: "fastround" | "upstream"} for auto-round, gptq and awq, as transformers routes them now."""
    if _backend is None:
        try:
            import transformers.quantizers.auto  # noqa: F401  (the post-import hook installs)
        except ImportError:
            return {}
        if _backend is None:
            install()
    from transformers.quantizers import auto

    from fastround.hf_quantizer import FastroundHfQuantizer

    return {m: "fastround" if auto.AUTO_QUANTIZER_MAPPING.get(m) is FastroundHfQuantizer else "upstream"
            for m in UPSTREAM_PACKAGES}


def install() -> None:
    """Apply FASTROUND_HF_BACKEND (default auto). Called by `import fastround` once transformers is importable."""
    backend = _check(os.environ.get(_ENV, "auto") or "auto")
    use(backend)
    logger.debug("fastround.hf: %s", serving())


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs install() right after transformers.quantizers.auto has executed (a post-import hook)."""

    TARGET = "transformers.quantizers.auto"

    def __init__(self) -> None:
        self._inner: Any = None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec) if hasattr(self._inner, "create_module") else None

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            install()
        except Exception as exc:  # noqa: BLE001 - a failed registration must not break importing transformers
            logger.warning("fastround: could not register with transformers: %s", exc)


def install_when_transformers_loads() -> None:
    """install() now if transformers' quantizer table is loaded, else once it is."""
    if "transformers.quantizers.auto" in sys.modules:
        try:
            install()
        except Exception as exc:  # noqa: BLE001
            logger.warning("fastround: could not register with transformers: %s", exc)
        return
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())




def load_quantized(folder: str | os.PathLike[str], device: Any = None, dtype: Any = "auto", **kwargs: Any) -> Any:
    """A quantized checkpoint (auto-round, gptq or awq quant_method; a local folder or hub id) as a transformers
    causal LM on fastround's layers, whatever FASTROUND_HF_BACKEND says.

    device: where the model runs ("cpu", "cuda", "cuda:1", a torch.device, or a transformers device_map such as
    "auto" or a dict); default the CPU. Tensors are read shard by shard from the memory-mapped safetensors files
    straight into the modules, so peak memory stays near the quantized size. kwargs go to from_pretrained.
    """
    import torch
    from transformers import AutoModelForCausalLM

    previous = _backend
    use("fastround")
    try:
        if isinstance(device, (dict, str)) and (isinstance(device, dict) or device in ("auto", "balanced",
                                                                                     "sequential")):
            device_map: Any = device
        else:
            device_map = {"": torch.device(device if device is not None else "cpu")}
        return AutoModelForCausalLM.from_pretrained(os.fspath(folder), device_map=device_map, dtype=dtype, **kwargs)
    finally:
        use(previous or os.environ.get(_ENV, "auto") or "auto")


__all__ = ["BACKENDS", "UPSTREAM_PACKAGES", "importable", "install", "install_when_transformers_loads",
           "load_quantized", "serving", "use"]
