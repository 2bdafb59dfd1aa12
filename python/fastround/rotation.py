"""Hadamard rotation of the regular flow (transforms-and-formats.md §1.5): upstream's `rotation_config` argument,
its resolution to a backend, and the per-linear "transform" backend for MXFP / NVFP schemes.

Per-linear transform backend: every nn.Linear whose name does not contain "lm_head" and whose weight is quantized
(bits < 16) gets, with b the block size (32 for mx_fp, 16 for nv_fp) and M the b x b block matrix,
    W <- W · M^T  (each b-long chunk of every row)       weight, once, before its quantization, in fp32
    x <- x · M^T  (each b-long chunk of the input)        a forward pre-hook (online activation rotation)
so the layer computes the same function. M = Ĥ_b (Sylvester, symmetric) for `hadamard`; M = diag(d) · T_b^T for
`random_hadamard`, T_b built on the K matrix of upstream's file and d drawn from a fresh torch.Generator() (the same
for every layer, §1.4). Both maps are the one kernel call hadamard_transform(chunk, b, K, d, transpose=True): the row
vector x · M^T is the column vector M·x = diag(d)·T^T·x.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

logger = logging.getLogger("fastround")

HADAMARD_TYPES = ("hadamard", "random_hadamard", "inplace_quarot_hadamard", "inplace_hadamard", "inplace_random")
BACKENDS = ("auto", "inplace", "transform")
TRANSFORM_TYPES = ("hadamard", "random_hadamard")
# Formats whose writer carries rotation_config (and hadamard_matrix buffers): upstream's MX / NV QuantLinear export.
ROTATION_FORMATS = ("auto_round",)
# The inplace backend writes nothing a loader could rebuild its online hooks from (upstream: "fake" export only).
INPLACE_FORMATS = ("fake",)


@dataclass
class RotationConfig:
    """upstream's RotationConfig (hadamard/config.py), field for field and in its dump order."""

    algorithm: str = "hadamard"
    layerwise: bool = False
    backend: str = "auto"
    block_size: int | None = None
    hadamard_type: Any = "hadamard"  # a name, or (inplace backend) a custom g×g tensor / {g: tensor} dict
    fuse_online_to_weight: bool | None = None
    allow_online_rotation: bool = True
    random_seed: bool = False  # excluded from the dump, unused (as upstream)

    def __post_init__(self) -> None:
        if self.algorithm != "hadamard":
            raise ValueError(f"rotation_config: algorithm must be 'hadamard' here, got {self.algorithm!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"rotation_config: unsupported backend {self.backend!r}; expected one of {list(BACKENDS)}")
        if is_custom_matrix(self.hadamard_type):
            # a custom matrix (upstream's rotation_matrix Tensor / dict, which its own RotationConfig, a str field,
            # rejects): checked against the block size by rotation_inplace.custom_block_matrix
            if self.backend == "transform":
                raise ValueError("rotation_config: a custom rotation matrix (hadamard_type a tensor or a {size: "
                                 "tensor} dict) is taken by the inplace backend only, not backend='transform'")
        elif not isinstance(self.hadamard_type, str) or self.hadamard_type not in HADAMARD_TYPES:
            raise ValueError(f"rotation_config: unsupported hadamard_type {self.hadamard_type!r}; expected one of "
                             f"{sorted(HADAMARD_TYPES)}")
        # <= 0 is upstream's "full dimension" for the inplace backend; the transform backend needs a block
        if self.block_size is not None and (not isinstance(self.block_size, int) or isinstance(self.block_size, bool)):
            raise ValueError(f"rotation_config: block_size must be an integer, got {self.block_size!r}")

    def model_dump(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "random_seed"}


def parse_rotation_config(value: Any, data_type: str = "mx_fp") -> Any:
    """upstream's normalize_rotation_config for the Hadamard algorithm: None / "" -> None; "default" ->
    hadamard_type "hadamard"; another string s -> hadamard_type s, block_size from the data type (fill_block_size);
    a dict (algorithm "hadamard" or absent) and an upstream RotationConfig (anything with model_dump) as given.
    "quarot" and a dict with algorithm "spinquant" give a fastround.quarot.QuaRotConfig (fixed rotations).
    Upstream fills a string's block_size for mx_fp whatever the scheme (32, also for nv_fp); here the scheme's
    data type decides (16 for nv_fp, docs/compatibility.md)."""
    from fastround.quarot import QuaRotConfig

    if value is None or isinstance(value, (RotationConfig, QuaRotConfig)):
        return value
    if isinstance(value, str):
        key = value.strip()
        if not key:
            return None
        if key.lower() in ("quarot", "spinquant"):
            from fastround.quarot import parse_spinquant

            return parse_spinquant(key)
        cfg = RotationConfig(hadamard_type="hadamard" if key == "default" else key)
        # upstream normalises a string for mx_fp whatever the scheme: 32, which the inplace backend of an int
        # scheme then uses as its group size
        fill_block_size(cfg, data_type if is_nv_fp(data_type) else "mx_fp")
        return cfg
    if hasattr(value, "model_dump") and not isinstance(value, dict):
        value = value.model_dump()
    if isinstance(value, dict):
        if value.get("algorithm", "hadamard") == "spinquant":
            from fastround.quarot import parse_spinquant

            return parse_spinquant(value)
        names = {f.name for f in fields(RotationConfig)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"rotation_config: unknown field(s) {sorted(unknown)}")
        return RotationConfig(**value)
    raise TypeError(f"rotation_config must be None, a string, a dict or a RotationConfig, got {type(value).__name__}")


def is_mx_fp(data_type: str) -> bool:
    return "mx_fp" in data_type


def is_nv_fp(data_type: str) -> bool:
    return "nv_fp" in data_type


def resolve_backend(cfg: RotationConfig, data_type: str) -> str:
    """upstream's resolve_hadamard_backend, without its QUIRK: only a literal "inplace_" prefix is stripped and
    "inplace_random" means random_hadamard (upstream cuts 8 characters whatever they are: backend="inplace" with
    "hadamard" became "" and "inplace_random" became "random", both invalid)."""
    if is_custom_matrix(cfg.hadamard_type):
        return "inplace"  # a custom matrix: only the inplace backend takes one (transform refused by the config)
    if cfg.backend == "inplace" or "inplace" in cfg.hadamard_type:
        if cfg.hadamard_type.startswith("inplace_"):
            cfg.hadamard_type = cfg.hadamard_type[len("inplace_"):]
        if cfg.hadamard_type == "random":
            cfg.hadamard_type = "random_hadamard"
        return "inplace"
    fp4 = is_mx_fp(data_type) or is_nv_fp(data_type)
    if cfg.backend == "transform":
        if cfg.fuse_online_to_weight:
            raise ValueError("rotation_config: backend='transform' does not support fuse_online_to_weight=True; "
                             "use backend='inplace' (or 'auto' with fuse_online_to_weight=True)")
        if not fp4:
            raise ValueError(f"rotation_config: backend='transform' only supports MXFP / NVFP schemes "
                             f"(data_type={data_type!r}); use backend='inplace' or 'auto'")
        if not cfg.allow_online_rotation:
            raise ValueError("rotation_config: backend='transform' needs allow_online_rotation=True")
        return "transform"
    fuse = cfg.fuse_online_to_weight
    if fuse is None and os.environ.get("AR_FUSE_ONLINE_ROTATION", "").lower() in ("1", "true", "yes", "on"):
        fuse = True
    if fuse:
        return "inplace"
    return "transform" if fp4 else "inplace"


def fill_block_size(cfg: RotationConfig, data_type: str) -> None:
    """upstream's normalize_rotation_config(data_type): block_size 32 for mx_fp and 16 for nv_fp when unset."""
    if cfg.block_size is None:
        if is_mx_fp(data_type):
            cfg.block_size = 32
        elif is_nv_fp(data_type):
            cfg.block_size = 16
            logger.warning("block_size is not set for data_type 'nv_fp'; defaulting to 16.")
        else:
            logger.warning("block_size is not set and cannot be inferred for data_type %r", data_type)
    elif is_mx_fp(data_type) and cfg.block_size != 32:
        logger.warning("data_type is 'mx_fp' but block_size=%d; recommended value is 32.", cfg.block_size)
    elif is_nv_fp(data_type) and cfg.block_size != 16:
        logger.warning("data_type is 'nv_fp' but block_size=%d; recommended value is 16.", cfg.block_size)


def is_custom_matrix(hadamard_type: Any) -> bool:
    """Whether rotation_config's hadamard_type is a custom matrix (a tensor or a {size: tensor} dict), not a preset."""
    return isinstance(hadamard_type, (torch.Tensor, dict))


class LinearRotation:
    """The per-linear transform backend of one run: the block operator, the weight rotation and the hooks."""

    def __init__(self, cfg: RotationConfig, data_type: str) -> None:
        from fastround import transform_ops as T

        backend = resolve_backend(cfg, data_type)
        if backend != "transform":
            raise ValueError(f"rotation_config resolves to the '{backend}' backend for data_type={data_type!r}: "
                             "fastround.rotation_inplace applies it, not the per-linear LinearRotation")
        if cfg.block_size is not None and cfg.block_size <= 0:
            raise ValueError(f"rotation_config: the transform backend needs a positive block_size, got "
                             f"{cfg.block_size}")
        if cfg.hadamard_type not in TRANSFORM_TYPES:
            raise ValueError(f"rotation_config: the transform backend supports hadamard_type 'hadamard' or "
                             f"'random_hadamard', got {cfg.hadamard_type!r}")
        if cfg.block_size is None and is_nv_fp(data_type):
            # upstream leaves a dict's unset block_size None and its transform then uses 32, for NVFP too; the
            # intended NVFP block is 16, and it is written so that a loader reads the size used
            fill_block_size(cfg, data_type)
        self.config = cfg
        self.block_size = int(cfg.block_size or 32)  # None: upstream's HadamardTransform default, 32
        self.random = cfg.hadamard_type == "random_hadamard"
        b = self.block_size
        if self.random:
            self.signs = T.random_signs(b).to(torch.int8)  # [b] ±1
            k = T.file_divisor(b)
            self.hadamard_k = T.library_matrix(k) if k > 1 else None  # [k, k] ±1
            self.matrix = T.random_hadamard_matrix(b, self.signs.to(torch.int64))  # M [b, b] fp32
        else:
            if not T.is_pow2(b):
                raise ValueError(f"rotation_config: block_size {b} must be a power of two for hadamard_type "
                                 "'hadamard' (Sylvester); random_hadamard accepts K * 2^m sizes")
            self.signs = None
            self.hadamard_k = None
            self.matrix = T.deterministic_hadamard_matrix(b)
        self.rotated: set[str] = set()
        # None: the online hook is the FWHT in fp32 rounded once (inference, loading, RTN); a dtype: SignRound's
        # tuning numerics (use_tuning_numerics)
        self.tuning_dtype: torch.dtype | None = None
        self.tuning_amp: torch.dtype | None = None  # autocast dtype of the tuning forwards (weight rotation)
        self._tuning_matrices: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # x -> x · M^T per b-block: the op (CPU, CUDA), its operands on each device and a dense fallback elsewhere
        self.block = T.BlockRotation(b, self.hadamard_k, self.signs, transpose=self.random)

    # -- the map x -> x · M^T on every b-long chunk of the last dimension -----------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.block_size:
            raise ValueError(f"[fastround.rotation] last dimension {x.shape[-1]} is not a multiple of block_size "
                             f"{self.block_size}")
        return self.block(x)

    def use_tuning_numerics(self, load_dtype: torch.dtype | None, amp: torch.dtype | None = None) -> None:
        """While SignRound tunes, the weight rotation and the online hook compute what upstream's patched
        WrapperLinear / WrapperWALayer compute, so that the tuned codes are upstream's bytes. load_dtype: the
        model's dtype as loaded (None restores the FWHT: the in-memory model then computes what its checkpoint
        loads as); amp: the autocast dtype of the tuning forwards (None: none). Upstream's activation transform is
        one dense matmul per b-long chunk, cast back to the activation's dtype, run under the caller's autocast,
        with that matmul's autograd:
          hadamard:        x.to(load_dtype) @ M, M rounded to load_dtype (bf16: ±0.17676 for ±1/sqrt(32));
          random_hadamard: x.to(fp32) @ M.T, M in fp32 (upstream's factory drops the random class's keyword
                           arguments, precision among them), a bf16 matmul under bf16 autocast.
        Its weight rotation is _rotate_weight_as_tuned. In bf16 either differs from the fp32 FWHT in the last bit
        of a few percent of values, which sign-SGD turns into a few percent of the codes."""
        self.tuning_amp = amp
        if load_dtype is None:
            self.tuning_dtype = None
        else:
            self.tuning_dtype = torch.float32 if self.random else load_dtype

    def _rotate_weight_as_tuned(self, w: torch.Tensor) -> torch.Tensor:
        """Upstream's weight rotation under SignRound: its patched WrapperLinear rotates at the first weight qdq,
        inside the tuning forward's autocast, so its fp32 product `w.float() @ M.T` runs as a matmul in the amp
        dtype (M rounded to it: bf16 ±0.17676), cast to the weight's dtype. Without amp: the fp32 product."""
        m = self.matrix.to(w.device)
        amp = self.tuning_amp
        with torch.autocast(w.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            rotated = w.reshape(-1, self.block_size).to(torch.float32) @ m.T  # [out * in / b, b]
        return rotated.reshape(w.shape).to(w.dtype)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """The online activation rotation x -> x · M^T of a rotated layer (its forward pre-hook)."""
        dtype = self.tuning_dtype
        if dtype is None:
            return self.apply(x)
        b = self.block_size
        if x.shape[-1] % b:
            raise ValueError(f"[fastround.rotation] last dimension {x.shape[-1]} is not a multiple of block_size {b}")
        key = (x.device, dtype)
        m = self._tuning_matrices.get(key)
        if m is None:
            m = self._tuning_matrices[key] = self.matrix.to(x.device, dtype)  # [b, b] M
        # the operand exactly as upstream passes it (a transposed view for random: BLAS's transposed path)
        return (x.reshape(-1, b).to(dtype) @ (m.T if self.random else m)).reshape(x.shape).to(x.dtype)

    def is_target(self, name: str, module: torch.nn.Module, cfg: dict[str, Any] | None) -> bool:
        """nn.Linear, not lm_head (by name, as upstream), weight quantized below 16 bits."""
        return (isinstance(module, torch.nn.Linear) and "lm_head" not in name and cfg is not None
                and int(cfg.get("bits", 16)) < 16)

    def rotate_module(self, name: str, module: torch.nn.Module) -> None:
        """Rotate the weight (fp32, cast back to its dtype; a new tensor, so a memory-mapped source is never
        written) and register the online pre-hook. Idempotent."""
        if name in self.rotated:
            return
        w = module.weight.data
        if w.shape[-1] % self.block_size:
            raise ValueError(f"[fastround.rotation] {name}: in_features {w.shape[-1]} is not a multiple of the "
                             f"rotation block_size {self.block_size}")
        if self.tuning_dtype is None:
            rotated = self.apply(w.to(torch.float32)).to(w.dtype)
        else:
            rotated = self._rotate_weight_as_tuned(w)
        module.weight.data = rotated
        module.register_forward_pre_hook(self._hook, prepend=True)
        self.rotated.add(name)

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (self.online(args[0]),) + tuple(args[1:])

    def export_buffer(self, name: str) -> torch.Tensor | None:
        """`hadamard_matrix` [b, b] fp32 (= M) for a rotated layer of a random rotation, else None."""
        return self.matrix.clone() if self.random and name in self.rotated else None


# Load-time activation step of layers whose checkpoint declares MXFP4 activations (FASTROUND_ROTATION_ACT_QDQ):
#   auto  (default) the fused rotation + MXFP4 qdq on CUDA tensors, as upstream's Triton fast path; the rotation
#         alone elsewhere (upstream's CPU fallback rotates, then its module's E8M0 act qdq runs, which fastround's
#         weight-only FPQuantLinear does not have)
#   fused the fused step on every device (CPU: the C++ op)
#   off   the rotation alone everywhere
ACT_QDQ_ENV = "FASTROUND_ROTATION_ACT_QDQ"
ACT_QDQ_MODES = ("auto", "fused", "off")


def act_qdq_mode() -> str:
    mode = os.environ.get(ACT_QDQ_ENV, "auto").strip().lower() or "auto"
    if mode not in ACT_QDQ_MODES:
        raise ValueError(f"{ACT_QDQ_ENV}={mode!r}: expected one of {list(ACT_QDQ_MODES)}")
    return mode


class MXFP4ActHook:
    """Forward pre-hook x <- MXFP4-qdq(x · M^T) (transform_ops.hadamard_mxfp4_act: per 32-group FP-Quant scale,
    output in the rotated space) where act_qdq_mode() says so, else x <- rotate(x). M is given as the op's operands:
    Sylvester (hadamard_k None) or a dense ±1 block matrix (hadamard_k = sign(M), K = block_size)."""

    def __init__(self, block_size: int, hadamard_k: torch.Tensor | None, rotate: Any, mode: str) -> None:
        self.block_size = block_size
        self.hadamard_k = hadamard_k  # [b, b] int8 CPU, or None
        self.rotate = rotate
        self.mode = mode
        self._device_k: dict[torch.device, torch.Tensor | None] = {}

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        from fastround import transform_ops as T

        b = self.block_size
        if x.device.type == "cpu":
            return T.hadamard_mxfp4_act(x, b, self.hadamard_k)
        if x.device.type == "cuda" and T.has_cuda_mxfp4_act_kernel() and b <= 32 and T.is_pow2(b):
            hk = self._device_k.get(x.device, ...)
            if hk is ...:  # copied once: the hook then neither copies nor waits per call
                hk = self._device_k[x.device] = None if self.hadamard_k is None else self.hadamard_k.to(x.device)
            return T.hadamard_mxfp4_act(x, b, hk)
        # no device kernel for this block or device: the CPU op on a host copy (same result, slow)
        return T.hadamard_mxfp4_act(x.cpu(), b, self.hadamard_k).to(x.device)

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.mode == "fused" or (self.mode == "auto" and x.device.type == "cuda"):
            return (self.fused(x),) + tuple(args[1:])
        return (self.rotate(x),) + tuple(args[1:])


def register_online_hooks(model: torch.nn.Module, config: dict[str, Any], data_type: str = "mx_fp",
                          buffers: dict[str, torch.Tensor] | None = None,
                          names: list[str] | None = None, act_mxfp4: set[str] | None = None) -> list[str]:
    """Load side (upstream's apply_rotation_hooks_from_config, input mode): a pre-hook x <- x · M^T on every
    rotated layer. `config` is quantization_config.rotation_config (block_size and hadamard_type are read, the
    block size resolved as at quantization: None -> 32, 16 for nv_fp); `names` are the rotated layers (default,
    as upstream: every nn.Linear not named lm_head). For random_hadamard, M is each layer's `hadamard_matrix`
    (from `buffers` by layer name, or the module's own buffer). Layers in `act_mxfp4` (their checkpoint declares
    MXFP4 activations) get MXFP4ActHook instead, upstream's fused fast path (act_qdq_mode()). Returns the hooked
    layer names."""
    from fastround import transform_ops as T
    from fastround.quant_linear import attach_rotation

    cfg = RotationConfig(block_size=config.get("block_size"), hadamard_type=config.get("hadamard_type", "hadamard"),
                         backend="transform")
    rot = LinearRotation(cfg, data_type)
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    mode = act_qdq_mode()
    for name in names:
        module = model.get_submodule(name)
        if rot.random:
            m = (buffers or {}).get(name, getattr(module, "hadamard_matrix", None))
            if m is None:
                raise ValueError(f"[fastround.rotation] {name}: random_hadamard needs its hadamard_matrix buffer")
            m32 = hadamard_from_buffer(m, rot.block_size, name)  # [b, b] fp32
            mt = m32.T.contiguous()

            def rotate(x: torch.Tensor, mt: torch.Tensor = mt) -> torch.Tensor:
                shape = x.shape
                xb = x.reshape(-1, shape[-1] // mt.shape[0], mt.shape[0]).float()
                return (xb @ mt.to(x.device)).reshape(shape).to(x.dtype)

            # x·M^T = M·x on each block: M's sign pattern as the op's dense K matrix (K = b, no butterflies)
            hadamard_k: torch.Tensor | None = torch.sign(m32).to(torch.int8)
        else:
            rotate, hadamard_k = rot.apply, None
        if act_mxfp4 is not None and name in act_mxfp4 and mode != "off":
            module.register_forward_pre_hook(MXFP4ActHook(rot.block_size, hadamard_k, rotate, mode), prepend=True)
        elif rot.random:
            module.register_forward_pre_hook(lambda mod, args, f=rotate: (f(args[0]),) + tuple(args[1:]),
                                             prepend=True)
        else:
            attach_rotation(module, rot._hook, rot.block)
    return list(names)


def hadamard_from_buffer(m: torch.Tensor, block_size: int, name: str = "hadamard_matrix") -> torch.Tensor:
    """A stored random Hadamard matrix M [b, b] as fp32, exact whatever dtype it was loaded in: every entry of
    diag(d)·T^T is ±1/sqrt(b), so its signs determine it (a model loaded in bf16 casts the buffer, and
    1/sqrt(32) is not a bf16 number)."""
    if tuple(m.shape) != (block_size, block_size):
        raise ValueError(f"[fastround.rotation] {name}: hadamard_matrix has shape {tuple(m.shape)}, expected "
                         f"[{block_size}, {block_size}] (rotation_config.block_size)")
    m32 = m.detach().to("cpu", torch.float32)
    scaled = m32.abs() * block_size ** 0.5
    if not bool(((scaled - 1).abs() < 1e-2).all()):
        raise ValueError(f"[fastround.rotation] {name}: hadamard_matrix is not a normalised Hadamard matrix "
                         f"(entries must be ±1/sqrt({block_size}))")
    if m.dtype in (torch.float32, torch.float64):
        return m32
    return torch.sign(m32) * (1.0 / block_size ** 0.5)
