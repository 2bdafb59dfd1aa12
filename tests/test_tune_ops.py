"""SignRound's C++ tuning ops against upstream 0.16.1's torch functions.

The qdq forward (torch.ops.fastround.int_qdq) must equal upstream's quant_tensor_sym / quant_tensor_asym with the
same V, factors and frozen extremes bit for bit, for every weight dtype; at V = 0 and factors 1 it is RTN. Its
gradient must equal torch autograd through upstream's functions: exactly for V, and for the range factors up to
the order in which fp16 partial sums round (upstream accumulates the scale's gradient in fp16 per op). One
sign-SGD step equals torch's SGD update p - lr * sign(d) (§2.7). The kernels' fast paths equal their scalar
references (cpp/tests/test_tune.cpp).
"""

from __future__ import annotations


import pytest
import torch

from cpp_runner import run_cpp_test
from fastround import ops, tune_ops

from auto_round.data_type.int import quant_tensor_asym, quant_tensor_sym  # noqa: E402
from auto_round.data_type.utils import reshape_pad_tensor_by_group_size  # noqa: E402


def _case(dtype: torch.dtype, gs: int, seed: int, rows: int = 48, cols: int = 200):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    w[0] = 0  # an all-zero row: the scale floor
    w[1, :] = torch.where(torch.arange(cols) % 2 == 0, 0.1, -0.1).to(dtype)  # tied extremes
    group, groups = tune_ops.group_layout(cols, gs)
    v = torch.rand(rows * groups, group, generator=g) - 0.5
    mn = 0.5 + 0.5 * torch.rand(rows, groups, generator=g)
    mx = 0.5 + 0.5 * torch.rand(rows, groups, generator=g)
    mx[::5] = 1.0
    return w, v, mn, mx


def _upstream(w, v, mn, mx, bits, gs, sym, scale_dtype=torch.float16, thresh=1e-5):
    wr, _, _ = reshape_pad_tensor_by_group_size(w, gs)
    tmin = torch.clamp(wr.min(1)[0], max=0)
    tmax = torch.clamp(wr.max(1)[0], min=0)
    fn = quant_tensor_sym if sym else quant_tensor_asym
    q, scale, zp = fn(w, bits=bits, group_size=gs, v=v, min_scale=mn, max_scale=mx, scale_dtype=scale_dtype,
                      tensor_min=tmin, tensor_max=tmax, q_scale_thresh=thresh)
    return q.to(w.dtype), scale, zp


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, -1, True), (2, 64, True), (8, 32, True),
                                         (4, 32, False), (2, -1, False), (3, 64, False)])
def test_forward_equals_upstream(dtype, bits, gs, sym):
    w, v, mn, mx = _case(dtype, gs, seed=bits * 10 + (gs > 0))
    wmin, wmax = tune_ops.group_extremes(w, gs)
    spec = tune_ops.IntQdqSpec(bits, gs, sym, torch.float16, 1e-5)
    ours = tune_ops.int_qdq(w, v, mn, mx, wmin, wmax, spec)
    theirs, scale, zp = _upstream(w, v, mn.reshape(-1), mx.reshape(-1), bits, gs, sym)
    assert _bits_equal(ours, theirs)
    # What export packs: codes, fp16 scales and zero points of upstream's qdq (§2.10).
    qdq, codes, scales, zeros = tune_ops.int_qdq_codes(w, v, mn, mx, wmin, wmax, spec)
    assert _bits_equal(qdq, theirs)
    assert torch.equal(scales, scale.reshape(scales.shape).to(torch.float16))
    if sym:
        assert bool((zeros == 2 ** (bits - 1)).all())
    else:
        assert torch.equal(zeros, zp.reshape(zeros.shape).to(torch.int32))
    cols, rep = codes.shape[1], (gs if gs > 0 else codes.shape[1])
    assert int(codes.max()) < 2 ** bits
    q = codes.to(torch.int32) - zeros.repeat_interleave(rep, dim=1)[:, :cols]  # [out, in] signed codes
    redone = (scales.float().repeat_interleave(rep, dim=1)[:, :cols] * q.float()).to(dtype)
    assert torch.equal(redone.float().abs(), theirs.float().abs())  # the codes stand for the qdq (up to -0)


def test_rounded_zeros_are_positive_as_round_ste():
    """upstream's round_ste gives +0 where round gives -0 (-0.3 -> +0), so a zero code's qdq has the scale's sign."""
    w = torch.tensor([[0.5, -0.03, 0.01, -1.0], [1.0, -0.03, 0.02, -0.5]])
    v = torch.zeros(2, 4)
    wmin, wmax = tune_ops.group_extremes(w, -1)
    ours = tune_ops.int_qdq(w, v, None, None, wmin, wmax, tune_ops.IntQdqSpec(4, -1, True, torch.float16, 1e-5))
    theirs, _, _ = _upstream(w, v, torch.ones(2), torch.ones(2), 4, -1, True)
    assert _bits_equal(ours, theirs)
    assert not bool(torch.signbit(ours[0, 1])) and bool(torch.signbit(ours[1, 1]))


