"""The Walsh-Hadamard kernel (torch.ops.fastround.hadamard_transform) against dense fp64 products by Sylvester and
Kronecker matrices built here, orthonormality, and upstream's own Hadamard builders and butterfly routines
(auto_round.algorithms.transforms.hadamard / spinquant), which it must reproduce."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastround  # noqa: F401  (a broken build must fail here, not skip)
from cpp_runner import run_cpp_test
from fastround import transform_ops as T


def sylvester_dense(n: int) -> torch.Tensor:
    """H_n by the recursion H_2m = [[H, H], [H, -H]] (independent of the module's popcount formula)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def kron_operator(n: int, hk: torch.Tensor | None) -> torch.Tensor:
    """T_n = (H_K ⊗ H_{n/K}) / sqrt(n) in fp64."""
    k = 1 if hk is None else hk.shape[0]
    base = torch.ones(1, 1, dtype=torch.float64) if hk is None else hk.to(torch.float64)
    return torch.kron(base, sylvester_dense(n // k)) / math.sqrt(n)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_cpp_kernels_fast_equals_reference():
    run_cpp_test("fastround-test-fwht", 3000)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096])
def test_pow2_equals_dense_sylvester(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, 3 * n, generator=g, dtype=torch.float64)
    t = kron_operator(n, None)
    want = (x.view(5, 3, n) @ t.T).view(5, 3 * n)  # block-diagonal: every n-block is T·v
    got = T.hadamard_transform(x, n)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * math.sqrt(n))
    full = T.hadamard_transform(x[:, :n], -1)  # -1: the whole last dimension
    torch.testing.assert_close(full, x[:, :n] @ t.T, rtol=0, atol=1e-12 * math.sqrt(n))


