"""GPU checks of the CUDA tuning kernels: every torch.ops.fastround tuning op on CUDA tensors
(python/src/bind_tune_cuda.cpp over cpp/fastround/tune/int_qdq_cuda.cu) must equal the same op on CPU tensors
(the C++ kernels that tests/test_tune_ops.py pins on upstream) bit for bit: the qdq weight, scales, codes and
zero points, the backward's V and range-factor gradients, autograd through tune_ops.int_qdq, the group extremes
and the sign-SGD step, for bf16 / fp16 / fp32 weights, fp16 / bf16 / fp32 scales, sym and asym, 2, 4 and 8 bits,
groups of 32, 128 and whole rows, with a padded last group. SignRoundV2 (enable_alg_ext): the qdq with an init
scale (max_scale in [0, 2], min_scale unused), its autograd, the sign-SGD step clamped to 2, and the init-scale
search called with a CUDA weight (it runs on a host copy) return what the CPU returns.

They need a CUDA device and a fastround built against a CUDA torch, so they live outside tests/ (CI has no GPU,
and the project never skips a test to look green). Run them explicitly on the GPU host:
    bash benchmarks/gpu_build.sh          # builds fastround with CUDA into /tmp, then runs this folder
On a machine without CUDA, or with a CPU-only build, every test fails at the `cuda` fixture.
"""

from __future__ import annotations

import pytest
import torch
from _same_bits import same_bits
from fastround import tune_ops

_ops = torch.ops.fastround


def _case(dtype: torch.dtype, gs: int, seed: int, rows: int, cols: int, factors: bool = True):
    """weight [rows, cols] with an all-zero row (the scale floor) and a row of tied extremes; v [rows*G, group];
    factors [rows, G] in [0.4, 1] with some at 1 (or None); a gradient like the weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0
    w[1] = torch.where(torch.arange(cols) % 2 == 0, 0.1, -0.1)
    w[2, ::3] *= 40  # a few outliers: clamped codes, scales far from the rest
    w = w.to(dtype)
    group, groups = tune_ops.group_layout(cols, gs)
    v = torch.rand(rows * groups, group, generator=g) - 0.5
    v[::7] = 0.0  # plain RTN rows: x + v lands on x itself
    mn = mx = None
    if factors:
        mn = 0.4 + 0.6 * torch.rand(rows, groups, generator=g)
        mx = 0.4 + 0.6 * torch.rand(rows, groups, generator=g)
        mn[::5] = 1.0
        mx[::3] = mn[::3]
    grad = (torch.randn(rows, cols, generator=g) * 1e-2).to(dtype)
    return w, v, mn, mx, grad


def _to(dev: torch.device, *ts):
    return tuple(None if t is None else t.to(dev) for t in ts)


def _check_all(dev, dtype, bits, gs, sym, scale_dtype=torch.float16, rows=64, cols=328, factors=True, seed=0,
               init_scale=False):
    """init_scale: SignRoundV2's form (sym), the scale init_scale * max_scale with max_scale in [0, 2]."""
    thresh = 1e-8 if scale_dtype == torch.float32 else 1e-5
    w, v, mn, mx, grad = _case(dtype, gs, seed, rows, cols, factors)
    init = None
    if init_scale:
        init = tune_ops.int_init_scale(w, bits, gs, torch.rand(cols) * 10, thresh).float()
        mn = None
        if mx is not None:
            mx = mx * 2.0 - 0.2
            mx[::4] = 2.0
    args = (bits, gs, sym, scale_dtype, thresh)
    wmin, wmax = _ops.int_group_extremes(w, gs)
    d_w, d_v, d_mn, d_mx, d_grad, d_init = _to(dev, w, v, mn, mx, grad, init)
    d_wmin, d_wmax = _ops.int_group_extremes(d_w, gs)
    assert same_bits(wmin, d_wmin) and same_bits(wmax, d_wmax), "group extremes"

    qdq, scale = _ops.int_qdq(w, v, mn, mx, wmin, wmax, *args, init)
    d_qdq, d_scale = _ops.int_qdq(d_w, d_v, d_mn, d_mx, d_wmin, d_wmax, *args, d_init)
    assert same_bits(qdq, d_qdq), "qdq"
    assert same_bits(scale, d_scale), "scale"

    cpu_codes = _ops.int_qdq_codes(w, v, mn, mx, wmin, wmax, *args, init)
    dev_codes = _ops.int_qdq_codes(d_w, d_v, d_mn, d_mx, d_wmin, d_wmax, *args, d_init)
    for name, a, b in zip(("qdq", "codes", "scales", "zeros"), cpu_codes, dev_codes):
        assert same_bits(a, b), f"int_qdq_codes {name}"

    for factor_grads in (True, False):
        gv, gmin, gmax = _ops.int_qdq_backward(grad, w, v, mn, mx, wmin, wmax, *args, factor_grads, init)
        d_gv, d_gmin, d_gmax = _ops.int_qdq_backward(d_grad, d_w, d_v, d_mn, d_mx, d_wmin, d_wmax, *args,
                                                     factor_grads, d_init)
        assert same_bits(gv, d_gv), f"grad_v (factor_grads={factor_grads})"
        if factor_grads:
            assert same_bits(gmin, d_gmin) and same_bits(gmax, d_gmax), "grad_min / grad_max"
            assert bool((gmax != 0).any()), "the case gives the factors a gradient"


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ops_equal_cpu(cuda, dtype, bits, gs, sym):
    """cols 328: a last group of 8 (gs 32) or 72 (gs 128); whole rows of 328 span two backward chunks."""
    _check_all(cuda, dtype, bits, gs, sym, seed=bits * 100 + gs)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_dtypes_equal_cpu(cuda, dtype, scale_dtype):
    """Every weight x scale dtype pair, incl. the ones where torch divides in the 16-bit weight dtype."""
    for sym in (True, False):
        _check_all(cuda, dtype, 4, 32, sym, scale_dtype=scale_dtype, seed=7)


