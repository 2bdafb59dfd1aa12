"""fastround: LLM weight quantization with a C++ core and the AutoRound API.

Importing it does not import torch: the model-free core (`fastround._C`) is plain C++. The LibTorch
adapters live in `fastround._torch` (import torch first)."""

import logging

from fastround import _C
from fastround._C import CheckpointError
from fastround.autoround import AutoRound, ModelFreeCompressor
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

__all__ = [
    "AUTOROUND_COMPAT_VERSION",
    "AutoRound",
    "CheckpointError",
    "ModelFreeCompressor",
    "QuantizationScheme",
    "preset_names",
]
