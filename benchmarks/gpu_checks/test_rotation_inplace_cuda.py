"""The inplace rotation backend on a CUDA model (fp64 weight rotations through the CUDA FWHT, the random matrix moved
to the weight's device, the online hooks on CUDA activations): the rotated weights equal the CPU run's bits and the
rotated model keeps its logits. Run by the lead on the GPU host: pytest benchmarks/gpu_checks."""

from __future__ import annotations

import copy

import pytest
import torch

from fastround import rotation_inplace as I

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


@pytest.mark.parametrize("preset", ["hadamard", "random_hadamard"])
@pytest.mark.parametrize("group,fuse", [(None, True), (32, True), (None, False)])
def test_cuda_rotation_equals_cpu_and_keeps_logits(preset, group, fuse):
    cpu = _tiny().to(torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = _tiny().cuda()
    with torch.no_grad():
        before = ref(ids.cuda()).logits.float()
    torch.manual_seed(3)
    I.apply_inplace(cpu, preset, group, fuse)
    torch.manual_seed(3)
    I.apply_inplace(gpu, preset, group, fuse)
    a, b = cpu.state_dict(), gpu.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k].cpu()), k
    torch.manual_seed(3)
    I.apply_inplace(ref, preset, group, fuse)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids.cuda()).logits.float(), before, rtol=0, atol=1e-4)
