"""The CUDA hadamard_transform (cpp/fastround/transform/fwht_cuda.cu) against the CPU op: the same bits for every
size (powers of two 1 .. 32768, K·2^m with short and long Sylvester parts), K matrix, dtype, block size, option and
row count (partial tiles), inside a CUDA graph too; bad input raises a clear error; the online rotation hooks on
CUDA equal their CPU result. Run by the lead on the GPU host: pytest benchmarks/gpu_checks/test_fwht_cuda.py."""

from __future__ import annotations

import pytest
import torch
from _profile import kernels
from _same_bits import assert_same_bits

from fastround import quarot as Q
from fastround import rotation as R
from fastround import transform_ops as T

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and T.has_cuda_kernel()),
                                reason="needs a CUDA device and the CUDA build")




def both(x: torch.Tensor, n: int, hk=None, signs=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    want = T.hadamard_transform(x, n, hk, signs, **kw)
    got = T.hadamard_transform(x.cuda(), n, None if hk is None else hk.cuda(),
                               None if signs is None else signs.cuda(), **kw)
    torch.cuda.synchronize()
    return got, want


def rand(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def captured(fn):
    """fn() run once on a side stream (its allocations and plans made), then captured in a CUDA graph:
    (the graph, what the captured fn returned)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
POW2 = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
# (K, 2^m): len 1/2/4 (K stage alone), len 8..256 (registers and shuffles), len >= 512 (shared-memory passes), and
# the model sizes 5120 / 12288 / 14336 with the safetensors rule's K and SpinQuant's.
KSIZES = [(12, 1), (12, 2), (20, 4), (28, 8), (12, 32), (40, 64), (172, 16), (12, 256), (20, 512), (28, 512),
          (160, 32), (192, 64), (224, 64), (12, 1024), (40, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", POW2)
def test_pow2_full_dimension(n, dtype):
    # One block's tile must fit the opt-in shared memory (fp64 is computed in fp64, the rest in fp32); beyond it the op
    # refuses with a clear error instead of launching.
    need = n * (8 if dtype == torch.float64 else 4)
    if need > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
        with pytest.raises(ValueError, match="too large for the CUDA kernel"):
            T.hadamard_transform(rand(1, n, dtype, n).cuda(), -1)
        return
    for rows in (1, 3, 33):
        got, want = both(rand(rows, n, dtype, n + rows), -1)
        assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,m", KSIZES)
def test_k_times_pow2(k, m, dtype):
    n = k * m
    hk = T.library_matrix(k)
    for rows, transpose in ((1, False), (5, True), (17, False)):
        got, want = both(rand(rows, n, dtype, n + rows), n, hk, transpose=transpose)
        assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,m", [(28, 8), (12, 32), (20, 512), (28, 512), (160, 32), (224, 64), (40, 128)])
def test_split_and_one_kernel_plans_agree(monkeypatch, k, m, dtype):
    """K > 1 with len % 8 == 0 below 64 tiles takes the split plan (butterflies into scratch, then the K stage over
    the grid); at and above it the one-kernel plan. Both against the CPU, on the tile counts either side of the
    switch, and the 1-row case (a decode step) against the same row inside a many-row launch. The cluster plan is
    off here (it takes the calls of up to 8 n-blocks; test_cluster_plan covers it)."""
    monkeypatch.setenv("FASTROUND_FWHT_CLUSTER", "0")
    n = k * m
    hk = T.library_matrix(k)
    bpt = max(1, 2048 // n)  # blocks per tile (n is a multiple of 8 here)
    for rows in (1, 2, 63 * bpt, 64 * bpt, 64 * bpt + 1):
        got, want = both(rand(rows, n, dtype, n + rows), n, hk, transpose=rows % 2 == 1)
        assert_same_bits(got, want)
    x = rand(64 * bpt, n, dtype, n)
    many = T.hadamard_transform(x.cuda(), n, hk.cuda())
    for r in (0, 64 * bpt - 1):
        assert_same_bits(T.hadamard_transform(x[r:r + 1].cuda(), n, hk.cuda()), many[r:r + 1].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_r4_decode_row_k28(dtype):
    """The batch-1 R4 row of a Llama-3-8B down_proj: 1 x 14336, K = 28 (the split plan), fp32 compute; with and
    without signs (a random R4), each side, transposed or not, and inside a CUDA graph (the scratch comes from the
    graph's pool)."""
    n, k = 14336, 28
    hk = T.spinquant_matrix(k)
    sg = T.random_signs(n, torch.Generator().manual_seed(5)).to(torch.int8)
    x = rand(1, n, dtype, 21)
    for signs in (None, sg):
        for signs_first in (False, True):
            for transpose in (False, True):
                got, want = both(x, n, hk, signs, transpose=transpose, signs_first=signs_first)
                assert_same_bits(got, want)
    hkc, sgc, xc = hk.cuda(), sg.cuda(), x.cuda()
    graph, y = captured(lambda: T.hadamard_transform(xc, n, hkc, sgc, signs_first=True))
    xc.copy_(rand(1, n, dtype, 22).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(y, T.hadamard_transform(xc.cpu(), n, hk, sg, signs_first=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_off_env_same_bits(monkeypatch, dtype):
    """FASTROUND_FWHT_SPLIT=0 forces the one-kernel plan on the rows the split plan takes: the same bits."""
    n, k = 14336, 28
    hk = T.spinquant_matrix(k).cuda()
    sg = T.random_signs(n, torch.Generator().manual_seed(6)).to(torch.int8).cuda()
    for rows in (1, 3):
        x = rand(rows, n, dtype, 30 + rows).cuda()
        split = T.hadamard_transform(x, n, hk, sg, signs_first=True)
        monkeypatch.setenv("FASTROUND_FWHT_SPLIT", "0")
        one = T.hadamard_transform(x, n, hk, sg, signs_first=True)
        monkeypatch.delenv("FASTROUND_FWHT_SPLIT")
        torch.cuda.synchronize()
        assert_same_bits(split, one.cpu())


def allocations(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and how many CUDA allocations it made (the split plan takes one more: its scratch)."""
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    out = fn()
    return out, torch.cuda.memory_stats()["allocation.all.allocated"] - before


def split_and_one_kernel(monkeypatch, x: torch.Tensor, n: int, sg=None, **kw) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The CUDA op on x (a CUDA tensor) with the split plan allowed and with FASTROUND_FWHT_SPLIT=0, and the extra
    allocations the first call made over the second."""
    split, a_split = allocations(lambda: T.hadamard_transform(x, n, None, sg, **kw))
    monkeypatch.setenv("FASTROUND_FWHT_SPLIT", "0")
    try:
        one, a_one = allocations(lambda: T.hadamard_transform(x, n, None, sg, **kw))
    finally:
        monkeypatch.delenv("FASTROUND_FWHT_SPLIT")
    torch.cuda.synchronize()
    return split, one, a_split - a_one


# Every combination of the op's sign side, transpose and normalization.
OPTION_SETS = [dict(transpose=t, signs_first=f, normalize=z) for f in (False, True) for t in (False, True)
               for z in (True, False)]


# Power-of-two blocks around the K = 1 split's minimum (kPow2SplitMin = 32768; below it the one-kernel plan runs and
# the split's scratch is not allocated; fp64 up to the one-kernel plan's shared-memory limit). With the minimum at
# 1024 every size here took the split and matched bit for bit on the H200 (2026-12-03).
POW2_SPLIT_MIN = 32768
POW2_SPLIT = [(n, d) for d in DTYPES for n in (1024, 2048, 4096, 8192, 16384, 32768)
              if not (d == torch.float64 and n > 16384)]


@pytest.mark.parametrize("n,dtype", POW2_SPLIT)
def test_pow2_split_and_one_kernel_plans_agree(monkeypatch, n, dtype):
    """A power-of-two n-block (n >= POW2_SPLIT_MIN) in a call of at most 8 n-blocks takes the K = 1 split plan (low stages per
    n/8 chunk into scratch, the last three stages across the chunks): the one-kernel plan's bits and the CPU op's,
    rows 1 .. 8 (and 9 n-blocks: the one-kernel plan, no scratch); signs on either side, transposed, unnormalized;
    two n-blocks per row (block-diagonal)."""
    monkeypatch.setenv("FASTROUND_FWHT_CLUSTER", "0")  # the cluster plan takes these calls first (test_cluster_plan)
    sg = T.random_signs(n, torch.Generator().manual_seed(n + 1)).to(torch.int8)
    sgc = sg.cuda()
    takes = int(n >= POW2_SPLIT_MIN)
    for rows in range(1, 10):
        x = rand(rows, n, dtype, n + rows)
        split, one, extra = split_and_one_kernel(monkeypatch, x.cuda(), -1)
        assert extra == (takes if rows <= 8 else 0), (rows, extra)  # the split plan ran (its scratch) up to 8 n-blocks
        assert_same_bits(split, one.cpu())
        assert_same_bits(split, T.hadamard_transform(x, -1))
    x = rand(3, n, dtype, n + 50)
    xc = x.cuda()
    for kw in OPTION_SETS:
        split, one, extra = split_and_one_kernel(monkeypatch, xc, n, sgc, **kw)
        assert extra == takes
        assert_same_bits(split, one.cpu())
        assert_same_bits(split, T.hadamard_transform(x, n, None, sg, **kw))
    for rows in (4, 5):  # two n-blocks per row: 8 n-blocks take the split, 10 the one-kernel plan
        xr = rand(rows, 2 * n, dtype, n + 60 + rows)
        split, one, extra = split_and_one_kernel(monkeypatch, xr.cuda(), n, sgc, signs_first=True)
        assert extra == (takes if rows == 4 else 0)
        assert_same_bits(split, one.cpu())
        assert_same_bits(split, T.hadamard_transform(xr, n, None, sg, signs_first=True))


# Power-of-two n-blocks of the cluster plan (from 4096; 8 blocks per n-block).
CLUSTER_CASES = [(1, 4096), (1, 8192), (1, 16384), (1, 32768)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,m", CLUSTER_CASES)
def test_cluster_plan(monkeypatch, k, m, dtype):
    """Power-of-two n-blocks from 4096 in calls of up to 8 take the cluster plan (one launch, a thread-block cluster
    per n-block, the last three strides through distributed shared memory): the CPU op's bits and the other plans'
    (cluster off),
    rows 1 .. 8 and two n-blocks a row, signs on either side, transposed, unnormalized; 9 n-blocks take
    another plan; and the cluster kernel is what ran."""
    n = k * m
    hk = T.library_matrix(k) if k > 1 else None
    hkc = None if hk is None else hk.cuda()
    sg = T.random_signs(n, torch.Generator().manual_seed(n + 3)).to(torch.int8)
    sgc = sg.cuda()
    for rows in (1, 2, 5, 8, 9):
        x = rand(rows, n, dtype, n + rows)
        xc = x.cuda()
        names = kernels(lambda: T.hadamard_transform(xc, n, hkc))
        assert any("fwht_cluster_kernel" in nm for nm in names) == (rows <= 8), (rows, names)
        assert_same_bits(T.hadamard_transform(xc, n, hkc), T.hadamard_transform(x, n, hk))
    x = rand(3, n, dtype, n + 50)
    xc = x.cuda()
    for kw in OPTION_SETS:
        got = T.hadamard_transform(xc, n, hkc, sgc, **kw)
        monkeypatch.setenv("FASTROUND_FWHT_CLUSTER", "0")
        other = T.hadamard_transform(xc, n, hkc, sgc, **kw)
        monkeypatch.delenv("FASTROUND_FWHT_CLUSTER")
        torch.cuda.synchronize()
        assert_same_bits(got, other.cpu())
        assert_same_bits(got, T.hadamard_transform(x, n, hk, sg, **kw))
    xr = rand(4, 2 * n, dtype, n + 70)  # two n-blocks a row: 8 n-blocks, block-diagonal
    assert_same_bits(T.hadamard_transform(xr.cuda(), n, hkc, sgc, signs_first=True),
                     T.hadamard_transform(xr, n, hk, sg, signs_first=True))


def test_cluster_plan_not_taken_elsewhere():
    """K > 1 rows (R4: its K stage through distributed shared memory was 3x slower than the split plan), powers of two
    below 4096, and fp64 keep their plans."""
    for n, k, dtype in ((14336, 28, torch.float32), (2048, 1, torch.float32), (4096, 1, torch.float64)):
        hk = T.spinquant_matrix(k).cuda() if k > 1 else None
        xc = rand(1, n, dtype, 95).cuda()
        assert not any("fwht_cluster_kernel" in nm for nm in kernels(lambda: T.hadamard_transform(xc, n, hk)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_plan_in_cuda_graph(dtype):
    """The R1 decode row (1 x 4096, signs first; and 8192) captured in a CUDA graph and replayed on new input: the
    CPU op's bits."""
    for n, k in ((4096, 1), (8192, 1)):
        hk = T.spinquant_matrix(k) if k > 1 else None
        hkc = None if hk is None else hk.cuda()
        sg = T.random_signs(n, torch.Generator().manual_seed(n)).to(torch.int8)
        sgc, xc = sg.cuda(), rand(1, n, dtype, 90).cuda()
        names = kernels(lambda: T.hadamard_transform(xc, n, hkc, sgc, signs_first=True))
        assert any("fwht_cluster_kernel" in nm for nm in names), names
        graph, y = captured(lambda: T.hadamard_transform(xc, n, hkc, sgc, signs_first=True))
        xc.copy_(rand(1, n, dtype, 91).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bits(y, T.hadamard_transform(xc.cpu(), n, hk, sg, signs_first=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_r1_decode_row_in_cuda_graph(dtype):
    """QuaRot's online R1 at batch 1: 1 x 4096, random signs first (the cluster plan), then the whole row again,
    captured in a CUDA graph and replayed on new input: the CPU op's bits; the R1 hook too."""
    n = 4096
    sg = T.random_signs(n, torch.Generator().manual_seed(7)).to(torch.int8)
    sgc, xc = sg.cuda(), rand(1, n, dtype, 40).cuda()

    def r1_then_full() -> tuple[torch.Tensor, torch.Tensor]:
        y = T.hadamard_transform(xc, n, None, sgc, signs_first=True)
        return y, T.hadamard_transform(y, -1)

    graph, (y, z) = captured(r1_then_full)
    xc.copy_(rand(1, n, dtype, 41).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = T.hadamard_transform(xc.cpu(), n, None, sg, signs_first=True)
    assert_same_bits(y, want)
    assert_same_bits(z, T.hadamard_transform(want, -1))
    hook = Q.online_hook("r1", n, 1)
    x = rand(1, n, dtype, 42).reshape(1, 1, n)
    (got,) = hook(None, (x.cuda(),))
    (want,) = hook(None, (x,))
    assert_same_bits(got, want)


def test_r4_hook_decode_row_cuda_equals_cpu():
    hook = Q.online_hook("r4", 14336, 28)
    x = rand(1, 14336, torch.bfloat16, 23).reshape(1, 1, 14336)
    (got,) = hook(None, (x.cuda(),))
    (want,) = hook(None, (x,))
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [2, 16, 32, 64, 128, 256, 512, 1024])
def test_block_diagonal(block, dtype):
    for rows, cols in ((1, 4096), (7, 2 * block), (129, 1024 if block <= 1024 else block)):
        got, want = both(rand(rows, cols, dtype, block + rows), block)
        assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 1), (4096, 1), (96, 12), (5120, 160), (14336, 28)])
@pytest.mark.parametrize("signs_first", [False, True])
def test_signs_transpose_unnormalized(n, k, signs_first, dtype):
    hk = T.library_matrix(k) if k > 1 else None
    sg = T.random_signs(n, torch.Generator().manual_seed(n)).to(torch.int8)
    x = rand(9, 2 * n, dtype, n)
    for transpose in (False, True):
        for normalize in (True, False):
            got, want = both(x, n, hk, sg, transpose=transpose, signs_first=signs_first, normalize=normalize)
            assert_same_bits(got, want)


def test_model_sizes_2048_rows():
    for n, k in ((4096, 1), (5120, 160), (8192, 1), (12288, 192), (14336, 224)):
        hk = T.library_matrix(k) if k > 1 else None
        for dtype in (torch.bfloat16, torch.float32):
            got, want = both(rand(2048, n, dtype, n), n, hk)
            assert_same_bits(got, want)


def test_zero_signs_and_special_values():
    x = torch.tensor([[0.0, -0.0, 1.0, -1.0, float("inf"), 3.0, -0.0, 0.0]] * 4)
    x[1, 4] = float("nan")
    x[2] = -0.0
    for dtype in DTYPES:
        got, want = both(x.to(dtype), 8)
        assert_same_bits(got, want)
        got, want = both(x.to(dtype).reshape(1, 32)[:, :24].contiguous(), 24, T.library_matrix(12))
        assert_same_bits(got, want)


def test_leading_dims_and_non_contiguous():
    x = rand(6 * 64, 256, torch.float32, 3).reshape(6, 64, 256)
    got, want = both(x, 64)
    assert_same_bits(got, want)
    xt = rand(256, 64, torch.bfloat16, 4).t()  # [64, 256], strides (1, 64)
    got = T.hadamard_transform(xt.cuda(), 256)
    assert_same_bits(got, T.hadamard_transform(xt, 256))


def test_unaligned_storage_takes_scalar_path():
    base = rand(1, 4096 + 1, torch.bfloat16, 5).cuda()
    x = base[0, 1:].reshape(8, 512)  # storage offset 1 element: 2 bytes, not 16-byte aligned
    got = T.hadamard_transform(x, 512)
    assert_same_bits(got, T.hadamard_transform(x.cpu(), 512))


def test_cpu_operands_are_checked_and_copied():
    x = rand(4, 96, torch.float32, 6)
    hk = T.library_matrix(12).to(torch.float32)  # any dtype holding ±1
    got = T.hadamard_transform(x.cuda(), 96, hk)
    assert_same_bits(got, T.hadamard_transform(x, 96, hk))


def test_cuda_graph_capture():
    n, k = 14336, 28
    hk = T.library_matrix(k).cuda()
    sg = T.random_signs(n, torch.Generator().manual_seed(0)).to(torch.int8).cuda()
    x = rand(64, n, torch.bfloat16, 7).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        T.hadamard_transform(x, n, hk, sg, transpose=True)  # warm-up outside the graph (smem attribute set)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = T.hadamard_transform(x, n, hk, sg, transpose=True)
        z = T.hadamard_transform(y, 32)
    x.copy_(rand(64, n, torch.bfloat16, 8).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want_y = T.hadamard_transform(x.cpu(), n, hk.cpu(), sg.cpu(), transpose=True)
    assert_same_bits(y, want_y)
    assert_same_bits(z, T.hadamard_transform(want_y, 32))


@pytest.mark.parametrize("call,match", [
    (lambda x: T.hadamard_transform(x.to(torch.int32), 32), "dtype"),
    (lambda x: T.hadamard_transform(x, 48), "block_size"),
    (lambda x: T.hadamard_transform(x, 0), "block_size"),
    (lambda x: T.hadamard_transform(x[:, :96], 96, T.library_matrix(20).cuda()), "hadamard_k"),
    (lambda x: T.hadamard_transform(x[:, :96], 96), None),  # 96 with K = 1: not a power of two
    (lambda x: T.hadamard_transform(x[:, :96], 96, torch.ones(12, 11)), "hadamard_k"),
    (lambda x: T.hadamard_transform(x, 32, None, torch.zeros(32)), "signs"),
    (lambda x: T.hadamard_transform(x, 32, None, torch.ones(16)), "signs"),
    (lambda x: T.hadamard_transform(torch.zeros(2, 1 << 17, device="cuda"), -1), "too large"),
])
def test_bad_input_errors(call, match):
    x = torch.zeros(4, 1024, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(x)
    torch.cuda.synchronize()  # no launch was left failing


@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rotation_hook_cuda_equals_cpu(hadamard_type, dtype):
    rot = R.LinearRotation(R.RotationConfig(hadamard_type=hadamard_type), "mx_fp")
    x = rand(64, 4096, dtype, 9)
    assert_same_bits(rot.apply(x.cuda()), rot.apply(x))


def test_quarot_r4_hook_cuda_equals_cpu():
    hook = Q.online_hook("r4", 14336, 28)
    x = rand(8, 14336, torch.bfloat16, 10)
    (got,) = hook(None, (x.cuda(),))
    (want,) = hook(None, (x,))
    assert_same_bits(got, want)


@pytest.mark.parametrize("n,fp32", [(4096, False), (32, False), (14336, True), (128, True)])
def test_quarot_random_maps_cuda_equal_cpu(n, fp32):
    """Random R1 (activation dtype) / R4 and R3 (fp32) maps: the FWHT with the signs first, on CUDA the same bits;
    and the map is x·M with the stored matrix."""
    torch.manual_seed(3)
    rot = Q.RandomRotation.draw(n, torch.device("cpu"))
    block_map = rot.block_map(fp32)
    x = rand(8, 2 * n, torch.bfloat16, 13)
    assert_same_bits(block_map(x.cuda()), block_map(x))
    want = (x.view(8, 2, n).double() @ rot.matrix.double()).view(8, 2 * n)
    torch.testing.assert_close(block_map(x).double(), want, rtol=0.02, atol=0.02)


def test_quarot_r3_on_cuda_model():
    """R3 installed on a tiny CUDA Llama: the logits of the unrotated model, the cached keys times Ĥ_hd."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=128)
    model = LlamaForCausalLM(cfg).float().eval().cuda()
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        before = model(ids, use_cache=True)
        Q.apply_quarot(model, Q.QuaRotConfig(r1=False, r2=False, r3=True, random_r3=True))
        after = model(ids, use_cache=True)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=1e-4)
    m = model.model.layers[0].self_attn.fastround_r3.random.matrix.cuda()
    torch.testing.assert_close(after.past_key_values.layers[0].keys, before.past_key_values.layers[0].keys @ m,
                               rtol=0, atol=1e-4)


def test_gradient_on_cuda_equals_cpu():
    n, k = 96, 12
    hk, sg = T.library_matrix(k), T.random_signs(n, torch.Generator().manual_seed(2)).to(torch.int8)
    x = rand(4, 2 * n, torch.float32, 11)
    g = rand(4, 2 * n, torch.float32, 12)
    grads = []
    for dev in ("cpu", "cuda"):
        xd = x.detach().clone().to(dev).requires_grad_(True)  # a fresh leaf per device (x.to("cpu") is x itself)
        y = T.hadamard_transform(xd, n, hk.to(dev), sg.to(dev), transpose=True)
        y.backward(g.to(dev))
        grads.append(xd.grad)
    assert_same_bits(grads[1], grads[0])