@pytest.mark.parametrize("k", [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172, 32])
def test_k_times_pow2_equals_dense_kronecker(k):
    hk = T.library_matrix(k)
    for m in (0, 1, 3, 5):
        n = k << m
        x = torch.randn(4, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        t = kron_operator(n, hk)
        torch.testing.assert_close(T.hadamard_transform(x, n, hk), x @ t.T, rtol=0, atol=1e-11)
        torch.testing.assert_close(T.hadamard_transform(x, n, hk, transpose=True), x @ t, rtol=0, atol=1e-11)
        d = T.random_signs(n, torch.Generator().manual_seed(3))
        torch.testing.assert_close(T.hadamard_transform(x, n, hk, d), (x @ t.T) * d, rtol=0, atol=1e-11)
        torch.testing.assert_close(T.hadamard_transform(x, n, hk, d, signs_first=True), (x * d) @ t.T,
                                   rtol=0, atol=1e-11)


@pytest.mark.parametrize("n,k", [(64, 1), (96, 12), (320, 20), (32, 32), (448, 28)])
def test_orthonormal(n, k):
    hk = None if k == 1 else T.library_matrix(k)
    eye = torch.eye(n, dtype=torch.float64)
    rows = T.hadamard_transform(eye, n, hk)  # row i = T e_i: the rows of T^T
    torch.testing.assert_close(rows @ rows.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(rows.T @ rows, eye, rtol=0, atol=1e-12)
    # the transposed operator undoes the plain one
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    back = T.hadamard_transform(T.hadamard_transform(x, n, hk), n, hk, transpose=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_compute_in_fp32_and_round_once(dtype):
    x = (torch.randn(6, 256, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    got = T.hadamard_transform(x, 32)
    want = T.hadamard_transform(x.float(), 32).to(dtype)
    assert got.dtype == dtype and torch.equal(bits(got), bits(want))


def test_fp32_close_to_fp64_and_leading_dims_kept():
    x = torch.randn(2, 3, 4096, generator=torch.Generator().manual_seed(9))
    got = T.hadamard_transform(x, -1)
    assert got.shape == x.shape and got.dtype == torch.float32
    want = T.hadamard_transform(x.double(), -1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_fake_kernel():
    with FakeTensorMode():
        x = torch.empty(7, 64, dtype=torch.bfloat16)
        y = torch.ops.fastround.hadamard_transform(x, 32)
        assert y.shape == (7, 64) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=24), "block_size"),
    (dict(block_size=12), "hadamard_k"),
    (dict(block_size=12, hadamard_k=torch.zeros(12, 12, dtype=torch.int8)), "hadamard_k"),
    (dict(block_size=16, signs=torch.ones(8, dtype=torch.int8)), "signs"),
    (dict(block_size=16, signs=torch.full((16,), 2, dtype=torch.int8)), "signs"),
])
def test_bad_input_names_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.hadamard_transform(torch.ones(2, 48), **kwargs)
    with pytest.raises(ValueError, match="x"):
        T.hadamard_transform(torch.ones(2, 16, dtype=torch.int32), 16)


def test_k_selection_rules():
    assert T.file_divisor(14336) == 224 and T.file_divisor(4096) == 256 and T.file_divisor(32) == 32
    assert T.file_divisor(768) == 192 and T.file_divisor(11008) == 172
    with pytest.raises(ValueError, match="block_size"):
        T.file_divisor(29568)


# ---- upstream's builders and routines ----

def test_library_is_upstreams_file():
    from auto_round.algorithms.transforms.hadamard.utils import math as up_math

    assert T.HADAMARDS_FILE.read_bytes() == up_math._HADAMARD_MATRICES_PATH.read_bytes()


@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_deterministic_matrix_equals_upstream(n):
    from auto_round.algorithms.transforms.hadamard.transforms import HadamardTransform

    up = HadamardTransform(block_size=n).weight.data  # fp32, ±1/sqrt(n)
    ours = T.deterministic_hadamard_matrix(n)
    assert up.dtype == ours.dtype and torch.equal(bits(up), bits(ours))


@pytest.mark.parametrize("n", [16, 32, 64, 96, 128, 160])
def test_random_matrix_equals_upstream(n):
    from auto_round.algorithms.transforms.hadamard.transforms import RandomHadamardTransform

    up = RandomHadamardTransform(block_size=n).weight.data  # fresh unseeded generator, as the backend builds it
    ours = T.random_hadamard_matrix(n)
    assert up.dtype == ours.dtype and torch.equal(bits(up), bits(ours))
    inv = RandomHadamardTransform(block_size=n, inverse=True).weight.data
    assert torch.equal(bits(inv), bits(ours.T.contiguous()))
    assert torch.Generator().initial_seed() == T.TORCH_DEFAULT_GENERATOR_SEED


@pytest.mark.parametrize("n", [64, 768, 1536, 2560, 3584])
def test_butterfly_equals_upstream_matmul_hadU(n):
    from auto_round.algorithms.transforms.hadamard.inplace.hooks import get_hadK, matmul_hadU

    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    hk, k = get_hadK(n)
    hk_i8 = None if hk is None else hk.to(torch.int8)
    for transpose in (False, True):
        up = matmul_hadU(x, transpose=transpose)
        ours = T.hadamard_transform(x, n, hk_i8, transpose=transpose)
        # upstream divides by torch.tensor(n).sqrt(), an fp32 square root: exact for 4^j, else ~1e-8 relative off
        tol = 1e-12 if math.isqrt(n) ** 2 == n else 1e-7
        torch.testing.assert_close(ours, up, rtol=tol, atol=1e-12)


@pytest.mark.parametrize("n", [12 * 64, 28 * 16, 40 * 32, 20 * 8, 4096])
def test_butterfly_equals_upstream_spinquant(n):
    from auto_round.algorithms.transforms.spinquant.rotation_utils import get_hadamard_K, matmul_hadU

    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    hk, k = get_hadamard_K(n)
    ours = T.hadamard_transform(x, n, None if k == 1 else hk.to(torch.int8))
    torch.testing.assert_close(ours, matmul_hadU(x), rtol=0, atol=1e-12)


def test_any_device_path_equals_the_kernel_via_meta_free_dense_product():
    """hadamard_any_device's dense fallback (used off the CPU) is the same map as the kernel: checked on the CPU
    by forcing the fallback's arithmetic through a dense product of the kernel's own matrix."""
    hk = T.library_matrix(12)
    x = torch.randn(5, 96, dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    rows_of_t = T.hadamard_transform(torch.eye(48, dtype=torch.float64), 48, hk, transpose=True)
    dense = (x.reshape(5, 2, 48).double() @ rows_of_t).reshape(5, 96)
    torch.testing.assert_close(T.hadamard_any_device(x, 48, hk, transpose=True).double(), dense, rtol=0, atol=1e-5)


def test_block_rotation_fallback_builds_its_dense_matrix_once(monkeypatch):
    """Where the op has no kernel (MPS, XPU, a CUDA build without fastround's kernels) a BlockRotation multiplies
    by the block matrix, built on its first call per device and then reused: a decode step must not rebuild it per
    layer call. Forced on the CPU; the result is the kernel's map."""
    hk = T.library_matrix(12)
    sg = T.random_signs(48, torch.Generator().manual_seed(5)).to(torch.int8)
    rot = T.BlockRotation(48, hk, sg, transpose=True)
    x = torch.randn(3, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(6))
    expected = rot(x)  # the kernel
    built = []
    real = T.dense_block_map
    monkeypatch.setattr(T, "_kernel_device", lambda device: False)
    monkeypatch.setattr(T, "dense_block_map", lambda *a, **k: built.append(a) or real(*a, **k))
    first, second = rot(x), rot(x)
    assert len(built) == 1
    assert first.dtype == torch.bfloat16 and torch.equal(first, second)
    torch.testing.assert_close(first.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("k,transpose,signs_first", [(1, False, False), (12, True, False), (12, False, True)])
def test_gradient_is_the_adjoint(k, transpose, signs_first):
    # The op's autograd (the same op, transposed, signs on the other side) against torch's own gradient of the
    # dense map x -> x · M^T, M the op applied to the identity.
    n = 12 * 8 if k > 1 else 64
    hk = T.library_matrix(k) if k > 1 else None
    sg = T.random_signs(n, torch.Generator().manual_seed(3)).to(torch.int8)
    x = torch.randn(5, 2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    w = torch.randn(5, 2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kw = dict(transpose=transpose, signs_first=signs_first)
    (T.hadamard_transform(x, n, hk, sg, **kw) * w).sum().backward()
    m = T.hadamard_transform(torch.eye(n, dtype=torch.float64), n, hk, sg, **kw)  # row i: the op on e_i
    xd = x.detach().clone().requires_grad_(True)
    ((xd.reshape(5, 2, n) @ m).reshape(5, 2 * n) * w).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=0, atol=1e-12)