@pytest.mark.parametrize("sym", [True, False])
def test_fixed_factors_equal_cpu(cuda, sym):
    """min_scale / max_scale None (factors fixed at 1)."""
    _check_all(cuda, torch.bfloat16, 4, 128, sym, factors=False, seed=3)


@pytest.mark.parametrize("gs,cols", [(128, 4096 + 72), (-1, 1000)])
def test_large_layer_equals_cpu(cuda, gs, cols):
    """Many blocks and grid-stride loops; a 1000-wide row group spans four backward chunks."""
    _check_all(cuda, torch.bfloat16, 4, gs, True, rows=1024, cols=cols, seed=11)
    _check_all(cuda, torch.float16, 4, gs, False, rows=512, cols=cols, seed=12)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_init_scale_ops_equal_cpu(cuda, dtype, bits, gs, scale_dtype):
    """SignRoundV2's qdq: the scale from the searched init scale times max_scale in [0, 2]."""
    _check_all(cuda, dtype, bits, gs, True, scale_dtype=scale_dtype, seed=bits * 10 + gs, init_scale=True)
    _check_all(cuda, dtype, bits, gs, True, scale_dtype=scale_dtype, seed=5, init_scale=True, factors=False)


def test_init_scale_search_on_cuda_weight(cuda):
    """tune_ops.int_init_scale of a CUDA weight: the CPU search's scales, returned on the weight's device."""
    w, _, _, _, _ = _case(torch.bfloat16, 128, 4, 256, 1000)
    im = torch.rand(1000) * 10
    cpu = tune_ops.int_init_scale(w, 4, 128, im, 1e-5)
    dev = tune_ops.int_init_scale(w.to(cuda), 4, 128, im.to(cuda), 1e-5)
    assert dev.device.type == "cuda" and same_bits(cpu, dev)


def test_init_scale_autograd_equals_cpu(cuda):
    w, v, _, mx, grad = _case(torch.bfloat16, 32, 6, 48, 200)
    init = tune_ops.int_init_scale(w, 2, 32, torch.rand(200) * 10, 1e-5).float()
    spec = tune_ops.IntQdqSpec(2, 32, True, torch.float16, 1e-5)
    grads = []
    for dev in (torch.device("cpu"), cuda):
        d_w, d_grad, d_init = _to(dev, w, grad, init)
        params = [t.detach().clone().to(dev).requires_grad_() for t in (v, mx * 2.0)]
        wmin, wmax = tune_ops.group_extremes(d_w, 32)
        tune_ops.int_qdq(d_w, params[0], None, params[1], wmin, wmax, spec, d_init).backward(d_grad)
        grads.append([p.grad for p in params])
    for name, a, b in zip(("v", "max_scale"), *grads):
        assert same_bits(a.cpu(), b), name


@pytest.mark.parametrize("sym", [True, False])
def test_autograd_equals_cpu(cuda, sym):
    """tune_ops.int_qdq's autograd (the backward op behind it) gives the same V and factor gradients."""
    w, v, mn, mx, grad = _case(torch.bfloat16, 32, 5, 48, 200)
    spec = tune_ops.IntQdqSpec(4, 32, sym, torch.float16, 1e-5)
    grads = []
    for dev in (torch.device("cpu"), cuda):
        d_w, d_grad = _to(dev, w, grad)
        # detach().clone(): on the CPU .to() returns the tensor itself, whose requires_grad would make the CUDA
        # copies non-leaf tensors without .grad
        params = [t.detach().clone().to(dev).requires_grad_() for t in (v, mn, mx)]
        wmin, wmax = tune_ops.group_extremes(d_w, 32)
        out = tune_ops.int_qdq(d_w, params[0], params[1], params[2], wmin, wmax, spec)
        out.backward(d_grad)
        grads.append([p.grad for p in params])
    for name, a, b in zip(("v", "min_scale", "max_scale"), *grads):
        a, b = a.cpu(), b.cpu()
        assert same_bits(a, b), (f"{name}: {int((a != b).sum())} of {a.numel()} differ, max abs "
                             f"{float((a - b).abs().max())}, max {float(a.abs().max())}")


