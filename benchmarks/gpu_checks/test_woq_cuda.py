"""GPU checks of torch.ops.fastround.woq_linear on CUDA tensors (python/src/bind_woq_cuda.cpp over
cpp/fastround/infer/woq_cuda.cu): the op must equal a plain-torch reference, the packed tensors unpacked with
explicit shifts and masks, dequantized in fp32 (scale * (q - zero)) and multiplied in fp32, within the rounding
of the output dtype. Every layout (gptq: zeros stored minus one; gptq_v2: zeros as is; awq: 4 bits, interleaved),
bits 2 / 4 / 8, groups of 32, 64, 128 and whole rows, batches 1, 2, 3, 8 (the GEMV), 33 and 512 (dequantize +
matmul), bf16 and fp16 activations, fp16 / bf16 / fp32 scales, with and without bias, layer shapes that take the
cluster split-K path and shapes that fall back to the dequantize path (unaligned activations, odd widths, groups
smaller than a word), partial last groups and padded qweight rows as the CPU op accepts them
(infer/woq_layout.cpp). The test's packers are pinned to fastround's own (pack_codes) byte for byte.

They need a CUDA device and a fastround built against a CUDA torch, so they live outside tests/ (CI has no GPU).
Run them on the GPU host:
    bash benchmarks/gpu_build.sh          # builds fastround with CUDA into /tmp, then runs this folder
"""

from __future__ import annotations

import pytest
import torch
from _profile import kernels
from fastround import ops



def _op(*args):
    return torch.ops.fastround.woq_linear(*args)


_AWQ_SLOT_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]  # nibble slot holding column p of each run of 8 (pack_awq.h)


# ---- plain-torch packing and its inverse (int64 arithmetic, then the int32 bit pattern) ----


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 tensor with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _from_int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def _pack_lanes(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack `values` (< 2^bits) along `dim` in runs of 32/bits, lane j at bits*j (gptq order)."""
    pf = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    pad = (-v.shape[-1]) % pf
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, pf) << (bits * torch.arange(pf))
    return _to_int32(v.sum(-1)).movedim(-1, dim)


def _unpack_lanes(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    pf = 32 // bits
    v = _from_int32(packed).movedim(dim, -1)
    v = (v[..., None] >> (bits * torch.arange(pf))) & ((1 << bits) - 1)
    return v.reshape(*v.shape[:-2], -1)[..., :length].movedim(-1, dim)


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """values [rows, out] (< 16) -> [rows, out/8]: column 8w+p in nibble slot _AWQ_SLOT_OF_COLUMN[p] of word w."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    shifts = 4 * torch.tensor(_AWQ_SLOT_OF_COLUMN)
    return _to_int32((v << shifts).sum(-1))


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    v = _from_int32(packed)
    slots = (v[..., None] >> (4 * torch.arange(8))) & 0xF  # [rows, out/8, slot]
    return slots[..., _AWQ_SLOT_OF_COLUMN].reshape(packed.shape[0], -1)


def pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, layout: str, pad_in: int = 0):
    """Codes q [in, out], zero points [groups, out] (what dequantization subtracts), scales [groups, out] ->
    (qweight, qzeros, scales) in `layout`. gptq stores zero - 1, which must be in range. pad_in: gptq qweight
    rows for that many extra inputs (code 0), as packers that pad inputs to whole groups write them."""
    if layout == "awq":
        return _pack_awq(q), _pack_awq(zeros), scales
    stored = zeros - 1 if layout == "gptq" else zeros
    assert int(stored.min()) >= 0 and int(stored.max()) < (1 << bits)
    if pad_in:
        q = torch.cat([q, torch.zeros(pad_in, q.shape[1], dtype=q.dtype)])
    return _pack_lanes(q, bits, 0), _pack_lanes(stored, bits, 1), scales