@pytest.mark.parametrize("scale_dtype,thresh", [(torch.float32, 1e-8), (torch.bfloat16, 1e-5)])
def test_forward_other_scale_dtypes(scale_dtype, thresh):
    for dtype in (torch.bfloat16, torch.float32):
        w, v, mn, mx = _case(dtype, 32, seed=3)
        wmin, wmax = tune_ops.group_extremes(w, 32)
        spec = tune_ops.IntQdqSpec(4, 32, True, scale_dtype, thresh)
        theirs, _, _ = _upstream(w, v, mn.reshape(-1), mx.reshape(-1), 4, 32, True, scale_dtype, thresh)
        assert _bits_equal(tune_ops.int_qdq(w, v, mn, mx, wmin, wmax, spec), theirs)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_offsets_are_rtn(sym, bits):
    """V = 0 and factors 1 give RTN's codes and qdq (fp32 weights; on bf16 upstream's RTN rounds the range to bf16
    before the fp16 cast, which its tuning qdq does not)."""
    w, _, _, _ = _case(torch.float32, 64, seed=bits)
    group, groups = tune_ops.group_layout(w.shape[1], 64)
    v = torch.zeros(w.shape[0] * groups, group)
    wmin, wmax = tune_ops.group_extremes(w, 64)
    spec = tune_ops.IntQdqSpec(bits, 64, sym, torch.float16, 1e-5)
    qdq, codes, scales, zeros = tune_ops.int_qdq_codes(w, v, None, None, wmin, wmax, spec)
    rtn = ops.encode_weight(w, "int_gptq", bits, 64, sym)
    assert torch.equal(codes, rtn.codes) and torch.equal(scales, rtn.scales) and torch.equal(zeros, rtn.zeros)
    assert torch.equal(qdq.abs(), ops.dequantize_codes(rtn.codes, rtn.scales, rtn.zeros, "int_gptq", bits, 64, sym,
                                                       torch.float32).abs())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (2, -1, True), (4, 64, False), (8, 32, False)])
def test_gradient_equals_torch_autograd(dtype, bits, gs, sym):
    w, v, mn, mx = _case(dtype, gs, seed=bits + 7)
    wmin, wmax = tune_ops.group_extremes(w, gs)
    spec = tune_ops.IntQdqSpec(bits, gs, sym, torch.float16, 1e-5)
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = [t.clone().requires_grad_() for t in (v, mn, mx)]
    (tune_ops.int_qdq(w, ours[0], ours[1], ours[2], wmin, wmax, spec).float() * gout.float()).sum().backward()
    ref = [v.clone().requires_grad_(), mn.reshape(-1).clone().requires_grad_(),
           mx.reshape(-1).clone().requires_grad_()]
    q, _, _ = _upstream(w, ref[0], ref[1], ref[2], bits, gs, sym)
    (q.float() * gout.float()).sum().backward()
    assert torch.equal(ours[0].grad, ref[0].grad)
    for a, b in ((ours[1].grad.reshape(-1), ref[1].grad), (ours[2].grad.reshape(-1), ref[2].grad)):
        big = b.abs() > 1e-3 * b.abs().max()
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-3 * float(b.abs().max()))
        assert float((torch.sign(a[big]) == torch.sign(b[big])).float().mean()) == 1.0


def test_opcheck_fake_and_autograd():
    w, v, mn, mx = _case(torch.bfloat16, 32, seed=5, rows=8, cols=64)
    wmin, wmax = tune_ops.group_extremes(w, 32)
    args = (w, v.requires_grad_(), mn.requires_grad_(), mx.requires_grad_(), wmin, wmax, 4, 32, True,
            torch.float16, 1e-5)
    torch.library.opcheck(torch.ops.fastround.int_qdq.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.fastround.int_qdq_codes.default, tuple(a.detach() if isinstance(a, torch.Tensor)
                                                                           else a for a in args),
                          test_utils=("test_schema", "test_faketensor"))


def test_sign_sgd_step_equals_torch_sgd():
    """One sign-SGD step as upstream's optimizer (torch SGD on sign(d), momentum buffer, weight decay 0)."""
    g = torch.Generator().manual_seed(0)
    for momentum in (0.0, 0.9):
        p = torch.randn(1000, generator=g)
        grads = [torch.randn(1000, generator=g) for _ in range(3)]
        grads[0][::7] = 0
        grads[1][::11] = float("nan")  # an overflowed scale gradient: torch.sign(nan) is 0 on the CPU
        ref = p.clone()
        buf_ref = None
        ours = p.clone()
        bufs = [torch.zeros_like(p)] if momentum else []
        for step, gr in enumerate(grads):
            lr = 0.01 * (1 - step / 3)
            d = gr
            if momentum:
                buf_ref = gr.clone() if buf_ref is None else buf_ref.mul(momentum).add(gr)
                d = buf_ref
            ref = ref.add(torch.sign(d), alpha=-lr)
            tune_ops.sign_sgd_step_([ours], [gr], bufs, lr, momentum, step == 0, False)
        assert torch.equal(ours, ref)
    f = torch.tensor([0.0, 1.0, 0.5, 0.999])
    tune_ops.sign_sgd_step_([f], [torch.tensor([1.0, -1.0, 0.0, -1.0])], [], 0.005, 0.0, True, True)
    assert f.tolist() == [0.0, 1.0, 0.5, 1.0]  # factors stay in [0, 1]; a zero gradient does not move


def test_bad_shapes_name_the_argument():
    w, v, mn, mx = _case(torch.bfloat16, 32, seed=2, rows=8, cols=64)
    wmin, wmax = tune_ops.group_extremes(w, 32)
    spec = tune_ops.IntQdqSpec(4, 32, True, torch.float16, 1e-5)
    with pytest.raises(ValueError, match=r"int_qdq\] v"):
        tune_ops.int_qdq(w, v[:-1], mn, mx, wmin, wmax, spec)
    with pytest.raises(ValueError, match="min_scale"):
        tune_ops.int_qdq(w, v, mn[:, :1], mx, wmin, wmax, spec)
    with pytest.raises(ValueError, match="group_size"):
        tune_ops.group_extremes(w, 0)


def test_cpp_reference_walk():
    """Fast kernels == scalar references for every dtype, scale dtype, bits, grouping and thread count."""
    run_cpp_test("fastround-test-tune", 2000)
