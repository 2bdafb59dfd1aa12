"""The inplace Hadamard backend of `rotation_config` (transforms-and-formats.md §1.6, upstream's QuaRot-style
residual rotation for any weight dtype): the model is rotated once, before quantization, so that it computes the
same function, with forward pre-hooks for the rotations the weights cannot absorb.

Modes (group size g from rotation_config.block_size, None / <= 0: full dimension):
  fused, full      norms fused and γ = 1 (LayerNorm models: embeddings and o/out projections centred, LayerNorm
                   -> RMSNorm), lm_head untied; the residual stream r -> r·Q (embeddings, the input side of
                   lm_head / q / k / v / MLP-in, the output side of o / MLP-out); MLP-out's input by the
                   intermediate rotation (online hook); v's output per head and o's input per head plus a
                   cross-head rotation over the heads axis (online hook on o).
  fused, grouped   every rotation above block-diagonal g×g, o and MLP-out also rotated on their inputs (group
                   hooks), no per-head v/o rotation.
  unfused          no norm fusion, embeddings untouched: every q/k/v/o/MLP linear rotated on its input with its
                   own pre-hook (full or grouped).
Presets: hadamard (deterministic: Sylvester, or H_K ⊗ Sylvester with K from upstream's file), random_hadamard
(diag(d)·Tᵀ per size, d from the global torch RNG, one matrix per size), quarot_hadamard (a random residual Q in
full mode, everything else deterministic; grouped: as hadamard, since upstream's fast_hadamard_transform path is
Sylvester too). Custom: hadamard_type a g×g tensor M or a {g: M} dict (upstream's rotation_matrix Tensor / dict),
grouped mode only: every rotation above is x·Mᵀ per g-block (residual and online sites alike, as upstream), the
weights by the fp64 product with M in fp64, the hooks by M in fp32 (transform_ops' dense block map, rounded once).

Numerics: weights in fp64 and cast back, as upstream: a deterministic block by the FWHT kernel unnormalised, divided
by upstream's scale sqrt(n) rounded to fp32 (torch.tensor(n).sqrt()), so the rotated weights are upstream's bits; a
random one as the fp64 product with the fp64 matrix. Online hooks run the FWHT kernel in the activation's dtype
(computed in fp32, rounded once). Deviations from upstream (docs/compatibility.md): a v_proj bias is rotated with
its weight; unfused mode always registers its hooks; unsupported head counts are refused up front; a custom matrix
is checked (square, orthogonal, g×g for the block size; upstream ignores a dict in full mode and a size it does not
find)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fastround import transform_ops as T
from fastround.quarot import _hook, fuse_norm, untie_lm_head
from fastround.rotation import is_custom_matrix

logger = logging.getLogger("fastround")

PRESETS = ("hadamard", "random_hadamard", "quarot_hadamard")
# How far M·Mᵀ (fp64) may be from the identity for a custom matrix: an fp32 QR factor is within ~1e-6; a matrix
# given in a half type is as orthogonal as its rounding allows (bf16 1/sqrt(32) is off by ~1e-3), hence the eps term
ORTHOGONALITY_ATOL = 1e-4


def orthogonality_atol(dtype: torch.dtype) -> float:
    return max(ORTHOGONALITY_ATOL, 8 * torch.finfo(dtype).eps)


def custom_block_matrix(hadamard_type: Any, group_size: int | None) -> torch.Tensor:
    """The g×g matrix M of a custom hadamard_type for group size g (None: full-dimension mode), checked: upstream
    refuses a tensor in full mode but silently ignores a dict there (a random residual rotation instead), and in
    grouped mode silently falls back to the Sylvester Hadamard when no matrix has the group's size; it never checks
    orthogonality. Each of those is refused here, naming the option."""
    what = "rotation_config: a custom rotation matrix (hadamard_type a tensor or a {size: tensor} dict)"
    if group_size is None:
        raise ValueError(f"{what} needs the inplace backend's grouped mode: set block_size to the matrix size (a "
                         "positive value; unset, it is the scheme's group_size), not a full-dimension <= 0 / -1")
    if isinstance(hadamard_type, dict):
        for key, t in hadamard_type.items():
            if isinstance(key, bool) or not isinstance(key, int) or not isinstance(t, torch.Tensor):
                raise ValueError(f"{what}: every entry must be int size -> tensor, got {key!r} -> "
                                 f"{type(t).__name__}")
        if group_size not in hadamard_type:
            raise ValueError(f"{what}: grouped mode with block_size {group_size} needs a matrix of size "
                             f"{group_size}; the dict has sizes {sorted(hadamard_type)} (upstream would silently "
                             "use the Sylvester Hadamard instead)")
        unused = sorted(k for k in hadamard_type if k != group_size)
        if unused:  # upstream takes the group's size and ignores the rest too
            logger.warning("rotation_config: block_size %d uses hadamard_type[%d]; sizes %s are not used",
                           group_size, group_size, unused)
        matrix = hadamard_type[group_size]
        label = f"hadamard_type[{group_size}]"
    else:
        matrix, label = hadamard_type, "hadamard_type"
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"rotation_config: {label} must be a square matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] != group_size:
        raise ValueError(f"rotation_config: {label} is {matrix.shape[0]}×{matrix.shape[1]} but block_size is "
                         f"{group_size}; set block_size={matrix.shape[0]} (upstream would silently use the "
                         "Sylvester Hadamard instead)")
    if not matrix.is_floating_point() or not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"rotation_config: {label} must be a finite floating-point matrix, got {matrix.dtype}")
    m = matrix.detach().cpu().to(torch.float64)
    err = float((m @ m.t() - torch.eye(group_size, dtype=torch.float64)).abs().max())
    atol = orthogonality_atol(matrix.dtype)
    if err > atol:
        raise ValueError(f"rotation_config: {label} must be orthogonal (M·Mᵀ = I within {atol:.3g}), "
                         f"off by {err:.3g}: the rotated model would not compute the original function")
    return matrix


@dataclass(frozen=True)
class Layout:
    """Where the rotated modules live (upstream's RotationMapping): paths from the model, or from each layer."""

    embedding: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    positional: str | None = None
    layers: str = "model.layers"
    attn_norm: str = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_in: tuple[str, ...] = ("mlp.up_proj", "mlp.gate_proj")
    mlp_out: str = "mlp.down_proj"
    final_norm: str = "model.norm"
    inter_attr: str = "intermediate_size"


_LLAMA = Layout()
_OPT = Layout(embedding="model.decoder.embed_tokens", positional="model.decoder.embed_positions",
              layers="model.decoder.layers", attn_norm="self_attn_layer_norm", o="self_attn.out_proj",
              mlp_norm="final_layer_norm", mlp_in=("fc1",), mlp_out="fc2",
              final_norm="model.decoder.final_layer_norm", inter_attr="ffn_dim")
LAYOUTS = {"llama": _LLAMA, "LlamaForCausalLM": _LLAMA, "qwen2": _LLAMA, "Qwen2ForCausalLM": _LLAMA,
           "qwen3": _LLAMA, "Qwen3ForCausalLM": _LLAMA, "opt": _OPT, "OPTForCausalLM": _OPT}


def layout_of(model: torch.nn.Module) -> tuple[Layout, bool]:
    """(layout, registered): by model_type, then class name; else the Llama layout, with a warning (as upstream)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    for key in (model_type, type(model).__name__):
        if key in LAYOUTS:
            return LAYOUTS[key], True
    logger.warning("inplace rotation: no layout registered for %s (model_type %r); using the Llama layout",
                   type(model).__name__, model_type)
    return _LLAMA, False


def _get(root: torch.nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def upstream_sqrt(n: int) -> float:
    """Upstream's normaliser: torch.tensor(n).sqrt(), an fp32 value (its fp64 weights are divided by it)."""
    return float(torch.tensor(n).sqrt())


class InplaceRotation:
    """rows -> rows·A on every n-block of the last dimension. Deterministic: A = Tᵀ, T = (H_K ⊗ H_2^m)/sqrt(n) with
    K = 1 for a power of two and otherwise the largest order of upstream's file with n/K a power of two (its
    get_hadK). Random: A = a dense fp64 matrix, M = diag(d)·Tᵀ itself (the full residual Q: W·Q) or Mᵀ (every other
    site: upstream's x·Mᵀ); the online map of Mᵀ is the FWHT with the signs after Tᵀ's transpose. Custom: A = Mᵀ
    for a user's M (fp64), its online map a dense product."""

    def __init__(self, n: int, signs: torch.Tensor | None = None, residual_q: bool = False,
                 matrix: torch.Tensor | None = None) -> None:
        k = 1 if matrix is not None or T.is_pow2(n) else T.file_divisor(n)
        self.n = n
        self.hk = T.library_matrix(k) if k > 1 else None  # [K, K] int8 ±1
        self.signs = signs  # [n] int8 ±1 (random) or None
        self.matrix = matrix  # [n, n] custom M (any float dtype) or None
        self.dense: torch.Tensor | None = None  # [n, n] fp64 right multiplier A (random, custom)
        if matrix is not None:  # A = Mᵀ: upstream's flat @ H.T with H = M in fp64
            self.dense = matrix.detach().cpu().to(torch.float64).t()
        elif signs is not None:
            m = self.unnormalised(torch.diag(signs.to(torch.float64))) / upstream_sqrt(n)  # M = diag(d)·Tᵀ
            self.dense = m if residual_q else m.t()  # a transposed view, as upstream's `@ H.T` (BLAS's path)
        self.residual_q = residual_q

    def unnormalised(self, t: torch.Tensor) -> torch.Tensor:
        """fp64 rows·(H_K ⊗ H_2^m)ᵀ per n-block (exact: ±1 sums of the fp64 values)."""
        return T.hadamard_transform(t.to(torch.float64).contiguous(), self.n, self.hk, normalize=False)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """rows·A per block in fp64 (t any float dtype; the caller casts back)."""
        if self.dense is None:
            return self.unnormalised(t) / upstream_sqrt(self.n)
        shape = t.shape
        return (t.detach().to(torch.float64).reshape(-1, self.n) @ self.dense.to(t.device)).reshape(shape)

    def block_map(self) -> T.BlockRotation | CustomBlockMap:
        """The online map x -> x·A in x's dtype (FWHT kernel); not defined for the residual Q (never online).
        Random: x·Mᵀ = x·T·diag(d), the kernel's transpose with the signs after. Custom: x·Mᵀ, a dense product."""
        if self.residual_q:
            raise AssertionError("the residual rotation has no online map")
        if self.matrix is not None:
            return CustomBlockMap(self.matrix)
        return T.BlockRotation(self.n, self.hk, self.signs, transpose=self.signs is not None)


class CustomBlockMap:
    """x [..., cols] -> x·Mᵀ on each n-block of the last dimension: transform_ops' dense block map (fp32, rounded
    once to x's dtype; differentiable), Mᵀ in fp32 copied to each device once."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.rows_of_t = matrix.detach().cpu().to(torch.float32).t().contiguous()  # [n, n] Mᵀ
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._on.get(x.device)
        if rows is None:
            rows = self._on[x.device] = self.rows_of_t.to(x.device)
        return T._dense_apply(x, rows)


class CrossHeadMap:
    """x [..., heads·hd] -> the rotation over the heads axis (x viewed [heads, hd], each of the hd columns)."""

    def __init__(self, rot: InplaceRotation, head_dim: int) -> None:
        self.rot, self.head_dim = rot, head_dim
        self.map = rot.block_map()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.shape[-1] // self.head_dim
        xt = x.reshape(-1, heads, self.head_dim).transpose(1, 2).contiguous()  # [rows, hd, heads]
        return self.map(xt).transpose(1, 2).reshape(x.shape)


def _cross_head_weight(w: torch.Tensor, rot: InplaceRotation, head_dim: int) -> torch.Tensor:
    out_f, in_f = w.shape
    heads = in_f // head_dim
    wt = w.reshape(out_f, heads, head_dim).transpose(1, 2)  # [out, hd, heads]
    return rot.weight(wt.contiguous()).transpose(1, 2).reshape(out_f, in_f)


def _rotate_input(lin: torch.nn.Linear, rot: InplaceRotation) -> None:
    lin.weight.data = rot.weight(lin.weight.data).to(lin.weight.dtype)


def _rotate_output(lin: torch.nn.Linear, rot: InplaceRotation, bias: bool = True) -> None:
    """W <- Aᵀ·W per n-block of out_features (the output y becomes y·A), and the bias with it."""
    w = lin.weight.data
    lin.weight.data = rot.weight(w.t()).t().contiguous().to(w.dtype)
    if bias and lin.bias is not None:
        lin.bias.data = rot.weight(lin.bias.data).to(lin.bias.dtype)


class RMSNormOne(torch.nn.Module):
    """The RMSNorm (weight 1, kept as a buffer as upstream's) that replaces a LayerNorm once its mean is baked into
    the weights; computed in fp32 and rounded once."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def _center_rows(t: torch.Tensor) -> torch.Tensor:
    w = t.to(torch.float64)
    return (w - w.mean(dim=-1, keepdim=True)).to(t.dtype)


def _prepare_fused(model: torch.nn.Module, lay: Layout, layers: list[torch.nn.Module]) -> None:
    """Untie, centre (LayerNorm models), fuse every norm into its readers, and LayerNorm -> RMSNorm."""
    emb, head = _get(model, lay.embedding), _get(model, lay.lm_head)
    untie_lm_head(model, emb, head)
    layer_norm = isinstance(_get(layers[0], lay.attn_norm), torch.nn.LayerNorm)
    if layer_norm:
        emb.weight.data = _center_rows(emb.weight.data)
        if lay.positional is not None:
            pos = _get(model, lay.positional)
            pos.weight.data = _center_rows(pos.weight.data)
    for layer in layers:
        fuse_norm(_get(layer, lay.mlp_norm), [_get(layer, p) for p in lay.mlp_in])
        fuse_norm(_get(layer, lay.attn_norm), [_get(layer, p) for p in (lay.q, lay.k, lay.v)])
    fuse_norm(_get(model, lay.final_norm), [head])
    if layer_norm:
        for layer in layers:
            for lin in (_get(layer, lay.o), _get(layer, lay.mlp_out)):
                w = lin.weight.data.to(torch.float64)  # the residual write minus its mean over the hidden axis
                lin.weight.data = (w - w.mean(dim=-2, keepdim=True)).to(lin.weight.dtype)
                if lin.bias is not None:
                    b = lin.bias.data.to(torch.float64)
                    lin.bias.data = (b - b.mean()).to(lin.bias.dtype)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.LayerNorm):
                parent, _, attr = name.rpartition(".")
                setattr(_get(model, parent) if parent else model, attr,
                        RMSNormOne(mod.normalized_shape[0], mod.eps, mod.weight.dtype, mod.weight.device))


@dataclass
class InplacePlan:
    """What apply_inplace did."""

    preset: str
    group_size: int | None
    fused: bool
    hooked: dict[str, str]  # layer name -> hook kind ("full", "group", "cross_head")


def _check_sizes(model: torch.nn.Module, lay: Layout, g: int | None, fused: bool,
                 custom: bool = False) -> tuple[int, int, int, int]:
    cfg = model.config
    hidden, inter, heads = int(cfg.hidden_size), int(getattr(cfg, lay.inter_attr)), int(cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None)
    head_dim = int(hd) if isinstance(hd, int) and hd > 0 else hidden // heads

    def decomposable(n: int) -> bool:
        if T.is_pow2(n):
            return True
        try:
            T.file_divisor(n)
            return True
        except ValueError:
            return False

    if g is not None:
        widths = (("hidden_size", hidden), ("intermediate size", inter), ("o_proj in_features", heads * head_dim))
        for what, n in widths:
            if n % g:
                raise ValueError(f"rotation_config: block_size {g} must divide {what} {n} (inplace backend)")
        if not custom and not decomposable(g):
            raise ValueError(f"rotation_config: block_size {g} is neither a power of two nor K·2^m with a known K")
        return hidden, inter, heads, head_dim
    need = [("hidden_size", hidden), ("intermediate size", inter), ("o_proj in_features", heads * head_dim)]
    if fused:
        need += [("num_attention_heads", heads)]
        if not T.is_pow2(head_dim):
            raise ValueError(f"rotation_config: the inplace backend's full fused mode needs a power-of-two head_dim, "
                             f"got {head_dim}; set block_size (grouped mode)")
    for what, n in need:
        if not decomposable(n):
            raise ValueError(f"rotation_config: no Hadamard matrix of order {what}={n} (a power of two or K·2^m with "
                             "K in upstream's file) for the inplace backend's full-dimension mode; set block_size")
    return hidden, inter, heads, head_dim


def apply_inplace(model: torch.nn.Module, preset: str | torch.Tensor | dict[int, torch.Tensor],
                  group_size: int | None, fuse: bool | None, allow_online: bool = True) -> InplacePlan:
    """Rotate `model` in place (upstream's apply_rotation_transform with rotation_matrix=preset: a name, or a custom
    matrix for grouped mode); the online hooks stay registered. fuse None: fused for a registered layout, unfused
    otherwise (as upstream). allow_online=False is ignored when fused (as upstream) and refused unfused (upstream then
    rotates without hooks, a QUIRK). Random matrices are drawn from the global torch RNG, one per size, in upstream's
    order."""
    g = group_size if group_size is not None and group_size > 0 else None
    custom: InplaceRotation | None = None  # the one g-block rotation of every site (custom matrices)
    if is_custom_matrix(preset):
        matrix = custom_block_matrix(preset, g)
        custom = InplaceRotation(matrix.shape[0], matrix=matrix)
        name = "custom"
    elif not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"rotation_config: the inplace backend supports hadamard_type {list(PRESETS)} or a custom "
                         f"matrix, got {preset!r}")
    else:
        name = preset
    lay, registered = layout_of(model)
    fused = registered if fuse is None else bool(fuse)
    if not fused and not allow_online:
        raise ValueError("rotation_config: allow_online_rotation=False with the unfused inplace rotation (fuse_online"
                         "_to_weight False, or unset on an unregistered model) would leave the rotated weights "
                         "without their online hooks; allow online rotation or fuse")
    hidden, inter, heads, head_dim = _check_sizes(model, lay, g, fused, custom is not None)
    layers = list(_get(model, lay.layers))
    if fused and lay is _OPT and (not getattr(model.config, "do_layer_norm_before", True)
                                  or getattr(model.config, "word_embed_proj_dim", hidden) != hidden):
        raise NotImplementedError("rotation_config: the inplace backend's fused mode needs pre-LayerNorm OPT models "
                                  "without embedding projections (do_layer_norm_before=True, word_embed_proj_dim = "
                                  "hidden_size)")

    drawn: dict[int, torch.Tensor] = {}

    def signs(n: int) -> torch.Tensor:
        # upstream's random_hadamard_matrix: randint(0, 2) on the global CPU generator, one draw per size
        if n not in drawn:
            drawn[n] = (torch.randint(0, 2, (n,)) * 2 - 1).to(torch.int8)
        return drawn[n]

    random = name == "random_hadamard"

    def online(n: int) -> InplaceRotation:
        if custom is not None:  # grouped mode only: n is g
            return custom
        return InplaceRotation(n, signs(n) if random else None)

    residual: InplaceRotation | None = None
    if g is not None:
        residual = online(g)
    elif fused:
        residual = InplaceRotation(hidden, signs(hidden) if name != "hadamard" else None, residual_q=True)
    elif name == "quarot_hadamard":
        signs(hidden)  # upstream builds its random full-mode Q unfused too, unused: the RNG moves the same way
    hooked: dict[str, str] = {}

    def hook(lin: torch.nn.Linear, name: str, kind: str, fn: Any) -> None:
        if isinstance(fn, T.BlockRotation):
            pre_hook = _hook(fn)  # a QuantLinear could fold this one (quant_linear.attach_rotation)
        else:  # the cross-head and custom maps are no FWHT of the input: nothing may fold them

            def pre_hook(module: torch.nn.Module, args: tuple, fn: Any = fn) -> tuple:
                return (fn(args[0]),) + tuple(args[1:])

        lin.register_forward_pre_hook(pre_hook, prepend=True)
        hooked[name] = kind

    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        if fused:
            assert residual is not None
            _prepare_fused(model, lay, layers)
            emb = _get(model, lay.embedding)
            emb.weight.data = residual.weight(emb.weight.data).to(emb.weight.dtype)
            if lay.positional is not None:
                pos = _get(model, lay.positional)
                pos.weight.data = residual.weight(pos.weight.data).to(pos.weight.dtype)
            _rotate_input(_get(model, lay.lm_head), residual)
        for layer in layers:
            q, k, v, o = (_get(layer, p) for p in (lay.q, lay.k, lay.v, lay.o))
            mlp_in, down = [_get(layer, p) for p in lay.mlp_in], _get(layer, lay.mlp_out)
            if fused:
                assert residual is not None
                for lin in (q, k, v, *mlp_in):
                    _rotate_input(lin, residual)
                _rotate_output(o, residual)
                _rotate_output(down, residual)
                if g is not None:
                    grp = online(g)
                    _rotate_input(down, grp)
                    hook(down, names[id(down)], "group", grp.block_map())
                    _rotate_input(o, grp)
                    hook(o, names[id(o)], "group", grp.block_map())
                else:
                    rot_inter = online(inter)
                    _rotate_input(down, rot_inter)
                    hook(down, names[id(down)], "full", rot_inter.block_map())
                    rot_hd = online(head_dim)
                    # v's output per head v_h -> v_h·A (its bias too: upstream leaves it, a QUIRK), o's input per
                    # head by the same A, which the attention's mix over tokens carries through
                    _rotate_output(v, rot_hd)
                    _rotate_input(o, rot_hd)
                    rot_heads = online(heads)
                    o.weight.data = _cross_head_weight(o.weight.data, rot_heads, head_dim).to(o.weight.dtype)
                    hook(o, names[id(o)], "cross_head", CrossHeadMap(rot_heads, head_dim))
            else:
                for lin in (q, k, v, o, *mlp_in, down):
                    rot = online(g) if g is not None else online(lin.in_features)
                    _rotate_input(lin, rot)
                    hook(lin, names[id(lin)], "group" if g is not None else "full", rot.block_map())
    return InplacePlan(name, g, fused, hooked)


def inplace_group_size(block_size: int | None, scheme_group_size: int | None) -> int | None:
    """Upstream's compressor fills an unset block_size with the scheme's group_size; None / <= 0: full dimension."""
    bs = block_size if block_size is not None else scheme_group_size
    return int(bs) if bs is not None and int(bs) > 0 else None