def dequantize_reference(qweight, qzeros, scales, bits: int, group_size: int, layout: str,
                         in_f: int | None = None) -> torch.Tensor:
    """The fp32 weight [in, out] the packed tensors stand for, from their bits alone. Input k is in group
    k // group (the last group may be partial); gptq rows past `in_f` (padding) are dropped."""
    qweight, qzeros, scales = qweight.cpu(), qzeros.cpu(), scales.cpu()
    out = scales.shape[1]
    if layout == "awq":
        q, z = _unpack_awq(qweight), _unpack_awq(qzeros)
    else:
        q = _unpack_lanes(qweight, bits, 0, qweight.shape[0] * 32 // bits)
        z = _unpack_lanes(qzeros, bits, 1, out) + (1 if layout == "gptq" else 0)
    in_f = q.shape[0] if in_f is None else in_f
    q = q[:in_f]
    group = in_f if group_size == -1 or group_size > in_f else group_size
    g = torch.arange(in_f) // group
    return (q.float() - z[g].float()) * scales.float()[g]


def linear_reference(x, qweight, qzeros, scales, bias, bits, group_size, layout) -> torch.Tensor:
    w = dequantize_reference(qweight, qzeros, scales, bits, group_size, layout, x.shape[-1])
    y = x.cpu().float().reshape(-1, w.shape[0]) @ w
    if bias is not None:
        y = y + bias.cpu().float()
    return y.reshape(*x.shape[:-1], w.shape[1])


def make_layer(in_f: int, out_f: int, bits: int, group_size: int, layout: str, scale_dtype=torch.float16,
               seed: int = 0, pad_in: int = 0):
    """Random codes, zero points and scales, packed: (qweight, qzeros, scales) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-in_f // group_size)
    q = torch.randint(0, 1 << bits, (in_f, out_f), generator=g)
    lo = 1 if layout == "gptq" else 0  # gptq stores zero - 1
    zeros = torch.randint(lo, (1 << bits) + lo, (groups, out_f), generator=g)
    zeros[0, : min(out_f, 4)] = lo  # the extreme zero points
    zeros[-1, -min(out_f, 4):] = (1 << bits) - 1 + lo
    scales = ((torch.rand(groups, out_f, generator=g) + 0.5) * (0.02 / (1 << bits))).to(scale_dtype)
    return pack(q, zeros, scales, bits, layout, pad_in)


def _tolerance(dtype: torch.dtype) -> float:
    return 1.6e-2 if dtype == torch.bfloat16 else 2e-3


def run_case(dev, in_f, out_f, bits, group_size, layout, m, dtype, scale_dtype=torch.float16, bias=True, seed=0,
             x_shape=None, pad_in=0, bias_dtype=None):
    qweight, qzeros, scales = make_layer(in_f, out_f, bits, group_size, layout, scale_dtype, seed, pad_in)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(x_shape or (m, in_f)), generator=g).to(dtype)
    b = (torch.randn(out_f, generator=g) * 0.1).to(bias_dtype or dtype) if bias else None
    ref = linear_reference(x, qweight, qzeros, scales, b, bits, group_size, layout)
    d = [t.to(dev) if t is not None else None for t in (x, qweight, qzeros, scales, b)]
    y = _op(*d, bits, group_size, layout)
    assert y.dtype == dtype and y.shape == ref.shape and y.device.type == "cuda"
    tol = _tolerance(dtype)
    torch.testing.assert_close(y.float().cpu(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    return y


# ---- the test's packers are fastround's ----


@pytest.mark.parametrize("layout,bits", [("gptq", 2), ("gptq", 4), ("gptq", 8), ("gptq_v2", 4), ("gptq_v2", 8),
                                         ("awq", 4)])
@pytest.mark.parametrize("group_size", [32, -1])
def test_packers_match_fastround(layout, bits, group_size):
    out_f, in_f = 64, 256
    g = torch.Generator().manual_seed(3)
    groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g).to(torch.uint8)  # [out, in]
    lo = 1 if layout == "gptq" else 0
    zeros = torch.randint(lo, (1 << bits), (out_f, groups), generator=g).to(torch.int32)  # [out, groups]
    scales = (torch.rand(out_f, groups, generator=g) * 0.01 + 0.001).to(torch.float16)
    encoding = "int_awq" if layout == "awq" else "int_gptq"
    zero_offset = 1 if layout == "gptq" else 0
    theirs = dict(ops.pack_codes(codes, scales, zeros, encoding, bits, group_size, False, zero_offset, True))
    mine = pack(codes.t().to(torch.int64), zeros.t().to(torch.int64), scales.t().contiguous(), bits, layout)
    for name, t in zip(("qweight", "qzeros", "scales"), mine, strict=True):
        assert torch.equal(theirs[name], t), name
    # and the reference dequantizes them to scale * (code - zero)
    w = dequantize_reference(*mine, bits, group_size, layout)
    group = in_f if group_size == -1 else group_size
    expect = (codes.float() - zeros.float().repeat_interleave(group, 1)) * scales.float().repeat_interleave(group, 1)
    assert torch.equal(w, expect.t())


# ---- the op against the reference ----

_LAYOUT_BITS = [("gptq", 2), ("gptq", 4), ("gptq", 8), ("gptq_v2", 2), ("gptq_v2", 4), ("gptq_v2", 8), ("awq", 4)]


@pytest.mark.parametrize("layout,bits", _LAYOUT_BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("m", [1, 2, 8, 33, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(cuda, layout, bits, group_size, m, dtype):
    # 1024 x 384: 12 gptq tiles / 3 awq tiles, so the GEMV splits the inputs over clusters of up to 8 blocks.
    run_case(cuda, 1024, 384, bits, group_size, layout, m, dtype, seed=bits * 7 + m)


@pytest.mark.parametrize("layout,bits,m", [("gptq", 4, 1), ("gptq", 4, 5), ("gptq_v2", 8, 1), ("awq", 4, 1),
                                           ("awq", 4, 3)])
def test_llama_shapes(cuda, layout, bits, m):
    # Layer shapes of the speed target (cluster splits 2, 4 and 8 on an H200), batches rounding up to a template.
    for in_f, out_f in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        run_case(cuda, in_f, out_f, bits, 128, layout, m, torch.bfloat16, seed=in_f + out_f + m)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["gptq", "awq"])
@pytest.mark.parametrize("m", [1, 64])
def test_scale_dtypes(cuda, scale_dtype, layout, m):
    run_case(cuda, 512, 256, 4, 64, layout, m, torch.bfloat16, scale_dtype=scale_dtype)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 40])
def test_bias_dtypes(cuda, bias_dtype, m):
    run_case(cuda, 512, 256, 4, 128, "gptq", m, torch.bfloat16, bias_dtype=bias_dtype)


def test_no_bias_and_batch_dims(cuda):
    y = run_case(cuda, 512, 256, 4, 128, "gptq", 0, torch.bfloat16, bias=False, x_shape=(2, 3, 512))
    assert y.shape == (2, 3, 256)
    run_case(cuda, 512, 256, 4, 128, "awq", 0, torch.float16, bias=False, x_shape=(1, 1, 512))
    run_case(cuda, 512, 256, 8, 64, "gptq_v2", 0, torch.bfloat16, x_shape=(4, 17, 512))


@pytest.mark.parametrize(
    "in_f,out_f,bits,group_size,layout",
    [
        (512, 250, 8, 128, "gptq"),     # out not a multiple of 4: no 16-byte column loads
        (512, 124, 4, 128, "gptq_v2"),  # a half-used last qzeros word, a partial column tile
        (512, 256, 2, 8, "gptq"),       # group smaller than a word's 16 inputs
        (512, 256, 4, 4, "gptq_v2"),    # group of 4 at 4 bits
        (512, 96, 4, 128, "awq"),       # out a multiple of 32, one partial 128-column tile
        (512, 40, 4, 64, "awq"),        # out not a multiple of 32: the dequantize path
        (196, 64, 8, 28, "gptq"),       # in not a multiple of 8: activation rows not 16-byte aligned
        (196, 64, 4, 64, "gptq"),       # in not a multiple of a word's 8 inputs (padded lanes), partial last group
        (200, 64, 4, 64, "gptq_v2"),    # partial last group of 8 inputs, the GEMV path
        (200, 96, 4, 64, "awq"),        # partial last group, the GEMV path
        (256, 64, 2, 300, "gptq"),      # a group larger than in: one group
    ],
)
@pytest.mark.parametrize("m", [1, 4, 40])
def test_odd_shapes(cuda, in_f, out_f, bits, group_size, layout, m):
    run_case(cuda, in_f, out_f, bits, group_size, layout, m, torch.bfloat16)


@pytest.mark.parametrize("layout,bits", [("gptq", 4), ("gptq_v2", 2), ("gptq", 8)])
@pytest.mark.parametrize("m", [1, 40])
def test_padded_qweight_rows(cuda, layout, bits, m):
    """qweight with rows for inputs padded to whole groups (model-free packing): the padding is never read."""
    run_case(cuda, 200, 64, bits, 64, layout, m, torch.bfloat16, pad_in=56)


def test_unaligned_activations(cuda):
    """x whose data pointer is not 16-byte aligned takes the dequantize path and still matches."""
    qweight, qzeros, scales = make_layer(512, 256, 4, 128, "gptq")
    buf = torch.randn(513, dtype=torch.bfloat16)
    x = buf[1:]  # contiguous, 2 bytes past the allocation
    ref = linear_reference(x[None], qweight, qzeros, scales, None, 4, 128, "gptq")
    dx = buf.to(cuda)[1:]
    assert dx.data_ptr() % 16 != 0
    y = _op(dx[None], qweight.to(cuda), qzeros.to(cuda), scales.to(cuda), None, 4, 128, "gptq")
    torch.testing.assert_close(y.float().cpu(), ref, rtol=1.6e-2, atol=1.6e-2 * float(ref.abs().max()))


def assert_deterministic_and_replays(qweight, qzeros, scales, layout: str, x: torch.Tensor) -> None:
    """Same bits on every call, and the op captured in a CUDA graph replays on new input with the eager bits."""
    call = lambda inp: _op(inp, qweight, qzeros, scales, None, 4, 128, layout)  # noqa: E731
    first = call(x)
    for _ in range(3):
        assert torch.equal(first, call(x))
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(static_x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = call(static_x)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, call(x2))


def test_deterministic_and_graph_capture(cuda):
    """Same bits on every call (no atomics), and the op replays inside a CUDA graph."""
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(4096, 4096, 4, 128, "gptq"))
    assert_deterministic_and_replays(qweight, qzeros, scales, "gptq",
                                     torch.randn(1, 4096, device=cuda, dtype=torch.bfloat16))


def test_bad_arguments(cuda):
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(256, 64, 4, 128, "gptq"))
    x = torch.randn(1, 256, device=cuda, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layout"):
        _op(x, qweight, qzeros, scales, None, 4, 128, "marlin")
    with pytest.raises(ValueError, match="qzeros"):
        _op(x, qweight, qzeros[:, :-1], scales, None, 4, 128, "gptq")
    with pytest.raises(ValueError, match="group_size"):
        _op(x, qweight, qzeros, scales, None, 4, 0, "gptq")
    with pytest.raises(ValueError, match="qzeros"):  # 100 makes 3 groups of 256 inputs
        _op(x, qweight, qzeros, scales, None, 4, 100, "gptq")
    with pytest.raises(ValueError, match="awq"):
        _op(x, qweight, qzeros, scales, None, 8, 128, "awq")
    with pytest.raises(ValueError, match="qweight"):
        _op(x, qweight.cpu(), qzeros, scales, None, 4, 128, "gptq")
    with pytest.raises(ValueError, match="bias"):
        _op(x, qweight, qzeros, scales, torch.zeros(63, device=cuda), 4, 128, "gptq")


# ---- the batch-1 GEMV's benchmark variants (FASTROUND_WOQ_CUDA_VARIANT, benchmarks/woq_cuda_bench.py --sweep) ----

_VARIANTS = [f"{u},{s}" for u in (2, 4, 8, 16) for s in (0, 1, 2, 4, 8)]


@pytest.mark.parametrize("variant", _VARIANTS)
def test_gemv_variants(cuda, variant, monkeypatch):
    """Every variant the sweep may pick as the default matches the reference, at every layout and bits, whole and
    partial groups, partial tiles and the largest split a Llama shape takes."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    for layout, bits in _LAYOUT_BITS:
        for group_size in (32, -1):
            run_case(cuda, 1024, 384, bits, group_size, layout, 1, torch.bfloat16, seed=bits + group_size)
    run_case(cuda, 512, 124, 4, 128, "gptq_v2", 1, torch.float16)  # a partial column tile
    run_case(cuda, 200, 96, 4, 64, "awq", 1, torch.bfloat16)       # partial last group
    run_case(cuda, 200, 64, 4, 64, "gptq", 1, torch.bfloat16, pad_in=56)
    run_case(cuda, 14336, 1024, 4, 128, "gptq", 1, torch.bfloat16)  # many rows per thread, a deep split


def test_gemv_variant_rejected(cuda, monkeypatch):
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(256, 64, 4, 128, "gptq"))
    x = torch.randn(1, 256, dtype=torch.bfloat16, device=cuda)
    for bad, what in (("3,0", "unroll"), ("8,9", "split"), ("8;2", "FASTROUND_WOQ_CUDA_VARIANT")):
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", bad)
        with pytest.raises(ValueError, match=what):
            _op(x, qweight, qzeros, scales, None, 4, 128, "gptq")


