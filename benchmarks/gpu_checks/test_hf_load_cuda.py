"""GPU check of loading quantized checkpoints on CUDA (fastround.load_quantized / transformers with fastround's
quantizer): the repo's small trained Llama quantized by fastround (W4A16 GPTQ words, asym W4 AWQ words, MXFP4),
loaded on the CPU and on CUDA; the CUDA logits must equal the CPU ones within fp32 matmul tolerance (both run the
reference dequantize-and-matmul unless torch.ops.fastround.woq_linear is built with a CUDA kernel) and greedy
generation must give the same tokens. Needs a CUDA device:
    python3 -m pytest -q benchmarks/gpu_checks/test_hf_load_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMALL_MODEL = REPO / "models" / "fastround-llama-tiny"
COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu"}


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    assert torch.cuda.is_available(), "this check needs a CUDA device: run it on the GPU host"
    return torch.device("cuda")


@pytest.mark.parametrize("fmt,kwargs", [
    ("auto_round", {"scheme": "W4A16"}),
    ("auto_round", {"scheme": "W4A16", "sym": False}),
    ("auto_round", {"scheme": "MXFP4"}),
])
def test_cuda_equals_cpu(cuda: torch.device, tmp_path: Path, fmt: str, kwargs: dict) -> None:
    import fastround
    from fastround import AutoRound

    _, folder = AutoRound(str(SMALL_MODEL), **COMMON, **kwargs).quantize_and_save(str(tmp_path), format=fmt)
    cpu = fastround.load_quantized(folder, device="cpu", dtype=torch.float32)
    dev = fastround.load_quantized(folder, device=cuda, dtype=torch.float32)
    ids = torch.arange(1, 65).view(1, 64)
    with torch.inference_mode():
        a = cpu(ids).logits
        b = dev(ids.to(cuda)).logits.cpu()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        g_cpu = cpu.generate(ids[:, :8], max_new_tokens=16, do_sample=False)
        g_dev = dev.generate(ids[:, :8].to(cuda), max_new_tokens=16, do_sample=False).cpu()
    assert torch.equal(g_cpu, g_dev)
