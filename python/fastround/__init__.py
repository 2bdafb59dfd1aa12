"""fastround: LLM weight quantization with a C++ core and the AutoRound API."""

import torch  # noqa: F401  (loads libtorch, which the extension links against)

from fastround import _C
from fastround._C import CheckpointError
from fastround.autoround import AutoRound, ModelFreeCompressor
from fastround.schemes import QuantizationScheme, preset_names

__version__ = "0.1.0"
AUTOROUND_COMPAT_VERSION: str = _C.AUTOROUND_COMPAT_VERSION

__all__ = [
    "AUTOROUND_COMPAT_VERSION",
    "AutoRound",
    "CheckpointError",
    "ModelFreeCompressor",
    "QuantizationScheme",
    "preset_names",
]