# ---- the staged GEMV (woq_cuda.cu gemv_gptq_staged_kernel) and the rows kernel it replaced as the default ----


def _staged_variants(bits: int) -> list[str]:
    """Every staged setting instantiated for `bits` (woq_cuda.cu staged_kernel; woq_cuda_bench.py staged_variants):
    U rows per chunk, split S, T lanes per row worker, prefetch off (1) or on (2), each forced."""
    us, txs = ((4, 8, 16), (32, 16, 8)) if bits == 4 else ((4, 8), (32, 16))
    plain = [f"staged:{u},{s},{t},1" for u in us for t in txs for s in (1, 2, 4, 8)]
    prefetch = [f"staged:{u},{s},{t},2" for u in (4, 8) for t in (32, 16) for s in (1, 2, 4, 8)] if bits == 4 else []
    return plain + prefetch


@pytest.mark.parametrize("variant",
                         _staged_variants(4) + ["staged", "staged:0,8,0", "staged:16,0,0", "staged:0,0,0,2"])
def test_staged_variants_4bit(cuda, variant, monkeypatch):
    """Every staged setting the sweep may pick matches the reference: sym and asym zeros, groups of 32 (chunks of
    16 rows cannot sit in one: the rows kernel takes it), 128 and whole rows, partial column tiles, fp16 and bf16,
    a partial last group, and a k/v-shaped layer with the deepest split."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    for layout in ("gptq", "gptq_v2"):
        for group_size in (32, 128, -1):
            run_case(cuda, 1024, 384, 4, group_size, layout, 1, torch.bfloat16, seed=group_size + len(layout))
    run_case(cuda, 1024, 124, 4, 128, "gptq_v2", 1, torch.float16)  # a partial column tile, fp16
    run_case(cuda, 1088, 64, 4, 64, "gptq", 1, torch.bfloat16)      # 17 groups: chunks unevenly over the split
    run_case(cuda, 200, 64, 4, 64, "gptq", 1, torch.bfloat16, pad_in=56)  # partial last group: rows kernel
    run_case(cuda, 4096, 1024, 4, 128, "gptq", 1, torch.bfloat16, bias=False)


@pytest.mark.parametrize("variant", _staged_variants(8) + ["staged"])
def test_staged_variants_8bit(cuda, variant, monkeypatch):
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    for layout in ("gptq", "gptq_v2"):
        for group_size in (32, 128, -1):
            run_case(cuda, 1024, 384, 8, group_size, layout, 1, torch.bfloat16, seed=group_size + 8)
    run_case(cuda, 1024, 124, 8, 128, "gptq_v2", 1, torch.float16)


@pytest.mark.parametrize("variant", ["rows", "rows:4,2", "staged"])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_kernel_choice_all_batches(cuda, variant, m, monkeypatch):
    """The rows kernel stays right now that the staged one is the default for GPTQ 4 bits, and the staged one is
    right at every batch template (MT 1, 2, 4, 8 with rows past m unused)."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    for layout in ("gptq", "gptq_v2"):
        run_case(cuda, 1024, 384, 4, 128, layout, m, torch.bfloat16, seed=m)
        run_case(cuda, 1024, 384, 8, -1, layout, m, torch.float16, seed=m + 1)
    run_case(cuda, 14336, 512, 4, 128, "gptq", m, torch.bfloat16, seed=m + 2)  # a large activation slice


