"""SignRoundV2 (enable_alg_ext=True) against auto-round 0.16.1 (eager, CPU).

The extension's numerics: the init-scale search (torch.ops.fastround.int_init_scale, OPT-RTN's C++ search fed the
imatrix as collected) equals upstream's search_optimized_init_scale bit for bit; the qdq with an init scale equals
upstream's quant_tensor_sym(init_scale=...) forward bit for bit and its gradient (exactly for V, up to the fp16
partial-sum order for max_scale); the sign-SGD step clamps max_scale to [0, 2]. End to end, W4A16 (plain loss) and
W2A16G64 (outlier-suppressed loss) checkpoints equal upstream's byte for byte with the tuning moving in every
block. The kernels' fast paths equal their references in cpp/tests/test_tune.cpp (tests/test_tune_ops.py runs it).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from fastround import tune_ops
from test_signround import _run, assert_same_checkpoint

from auto_round.data_type.int import quant_tensor_sym  # noqa: E402
from auto_round.data_type.utils import (  # noqa: E402
    reshape_imatrix_for_weight,
    reshape_pad_tensor_by_group_size,
    search_optimized_init_scale,
)


def _weight(dtype: torch.dtype, seed: int, rows: int = 24, cols: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0  # an all-zero row: the scale floor
    w[1, :] = torch.where(torch.arange(cols) % 2 == 0, 0.1, -0.1)  # tied extremes
    w[2, 7] = 0.9  # an outlier
    return w.to(dtype)


def _imatrix(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    im = torch.rand(cols, generator=g) * 50
    im[::9] = 0  # zero entries stay zero (OPT-RTN's fix-up is not applied)
    return im


def _upstream_init(w: torch.Tensor, bits: int, gs: int, im: torch.Tensor | None, thresh: float) -> torch.Tensor:
    wr, _, _ = reshape_pad_tensor_by_group_size(w, gs)
    return search_optimized_init_scale(wr, "int", bits, reshape_imatrix_for_weight(im, wr, gs), thresh)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,gs", [(4, 32), (2, 64), (4, -1), (8, 128), (3, 64)])
def test_init_scale_equals_upstream_search(dtype, bits, gs):
    w = _weight(dtype, seed=bits * 3 + (gs > 0))
    for im, thresh in ((_imatrix(w.shape[1], bits), 1e-5), (None, 1e-5), (_imatrix(w.shape[1], 1), 1e-8)):
        ours = tune_ops.int_init_scale(w, bits, gs, im, thresh)
        theirs = _upstream_init(w, bits, gs, im, thresh)
        assert _bits_equal(ours, theirs.reshape(ours.shape))


def _qdq_case(dtype: torch.dtype, bits: int, gs: int, seed: int):
    w = _weight(dtype, seed)
    group, groups = tune_ops.group_layout(w.shape[1], gs)
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(w.shape[0] * groups, group, generator=g) - 0.5
    mx = 2 * torch.rand(w.shape[0], groups, generator=g)  # max_scale ranges over [0, 2] under the extension
    mx[::5] = 2.0
    mx[3] = 0.0  # a zero factor: the scale floor
    init = tune_ops.int_init_scale(w, bits, gs, _imatrix(w.shape[1], seed), 1e-5)
    return w, v, mx, init


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,gs", [(4, 32), (2, 64), (4, -1)])
def test_qdq_with_init_scale_equals_upstream(dtype, bits, gs):
    w, v, mx, init = _qdq_case(dtype, bits, gs, seed=bits + 11)
    wmin, wmax = tune_ops.group_extremes(w, gs)
    spec = tune_ops.IntQdqSpec(bits, gs, True, torch.float16, 1e-5)
    init32 = init.float()
    ours = tune_ops.int_qdq(w, v, None, mx, wmin, wmax, spec, init32)
    theirs, scale, _ = quant_tensor_sym(w, bits=bits, group_size=gs, v=v, max_scale=mx.reshape(-1),
                                        init_scale=init.reshape(-1, 1), scale_dtype=torch.float16)
    assert _bits_equal(ours, theirs.to(dtype))
    qdq, codes, scales, zeros = tune_ops.int_qdq_codes(w, v, None, mx, wmin, wmax, spec, init32)
    assert _bits_equal(qdq, ours)
    assert torch.equal(scales, scale.reshape(scales.shape).to(torch.float16))
    assert bool((zeros == 2 ** (bits - 1)).all()) and int(codes.max()) < 2 ** bits
    # The gradient: exact for V; for max_scale as torch autograd up to the fp16 rounding order of partial sums. An
    # fp16 weight is left out, as in test_tune_ops.py: torch differentiates its fp16 division in fp16, which
    # overflows to NaN on groups whose scale is tiny, where the C++ backward computes in fp32.
    if dtype == torch.float16:
        return
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    mine = [v.clone().requires_grad_(), mx.clone().requires_grad_()]
    out = tune_ops.int_qdq(w, mine[0], None, mine[1], wmin, wmax, spec, init32)
    (out.float() * gout.float()).sum().backward()
    ref = [v.clone().requires_grad_(), mx.reshape(-1).clone().requires_grad_()]
    q, _, _ = quant_tensor_sym(w, bits=bits, group_size=gs, v=ref[0], max_scale=ref[1],
                               init_scale=init.reshape(-1, 1), scale_dtype=torch.float16)
    (q.to(dtype).float() * gout.float()).sum().backward()
    assert torch.equal(mine[0].grad, ref[0].grad)
    a, b = mine[1].grad.reshape(-1), ref[1].grad
    big = b.abs() > 1e-3 * b.abs().max()
    assert torch.allclose(a, b, rtol=2e-2, atol=2e-3 * float(b.abs().max()))
    assert float((torch.sign(a[big]) == torch.sign(b[big])).float().mean()) == 1.0


def test_init_scale_op_checks():
    w, v, mx, init = _qdq_case(torch.bfloat16, 4, 32, seed=4)
    wmin, wmax = tune_ops.group_extremes(w, 32)
    torch.library.opcheck(torch.ops.fastround.int_init_scale.default, (w, 4, 32, _imatrix(w.shape[1], 2), 1e-5),
                          test_utils=("test_schema", "test_faketensor"))
    args = (w, v.requires_grad_(), None, mx.requires_grad_(), wmin, wmax, 4, 32, True, torch.float16, 1e-5,
            init.float())
    torch.library.opcheck(torch.ops.fastround.int_qdq.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="init_scale"):
        tune_ops.int_qdq(w, v, None, mx, wmin, wmax, tune_ops.IntQdqSpec(4, 32, False, torch.float16, 1e-5),
                         init.float())
    with pytest.raises(ValueError, match="init_scale"):
        tune_ops.int_qdq(w, v, None, mx, wmin, wmax, tune_ops.IntQdqSpec(4, 32, True, torch.float16, 1e-5),
                         init.float()[:, :1])
    with pytest.raises(ValueError, match=r"int_init_scale\] imatrix"):
        tune_ops.int_init_scale(w, 4, 32, torch.ones(3), 1e-5)


def test_sign_sgd_clamps_factors_to_two():
    """SignRoundV2 bounds max_scale to [0, 2] (upstream clamps it before each forward)."""
    f = torch.tensor([0.0, 2.0, 1.5, 1.999, 0.999, 1.0])
    g = torch.tensor([1.0, -1.0, 0.0, -1.0, -1.0, -1.0])
    ref = (f + torch.sign(g) * torch.tensor(-0.005)).clamp(0.0, 2.0)
    tune_ops.sign_sgd_step_([f], [g], [], 0.005, 0.0, True, True, 2.0)
    assert torch.equal(f, ref) and f[3] == 2.0 and f[5] > 1.0  # above 1 allowed, 2 the bound


def test_outlier_loss_drops_the_largest_errors():
    """The W2 loss: the k = numel/1000 largest |error| elements leave the mean; the rest count, masked tokens 0."""
    from fastround.alg_ext import outlier_loss

    class Block(torch.nn.Module):
        def forward(self, x, **kw):
            return (x * 2,)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 40, generator=g)
    target = x * 2 + 0.01 * torch.randn(x.shape, generator=g)
    target[0, 3, 5] += 10.0  # two outliers among 4000 elements: k = 4 drops them and two more
    target[1, 7, 9] -= 10.0
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 40:] = 0
    loss = outlier_loss(Block(), x, {}, target, mask, "mean", None)
    err = ((x * 2 - target).abs() * mask.unsqueeze(-1)).reshape(-1)
    keep = torch.ones_like(err, dtype=torch.bool)
    keep[(x * 2 - target).abs().reshape(-1).topk(4).indices] = False
    assert float(loss) == pytest.approx(float((err * keep).pow(2).mean()), rel=1e-6)
    assert float(loss) < 1e-3


# Upstream's SignRoundV2 runs both cases: W4A16 trains the init scale with the plain MSE loss, W2A16G64 with the
# outlier-suppressed one. Each tuning must move (a best iteration after 0 in every block): at iteration 0 the
# parameters give the searched init scale, not the tuned one.
@pytest.mark.parametrize("kwargs,loss", [
    ({"scheme": "W4A16", "iters": 10, "lr": 0.02}, "MSE"),
    ({"scheme": "W2A16G64", "iters": 6, "lr": 0.02}, "outlier-suppressed"),
])
def test_checkpoint_equals_upstream(checkpoint, tmp_path, caplog, kwargs, loss):
    src = checkpoint("llama_aligned")
    theirs = _run("upstream", src, tmp_path / "up", enable_alg_ext=True, **kwargs)
    with caplog.at_level(logging.INFO, logger="fastround"):
        ours = _run("fastround", src, tmp_path / "fr", enable_alg_ext=True, **kwargs)
    assert f"SignRoundV2 (enable_alg_ext): imatrix-searched init scales, max_scale in [0, 2], {loss} loss" in caplog.text
    best_iters = [int(i) for i in re.findall(r"loss iter 0: [0-9.e+-]+ -> iter (\d+):", caplog.text)]
    assert len(best_iters) == 2 and min(best_iters) > 0, best_iters
    assert_same_checkpoint(theirs, ours)


def test_asym_scheme_tunes_as_plain_signround(checkpoint, tmp_path, caplog):
    """Upstream swaps in the extension's wrapper for sym schemes only: an asym run is plain SignRound."""
    src = checkpoint("llama_aligned")
    args = {"scheme": "W4A16", "sym": False, "group_size": 32, "iters": 3, "lr": 0.02, "nsamples": 4}
    with caplog.at_level(logging.WARNING, logger="fastround"):
        ext = _run("fastround", src, tmp_path / "ext", "auto_gptq", enable_alg_ext=True, **args)
    assert "plain SignRound" in caplog.text
    plain = _run("fastround", src, tmp_path / "plain", "auto_gptq", **args)
    assert_same_checkpoint(plain, ext)


