"""QuaRot rotations (transforms-and-formats.md §2, upstream's SpinQuant path with fixed Hadamard matrices) for
Llama-layout models (llama, qwen2, qwen3): R1 on the residual stream (online per linear, or offline with RMSNorm
fusion and untying), R2 per attention head on the V/O pair, R4 on down_proj's input with its online hook. Every
weight rotation runs in fp64 through the FWHT kernel and is cast back; Python only walks the modules.

R3 rotates q and k per head right after RoPE (q·R3·(k·R3)ᵀ = q·kᵀ, so only a quantized KV cache would see it) by
standing in for apply_rotary_pos_emb in each attention instance's own forward (no class or module is patched).
Random matrices (random_r1 .. random_r4) are upstream's diag(d)·Tᵀ with d drawn from the global torch RNG in R1, R2,
R3, R4 order; their weight rotations are fp64 products with the fp32 matrix, as upstream's, and every online map
(hooks, R3) runs through the FWHT kernel with the signs.

AutoRound(..., rotation_config="quarot") applies it to the loaded model before quantization; the auto_round export
writes spinquant_config, the model-level matrices and the per-layer type/size (and, random, int8 sign matrix)
buffers as upstream. Not built: trainable matrices (SpinQuant proper).

Conventions (row vectors, y = x·Wᵀ): for a deterministic R the matrices are normalised Sylvester (symmetric) or
T = (H_K ⊗ H_2^m)/sqrt(n) with K from SpinQuant's first-match list for R4; the kernel's hadamard_transform(x, n, K)
returns x·Tᵀ."""

from __future__ import annotations

import functools
import logging
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastround import transform_ops as T
from fastround.quant_linear import attach_rotation

logger = logging.getLogger("fastround")


@dataclass
class QuaRotConfig:
    """The fields of upstream's SpinQuantConfig that fixed (QuaRot) rotations use, with its defaults."""

    r1: bool = True
    r2: bool = True
    r3: bool = False
    r4: bool = False
    rotation_size: int | None = None  # pow2; replaces hidden for R1 and intermediate for R4 (block rotation)
    online_r1_rotation: bool = True
    fuse_rmsnorm: bool = True  # offline R1 only
    untie_embeddings: bool = True  # offline R1 only
    random_r1: bool = False  # random Hadamard diag(d)·Tᵀ instead of the fixed one, per position
    random_r2: bool = False
    random_r3: bool = False
    random_r4: bool = False

    def __post_init__(self) -> None:
        if self.rotation_size is not None and not T.is_pow2(int(self.rotation_size)):
            raise ValueError(f"quarot: rotation_size must be a power of two, got {self.rotation_size}")


@dataclass
class _Arch:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int


def _arch(model: torch.nn.Module) -> _Arch:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "qwen2", "qwen3"):
        raise NotImplementedError(f"quarot: model_type {getattr(cfg, 'model_type', None)!r} is not supported "
                                  "(llama, qwen2, qwen3)")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return _Arch(cfg.hidden_size, cfg.intermediate_size, heads, getattr(cfg, "num_key_value_heads", heads) or heads,
                 head_dim)


def _rows(t: torch.Tensor, n: int, hk: torch.Tensor | None = None) -> torch.Tensor:
    """Each n-block of every row r -> r·Tᵀ in fp64, back in t's dtype (T symmetric for Sylvester)."""
    return T.hadamard_transform(t.detach().to(torch.float64), n, hk).to(t.dtype)


def _rotate_in(linear: torch.nn.Linear, n: int, hk: torch.Tensor | None = None) -> None:
    """Input side: W <- W·Tᵀ per n-block of in_features (x·Wᵀ then takes x·Tᵀ)."""
    linear.weight.data = _rows(linear.weight.data, n, hk)


def _rotate_out(linear: torch.nn.Linear, n: int) -> None:
    """Output side with a symmetric T: W <- T·W per n-block of out_features, b <- T·b: the output becomes y·T."""
    linear.weight.data = _rows(linear.weight.data.t(), n).t().contiguous()
    if linear.bias is not None:
        linear.bias.data = _rows(linear.bias.data, n)