@pytest.mark.parametrize("variant", ["staged", "staged:8,8,32,1", "staged:16,4,16,1", "staged:4,2,8,1",
                                     "staged:8,4,32,2"])
def test_staged_deterministic(cuda, variant, monkeypatch):
    """Cluster split-K without atomics: the same bits on every call."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(4096, 4096, 4, 128, "gptq_v2"))
    x = torch.randn(1, 4096, device=cuda, dtype=torch.bfloat16)
    first = _op(x, qweight, qzeros, scales, None, 4, 128, "gptq_v2")
    for _ in range(3):
        assert torch.equal(first, _op(x, qweight, qzeros, scales, None, 4, 128, "gptq_v2"))


def test_staged_variant_rejected(cuda, monkeypatch):
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(256, 64, 4, 128, "gptq"))
    x = torch.randn(1, 256, dtype=torch.bfloat16, device=cuda)
    for bad, what in (("staged:2,0,0", "unroll"), ("staged:8,3,0", "split"), ("staged:8,2,64", "tx"),
                      ("rows:8,2,32", "FASTROUND_WOQ_CUDA_VARIANT"), ("staged8", "FASTROUND_WOQ_CUDA_VARIANT"),
                      ("staged:8,2,32,3", "prefetch"), ("8,2,0,2", "FASTROUND_WOQ_CUDA_VARIANT"),
                      ("staged:8,2,32,1,0", "FASTROUND_WOQ_CUDA_VARIANT")):
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", bad)
        with pytest.raises(ValueError, match=what):
            _op(x, qweight, qzeros, scales, None, 4, 128, "gptq")


# ---- the staged kernel's half2 variant (FASTROUND_WOQ_CUDA_VARIANT=half2, woq_cuda.cu word_dot_half2) ----

_HALF2_SETTINGS = ["half2", "half2:16,1,8", "half2:8,1,16", "half2:4,8,8", "half2:8,2,8", "half2:4,2,8",
                   "half2:8,2,32", "half2:4,4,16"]


@pytest.mark.parametrize("variant", _HALF2_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half2_variant(cuda, variant, dtype, monkeypatch):
    """Every instantiated half2 setting within the output dtype's tolerance of the fp32 reference: sym and asym
    zeros (all 16 codes, the extreme zero points), groups a chunk may not fit (the rows kernel then takes it),
    partial column tiles, uneven chunks over the split, and the Llama k/v shape."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    for layout in ("gptq", "gptq_v2"):
        for group_size in (32, 128, -1):
            run_case(cuda, 1024, 384, 4, group_size, layout, 1, dtype, seed=group_size + len(layout))
    run_case(cuda, 1024, 124, 4, 128, "gptq_v2", 1, dtype)
    run_case(cuda, 1088, 64, 4, 64, "gptq", 1, dtype)
    run_case(cuda, 4096, 1024, 4, 128, "gptq", 1, dtype, bias=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half2_large_activations(cuda, dtype, monkeypatch):
    """Large fp16 activations: the products are taken as (q - z)/16 * x, so they overflow no sooner than x; a lane's
    sum of 4 products (inputs j, j+1, j+2, j+3 of a word's half) stays finite while their |x| add up to < 65504."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "half2")
    qweight, qzeros, scales = make_layer(1024, 256, 4, 128, "gptq", torch.float16, 3)
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(1, 1024, generator=g) * 2 - 1) * 4000.0
    x[0, :8] = torch.tensor([16000.0, -16000.0, 8000.0, -8000.0, 0.0, 1e-6, -1e-6, 60000.0])
    x = x.to(dtype)
    ref = linear_reference(x, qweight, qzeros, scales, None, 4, 128, "gptq")
    y = _op(x.to(cuda), qweight.to(cuda), qzeros.to(cuda), scales.to(cuda), None, 4, 128, "gptq")
    assert torch.isfinite(y.float()).all()
    tol = _tolerance(dtype)
    torch.testing.assert_close(y.float().cpu(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("m", [2, 8])
def test_half2_elsewhere_takes_the_default(cuda, m, monkeypatch):
    """Beyond batch 1 and at 8 bits the half2 variant leaves the call to the built-in choice: same bits."""
    for bits, mm in ((4, m), (8, 1)):
        qweight, qzeros, scales = (t.to(cuda) for t in make_layer(1024, 384, bits, 128, "gptq_v2"))
        x = torch.randn(mm, 1024, device=cuda, dtype=torch.bfloat16)
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "")
        want = _op(x, qweight, qzeros, scales, None, bits, 128, "gptq_v2")
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "half2")
        assert torch.equal(_op(x, qweight, qzeros, scales, None, bits, 128, "gptq_v2"), want)


def test_half2_deterministic_and_rejected(cuda, monkeypatch):
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(4096, 4096, 4, 128, "gptq"))
    x = torch.randn(1, 4096, device=cuda, dtype=torch.float16)
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "half2")
    first = _op(x, qweight, qzeros, scales, None, 4, 128, "gptq")
    for _ in range(3):
        assert torch.equal(first, _op(x, qweight, qzeros, scales, None, 4, 128, "gptq"))
    for bad, what in (("half2:8,2,32,1", "FASTROUND_WOQ_CUDA_VARIANT"), ("half2:3,0,0", "unroll"),
                      ("half2x", "FASTROUND_WOQ_CUDA_VARIANT")):
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", bad)
        with pytest.raises(ValueError, match=what):
            _op(x, qweight, qzeros, scales, None, 4, 128, "gptq")


# ---- the tensor-core GEMV (FASTROUND_WOQ_CUDA_VARIANT=mma, woq_cuda.cu gemv_gptq_mma_kernel) ----
# It takes gptq / gptq_v2 at 4 bits, batches 1..8, in and group multiples of 32; elsewhere the built-in choice runs
# (same bits as without the variable). Its products are exact and its sums fp32, so it stays within the output
# dtype's rounding of the fp32 reference.

_MMA_SETTINGS = ["mma", "mma:4,1", "mma:8,1", "mma:4,2", "mma:8,4", "mma:4,8"]


def _runs_mma(dev, in_f, out_f, group_size, layout, m, dtype=torch.bfloat16) -> bool:
    qweight, qzeros, scales = (t.to(dev) for t in make_layer(in_f, out_f, 4, group_size, layout))
    x = torch.randn(m, in_f, device=dev, dtype=dtype)
    names = kernels(lambda: _op(x, qweight, qzeros, scales, None, 4, group_size, layout))
    return any("gemv_gptq_mma_kernel" in n for n in names)


@pytest.mark.parametrize("variant", _MMA_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_variant(cuda, variant, dtype, monkeypatch):
    """Every setting within the output dtype's tolerance of the fp32 reference: sym (gptq) and asym (gptq_v2) zeros
    with all 16 codes and the extreme zero points, groups of 32 / 64 / 128 / whole rows, a partial column tile, a
    group straddling chunks and blocks (96), runs that split unevenly over warps and clusters; every batch 1..8 for
    the planner's choice, 1, 3 and 8 for the forced settings (one kernel serves every batch)."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    for m in range(1, 9) if variant == "mma" else (1, 3, 8):
        for layout in ("gptq", "gptq_v2"):
            for group_size in (32, 64, 128, -1):
                run_case(cuda, 1024, 384, 4, group_size, layout, m, dtype, seed=group_size + len(layout) + m)
        run_case(cuda, 1024, 124, 4, 128, "gptq_v2", m, dtype)           # a partial column tile
        run_case(cuda, 1056, 64, 4, 96, "gptq", m, dtype, bias=False)     # 33 steps, groups of 3 steps
        run_case(cuda, 2080, 36, 4, -1, "gptq_v2", m, dtype, scale_dtype=torch.bfloat16)  # per channel, odd steps
        run_case(cuda, 128, 32, 4, 32, "gptq", m, dtype, bias_dtype=torch.float32)  # fewer steps than warps
        run_case(cuda, 1088, 64, 4, 128, "gptq_v2", m, dtype)            # a partial last group
    # Tolerance alone would pass a silent fallback to the built-in GEMV: the odd cases ran the mma kernel.
    for in_f, out_f, group_size, layout in ((1024, 124, 128, "gptq_v2"), (1056, 64, 96, "gptq"),
                                            (2080, 36, -1, "gptq_v2"), (128, 32, 32, "gptq"),
                                            (1088, 64, 128, "gptq_v2")):
        assert _runs_mma(cuda, in_f, out_f, group_size, layout, 3, dtype), (variant, in_f, out_f, group_size)


@pytest.mark.parametrize("in_f,out_f", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_llama_shapes(cuda, in_f, out_f, dtype, monkeypatch):
    """The Llama-3-8B layer shapes at batches 1, 4 and 8, as the built-in plan chooses them, both layouts."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "mma")
    for m, layout in ((1, "gptq"), (4, "gptq_v2"), (8, "gptq")):
        run_case(cuda, in_f, out_f, 4, 128, layout, m, dtype, seed=m)
    assert _runs_mma(cuda, in_f, out_f, 128, "gptq", 1, dtype)


def test_mma_takes_what_it_says(cuda, monkeypatch):
    """The variant runs the mma kernel where it applies (woq_cuda.h WoqGemvKernel::Mma), and the built-in choice,
    same bits as without the variable, elsewhere: 2 and 8 bits, awq, groups of 16 or 48 inputs, in not a
    multiple of 32."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "mma")
    for m in (1, 8):
        assert _runs_mma(cuda, 1024, 256, 128, "gptq", m)
        assert _runs_mma(cuda, 1024, 256, -1, "gptq_v2", m)
    assert _runs_mma(cuda, 1024, 256, 32, "gptq", 3)
    for in_f, out_f, bits, group_size, layout, m in ((1024, 256, 8, 128, "gptq", 1), (1024, 256, 2, 128, "gptq", 2),
                                                     (1024, 256, 4, 128, "awq", 1), (1024, 256, 4, 16, "gptq", 1),
                                                     (960, 256, 4, 48, "gptq_v2", 4), (1040, 256, 4, -1, "gptq", 1)):
        qweight, qzeros, scales = (t.to(cuda) for t in make_layer(in_f, out_f, bits, group_size, layout))
        x = torch.randn(m, in_f, device=cuda, dtype=torch.bfloat16)
        call = lambda: _op(x, qweight, qzeros, scales, None, bits, group_size, layout)
        names = kernels(call)
        assert not any("gemv_gptq_mma_kernel" in n for n in names), (in_f, bits, group_size, layout, names)
        got = call()
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "")
        want = call()
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "mma")
        assert torch.equal(got, want), (in_f, bits, group_size, layout)
    # Batches beyond the GEMV take the dequantize path whatever the variant.
    run_case(cuda, 1024, 256, 4, 128, "gptq", 33, torch.bfloat16)