def test_asym_layer_in_sym_scheme_is_refused(checkpoint, tmp_path):
    from fastround import AutoRound

    from test_opt_rtn_flow import _texts
    from test_signround import COMMON

    src = checkpoint("llama_aligned")
    ar = AutoRound(str(src), scheme="W4A16", iters=2, enable_alg_ext=True, dataset=_texts(),
                   layer_config={"model.layers.0.self_attn.q_proj": {"sym": False}}, **COMMON)
    with pytest.raises(NotImplementedError, match=r"q_proj: enable_alg_ext with an asym layer"):
        ar.quantize_and_save(str(tmp_path / "out"))


def test_adam_wins_and_other_schemes_are_refused(caplog):
    """Upstream resolves enable_adam before enable_alg_ext; MXFP / NVFP and GGUF double quant are not built."""
    from types import SimpleNamespace

    from fastround import alg_ext
    from fastround.tune_settings import SignRoundSettings

    with caplog.at_level(logging.WARNING, logger="fastround"):
        s = SignRoundSettings.from_kwargs(10, {"enable_adam": True, "enable_alg_ext": True})
    assert s.enable_adam and not s.enable_alg_ext and "enable_alg_ext is ignored" in caplog.text
    for scheme, match in (({"data_type": "mx_fp", "bits": 4, "sym": True}, "data_type=mx_fp"),
                          ({"data_type": "nv_fp", "bits": 4, "sym": True}, "data_type=nv_fp"),
                          ({"data_type": "int_sym_dq", "bits": 4, "sym": True, "super_group_size": 16}, "GGUF")):
        with pytest.raises(NotImplementedError, match=match):
            alg_ext.check(SimpleNamespace(scheme=scheme, layer_config={}))
