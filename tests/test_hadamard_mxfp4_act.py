"""The fused Hadamard + MXFP4 activation qdq (torch.ops.fastround.hadamard_mxfp4_act): the C++ kernels' own test,
the op against upstream's Triton kernel's formulas written out in torch (auto_round/algorithms/transforms/hadamard/
utils/triton/mxfp4.py: a matmul by the block matrix cast to x's dtype, exp2(floor(log2 amax) - 2) / 0.75, nested
strict thresholds, sign from `> 0`), the unfused composition (hadamard_transform then that qdq), its fake kernel,
and the load-time hook that uses it (rotation.register_online_hooks with act_mxfp4, FASTROUND_ROTATION_ACT_QDQ)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastround  # noqa: F401  (a broken build must fail here, not skip)
from cpp_runner import run_cpp_test
from fastround import rotation
from fastround import transform_ops as T


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def upstream_qdq(xh: torch.Tensor) -> torch.Tensor:
    """mxfp4_forward_kernel's quest=False branch after its dot, on fp32 rotated values [..., K] (K % 32 == 0),
    spelled as upstream does (an int sign times the level; transform_ops.mxfp4_act_qdq_torch is checked against it)."""
    g = xh.reshape(-1, 32)
    scales = g.abs().amax(-1, keepdim=True)
    shared_exps = torch.exp2(torch.floor(torch.log2(scales)) - 2) / (3 / 4)
    s = g / shared_exps
    a = s.abs()
    sign = torch.where(s > 0, 1, -1)
    q = torch.where(a > 5, 6, torch.where(a > 3.5, 4, torch.where(a > 2.5, 3, torch.where(
        a > 1.75, 2, torch.where(a > 1.25, 1.5, torch.where(a > 0.75, 1, torch.where(a > 0.25, 0.5, 0))))))) * sign
    return (q * shared_exps).reshape(xh.shape)


def upstream_fused(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Upstream's hook: x_flat @ H with H = M^T cast to x's dtype, products and sums in fp32, qdq, cast back."""
    b = m.shape[0]
    h = m.T.to(x.dtype).float()
    xh = (x.float().reshape(-1, b) @ h).reshape(x.shape)
    return upstream_qdq(xh).to(x.dtype)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def dyadic_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small multiples of 2^-6 with a per-group exponent: every block sum is exact in fp32, so any summation order
    gives the same rotated values and the comparison is about the scale and the thresholds alone."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 129, shape, generator=g).float() / 64
    x = x * torch.exp2(torch.randint(-8, 9, (*shape[:-1], shape[-1] // 32, 1), generator=g).float()).repeat_interleave(
        32, -1).reshape(shape)
    x[..., :32] = 0  # a zero group: 0/0 in upstream's kernel, -0 outputs
    return x.to(dtype)


def test_cpp_kernels_fast_equals_reference():
    run_cpp_test("fastround-test-hadamard-mxfp4-act", 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_equals_upstream_formulas_on_exact_sums(dtype):
    x = dyadic_input((7, 5, 256), dtype, 1)
    got = T.hadamard_mxfp4_act(x, 32)
    want = upstream_fused(x, sylvester(32))
    if dtype == torch.float32:
        # fp32 products x·fp32(1/sqrt(32)) are inexact: where the exact block sum is 0 the matmul leaves a signed
        # residue (a +0 output) and the FWHT an exact 0 (-0); values are equal, zero signs may not be
        assert torch.equal(got, want)
    else:
        assert torch.equal(bits(got), bits(want))
    assert bool((bits(got[..., :32]) == bits(torch.tensor(-0.0, dtype=dtype))).all())  # upstream's -0 zeros


def test_random_hadamard_dense_matrix_equals_upstream_formulas():
    m = T.random_hadamard_matrix(32)  # M = diag(d)·T^T, the hadamard_matrix buffer
    x = dyadic_input((9, 128), torch.bfloat16, 2)
    got = T.hadamard_mxfp4_act(x, 32, torch.sign(m).to(torch.int8))
    assert torch.equal(bits(got), bits(upstream_fused(x, m)))


def test_gaussian_bf16_within_summation_order_of_upstream():
    """On general bf16 activations only the fp32 summation order differs from upstream's dot: rare flips."""
    x = (torch.randn(64, 2048, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    got, want = T.hadamard_mxfp4_act(x, 32), upstream_fused(x, sylvester(32))
    assert float((got != want).float().mean()) < 1e-3
    assert float((got.float() - want.float()).abs().max()) <= float(want.float().abs().max()) / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_equals_unfused_composition(dtype):
    """hadamard_transform without its 1/sqrt(n), times c rounded to the dtype, then the qdq: the same bits."""
    x = (torch.randn(33, 320, generator=torch.Generator().manual_seed(4)) * 10).to(dtype)
    d = T.random_signs(32).to(torch.int8)
    for signs in (None, d):
        c = torch.tensor(1 / math.sqrt(32)).to(dtype).float()
        sums = T.hadamard_transform(x.float(), 32, None, signs, normalize=False)
        want = upstream_qdq(sums * c).to(dtype)
        assert torch.equal(bits(T.hadamard_mxfp4_act(x, 32, None, signs)), bits(want))


def test_torch_qdq_reference_spells_upstreams_formulas():
    x = dyadic_input((3, 512), torch.float32, 6) * 1.37
    assert torch.equal(bits(T.mxfp4_act_qdq_torch(x)), bits(upstream_qdq(x)))


def test_fake_kernel_and_errors():
    with FakeTensorMode():
        y = torch.ops.fastround.hadamard_mxfp4_act(torch.empty(3, 64, dtype=torch.bfloat16), 32)
    assert y.shape == (3, 64) and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="hadamard_mxfp4_act.*multiple of the MXFP4 activation group"):
        T.hadamard_mxfp4_act(torch.zeros(2, 48), 16)
    with pytest.raises(ValueError, match="hadamard_mxfp4_act.*x"):
        T.hadamard_mxfp4_act(torch.zeros(2, 32, dtype=torch.float64), 32)


def _tiny(names=("a", "b")) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({n: torch.nn.Linear(64, 8, bias=False) for n in names}).to(torch.bfloat16)


def _seen_input(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model[name].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    model[name](x)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
def test_load_hook_modes(monkeypatch, hadamard_type):
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)
    m = T.random_hadamard_matrix(32) if hadamard_type == "random_hadamard" else sylvester(32)
    buffers = {"a": m, "b": m} if hadamard_type == "random_hadamard" else None
    rot_cfg = {"block_size": 32, "hadamard_type": hadamard_type}
    rotated = rotation.LinearRotation(rotation.RotationConfig(block_size=32), "mx_fp").apply(x) \
        if hadamard_type == "hadamard" else (x.float().reshape(-1, 2, 32) @ m.T.contiguous()).reshape(x.shape).to(x.dtype)
    fused = upstream_fused(x, m)
    assert not torch.equal(fused, rotated)
    for mode, want_a in (("fused", fused), ("auto", rotated), ("off", rotated)):  # auto: CPU tensors are not fused
        monkeypatch.setenv(rotation.ACT_QDQ_ENV, mode)
        model = _tiny()
        rotation.register_online_hooks(model, rot_cfg, "mx_fp", buffers, names=["a", "b"], act_mxfp4={"a"})
        got_a = _seen_input(model, "a", x)
        assert float((got_a != want_a).float().mean()) < 5e-3, mode  # summation order only (fused vs upstream)
        assert torch.equal(_seen_input(model, "b", x), rotated), mode  # not an MXFP4-activation layer
        if mode == "fused":
            assert torch.equal(got_a, T.hadamard_mxfp4_act(x, 32, None if buffers is None else
                                                          torch.sign(m).to(torch.int8)))
    monkeypatch.setenv(rotation.ACT_QDQ_ENV, "sometimes")
    with pytest.raises(ValueError, match="FASTROUND_ROTATION_ACT_QDQ"):
        rotation.register_online_hooks(_tiny(), rot_cfg, "mx_fp", buffers, names=["a"], act_mxfp4={"a"})


def test_which_layers_declare_mxfp4_activations():
    from fastround.hf_quantizer import mxfp4_activation_layers

    mxfp4 = {"data_type": "mx_fp", "bits": 4, "act_bits": 4, "act_data_type": "mx_fp", "act_group_size": 32}
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert mxfp4_activation_layers(mxfp4, names) == set(names)
    extra = {**mxfp4, "extra_config": {"model.layers.0.mlp.down_proj": {"act_bits": 16}}}
    assert mxfp4_activation_layers(extra, names) == {names[1]}
    assert mxfp4_activation_layers({**mxfp4, "act_bits": 16}, names) == set()  # W4A16 MXFP4
    assert mxfp4_activation_layers({**mxfp4, "act_bits": 8, "bits": 8}, names) == set()  # MXFP8
    assert mxfp4_activation_layers({**mxfp4, "data_type": "nv_fp", "act_data_type": "nv_fp"}, names) == set()
