"""Setup the GPU checks share: the `cuda` fixture, which fails (never skips) where the checks cannot run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    """The CUDA device, asserting that one exists and that fastround was built with its CUDA kernels."""
    from fastround import _torch

    assert torch.cuda.is_available(), "these checks need a CUDA device: run them on the GPU host"
    assert _torch.with_cuda(), "fastround was built without CUDA: build it with benchmarks/gpu_build.sh"
    return torch.device("cuda")
