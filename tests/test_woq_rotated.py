"""The fused online rotation of a rotated checkpoint's QuantLinear (torch.ops.fastround.woq_linear_rotated,
quant_linear.attach_rotation): the same bits as the forward pre-hook it replaces, at op level (every rotation option,
GEMV and matmul row counts, dtypes) and at module level (QuaRot R1 / R4 hooks, the transform backend's
register_online_hooks, the reference path), while other layers keep their pre-hooks."""

from __future__ import annotations

import pytest
import torch

from fastround import quarot as Q
from fastround import rotation as R
from fastround import transform_ops as T
from fastround.quant_linear import QuantLinear, attach_rotation, online_rotation_count

_ops = torch.ops.fastround
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(_INT[a.dtype]), b.contiguous().view(_INT[b.dtype]))


def quant_linear(i: int, o: int, seed: int, bias: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(i, o, 4, 32, True, "gptq", bias=bias)
    with torch.no_grad():
        q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, q.qweight.shape, generator=g, dtype=torch.int64)
                        .to(torch.int32))
        q.qzeros.fill_(0x77777777)
        q.scales.copy_((torch.rand(q.scales.shape, generator=g) * 0.01 + 0.001).half())
        if bias:
            q.bias.copy_(torch.randn(o, generator=g).half())
    return q


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_equals_rotation_then_linear(dtype):
    n, k = 96, 12
    q = quant_linear(2 * n, 64, 1, bias=True)
    hk = T.library_matrix(k)
    sg = T.random_signs(n, torch.Generator().manual_seed(2)).to(torch.int8)
    for rows in (1, 3, 40):  # the GEMV rows and the dequantize + matmul rows
        x = rand((rows, 2 * n), dtype, rows)
        for signs, transpose, signs_first in ((None, False, False), (sg, True, False), (sg, False, True)):
            args = (q.qweight, q.qzeros, q.scales, q.bias, 4, 32, "gptq")
            want = _ops.woq_linear(T.hadamard_transform(x, n, hk, signs, transpose, signs_first), *args)
            got = _ops.woq_linear_rotated(x, *args, n, hk, signs, transpose, signs_first)
            same_bits(got, want)
    with pytest.raises(ValueError, match="block_size"):
        _ops.woq_linear_rotated(rand((1, 2 * n), dtype, 0), q.qweight, q.qzeros, q.scales, None, 4, 32, "gptq", 80)


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = quant_linear(64, 128, 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = _ops.woq_linear_rotated(torch.empty(2, 5, 64), q.qweight, q.qzeros, q.scales, None, 4, 32, "gptq", 32)
    assert tuple(y.shape) == (2, 5, 128)


@pytest.mark.parametrize("reference", ["0", "1"])
def test_quarot_hooks_fused_equal_pre_hooks(monkeypatch, reference):
    """R4 (K = 28, fp32 numerics) and a random R1 (signs) on QuantLinears: attach_rotation folds them into the op;
    the output equals the same layer with the pre-hook, bit for bit, on the op path and on the reference path."""
    monkeypatch.setenv("FASTROUND_WOQ_REFERENCE", reference)
    torch.manual_seed(0)
    cases = [(Q.online_hook("r4", 448, 28), 448), (Q._hook(Q.RandomRotation.draw(128, torch.device("cpu"))
                                                           .block_map(fp32=False)), 256)]
    for hook, width in cases:
        fused, hooked = quant_linear(width, 64, 4), quant_linear(width, 64, 4)
        attach_rotation(fused, hook)
        hooked.register_forward_pre_hook(hook, prepend=True)
        assert fused.input_rotation is not None and not fused._forward_pre_hooks
        assert online_rotation_count(fused) == online_rotation_count(hooked) == 1
        for dtype in (torch.bfloat16, torch.float32):
            for shape in ((1, 1, width), (2, 9, width)):
                x = rand(shape, dtype, width)
                with torch.inference_mode():
                    same_bits(fused(x), hooked(x))


def test_register_online_hooks_fuses_quant_linears_only():
    """The transform backend's load hooks: QuantLinears get the fused rotation, an nn.Linear keeps its pre-hook, a
    QuantLinear that already has a pre-hook keeps the hook order (a new pre-hook, prepended); outputs equal the
    pre-hook path."""
    model = torch.nn.Sequential(quant_linear(64, 64, 5), torch.nn.Linear(64, 64), quant_linear(64, 64, 6))
    ref = torch.nn.Sequential(quant_linear(64, 64, 5), torch.nn.Linear(64, 64), quant_linear(64, 64, 6))
    ref[1].load_state_dict(model[1].state_dict())
    seen: list[torch.Tensor] = []
    for m in (model[2], ref[2]):
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    names = R.register_online_hooks(model, {"block_size": 32, "hadamard_type": "hadamard"}, "mx_fp",
                                    names=["0", "1", "2"])
    assert names == ["0", "1", "2"]
    assert model[0].input_rotation is not None and not model[0]._forward_pre_hooks
    assert len(model[1]._forward_pre_hooks) == 1
    assert model[2].input_rotation is None and len(model[2]._forward_pre_hooks) == 2
    rot = R.LinearRotation(R.RotationConfig(block_size=32, backend="transform"), "mx_fp")
    for m in ref:
        m.register_forward_pre_hook(rot._hook, prepend=True)
    x = rand((1, 3, 64), torch.bfloat16, 7)
    model[1].bfloat16()
    ref[1].bfloat16()
    with torch.inference_mode():
        same_bits(model(x), ref(x))
    same_bits(seen[0], seen[1])  # the older pre-hook saw the rotated input on both


def test_r1_is_one_transform_per_shared_input(monkeypatch):
    """A loaded QuaRot checkpoint with online R1 (fuse_online_to_weight=False): q/k/v (and gate/up) rotate one input,
    so register_online_hooks gives each group one SharedInputRotation: one transform for the three layers, the bits
    of each layer rotating on its own; another input, an input written in place, or autograd: its own transform."""
    width = 64

    def parent(*names: str) -> torch.nn.Module:
        m = torch.nn.Module()
        for i, n in enumerate(names):
            q = quant_linear(width, 32, 20 + i)
            q.register_buffer("spinquant_r1_type", torch.tensor(0, dtype=torch.int32))
            q.register_buffer("spinquant_r1_size", torch.tensor(width, dtype=torch.int32))
            setattr(m, n, q)
        return m

    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = parent("q_proj", "k_proj", "v_proj"), parent("gate_proj", "up_proj")
    model = torch.nn.ModuleDict({"0": layer})
    hooked = Q.register_online_hooks(model, {"r1": True})
    assert len(hooked["r1"]) == 5
    attn, mlp = layer.self_attn, layer.mlp
    shared = attn.q_proj.input_rotation
    assert isinstance(shared, T.SharedInputRotation) and shared.consumers == 3
    assert attn.k_proj.input_rotation is shared and attn.v_proj.input_rotation is shared
    assert mlp.gate_proj.input_rotation is mlp.up_proj.input_rotation is not shared
    calls = []
    real = T.hadamard_transform
    monkeypatch.setattr(T, "hadamard_transform", lambda *a, **k: calls.append(1) or real(*a, **k))
    own = Q.online_hook("r1", width, 1)
    x = rand((1, 3, width), torch.bfloat16, 1)
    with torch.inference_mode():
        outs = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        assert len(calls) == 1 and shared._x is None  # one transform; the cache released after the third layer
        for m, y in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs):
            m.input_rotation = None
            same_bits(y, m(own(None, (x,))[0]))
            m.input_rotation = shared
        calls.clear()
        x2 = x.clone()
        attn.q_proj(x2)
        attn.k_proj(x)  # another tensor: its own transform
        x2.add_(1.0)
        attn.k_proj(x2)  # written in place after q took it: recomputed
        assert len(calls) == 3
    calls.clear()
    xg = rand((1, 2, width), torch.float32, 2).requires_grad_()
    attn.q_proj(xg), attn.k_proj(xg)
    assert len(calls) == 2  # autograd: no cache across layers
