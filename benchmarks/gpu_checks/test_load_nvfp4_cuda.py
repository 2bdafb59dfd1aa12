"""GPU check of the NVFP4 load path (FPQuantLinear, encoding nvfp4): on CUDA the layer's weight decode (torch ops)
and its input qdq (torch.ops.fastround.fp_qdq, data_type nv_fp, CUDA kernel) must equal the CPU layer bit for bit,
and the forward agree within fp32 matmul rounding. The CPU path is pinned on upstream by tests/test_load_nvfp4.py.
Run on the GPU host:
    bash benchmarks/gpu_build.sh          # builds fastround with CUDA into /tmp, then runs this folder
"""

from __future__ import annotations

import pytest
import torch
from _same_bits import same_bits

from fastround.quant_linear import FPQuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layer(out_f: int, in_f: int) -> FPQuantLinear:
    g = torch.Generator().manual_seed(0)
    layer = FPQuantLinear(in_f, out_f, "nvfp4", act_nvfp4=True, input_global_scale=True)
    layer.weight_packed.copy_(torch.randint(0, 256, (out_f, in_f // 2), generator=g, dtype=torch.uint8))
    scales = (torch.rand(out_f, in_f // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
    layer.weight_scale.copy_(scales)
    layer.weight_global_scale.fill_(448 * 6 / 0.37)
    layer.input_global_scale.fill_(448 * 6 / 5.0)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_layer_cuda_equals_cpu(dtype: torch.dtype) -> None:
    cpu = _layer(96, 160)
    dev = _layer(96, 160).cuda()
    x = torch.randn(4, 7, 160, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    assert same_bits(cpu.dequantize(), dev.dequantize().cpu())
    assert same_bits(cpu.quantize_input(x), dev.quantize_input(x.cuda()).cpu())
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp32 sums in another order, then one rounding to 16 bits
    with torch.inference_mode():
        torch.testing.assert_close(dev(x.cuda()).cpu().float(), cpu(x).float(), rtol=tol, atol=tol)
