"""fastround: LLM weight quantization with a C++ core and the AutoRound API.

Importing it does not import torch: the model-free core (`fastround._C`) is plain C++. The LibTorch
adapters live in `fastround._torch` (import torch first)."""

import logging

from fastround import _C
from fastround._C import CheckpointError
from fastround.autoround import AutoRound, ModelFreeCompressor
from fastround.hf import install_when_transformers_loads as _install_hf
from fastround.schemes import QuantizationScheme, preset_names

__version__ = "0.1.0"

# Like upstream auto-round, show INFO (progress summaries) unless the application configured logging.
_logger = logging.getLogger("fastround")
if not _logger.handlers and not logging.getLogger().handlers:
    _handler = logging.StreamHandler()
    _handler._fastround_default = True  # type: ignore[attr-defined]  # the CLI swaps it for its own
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
AUTOROUND_COMPAT_VERSION: str = _C.AUTOROUND_COMPAT_VERSION

# transformers loads auto-round / gptq / awq checkpoints on fastround's layers when their packages are absent
# (fastround.hf; FASTROUND_HF_BACKEND): registered now, or once transformers' quantizer table is imported.
_install_hf()


def load_quantized(folder, device=None, dtype="auto", **kwargs):  # type: ignore[no-untyped-def]
    """A quantized checkpoint as a transformers causal LM on fastround's layers (fastround.hf.load_quantized)."""
    from fastround.hf import load_quantized as _load

    return _load(folder, device=device, dtype=dtype, **kwargs)

__all__ = [
    "AUTOROUND_COMPAT_VERSION",
    "AutoRound",
    "CheckpointError",
    "ModelFreeCompressor",
    "load_quantized",
    "QuantizationScheme",
    "preset_names",
]
