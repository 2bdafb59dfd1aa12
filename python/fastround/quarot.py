"""QuaRot rotations (transforms-and-formats.md §2, upstream's SpinQuant path with fixed Hadamard matrices) for
Llama-layout models (llama, qwen2, qwen3): R1 on the residual stream (online per linear, or offline with RMSNorm
fusion and untying), R2 per attention head on the V/O pair, R4 on down_proj's input with its online hook. Every
weight rotation runs in fp64 through the FWHT kernel and is cast back; Python only walks the modules.

AutoRound(..., rotation_config="quarot") applies it to the loaded model before quantization; the auto_round export
writes spinquant_config, the model-level matrices and the per-layer type/size buffers as upstream. Not built yet:
R3 (the post-RoPE Q/K rotation), random and trainable matrices.

Conventions (row vectors, y = x·Wᵀ): for a deterministic R the matrices are normalised Sylvester (symmetric) or
T = (H_K ⊗ H_2^m)/sqrt(n) with K from SpinQuant's first-match list for R4; the kernel's hadamard_transform(x, n, K)
returns x·Tᵀ."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fastround import transform_ops as T

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

    def __post_init__(self) -> None:
        if self.r3:
            raise NotImplementedError("QuaRot R3 (post-RoPE Q/K rotation) is not implemented in fastround yet")
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


def _hook(n: int, hk: torch.Tensor | None = None, fp32: bool = False):
    hk_on: dict[torch.device, torch.Tensor] = {}  # the K matrix copied once per device, not every call

    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        k = hk
        if hk is not None and x.device.type != "cpu":
            k = hk_on.get(x.device)
            if k is None:
                k = hk_on[x.device] = hk.to(torch.int8).to(x.device)
        y = T.hadamard_any_device(x.float() if fp32 else x, n, k).to(x.dtype)
        return (y,) + tuple(args[1:])

    return pre_hook


def online_hook(position: str, size: int, k: int = 1):
    """The online pre-hook of R1 (x <- x·T per size-block, in x's dtype) or R4 (the same in fp32, as upstream's R4
    hook runs whatever the activation dtype), T built on SpinQuant's K matrix of order k (1: Sylvester)."""
    hk = T.spinquant_matrix(k) if k > 1 else None
    return _hook(size, hk, fp32=position == "r4")


