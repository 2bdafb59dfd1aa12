# Type stub of the fastround._torch extension (checked against the built module by tests/test_torch_ops.py).
# Its dispatcher ops are torch.ops.fastround.{encode_weight, pack_codes, dequantize_codes, dequantize_packed}, typed by
# fastround.ops, the tuning ops (fastround.tune_ops) and woq_linear (packed INT inference, typed by fastround.infer_ops).
# torch.ops.fastround.hadamard_transform (the FWHT) is typed by fastround.transform_ops.hadamard_transform.
"""
fastround LibTorch adapters (the regular flow's ops are torch.ops.fastround.*)
"""
from __future__ import annotations

import torch

__all__: list[str] = ["packed_tensors", "quantize_int_gptq_tensor", "with_cuda"]

def packed_tensors(
    encoding: str,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    sym: bool,
    zero_offset: int,
    pad_partial_groups: bool,
) -> list[tuple[str, str, list[int]]]:
    """(suffix, dtype, shape) of each tensor pack_codes returns for a [rows, cols] weight, in order."""

def quantize_int_gptq_tensor(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, zero_offset: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN-quantize a torch weight [out, in] and pack it as auto_gptq: (qweight, qzeros, scales fp16)."""

def with_cuda() -> bool:
    """Whether the tuning ops have CUDA implementations (built against a CUDA torch with nvcc)."""
