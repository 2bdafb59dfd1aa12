"""woq_linear_rotated on CUDA (the fused online rotation of a rotated checkpoint's QuantLinear): the bits of
hadamard_transform followed by woq_linear on the GPU, for the decode shapes of a Llama-3-8B (R4 1 x 14336 K = 28 in
fp32 numerics, R1 4096, the transform backend's 32-blocks), and a QuantLinear with attach_rotation equals the same
layer with the forward pre-hook. Run by the lead on the GPU host: pytest benchmarks/gpu_checks/test_woq_rotated_cuda.py."""

from __future__ import annotations

import pytest
import torch

from fastround import quarot as Q
from fastround import transform_ops as T
from fastround.quant_linear import QuantLinear, attach_rotation

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and T.has_cuda_kernel()
                                     and hasattr(torch.ops.fastround, "woq_linear_rotated")),
                                reason="needs a CUDA device and the CUDA build")
_ops = torch.ops.fastround


def quant_linear(i: int, o: int, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(i, o, 4, 128, True, "gptq")
    with torch.no_grad():
        q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, q.qweight.shape, generator=g, dtype=torch.int64)
                        .to(torch.int32))
        q.qzeros.fill_(0x77777777)
        q.scales.copy_((torch.rand(q.scales.shape, generator=g) * 0.004 + 0.001).half())
    return q.cuda()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("width,block,k", [(14336, 14336, 28), (4096, 4096, 1), (4096, 32, 1)])
@pytest.mark.parametrize("rows", [1, 5])
def test_op_equals_two_ops(width, block, k, rows):
    q = quant_linear(width, 512, width + rows)
    hk = T.spinquant_matrix(k).cuda() if k > 1 else None
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)).bfloat16().cuda()
    args = (q.qweight, q.qzeros, q.scales, None, 4, 128, "gptq")
    want = _ops.woq_linear(T.hadamard_transform(x, block, hk, None, False, True), *args)
    got = _ops.woq_linear_rotated(x, *args, block, hk, None, False, True)
    torch.cuda.synchronize()
    same_bits(got, want)


def test_module_fused_equals_pre_hook():
    hook = Q.online_hook("r4", 14336, 28)
    fused, hooked = quant_linear(14336, 4096, 1), quant_linear(14336, 4096, 1)
    attach_rotation(fused, hook)
    hooked.register_forward_pre_hook(hook, prepend=True)
    assert fused.input_rotation is not None
    x = torch.randn(1, 1, 14336, generator=torch.Generator().manual_seed(2)).bfloat16().cuda()
    with torch.inference_mode():
        same_bits(fused(x), hooked(x))
