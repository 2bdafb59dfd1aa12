"""woq_linear_rotated's fused CUDA path (issue 12): a plain power-of-two block Hadamard whose GEMV is the staged
kernel runs inside that kernel, one launch, and must give the bits of hadamard_transform followed by woq_linear,
and of the op with the fusion turned off (FASTROUND_WOQ_FUSE_ROTATION=0). Cases the fusion does not take (other
bits and layouts, K > 1, more rows, fp32 x, blocks that straddle the kernel's slices) run the two ops and still
match. Run by the lead on the GPU host:

    pytest -q benchmarks/gpu_checks/test_woq_rotated_fused_cuda.py
"""

from __future__ import annotations

import pytest
import torch
from _profile import kernels
from _same_bits import assert_same_bits

from fastround import transform_ops as T

_ops = torch.ops.fastround
_FUSE_ENV = "FASTROUND_WOQ_FUSE_ROTATION"


def make_layer(in_f: int, out_f: int, bits: int, group_size: int, layout: str, seed: int, dev: torch.device):
    """Random packed words (any 32-bit word is valid codes), zero points and small fp16 scales on `dev`:
    (qweight, qzeros, scales)."""
    g = torch.Generator().manual_seed(seed)
    groups = (in_f + (in_f if group_size == -1 else group_size) - 1) // (in_f if group_size == -1 else group_size)
    words = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    if layout == "awq":
        qweight, qzeros = words(in_f, out_f // 8), words(groups, out_f // 8)
    else:
        qweight, qzeros = words(in_f * bits // 32, out_f), words(groups, (out_f * bits + 31) // 32)
    scales = (torch.rand(groups, out_f, generator=g) * 0.004 + 0.001).half()
    return qweight.to(dev), qzeros.to(dev), scales.to(dev)


def inputs(rows: int, in_f: int, dtype: torch.dtype, seed: int, dev: torch.device) -> torch.Tensor:
    return torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype).to(dev)


def both_paths(x, layer, bias, bits, group_size, layout, block, signs=None, signs_first=False, hk=None,
               monkeypatch=None):
    """(the op as called, the op with the fusion off, hadamard_transform then woq_linear)."""
    args = (*layer, bias, bits, group_size, layout)
    got = _ops.woq_linear_rotated(x, *args, block, hk, signs, False, signs_first)
    monkeypatch.setenv(_FUSE_ENV, "0")
    off = _ops.woq_linear_rotated(x, *args, block, hk, signs, False, signs_first)
    monkeypatch.delenv(_FUSE_ENV)
    want = _ops.woq_linear(_ops.hadamard_transform(x, block, hk, signs, False, signs_first, True), *args)
    torch.cuda.synchronize()
    return got, off, want


@pytest.mark.parametrize("in_f,out_f", [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptq4_fused_equals_two_ops(cuda, monkeypatch, in_f, out_f, block, dtype):
    layer = make_layer(in_f, out_f, 4, 128, "gptq", in_f + out_f, cuda)
    bias = (torch.randn(out_f, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype).to(cuda)
    for m in (1, 2, 3, 4):
        x = inputs(m, in_f, dtype, m + block, cuda)
        for b in (bias, None) if m == 1 else (bias,):
            got, off, want = both_paths(x, layer, b, 4, 128, "gptq", block, monkeypatch=monkeypatch)
            assert_same_bits(got, want)
            assert_same_bits(off, want)


@pytest.mark.parametrize("group_size", [32, 64, 256, 1024, -1])
@pytest.mark.parametrize("block", [16, 64, 128, 256])
@pytest.mark.parametrize("layout", ["gptq", "gptq_v2"])
def test_group_sizes_and_v2(cuda, monkeypatch, group_size, block, layout):
    """Same bits whether the call fuses or not (5120 inputs: slices a 256-block may straddle, the two-op fallback),
    and at least one shape fuses (one launch), so the comparison covers the fused kernel."""
    fused = 0
    for in_f, out_f in ((4096, 1024), (2048, 4096), (5120, 1024)):
        if group_size > 0 and in_f % group_size:
            continue
        layer = make_layer(in_f, out_f, 4, group_size, layout, group_size + in_f, cuda)
        for m in (1, 2, 4):
            x = inputs(m, in_f, torch.bfloat16, m, cuda)
            got, off, want = both_paths(x, layer, None, 4, group_size, layout, block, monkeypatch=monkeypatch)
            assert_same_bits(got, want)
            assert_same_bits(off, want)
        x = inputs(1, in_f, torch.bfloat16, 1, cuda)
        fused += len(kernels(lambda: _ops.woq_linear_rotated(x, *layer, None, 4, group_size, layout, block, None,
                                                             None))) == 1
    assert fused >= 1


@pytest.mark.parametrize("signs_first", [False, True])
@pytest.mark.parametrize("signs_dtype", [torch.int8, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_signs(cuda, monkeypatch, signs_first, signs_dtype, dtype):
    layer = make_layer(4096, 4096, 4, 128, "gptq", 7, cuda)
    for block in (32, 128):
        signs = (torch.randint(0, 2, (block,), generator=torch.Generator().manual_seed(block)) * 2 - 1)
        for m in (1, 3):
            x = inputs(m, 4096, dtype, m, cuda)
            for s in (signs.to(signs_dtype).to(cuda), signs.to(torch.int8)):  # a CPU vector: the two ops
                got, off, want = both_paths(x, layer, None, 4, 128, "gptq", block, s, signs_first,
                                            monkeypatch=monkeypatch)
                assert_same_bits(got, want)
                assert_same_bits(off, want)
        x = inputs(1, 4096, dtype, 1, cuda)
        sc = signs.to(signs_dtype).to(cuda)
        names = kernels(lambda: _ops.woq_linear_rotated(x, *layer, None, 4, 128, "gptq", block, None, sc, False,
                                                        signs_first))
        # signs on the device: fused (float signs are first converted to int8 by a copy kernel, as the op does)
        assert "gemv_gptq_staged_kernel" in names[-1] and not any("fwht" in n for n in names[:-1]), names
        assert len(names) == (1 if signs_dtype == torch.int8 else 2), names


@pytest.mark.parametrize("case", ["gptq8", "gptq2", "awq", "rows6", "rows8", "fp32", "k28", "block512",
                                  "whole_row"])
def test_unfused_cases_match(cuda, monkeypatch, case):
    in_f, out_f, bits, layout, rows, dtype, block, hk = 4096, 4096, 4, "gptq", 1, torch.bfloat16, 32, None
    if case == "gptq8":
        bits = 8
    elif case == "gptq2":
        bits = 2
    elif case == "awq":
        layout = "awq"
    elif case.startswith("rows"):
        rows = int(case[4:])
    elif case == "fp32":
        dtype = torch.float32
    elif case == "k28":
        in_f, block, hk = 14336, 14336, T.spinquant_matrix(28).cuda()
    elif case == "block512":
        block = 512
    else:
        block = -1
    layer = make_layer(in_f, out_f, bits, 128, layout, 11, cuda)
    x = inputs(rows, in_f, dtype, 5, cuda)
    got, off, want = both_paths(x, layer, None, bits, 128, layout, block, hk=hk, monkeypatch=monkeypatch)
    assert_same_bits(got, want)
    assert_same_bits(off, want)
    names = kernels(lambda: _ops.woq_linear_rotated(x, *layer, None, bits, 128, layout, block, hk, None))
    assert any("fwht" in n or "kmix" in n for n in names), names  # the rotation ran as its own kernel


@pytest.mark.parametrize("rows", [1, 4])
def test_fused_is_one_launch(cuda, monkeypatch, rows):
    """The decode case (Llama-3-8B q_proj, the transform backend's 32-blocks) launches the staged GEMV alone; with
    the switch off, the FWHT kernel runs before it."""
    layer = make_layer(4096, 4096, 4, 128, "gptq", 1, cuda)
    x = inputs(rows, 4096, torch.bfloat16, 1, cuda)
    call = lambda: _ops.woq_linear_rotated(x, *layer, None, 4, 128, "gptq", 32, None, None)
    names = kernels(call)
    assert len(names) == 1 and "gemv_gptq_staged_kernel" in names[0], names
    monkeypatch.setenv(_FUSE_ENV, "0")
    names = kernels(call)
    assert len(names) == 2 and "fwht" in names[0] and "gemv_gptq_staged_kernel" in names[1], names