def test_mma_large_activations(cuda, monkeypatch):
    """fp16 x near its range: the products and sums are fp32, so nothing overflows before the one rounding."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "mma")
    qweight, qzeros, scales = make_layer(1024, 256, 4, 128, "gptq", torch.float16, 3)
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 1024, generator=g) * 2 - 1) * 4000.0
    x[0, :8] = torch.tensor([16000.0, -16000.0, 8000.0, -8000.0, 0.0, 1e-6, -1e-6, 60000.0])
    x = x.half()
    ref = linear_reference(x, qweight, qzeros, scales, None, 4, 128, "gptq")
    y = _op(x.to(cuda), qweight.to(cuda), qzeros.to(cuda), scales.to(cuda), None, 4, 128, "gptq")
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float().cpu(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", ["mma", "mma:4,8", "mma:8,2"])
def test_mma_deterministic_and_graph_capture(cuda, variant, monkeypatch):
    """Same bits on every call (fixed-order sums, no atomics) and inside a CUDA graph, at batches 1 and 5."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", variant)
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(4096, 4096, 4, 128, "gptq_v2"))
    for m in (1, 5):
        assert_deterministic_and_replays(qweight, qzeros, scales, "gptq_v2",
                                         torch.randn(m, 4096, device=cuda, dtype=torch.bfloat16))