@pytest.mark.parametrize("clamp01,clamp_hi", [(False, 1.0), (True, 1.0), (True, 2.0)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sign_sgd_equals_cpu(cuda, momentum, clamp01, clamp_hi):
    """Three steps over 70 tensors (more than one launch's batch), some empty, some gradients zero; clamp_hi 2 is
    SignRoundV2's max_scale bound."""
    g = torch.Generator().manual_seed(int(momentum * 10) + clamp01)
    sizes = [int(n) for n in torch.randint(0, 5000, (70,), generator=g)] + [300_001, 1]
    params = [clamp_hi * (0.5 + 0.6 * (torch.rand(n, generator=g) - 0.5)) if clamp01 else torch.randn(n, generator=g)
              for n in sizes]
    steps = []
    for _ in range(3):
        gr = [torch.randn(n, generator=g) for n in sizes]
        for t in gr[::4]:
            t[::3] = 0.0
        steps.append(gr)
    state = []  # [params + bufs] on the CPU, then on the device
    for dev in (torch.device("cpu"), cuda):
        ps = [p.clone().to(dev) for p in params]
        bufs = [torch.zeros_like(p) for p in ps] if momentum else []
        for i, gr in enumerate(steps):
            tune_ops.sign_sgd_step_(ps, [t.to(dev) for t in gr], bufs, 0.01 * (1 - i / 3), momentum, i == 0, clamp01,
                                    clamp_hi)
        state.append(ps + bufs)
    assert all(same_bits(a, b) for a, b in zip(*state))
    assert not same_bits(params[-2], state[0][len(params) - 2]), "the steps moved the parameters"


def test_runs_on_the_current_stream(cuda):
    """Ops called under a side stream enqueue there: synchronizing that stream alone makes the result ready."""
    w, v, mn, mx, _ = _case(torch.bfloat16, 128, 9, 2048, 4096)
    wmin, wmax = _ops.int_group_extremes(w, 128)
    qdq, _ = _ops.int_qdq(w, v, mn, mx, wmin, wmax, 4, 128, True, torch.float16, 1e-5)
    d_w, d_v, d_mn, d_mx = _to(cuda, w, v, mn, mx)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        d_wmin, d_wmax = _ops.int_group_extremes(d_w, 128)
        d_qdq, _ = _ops.int_qdq(d_w, d_v, d_mn, d_mx, d_wmin, d_wmax, 4, 128, True, torch.float16, 1e-5)
        host = torch.empty(d_qdq.shape, dtype=d_qdq.dtype, pin_memory=True)
        host.copy_(d_qdq, non_blocking=True)
    side.synchronize()
    assert same_bits(qdq, host)


def test_bad_arguments_name_the_argument(cuda):
    w, v, mn, mx, grad = _case(torch.bfloat16, 32, 2, 8, 64)
    d_w, d_v, d_mn, d_mx, d_grad = _to(cuda, w, v, mn, mx, grad)
    d_wmin, d_wmax = _ops.int_group_extremes(d_w, 32)
    spec = tune_ops.IntQdqSpec(4, 32, True, torch.float16, 1e-5)
    with pytest.raises(ValueError, match=r"int_qdq\] v: expected float32 cuda"):
        tune_ops.int_qdq(d_w, v, d_mn, d_mx, d_wmin, d_wmax, spec)  # v left on the CPU
    with pytest.raises(ValueError, match=r"int_qdq\] weight: expected a CUDA tensor"):
        tune_ops.int_qdq(w, d_v, d_mn, d_mx, d_wmin, d_wmax, spec)
    with pytest.raises(ValueError, match=r"int_qdq\] v"):
        tune_ops.int_qdq(d_w, d_v[:-1], d_mn, d_mx, d_wmin, d_wmax, spec)
    with pytest.raises(ValueError, match="min_scale"):
        tune_ops.int_qdq(d_w, d_v, d_mn[:, :1], d_mx, d_wmin, d_wmax, spec)
    with pytest.raises(ValueError, match=r"int_qdq_backward\] grad"):
        _ops.int_qdq_backward(d_grad.float(), d_w, d_v, d_mn, d_mx, d_wmin, d_wmax, 4, 32, True, torch.float16,
                              1e-5, True)
    with pytest.raises(ValueError, match="group_size"):
        tune_ops.group_extremes(d_w, 0)
    with pytest.raises(ValueError, match=r"sign_sgd_step_\] params"):
        tune_ops.sign_sgd_step_([d_v], [v], [], 0.01)
