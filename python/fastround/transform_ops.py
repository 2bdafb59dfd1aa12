"""Hadamard transforms (transforms-and-formats.md §1): the C++ fast Walsh-Hadamard kernel registered by
fastround._torch as torch.ops.fastround.hadamard_transform, its fake kernel, the K matrices and their selection
rules, upstream's random sign vector, and the dense matrices an export stores.

Operator conventions, for a block v of n = K·2^m elements of the last dimension (a row vector x: the op returns the
row vector of the product below):
    T_n = (H_K ⊗ H_{2^m}) / sqrt(n)            transpose=True gives T_n^T
    hadamard_transform(x, n)                 -> T_n · v      (upstream's matmul_hadU applied to x: x · T_n^T)
    signs d, signs_first=False               -> diag(d) · T_n · v
Sylvester H_{2^m} is symmetric, so only a non-Sylvester H_K makes transpose matter."""

from __future__ import annotations

import json
import math
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fastround import _torch  # noqa: F401  (registers the op)

_ops = torch.ops.fastround

# Sloane's library as upstream ships it (auto_round/algorithms/transforms/hadamard/utils/hadamards.safetensors,
# Apache-2.0; the same data compressed-tensors ships), byte for byte: int8 ±1 [k, k] for k in {1, 2, 4, 8} and every
# multiple of 4 from 12 to 256. The Paley, Williamson, ... matrices in it cannot be regenerated bit-exactly.
HADAMARDS_FILE = Path(__file__).parent / "data" / "hadamards.safetensors"

# SpinQuant's known_hadamard sizes, in the order its get_hadamard_K searches them (first match wins, §1.3 b).
SPINQUANT_K_ORDER = (172, 156, 140, 108, 60, 52, 40, 36, 28, 20, 12)

# Seed of a fresh, unseeded torch.Generator(): the per-linear transform backend draws its random signs from one
# (§1.4), so "random" Hadamard is the same matrix for every layer and every run.
TORCH_DEFAULT_GENERATOR_SEED = 67280421310721


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@lru_cache(maxsize=1)
def _library() -> dict[int, np.ndarray]:
    """{k: int8 [k, k]} read straight from the safetensors layout (8-byte header length, JSON header, data)."""
    raw = HADAMARDS_FILE.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    data = memoryview(raw)[8 + hlen:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] != "I8":
            raise ValueError(f"{HADAMARDS_FILE}: {key} is {info['dtype']}, expected I8")
        begin, end = info["data_offsets"]
        out[int(key)] = np.frombuffer(data[begin:end], dtype=np.int8).reshape(info["shape"]).copy()
    return out


def library_sizes() -> tuple[int, ...]:
    return tuple(sorted(_library()))


def library_matrix(k: int) -> torch.Tensor:
    """The file's int8 ±1 matrix of order k."""
    lib = _library()
    if k not in lib:
        raise ValueError(f"[fastround.hadamard] no Hadamard matrix of order {k} in {HADAMARDS_FILE.name}")
    return torch.from_numpy(lib[k].copy())