class _BlockMap(T.BlockRotation):
    """x <- x·Tᵀ (fixed) or x·diag(d)·Tᵀ (random, d the signs) on each n-block of the last dimension, through the
    FWHT kernel on x's device (signs first); fp32: R4's numerics (non-float32 types computed in fp32)."""

    def __init__(self, n: int, hk: torch.Tensor | None, signs: torch.Tensor | None, fp32: bool) -> None:
        super().__init__(n, hk, signs, transpose=False, signs_first=True, fp32=fp32)
        # True while SignRound tunes a full-size deterministic R1 (QuaRotPlan.use_tuning_numerics): upstream's
        # stage-by-stage butterfly instead of the FWHT rounded once
        self.staged = False

    def fusable(self, x: torch.Tensor) -> bool:
        return not self.staged and super().fusable(x)  # the fused op computes the FWHT, not the staged map

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return staged_hadamard(x) if self.staged else super().__call__(x)


def staged_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x [..., n], n a power of two -> x·Ĥ_n the way upstream's matmul_hadU computes it for K = 1: log2(n) butterfly
    stages on adjacent pairs (bit 0 first), each sum and difference rounded to x's dtype, then one division by
    sqrt(n). SignRound's numerics for a full-size deterministic R1 (weight rotation and online hook), so that the
    tuned codes are upstream's: in bf16 every stage rounds, and most values differ from the once-rounded FWHT (about 4
    times its error). Out of place, so autograd's gradient is the same staged map, as upstream's."""
    n = x.shape[-1]
    if not T.is_pow2(n):
        raise ValueError(f"quarot: staged Hadamard needs a power-of-two last dimension, got {n}")
    rows = x.reshape(-1, n, 1)  # [rows, m, r]: m blocks still to pair, r = n / m sums per block
    while rows.shape[1] > 1:
        pairs = rows.reshape(rows.shape[0], rows.shape[1] // 2, 2, rows.shape[2])  # [rows, m/2, 2, r]
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        rows = torch.stack((a + b, a - b), dim=2).reshape(rows.shape[0], rows.shape[1] // 2, -1)
    return rows.reshape(x.shape) / math.sqrt(n)


def _hook(block_map: T.BlockRotation):
    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (block_map(args[0]),) + tuple(args[1:])

    pre_hook.block_rotation = block_map  # what attach_rotation folds into a QuantLinear instead
    return pre_hook


def online_hook(position: str, size: int, k: int = 1):
    """The fixed online pre-hook of R1 (x <- x·Tᵀ per size-block, in x's dtype) or R4 (the same in fp32, as
    upstream's R4 hook runs whatever the activation dtype), T built on SpinQuant's K matrix of order k (1:
    Sylvester). A random matrix's hook is _hook(RandomRotation.block_map(...))."""
    hk = T.spinquant_matrix(k) if k > 1 else None
    return _hook(_BlockMap(size, hk, None, fp32=position == "r4"))


@dataclass
class RandomRotation:
    """Upstream's random_hadamard_matrix(n): M = diag(d)·Tᵀ, T = (H_K ⊗ H_2^m)/sqrt(n) on SpinQuant's K, built in
    fp64 and stored in fp32 (what every weight rotation multiplies by); d the ±1 signs, all the online maps need."""

    signs: torch.Tensor  # [n] int8

    @property
    def n(self) -> int:
        return int(self.signs.numel())

    @property
    def k(self) -> int:
        return T.spinquant_divisor(self.n)

    @functools.cached_property
    def matrix(self) -> torch.Tensor:
        """M [n, n] fp32: every entry ±1/sqrt(n) rounded once from fp64, as upstream's fp64 build then cast."""
        scale = torch.tensor(1.0 / math.sqrt(self.n), dtype=torch.float64).to(torch.float32)
        t_t = _transposed_t(self.n, torch.float32)
        return t_t.mul_(self.signs.to(torch.float32)[:, None]).mul_(scale)

    @staticmethod
    def draw(n: int, device: torch.device) -> "RandomRotation":
        """One draw from the global torch RNG of `device`, as upstream (randint(0, 2) in fp64, then 2d - 1)."""
        d = torch.randint(0, 2, (n,), dtype=torch.float64, device=device) * 2 - 1
        return RandomRotation(d.cpu().to(torch.int8))

    @staticmethod
    def from_stored(m: torch.Tensor, what: str) -> "RandomRotation":
        """Back from a stored matrix (int8 sign(M) of a checkpoint's type-1 buffer, or M itself in any float
        dtype): d is read off the first column; sign(M) must then be diag(d)·sign(Tᵀ), checked exactly on two
        integer probe vectors (sign(M)·v against d·(Tᵀ·v) by the FWHT, both exact in fp64) without an n×n copy."""
        if m.dim() != 2 or m.shape[0] != m.shape[1] or T.spinquant_divisor(int(m.shape[0])) == 0:
            raise ValueError(f"fastround: {what} has shape {tuple(m.shape)}, not [n, n] with n = K·2^m")
        n, k = int(m.shape[0]), T.spinquant_divisor(int(m.shape[0]))
        hk = T.spinquant_matrix(k) if k > 1 else None
        m = m.detach().cpu()
        probes = torch.randint(1, 1 << 12, (3, n), generator=torch.Generator().manual_seed(0)).to(torch.float64)
        probes[0] = 0
        probes[0, 0] = 1  # e_0: its image is column 0 of Tᵀ, which gives d
        t_probes = T.hadamard_transform(probes, n, hk, transpose=True, normalize=False)  # rows (Tᵀ·v)ᵀ
        m_probes = torch.cat([m[i:i + 1024].to(torch.float64).sign() @ probes.t() for i in range(0, n, 1024)])
        d = m_probes[:, 0] * t_probes[0]
        if not torch.equal(m_probes, d[:, None] * t_probes.t()):
            raise ValueError(f"fastround: {what} is not a random Hadamard matrix diag(±1)·Tᵀ (SpinQuant's T of "
                             f"order {n}); fastround applies a random rotation through the FWHT with its signs")
        return RandomRotation(d.to(torch.int8))

    def block_map(self, fp32: bool) -> T.BlockRotation:
        k = self.k
        return _BlockMap(self.n, T.spinquant_matrix(k) if k > 1 else None, self.signs, fp32)


def _transposed_t(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Unnormalised Tᵀ [n, n] (±1, exact in any float dtype): row i is e_i through the kernel (e_i·Tᵀ)."""
    k = T.spinquant_divisor(n)
    return T.hadamard_transform(torch.eye(n, dtype=dtype), n, T.spinquant_matrix(k) if k > 1 else None,
                                normalize=False)


def _right(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each n-block b of every row of t -> b·M in fp64 with M's fp32 values, back in t's dtype (upstream's
    arithmetic for a stored matrix, so the rounded weights equal its)."""
    n, shape = m.shape[0], t.shape
    w, r = t.detach().to(torch.float64), m.to(t.device, torch.float64)
    out = w @ r if shape[-1] == n else (w.reshape(*shape[:-1], -1, n) @ r).reshape(shape)
    return out.to(t.dtype)


def _rotate_in_by(linear: torch.nn.Linear, m: torch.Tensor) -> None:
    """Input side with a stored M: W <- W·M per block (the hook's x·M then cancels: x·M·(W·M)ᵀ = x·Wᵀ)."""
    linear.weight.data = _right(linear.weight.data, m)


def _rotate_out_by(linear: torch.nn.Linear, m: torch.Tensor) -> None:
    """Output side with a stored M: W <- Mᵀ·W per n-block of out_features, b <- Mᵀ·b: the output becomes y·M."""
    linear.weight.data = _right(linear.weight.data.t(), m).t().contiguous()
    if linear.bias is not None:
        linear.bias.data = _right(linear.bias.data, m)


class RopeThenR3:
    """Stands in for apply_rotary_pos_emb inside one attention instance's forward: RoPE, then q, k <- ·R3 per head
    (upstream's QKRotationWrapper: fp32, cast back; R3 = Ĥ_hd, or diag(d)·Ĥ_hd random). Before the cache update,
    so a KV cache holds rotated keys."""

    def __init__(self, rope: Callable[..., Any], head_dim: int, random: RandomRotation | None) -> None:
        self.rope = rope
        self.random = random
        self.map = random.block_map(True) if random is not None else _BlockMap(head_dim, None, None, True)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.rope(*args, **kwargs)
        return self.map(q), self.map(k)


_ROPE = "apply_rotary_pos_emb"


def _rebind_global(fn: types.FunctionType, name: str, make: Callable[[Any], Any]) -> types.FunctionType | None:
    """A copy of fn whose global `name` is make(its value); through decorators, whose closures hold the decorated
    function, by copying each wrapper with that cell replaced (the decorators keep working). None if no function on
    the chain reads the global."""
    if name in fn.__code__.co_names and name in fn.__globals__:
        out = types.FunctionType(fn.__code__, {**fn.__globals__, name: make(fn.__globals__[name])}, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    else:
        cells = list(fn.__closure__ or ())
        for i, cell in enumerate(cells):
            try:
                inner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(inner, types.FunctionType) and inner is not fn:
                new_inner = _rebind_global(inner, name, make)
                if new_inner is not None:
                    cells[i] = types.CellType(new_inner)
                    break
        else:
            return None
        out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    out.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    out.__qualname__, out.__module__, out.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    out.__dict__.update(fn.__dict__)
    return out


def install_r3(attn: torch.nn.Module, head_dim: int, random: RandomRotation | None) -> RopeThenR3:
    """Gives this attention instance its own forward: its class's, reading a RopeThenR3 where it calls
    apply_rotary_pos_emb. Other instances, the class and the transformers module are untouched."""
    if getattr(attn, "fastround_r3", None) is not None:
        raise ValueError(f"quarot: R3 is already installed on this {type(attn).__name__}")
    forward = type(attn).forward
    made: list[RopeThenR3] = []

    def make(rope: Callable[..., Any]) -> RopeThenR3:
        made.append(RopeThenR3(rope, head_dim, random))
        return made[-1]

    patched = _rebind_global(forward, _ROPE, make) if isinstance(forward, types.FunctionType) else None
    if patched is None:
        raise NotImplementedError(f"quarot: R3 needs an attention forward that calls {_ROPE}; "
                                  f"{type(attn).__qualname__}.forward does not")
    attn.forward = types.MethodType(patched, attn)
    attn.fastround_r3 = made[0]
    return made[0]


def _attentions(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The self-attention modules R3 applies to (upstream: names ending in self_attn with q_proj and k_proj)."""
    return [(n, m) for n, m in model.named_modules()
            if n.endswith("self_attn") and hasattr(m, "q_proj") and hasattr(m, "k_proj")]


def fuse_norm(norm: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    """W <- W·diag(γ) (fp64) for each linear reading the norm's output, then γ = 1; a LayerNorm's β too:
    b <- b + W·β (W before γ, a zero bias created if the linear has none), then β = 0."""
    gamma = norm.weight.data.to(torch.float64)
    beta = getattr(norm, "bias", None)
    for lin in linears:
        w = lin.weight.data.to(torch.float64)
        lin.weight.data = (w * gamma).to(lin.weight.dtype)
        if beta is not None:
            b = lin.bias.data.to(torch.float64) if lin.bias is not None else torch.zeros(
                w.shape[0], dtype=torch.float64, device=w.device)
            new_b = (b + w @ beta.data.to(w.device, torch.float64)).to(lin.weight.dtype)
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(new_b, requires_grad=False)
            else:
                lin.bias.data = new_b
    norm.weight.data = torch.ones_like(norm.weight.data)
    if beta is not None:
        beta.data = torch.zeros_like(beta.data)


def untie_lm_head(model: torch.nn.Module, emb: torch.nn.Module, head: torch.nn.Module) -> None:
    """lm_head gets its own copy of a weight it shares with the embedding (the two are rotated differently)."""
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = torch.nn.Parameter(emb.weight.data.clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


def parse_spinquant(value: Any) -> QuaRotConfig:
    """"quarot" or a dict with algorithm "spinquant" (upstream's SpinQuantConfig fields): fixed or random Hadamard
    rotations; trainable ones (SpinQuant proper) are refused clearly."""
    if isinstance(value, str):
        if value.strip().lower() == "spinquant":
            raise NotImplementedError("rotation_config='spinquant' (trainable rotations) is not implemented in "
                                      "fastround yet; 'quarot' is")
        return QuaRotConfig()
    fields = {k: v for k, v in value.items() if k != "algorithm"}
    for key in ("trainable_rotation", "trainable_smooth"):
        if fields.pop(key, False):
            raise NotImplementedError(f"spinquant_config {key}=True is not implemented in fastround yet")
    known = {"r1", "r2", "r3", "r4", "rotation_size", "online_r1_rotation", "fuse_rmsnorm", "untie_embeddings",
             "random_r1", "random_r2", "random_r3", "random_r4"}
    ignored = {"iters", "lr", "smooth_lr", "batch_size", "loss_type", "kl_top_k", "dtype", "device"}
    unknown = set(fields) - known - ignored
    if unknown:
        raise ValueError(f"rotation_config (spinquant): unknown field(s) {sorted(unknown)}")
    return QuaRotConfig(**{k: v for k, v in fields.items() if k in known})


@dataclass
class QuaRotPlan:
    """What apply_quarot did: the positions actually applied, their sizes and random matrices (what the export
    records)."""

    r1: bool
    r2: bool
    r4: bool
    r1_size: int
    r4_size: int
    k4: int
    arch: _Arch
    online_r1: bool
    r3: bool = False
    random: dict[str, RandomRotation] = field(default_factory=dict)  # "r1" .. "r4": the drawn matrices
    staged_maps: list[_BlockMap] = field(default_factory=list)  # the full-size deterministic R1 hooks' maps

    def use_tuning_numerics(self, on: bool) -> None:
        """While SignRound tunes (on), the full-size deterministic R1 hooks run upstream's staged butterfly in the
        activation's dtype, as its hook does in the tuning forward; off: the FWHT rounded once (inference, loading,
        and what the in-memory model computes after quantize())."""
        for block_map in self.staged_maps:
            block_map.staged = on

    def spinquant_config(self, cfg: QuaRotConfig) -> dict[str, Any]:
        """upstream's serialised spinquant_config: the flags in effect after its size checks, and the model info."""
        return {"r1": self.r1, "r2": self.r2, "r3": self.r3, "r4": self.r4,
                "online_r1_rotation": cfg.online_r1_rotation, "rotation_size": cfg.rotation_size,
                "random_r1": cfg.random_r1, "random_r2": cfg.random_r2, "random_r3": cfg.random_r3,
                "random_r4": cfg.random_r4, "trainable_rotation": False, "head_dim": self.arch.head_dim,
                "hidden_size": self.arch.hidden, "intermediate_size": self.arch.inter, "algorithm": "spinquant"}

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The matrices upstream registers on the model (and so saves), fp32: R1 [r1, r1] when fused offline or
        random, R2 [hd, hd], R3 [hd, hd] (a random one is read back at load: upstream's loader ignores it), a random
        R4 [r4, r4], and for R4 the unnormalised K matrix (the full Sylvester matrix when K = 1) and K."""
        out: dict[str, torch.Tensor] = {}
        rnd = self.random
        if self.r1 and ("r1" in rnd or not self.online_r1):
            out["spinquant_R1"] = rnd["r1"].matrix if "r1" in rnd else \
                T.deterministic_hadamard_matrix(self.r1_size, torch.float32)
        if self.r2:
            out["spinquant_R2_head"] = rnd["r2"].matrix if "r2" in rnd else \
                T.deterministic_hadamard_matrix(self.arch.head_dim, torch.float32)
        if self.r3:
            out["spinquant_R3_head"] = rnd["r3"].matrix if "r3" in rnd else \
                T.deterministic_hadamard_matrix(self.arch.head_dim, torch.float32)
        if self.r4:
            if "r4" in rnd:
                out["spinquant_R4_matrix"] = rnd["r4"].matrix
            hk = T.sylvester(self.r4_size) if self.k4 == 1 else T.spinquant_matrix(self.k4)
            out["spinquant_R4_had_K"] = hk.to(torch.float32)
            out["spinquant_R4_K"] = torch.tensor(self.k4)
        return out

    def layer_buffers(self, name: str) -> dict[str, torch.Tensor]:
        """Per quantized layer: type (0: deterministic, 1: random) and size of the online R1 (q/k/v/gate/up) or R4
        (down), and for a random one its matrix as int8 sign(M) (the loader divides by sqrt(size))."""
        short = name.rsplit(".", 1)[-1]
        out: dict[str, torch.Tensor] = {}
        for pos, on, size in (("r1", self.r1 and self.online_r1 and short in _R1_TARGETS, self.r1_size),
                              ("r4", self.r4 and short == "down_proj", self.r4_size)):
            if not on:
                continue
            rnd = self.random.get(pos)
            out[f"spinquant_{pos}_type"] = torch.tensor(0 if rnd is None else 1, dtype=torch.int32)
            out[f"spinquant_{pos}_size"] = torch.tensor(size, dtype=torch.int32)
            if rnd is not None:
                out[f"spinquant_{pos}_matrix"] = rnd.matrix.sign().to(torch.int8)
        return out


_R1_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def apply_quarot(model: torch.nn.Module, config: QuaRotConfig | None = None, tuning: bool = False) -> QuaRotPlan:
    """Rotate a Llama-layout model in place so that it computes the same function; the hooks and R3 stay
    installed. Positions whose sizes do not fit (§2.2: R1 needs a pow2 size dividing hidden, R2 and R3 a pow2
    head_dim, R4 a SpinQuant K·2^m size dividing intermediate) are disabled with a warning, as upstream. Random
    matrices are drawn from the global torch RNG (of the model's device) in R1, R2, R3, R4 order, each only when its
    position is on: torch.manual_seed(s) before this call gives upstream's matrices for the same seed.
    tuning (SignRound follows): a full-size deterministic online R1 rotates its weights with upstream's staged
    butterfly in the weight's dtype, and its hooks start in that numerics (QuaRotPlan.use_tuning_numerics)."""
    cfg = config or QuaRotConfig()
    a = _arch(model)
    inner = model.model
    layers = list(inner.layers)

    r1 = cfg.rotation_size or a.hidden
    do_r1 = cfg.r1 and T.is_pow2(r1) and a.hidden % r1 == 0
    if cfg.r1 and not do_r1:
        logger.warning("quarot: R1 disabled (size %d is not a power of two dividing hidden %d; set rotation_size)",
                       r1, a.hidden)
    do_r2 = cfg.r2 and T.is_pow2(a.head_dim)
    if cfg.r2 and not do_r2:
        logger.warning("quarot: R2 disabled (head_dim %d is not a power of two)", a.head_dim)
    do_r3 = cfg.r3 and T.is_pow2(a.head_dim)
    if cfg.r3 and not do_r3:
        logger.warning("quarot: R3 disabled (head_dim %d is not a power of two)", a.head_dim)
    if do_r3 and cfg.rotation_size is not None:
        logger.warning("quarot: R3 always rotates head_dim %d; rotation_size is ignored for it", a.head_dim)
    r4 = cfg.rotation_size or a.inter
    k4 = T.spinquant_divisor(r4) if cfg.r4 else 0
    do_r4 = cfg.r4 and k4 > 0 and a.inter % r4 == 0
    if cfg.r4 and not do_r4:
        logger.warning("quarot: R4 disabled (no K * 2^m decomposition of %d dividing intermediate %d)", r4, a.inter)
    hk4 = T.spinquant_matrix(k4) if do_r4 and k4 > 1 else None

    device = next(model.parameters()).device
    staged_maps: list[_BlockMap] = []
    rnd: dict[str, RandomRotation] = {}
    for pos, on, random, size in (("r1", do_r1, cfg.random_r1, r1), ("r2", do_r2, cfg.random_r2, a.head_dim),
                                  ("r3", do_r3, cfg.random_r3, a.head_dim), ("r4", do_r4, cfg.random_r4, r4)):
        if on and random:
            rnd[pos] = RandomRotation.draw(size, device)

    with torch.no_grad():
        if do_r1 and not cfg.online_r1_rotation:
            emb, head = inner.embed_tokens, model.lm_head
            if cfg.untie_embeddings:
                untie_lm_head(model, emb, head)
            if cfg.fuse_rmsnorm:
                for layer in layers:
                    att, mlp = layer.self_attn, layer.mlp
                    fuse_norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
                    fuse_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
                fuse_norm(inner.norm, [head])
            m1 = rnd["r1"].matrix if "r1" in rnd else None
            emb.weight.data = _rows(emb.weight.data, r1) if m1 is None else _right(emb.weight.data, m1)
            readers = [head] + [lin for layer in layers for lin in (
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                layer.mlp.up_proj)]
            writers = [lin for layer in layers for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)]
            for lin in readers:
                if m1 is None:
                    _rotate_in(lin, r1)
                else:
                    _rotate_in_by(lin, m1)
            for lin in writers:
                if m1 is None:
                    _rotate_out(lin, r1)
                else:
                    _rotate_out_by(lin, m1)
        elif do_r1:
            rot1 = rnd.get("r1")
            # block-size R1: upstream rotates the weights in fp64 as here, but its hook is a dense matmul in the
            # activation dtype, not reproduced while tuning (docs/compatibility.md)
            staged = tuning and r1 == a.hidden
            for layer in layers:
                att, mlp = layer.self_attn, layer.mlp
                for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                    if rot1 is None:
                        block_map = _BlockMap(r1, None, None, fp32=False)
                        if staged:
                            lin.weight.data = staged_hadamard(lin.weight.data)
                            block_map.staged = True
                            staged_maps.append(block_map)
                        else:
                            _rotate_in(lin, r1)
                        hook = _hook(block_map)
                    else:
                        _rotate_in_by(lin, rot1.matrix)
                        hook = _hook(rot1.block_map(fp32=False))
                    attach_rotation(lin, hook)
        if do_r2:
            m2 = rnd["r2"].matrix if "r2" in rnd else None
            for layer in layers:
                att = layer.self_attn
                # v's output per kv head becomes v_h·R2 (bias too: upstream leaves a v bias unrotated, a QUIRK);
                # o_proj reads each q head's block through R2, which undoes it
                if m2 is None:
                    _rotate_out(att.v_proj, a.head_dim)
                    _rotate_in(att.o_proj, a.head_dim)
                else:
                    _rotate_out_by(att.v_proj, m2)
                    _rotate_in_by(att.o_proj, m2)
        if do_r4:
            rot4 = rnd.get("r4")
            for layer in layers:
                down = layer.mlp.down_proj
                if rot4 is None:
                    _rotate_in(down, r4, hk4)
                    hook = online_hook("r4", r4, k4)
                else:
                    _rotate_in_by(down, rot4.matrix)
                    hook = _hook(rot4.block_map(fp32=True))
                attach_rotation(down, hook)
        if do_r3:
            for _, attn in _attentions(model):
                install_r3(attn, a.head_dim, rnd.get("r3"))
    return QuaRotPlan(do_r1, do_r2, do_r4, r1, r4, k4, a, cfg.online_r1_rotation, do_r3, rnd, staged_maps)


def check_loadable(spinquant_config: dict[str, Any]) -> None:
    """Refuses, by name, the spinquant_config fields whose load side fastround does not implement."""
    if not isinstance(spinquant_config, dict):
        raise ValueError(f"spinquant_config must be a dict, got {type(spinquant_config).__name__}")
    if spinquant_config.get("trainable_rotation"):
        raise NotImplementedError("fastround: loading a checkpoint with spinquant_config trainable_rotation=True is "
                                  "not implemented yet (fixed and random QuaRot rotations only)")


def register_online_hooks(model: torch.nn.Module, spinquant_config: dict[str, Any]) -> dict[str, list[str]]:
    """Load side (upstream's rebuild_spinquant_online): every module carrying spinquant_r1_* / spinquant_r4_*
    buffers (type 0: Hadamard, type 1: random with its int8 sign matrix; size: the rotation block) gets the same
    online pre-hook as apply_quarot registers, and with r3 every self-attention gets R3 back from the config: a
    random R3 from the model-level spinquant_R3_head when the checkpoint has it (preregistered by the loader), the
    fixed one otherwise (the same outputs: R3 cancels in q·kᵀ). R2 and an offline R1 live in the weights.
    Returns {"r1": names, "r4": names, "r3": names}."""
    check_loadable(spinquant_config)
    hooked: dict[str, list[str]] = {"r1": [], "r4": [], "r3": []}
    # R1 is the same map on q/k/v (and on gate/up), which read one input: one rotation per parent, shared
    r1_groups: dict[tuple[str, int, int, bytes], list[tuple[torch.nn.Module, Any]]] = {}
    for name, module in model.named_modules():
        for pos in ("r1", "r4"):
            kind = getattr(module, f"spinquant_{pos}_type", None)
            if kind is None:
                continue
            size_buf = getattr(module, f"spinquant_{pos}_size", None)
            if size_buf is None:
                raise ValueError(f"fastround: {name} has spinquant_{pos}_type but no spinquant_{pos}_size")
            kind, size = int(kind), int(size_buf)
            in_features = _in_features(module)
            k = T.spinquant_divisor(size) if size > 0 else 0
            if k == 0 or in_features % size:
                raise ValueError(f"fastround: {name}.spinquant_{pos}_size={size} is not a K·2^m Hadamard size "
                                 f"dividing in_features {in_features}")
            if kind == 0:
                hook = online_hook(pos, size, k)
            elif kind == 1:
                stored = getattr(module, f"spinquant_{pos}_matrix", None)
                if stored is None or tuple(stored.shape) != (size, size):
                    raise ValueError(f"fastround: {name}.spinquant_{pos}_type=1 (random) needs its "
                                     f"spinquant_{pos}_matrix [{size}, {size}]")
                rot = RandomRotation.from_stored(stored, f"{name}.spinquant_{pos}_matrix")
                hook = _hook(rot.block_map(fp32=pos == "r4"))
            else:
                raise NotImplementedError(f"fastround: {name}.spinquant_{pos}_type={kind} (trained matrix) is not "
                                          "implemented yet; 0 (Hadamard) and 1 (random) are")
            hooked[pos].append(name)
            if pos == "r1":
                stored = getattr(module, "spinquant_r1_matrix", None) if kind == 1 else None
                key = (name.rpartition(".")[0], kind, size,
                       b"" if stored is None else torch.sign(stored.detach().float()).to(torch.int8).cpu().numpy().tobytes())
                r1_groups.setdefault(key, []).append((module, hook))
            else:
                attach_rotation(module, hook)
    for members in r1_groups.values():
        shared = T.SharedInputRotation(members[0][1].block_rotation, len(members))
        for module, _ in members:
            attach_rotation(module, _hook(shared))
    if spinquant_config.get("r3"):
        head_dim = int(spinquant_config.get("head_dim") or _arch(model).head_dim)
        if not T.is_pow2(head_dim):
            raise ValueError(f"fastround: spinquant_config r3 with head_dim {head_dim}, not a power of two")
        rot3 = None
        if spinquant_config.get("random_r3"):
            stored = next((b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] == "spinquant_R3_head"), None)
            if stored is not None:
                rot3 = RandomRotation.from_stored(stored, "spinquant_R3_head")
            else:
                logger.warning("fastround: random_r3 but the checkpoint has no spinquant_R3_head; R3 uses the fixed "
                               "Hadamard (the same logits)")
        for name, attn in _attentions(model):
            install_r3(attn, head_dim, rot3)
            hooked["r3"].append(name)
    return hooked


def _in_features(module: torch.nn.Module) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[-1])