def test_mma_rotated_runs_two_ops(cuda, monkeypatch):
    """The mma variant never fuses the rotation: woq_linear_rotated is hadamard_transform then the mma GEMV."""
    monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", "mma")
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(4096, 1024, 4, 128, "gptq"))
    x = torch.randn(1, 4096, device=cuda, dtype=torch.bfloat16)
    ops_ = torch.ops.fastround
    call = lambda: ops_.woq_linear_rotated(x, qweight, qzeros, scales, None, 4, 128, "gptq", 64, None, None, False,
                                           False)
    names = kernels(call)
    assert any("gemv_gptq_mma_kernel" in n for n in names), names
    assert not any("staged" in n for n in names), names
    want = _op(ops_.hadamard_transform(x, 64, None, None, False, False, True), qweight, qzeros, scales, None, 4, 128,
               "gptq")
    assert torch.equal(call(), want)


def test_mma_rejected(cuda, monkeypatch):
    qweight, qzeros, scales = (t.to(cuda) for t in make_layer(1024, 256, 4, 128, "gptq"))
    x = torch.randn(1, 1024, device=cuda, dtype=torch.bfloat16)
    for bad, what in (("mma:8,2,32", "FASTROUND_WOQ_CUDA_VARIANT"), ("mma:16,0", "unroll"), ("mma:4,3", "split"),
                      ("mmax", "FASTROUND_WOQ_CUDA_VARIANT")):
        monkeypatch.setenv("FASTROUND_WOQ_CUDA_VARIANT", bad)
        with pytest.raises(ValueError, match=what):
            _op(x, qweight, qzeros, scales, None, 4, 128, "gptq")