def file_divisor(n: int) -> int:
    """Upstream's _fetch_hadamard_divisor: the largest file order k with n % k == 0 and n / k a power of two."""
    for k in sorted(_library(), reverse=True):
        if n % k == 0 and is_pow2(n // k):
            return k
    raise ValueError(f"[fastround.hadamard] block_size: no Hadamard decomposition of {n} as K * 2^m with a known K")


def sylvester(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalised Sylvester H_n, H[i][j] = (-1)^popcount(i & j); n a power of two."""
    if not is_pow2(n):
        raise ValueError(f"[fastround.hadamard] block_size: the Sylvester construction needs a power of two, got {n}")
    idx = torch.arange(n)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def hadamard_transform(
    x: torch.Tensor,
    block_size: int,
    hadamard_k: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    transpose: bool = False,
    signs_first: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """x [..., cols] (fp32/fp64/fp16/bf16, CPU, or CUDA when built with it) -> a new tensor with each block_size-long block of the last
    dimension (-1: the whole of it) replaced by diag(d)·T·v (module docstring); hadamard_k: ±1 [K, K] with
    block_size = K·2^m; signs: ±1 [block_size]. Half types compute in fp32 and round once (RNE)."""
    if not x.requires_grad and not torch.compiler.is_compiling():
        # No gradient to record (the online hooks at inference): skip the Python autograd kernel, a few us of the
        # ~10-30 us a hook costs a decode step on the host
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.hadamard_transform(x, block_size, hadamard_k, signs, transpose, signs_first, normalize)
    return _ops.hadamard_transform(x, block_size, hadamard_k, signs, transpose, signs_first, normalize)


@lru_cache(maxsize=1)
def has_cuda_kernel() -> bool:
    """Whether this build registered the CUDA hadamard_transform (FASTROUND_WITH_CUDA); fixed once _torch loaded."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastround::hadamard_transform", "CUDA")


def _kernel_device(device: torch.device) -> bool:
    """Whether hadamard_transform has a kernel for tensors on `device` (CPU; CUDA when built with it)."""
    return device.type == "cpu" or (device.type == "cuda" and has_cuda_kernel())


def dense_block_map(n: int, hadamard_k: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                    transpose: bool = False, signs_first: bool = False) -> torch.Tensor:
    """The block map as a matrix acting on rows, [n, n] fp64 (x_block @ it = the op on x_block): the op applied to
    the identity on the CPU."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64), n,
                              None if hadamard_k is None else hadamard_k.cpu(),
                              None if signs is None else signs.cpu(), transpose, signs_first)


def _dense_apply(x: torch.Tensor, rows_of_t: torch.Tensor) -> torch.Tensor:
    """x [..., cols] through rows_of_t [n, n] fp32 (on x's device) on each n-long block, in fp32, rounded once to
    x's dtype: the fallback where the op has no kernel."""
    n, shape = rows_of_t.shape[0], x.shape
    return (x.reshape(-1, shape[-1] // n, n).float() @ rows_of_t).reshape(shape).to(x.dtype)


def hadamard_any_device(x: torch.Tensor, block_size: int, hadamard_k: torch.Tensor | None = None,
                        signs: torch.Tensor | None = None, transpose: bool = False,
                        signs_first: bool = False) -> torch.Tensor:
    """hadamard_transform on a CPU tensor, and on a CUDA tensor when the build has the CUDA kernel (the same result
    bit for bit; hadamard_k and signs are best passed already on x's device, a CPU copy is checked and copied every
    call); elsewhere the same block map as a dense fp32 matmul on x's device, rounded once to x's dtype (built per
    call: BlockRotation keeps it per device)."""
    if _kernel_device(x.device):
        return hadamard_transform(x, block_size, hadamard_k, signs, transpose, signs_first)
    n = x.shape[-1] if block_size == -1 else block_size
    rows_of_t = dense_block_map(n, hadamard_k, signs, transpose, signs_first)
    return _dense_apply(x, rows_of_t.to(torch.float32).to(x.device))


_FUSABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class BlockRotation:
    """An online activation rotation x <- hadamard_transform(x, block_size, hadamard_k, signs, transpose, signs_first)
    on each block of the last dimension, in x's dtype (half types computed in fp32, rounded once); fp32=True computes
    other dtypes (fp64) in fp32 and casts back, as upstream's R4 hook. The ±1 operands are copied to a device once.
    Called as a function it is the online hook's map; a QuantLinear holding it (quant_linear.attach_rotation) passes
    the same operands to woq_linear_rotated instead, one op call for the rotation and the linear, the same bits."""

    def __init__(self, block_size: int, hadamard_k: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                 transpose: bool = False, signs_first: bool = False, fp32: bool = False) -> None:
        self.block_size, self.transpose, self.signs_first, self.fp32 = int(block_size), transpose, signs_first, fp32
        self.hadamard_k, self.signs = hadamard_k, signs  # [K, K] / [block_size] ±1, CPU, or None
        self._on: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        # [n, n] fp32 block matrices on devices without the op's kernel, built once per (device, n)
        self._dense: dict[tuple[torch.device, int], torch.Tensor] = {}

    def operands(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hadamard_k, signs) for a tensor on `device`: the CPU tensors as given; elsewhere int8 copies made once,
        so the op neither copies nor waits per call (and can be captured in a CUDA graph)."""
        if device.type == "cpu":
            return self.hadamard_k, self.signs
        ops = self._on.get(device)
        if ops is None:
            ops = self._on[device] = tuple(None if t is None else t.to(torch.int8).to(device)
                                           for t in (self.hadamard_k, self.signs))
        return ops

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether hadamard_transform's own kernel computes this map for x (the fused op then gives its bits)."""
        return x.dtype in _FUSABLE_DTYPES and _kernel_device(x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # One op call, no casts around it for half types: the kernel computes them in fp32 and rounds once, the bits
        # of upstream's fp32 hook (x.float() -> transform -> cast back)
        y = x.float() if self.fp32 and x.dtype not in _FUSABLE_DTYPES else x
        if _kernel_device(x.device):
            hk, sg = self.operands(x.device)
            return hadamard_transform(y.contiguous(), self.block_size, hk, sg, self.transpose,
                                      self.signs_first).to(x.dtype)
        n = x.shape[-1] if self.block_size == -1 else self.block_size
        rows_of_t = self._dense.get((x.device, n))
        if rows_of_t is None:
            rows_of_t = self._dense[(x.device, n)] = dense_block_map(
                n, self.hadamard_k, self.signs, self.transpose, self.signs_first).to(torch.float32).to(x.device)
        return _dense_apply(y, rows_of_t).to(x.dtype)


class SharedInputRotation:
    """One online rotation of an input several layers read (QuaRot's R1 before q/k/v and before gate/up): the first
    of them rotates it, the other `consumers - 1` take that result, so a decode step runs 2 transforms a layer, not 5.
    The input is matched by identity (and version), so a layer fed another tensor computes its own; the cache holds
    the input and its rotation only until the last consumer took it. Same bits as each layer rotating its input."""

    def __init__(self, rotation: BlockRotation, consumers: int) -> None:
        self.rotation, self.consumers = rotation, int(consumers)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._version: int | None = None
        self._left = 0

    def fusable(self, x: torch.Tensor) -> bool:
        """Never fused into the linear's op: the shared result is the saving."""
        return False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return self.rotation(x)  # autograd: no cache across layers
        version = None if torch.is_inference(x) else x._version  # inference tensors have no version counter
        if self._left > 0 and x is self._x and version == self._version:
            y = self._y
            self._left -= 1
            if self._left == 0:
                self._x = self._y = None
            return y
        y = self.rotation(x)
        if self.consumers > 1:
            self._x, self._y, self._version, self._left = x, y, version, self.consumers - 1
        return y


@torch.library.register_fake("fastround::hadamard_transform")
def _hadamard_transform_fake(x, block_size, hadamard_k=None, signs=None, transpose=False, signs_first=False,
                             normalize=True):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_hadamard_transform(ctx, inputs, output):
    _, block_size, hadamard_k, signs, transpose, signs_first, normalize = inputs
    ctx.args = (block_size, hadamard_k, signs, transpose, signs_first, normalize)


def _hadamard_transform_backward(ctx, grad):
    """The map is linear, v -> S_a·T·S_b·v per block, so the input gradient is its adjoint S_b·T^T·S_a·g: the same
    op with transpose and the sign side flipped (a hook on an activation that SignRound differentiates through)."""
    block_size, hadamard_k, signs, transpose, signs_first, normalize = ctx.args
    gx = _ops.hadamard_transform(grad.contiguous(), block_size, hadamard_k, signs, not transpose, not signs_first,
                                 normalize)
    return gx, None, None, None, None, None, None


torch.library.register_autograd("fastround::hadamard_transform", _hadamard_transform_backward,
                                setup_context=_setup_hadamard_transform)


def hadamard_mxfp4_act(x: torch.Tensor, block_size: int, hadamard_k: torch.Tensor | None = None,
                       signs: torch.Tensor | None = None, transpose: bool = False,
                       signs_first: bool = False) -> torch.Tensor:
    """Upstream's fused load-time activation step for rotated MXFP checkpoints: x [..., cols] (fp32/fp16/bf16, CPU,
    or CUDA when built with it; cols a multiple of 32 and of block_size) -> each block rotated as hadamard_transform
    (same operands) with 1/sqrt(block_size) rounded to x's dtype, then each 32-group quantize-dequantized to MXFP4
    with FP-Quant's scale 2^(floor(log2 amax) - 2) / 0.75 (not E8M0) and strict E2M1 thresholds; computed in fp32,
    rounded once, left in the rotated space (cpp/fastround/transform/hadamard_mxfp4_act.h)."""
    return _ops.hadamard_mxfp4_act(x, block_size, hadamard_k, signs, transpose, signs_first)


def mxfp4_act_qdq_torch(xh: torch.Tensor) -> torch.Tensor:
    """The qdq half of hadamard_mxfp4_act as torch ops, upstream's Triton formulas line for line (exp2 / floor / log2
    scale, nested strict thresholds, sign from > 0), on rotated values [..., K] (K % 32 == 0) -> fp32: the unfused
    reference the tests and benchmarks/hadamard.py compare the kernel with."""
    g = xh.float().reshape(-1, 32)
    shared_exps = torch.exp2(torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) - 2) / 0.75
    s = g / shared_exps
    a = s.abs()
    q = torch.where(a > 5, 6.0, torch.where(a > 3.5, 4.0, torch.where(a > 2.5, 3.0, torch.where(
        a > 1.75, 2.0, torch.where(a > 1.25, 1.5, torch.where(a > 0.75, 1.0, torch.where(a > 0.25, 0.5, 0.0)))))))
    return (torch.where(s > 0, q, -q) * shared_exps).reshape(xh.shape)


@lru_cache(maxsize=1)
def has_cuda_mxfp4_act_kernel() -> bool:
    """Whether this build registered the CUDA hadamard_mxfp4_act (FASTROUND_WITH_CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastround::hadamard_mxfp4_act", "CUDA")


@torch.library.register_fake("fastround::hadamard_mxfp4_act")
def _hadamard_mxfp4_act_fake(x, block_size, hadamard_k=None, signs=None, transpose=False, signs_first=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def random_signs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Upstream's sign vector d (int64 ±1 [n]): randint(0, 2) * 2 - 1 from `generator`, a fresh unseeded
    torch.Generator() when None, as the per-linear transform backend builds it."""
    gen = generator if generator is not None else torch.Generator()
    return torch.randint(0, 2, (n,), generator=gen) * 2 - 1


def random_hadamard_matrix(n: int, signs: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """M = diag(d) · T_n^T (normalised) with K from the file even for powers of two (§1.4): what upstream's
    random_hadamard_matrix(n) * 1/sqrt(n) builds and the per-linear export stores as `hadamard_matrix`."""
    d = random_signs(n) if signs is None else signs
    k = file_divisor(n)
    hk = library_matrix(k) if k > 1 else None
    eye = torch.eye(n, dtype=torch.float64)
    # Row i of the identity through T gives T e_i, the i-th column of T: the rows of T^T. Entries are ±1/sqrt(n)
    # exactly once rounded, as upstream's int64 matrix times the float scale.
    t_t = hadamard_transform(eye, n, hk, normalize=False)
    m = (t_t * d.to(torch.float64)[:, None]) * (1.0 / math.sqrt(n))
    return m.to(dtype)


def deterministic_hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ĥ_n = H_n / sqrt(n) (Sylvester, symmetric, its own inverse): the per-linear `hadamard` block matrix."""
    return (sylvester(n, torch.float64) * (1.0 / math.sqrt(n))).to(dtype)


def spinquant_divisor(n: int) -> int:
    """SpinQuant's get_hadamard_K rule (§1.3 b): 1 for a power of two, else the first K of SPINQUANT_K_ORDER with
    n % K == 0 and n / K a power of two, 0 if none."""
    if is_pow2(n):
        return 1
    for k in SPINQUANT_K_ORDER:
        if n % k == 0 and is_pow2(n // k):
            return k
    return 0


def spinquant_matrix(k: int) -> torch.Tensor:
    """SpinQuant's known K matrix (int8 ±1): the file's matrix of that order, which SpinQuant's table equals for
    every K it lists except 20. Its 20 differs, and this returns the file's: the two choices give different (both
    orthonormal) rotations only for n = 20 itself, since any larger 20·2^m matches 40 first."""
    if k not in SPINQUANT_K_ORDER:
        raise ValueError(f"[fastround.hadamard] {k} is not one of SpinQuant's K sizes {SPINQUANT_K_ORDER}")
    return library_matrix(k)
