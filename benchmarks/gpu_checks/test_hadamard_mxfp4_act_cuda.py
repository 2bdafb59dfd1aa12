"""The CUDA hadamard_mxfp4_act (cpp/fastround/transform/hadamard_mxfp4_act_cuda.cu) against the CPU op: the same bits
for every dtype, block (1 .. 32, Sylvester, K-split and dense random matrices, signs before / after), row count and
value range (zero groups, huge / tiny / subnormal-producing groups), inside a CUDA graph too; bad input raises a clear
error; the load-time hook on CUDA (FASTROUND_ROTATION_ACT_QDQ=auto) equals the CPU op. Where Triton is installed it
also measures the share of values that differ from upstream's own Triton kernel (mxfp4_forward_kernel_wrapper), whose
approximate lg2 / ex2 / division and TF32 dot (fp32 inputs) may differ at ties and power-of-two boundaries.
Run by the lead on the GPU host: pytest benchmarks/gpu_checks/test_hadamard_mxfp4_act_cuda.py."""

from __future__ import annotations

import math

import pytest
import torch
from _same_bits import assert_same_bits

from fastround import rotation as R
from fastround import transform_ops as T

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and T.has_cuda_mxfp4_act_kernel()),
                                reason="needs a CUDA device and the CUDA build")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]



def rand(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-30, 31, (rows, cols // 32, 1), generator=g).double()).repeat_interleave(
        32, -1).reshape(rows, cols)
    return x.to(dtype)


def both(x, n, hk=None, signs=None, **kw):
    want = T.hadamard_mxfp4_act(x, n, hk, signs, **kw)
    got = T.hadamard_mxfp4_act(x.cuda(), n, None if hk is None else hk.cuda(), None if signs is None else signs.cuda(),
                               **kw)
    torch.cuda.synchronize()
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("rows", [1, 7, 4099])
def test_sylvester_blocks(n, rows, dtype):
    x = rand(rows, 256, dtype, n * 1000 + rows)
    assert_same_bits(*both(x, n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signs_first", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_signs_and_k_matrices(dtype, signs_first, transpose):
    x = rand(513, 4096, dtype, 11)
    d = T.random_signs(32).to(torch.int8)
    assert_same_bits(*both(x, 32, None, d, transpose=transpose, signs_first=signs_first))
    dense = torch.sign(T.random_hadamard_matrix(32)).to(torch.int8)  # a loaded random_hadamard layer: K = 32
    assert_same_bits(*both(x, 32, dense, transpose=transpose))
    for k in T.library_sizes():
        if k > 1 and 32 % k == 0:
            assert_same_bits(*both(x, 32, T.library_matrix(k), d, transpose=transpose, signs_first=signs_first))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    x = rand(64, 512, dtype, 5)
    x[0] = 0
    x[1, :32] = torch.finfo(dtype).max
    x[2, :32] = torch.finfo(dtype).tiny
    x[3, 5] = float("inf")
    x[4, 7] = float("nan")
    x[5] = -0.0
    assert_same_bits(*both(x, 32))


def test_leading_dims_non_contiguous_and_graph():
    x = rand(96, 512, torch.bfloat16, 3).reshape(3, 32, 512).transpose(0, 1)
    assert_same_bits(*both(x, 32))
    xc = x.cuda().contiguous()
    T.hadamard_mxfp4_act(xc, 32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = T.hadamard_mxfp4_act(xc, 32)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(y, T.hadamard_mxfp4_act(x.contiguous(), 32))


@pytest.mark.parametrize("call, match", [
    (lambda: T.hadamard_mxfp4_act(torch.zeros(2, 48, device="cuda"), 16), "multiple of the MXFP4 activation group"),
    (lambda: T.hadamard_mxfp4_act(torch.zeros(2, 64, device="cuda"), 64), "block_size"),
    (lambda: T.hadamard_mxfp4_act(torch.zeros(2, 32, device="cuda", dtype=torch.float64), 32), "x"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    torch.cuda.synchronize()


@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
def test_load_hook_on_cuda_is_fused_and_equals_cpu(monkeypatch, hadamard_type):
    monkeypatch.setenv(R.ACT_QDQ_ENV, "auto")
    m = T.random_hadamard_matrix(32)
    buffers = {"a": m} if hadamard_type == "random_hadamard" else None
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(256, 8, bias=False)}).to(torch.bfloat16)
    R.register_online_hooks(model, {"block_size": 32, "hadamard_type": hadamard_type}, "mx_fp", buffers,
                            names=["a"], act_mxfp4={"a"})
    model = model.cuda()
    seen = {}
    model["a"].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    x = rand(33, 256, torch.bfloat16, 9)
    model["a"](x.cuda())
    hk = torch.sign(m).to(torch.int8) if buffers else None
    assert_same_bits(seen["x"], T.hadamard_mxfp4_act(x, 32, hk))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_share_of_values_that_differ_from_upstreams_triton_kernel(dtype):
    mx = pytest.importorskip("auto_round.algorithms.transforms.hadamard.utils.triton.mxfp4")
    pytest.importorskip("triton")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 32:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = (h / math.sqrt(32)).float()
    x = (torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)) * 4).to(dtype).cuda()
    up, _ = mx.mxfp4_forward_kernel_wrapper(x, h.to(dtype).cuda())
    ours = T.hadamard_mxfp4_act(x, 32)
    share = float((up != ours).float().mean())
    print(f"{dtype}: {share:.2e} of the values differ from upstream's Triton kernel")
    # bf16 / fp16: the dot's products are exact and the sums almost always are, so only the approximate lg2 / ex2 /
    # division can differ; fp32 goes through TF32 in upstream's dot, a different rounding of every input.
    assert share < (5e-2 if dtype == torch.float32 else 1e-3)