def _fuse_norm(norm: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    """W <- W·diag(γ) (fp64) for each linear reading the norm's output, then γ = 1."""
    gamma = norm.weight.data.to(torch.float64)
    for lin in linears:
        lin.weight.data = (lin.weight.data.to(torch.float64) * gamma).to(lin.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def parse_spinquant(value: Any) -> QuaRotConfig:
    """"quarot" or a dict with algorithm "spinquant" (upstream's SpinQuantConfig fields): fixed Hadamard
    rotations only; trainable (SpinQuant proper) and random matrices are refused clearly."""
    if isinstance(value, str):
        if value.strip().lower() == "spinquant":
            raise NotImplementedError("rotation_config='spinquant' (trainable rotations) is not implemented in "
                                      "fastround yet; 'quarot' is")
        return QuaRotConfig()
    fields = {k: v for k, v in value.items() if k != "algorithm"}
    for key in ("trainable_rotation", "trainable_smooth", "random_r1", "random_r2", "random_r3", "random_r4"):
        if fields.pop(key, False):
            raise NotImplementedError(f"spinquant_config {key}=True is not implemented in fastround yet")
    known = {"r1", "r2", "r3", "r4", "rotation_size", "online_r1_rotation", "fuse_rmsnorm", "untie_embeddings"}
    ignored = {"iters", "lr", "smooth_lr", "batch_size", "loss_type", "kl_top_k", "dtype", "device"}
    unknown = set(fields) - known - ignored
    if unknown:
        raise ValueError(f"rotation_config (spinquant): unknown field(s) {sorted(unknown)}")
    return QuaRotConfig(**{k: v for k, v in fields.items() if k in known})


@dataclass
class QuaRotPlan:
    """What apply_quarot did: the positions actually applied and their sizes (what the export records)."""

    r1: bool
    r2: bool
    r4: bool
    r1_size: int
    r4_size: int
    k4: int
    arch: _Arch
    online_r1: bool

    def spinquant_config(self, cfg: QuaRotConfig) -> dict[str, Any]:
        """upstream's serialised spinquant_config: the flags in effect after its size checks, and the model info."""
        return {"r1": self.r1, "r2": self.r2, "r3": False, "r4": self.r4, "online_r1_rotation": cfg.online_r1_rotation,
                "rotation_size": cfg.rotation_size, "random_r1": False, "random_r2": False, "random_r3": False,
                "random_r4": False, "trainable_rotation": False, "head_dim": self.arch.head_dim,
                "hidden_size": self.arch.hidden, "intermediate_size": self.arch.inter, "algorithm": "spinquant"}

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The matrices upstream registers on the model (and so saves): R1 [r1, r1] fp32 when fused offline,
        R2 [hd, hd] fp32, and for R4 the unnormalised K matrix (the full Sylvester matrix when K = 1) and K."""
        out: dict[str, torch.Tensor] = {}
        if self.r1 and not self.online_r1:
            out["spinquant_R1"] = T.deterministic_hadamard_matrix(self.r1_size, torch.float32)
        if self.r2:
            out["spinquant_R2_head"] = T.deterministic_hadamard_matrix(self.arch.head_dim, torch.float32)
        if self.r4:
            hk = T.sylvester(self.r4_size) if self.k4 == 1 else T.spinquant_matrix(self.k4)
            out["spinquant_R4_had_K"] = hk.to(torch.float32)
            out["spinquant_R4_K"] = torch.tensor(self.k4)
        return out

    def layer_buffers(self, name: str) -> dict[str, torch.Tensor]:
        """Per quantized layer: type (0: deterministic) and size of the online R1 (q/k/v/gate/up) or R4 (down)."""
        short = name.rsplit(".", 1)[-1]
        out: dict[str, torch.Tensor] = {}
        if self.r1 and self.online_r1 and short in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            out["spinquant_r1_type"] = torch.tensor(0, dtype=torch.int32)
            out["spinquant_r1_size"] = torch.tensor(self.r1_size, dtype=torch.int32)
        if self.r4 and short == "down_proj":
            out["spinquant_r4_type"] = torch.tensor(0, dtype=torch.int32)
            out["spinquant_r4_size"] = torch.tensor(self.r4_size, dtype=torch.int32)
        return out


def apply_quarot(model: torch.nn.Module, config: QuaRotConfig | None = None) -> QuaRotPlan:
    """Rotate a Llama-layout model in place so that it computes the same function; the hooks stay registered.
    Positions whose sizes do not fit (§2.2: R1 needs a pow2 size dividing hidden, R2 a pow2 head_dim, R4 a
    SpinQuant K·2^m size dividing intermediate) are disabled with a warning, as upstream."""
    cfg = config or QuaRotConfig()
    a = _arch(model)
    inner = model.model
    layers = list(inner.layers)
    handles: list[Any] = []

    r1 = cfg.rotation_size or a.hidden
    do_r1 = cfg.r1 and T.is_pow2(r1) and a.hidden % r1 == 0
    if cfg.r1 and not do_r1:
        logger.warning("quarot: R1 disabled (size %d is not a power of two dividing hidden %d; set rotation_size)",
                       r1, a.hidden)
    do_r2 = cfg.r2 and T.is_pow2(a.head_dim)
    if cfg.r2 and not do_r2:
        logger.warning("quarot: R2 disabled (head_dim %d is not a power of two)", a.head_dim)
    r4 = cfg.rotation_size or a.inter
    k4 = T.spinquant_divisor(r4) if cfg.r4 else 0
    do_r4 = cfg.r4 and k4 > 0 and a.inter % r4 == 0
    if cfg.r4 and not do_r4:
        logger.warning("quarot: R4 disabled (no K * 2^m decomposition of %d dividing intermediate %d)", r4, a.inter)
    hk4 = T.spinquant_matrix(k4) if do_r4 and k4 > 1 else None

    with torch.no_grad():
        if do_r1 and not cfg.online_r1_rotation:
            emb, head = inner.embed_tokens, model.lm_head
            if cfg.untie_embeddings and head.weight.data_ptr() == emb.weight.data_ptr():
                head.weight = torch.nn.Parameter(emb.weight.data.clone(), requires_grad=False)
                model.config.tie_word_embeddings = False
            if cfg.fuse_rmsnorm:
                for layer in layers:
                    att, mlp = layer.self_attn, layer.mlp
                    _fuse_norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
                    _fuse_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
                _fuse_norm(inner.norm, [head])
            emb.weight.data = _rows(emb.weight.data, r1)
            _rotate_in(head, r1)
            for layer in layers:
                att, mlp = layer.self_attn, layer.mlp
                for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                    _rotate_in(lin, r1)
                _rotate_out(att.o_proj, r1)
                _rotate_out(mlp.down_proj, r1)
        elif do_r1:
            for layer in layers:
                att, mlp = layer.self_attn, layer.mlp
                for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                    _rotate_in(lin, r1)
                    handles.append(lin.register_forward_pre_hook(online_hook("r1", r1), prepend=True))
        if do_r2:
            for layer in layers:
                att = layer.self_attn
                # v's output per kv head becomes v_h·R2 (bias too: upstream leaves a v bias unrotated, a QUIRK);
                # o_proj reads each q head's block through R2, which undoes it
                _rotate_out(att.v_proj, a.head_dim)
                _rotate_in(att.o_proj, a.head_dim)
        if do_r4:
            for layer in layers:
                down = layer.mlp.down_proj
                _rotate_in(down, r4, hk4)
                handles.append(down.register_forward_pre_hook(online_hook("r4", r4, k4), prepend=True))
    return QuaRotPlan(do_r1, do_r2, do_r4, r1, r4, k4, a, cfg.online_r1_rotation)


def check_loadable(spinquant_config: dict[str, Any]) -> None:
    """Refuses, by name, the spinquant_config fields whose load side fastround does not implement."""
    if not isinstance(spinquant_config, dict):
        raise ValueError(f"spinquant_config must be a dict, got {type(spinquant_config).__name__}")
    for key in ("r3", "random_r1", "random_r2", "random_r3", "random_r4", "trainable_rotation"):
        if spinquant_config.get(key):
            raise NotImplementedError(f"fastround: loading a checkpoint with spinquant_config {key}=True is not "
                                      "implemented yet (fixed QuaRot rotations only)")


def register_online_hooks(model: torch.nn.Module, spinquant_config: dict[str, Any]) -> dict[str, list[str]]:
    """Load side (upstream's rebuild_spinquant_online for deterministic matrices): every module carrying
    spinquant_r1_* / spinquant_r4_* buffers (type 0: Hadamard; size: the rotation block) gets the same online
    pre-hook as apply_quarot registers. R2 and an offline R1 live in the weights and need nothing here.
    Returns {"r1": names, "r4": names}."""
    check_loadable(spinquant_config)
    hooked: dict[str, list[str]] = {"r1": [], "r4": []}
    for name, module in model.named_modules():
        for pos in ("r1", "r4"):
            kind = getattr(module, f"spinquant_{pos}_type", None)
            if kind is None:
                continue
            size_buf = getattr(module, f"spinquant_{pos}_size", None)
            if size_buf is None:
                raise ValueError(f"fastround: {name} has spinquant_{pos}_type but no spinquant_{pos}_size")
            if int(kind) != 0:
                raise NotImplementedError(f"fastround: {name}.spinquant_{pos}_type={int(kind)} (random or trained "
                                          "matrix) is not implemented yet; only 0 (Hadamard) is")
            size = int(size_buf)
            in_features = _in_features(module)
            k = T.spinquant_divisor(size) if size > 0 else 0
            if k == 0 or in_features % size:
                raise ValueError(f"fastround: {name}.spinquant_{pos}_size={size} is not a K·2^m Hadamard size "
                                 f"dividing in_features {in_features}")
            module.register_forward_pre_hook(online_hook(pos, size, k), prepend=True)
            hooked[pos].append(name)
    return hooked


def _in_features(module: torch.nn.Module) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[-1])
