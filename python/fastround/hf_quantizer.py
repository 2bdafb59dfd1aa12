"""fastround's transformers quantizer: loads `auto-round`, `gptq` and `awq` checkpoints onto fastround's own layers
(fastround.quant_linear), so neither auto_round nor gptqmodel has to be importable. fastround.hf decides when
transformers routes a quant_method here.

Which layers are quantized, and in which tensor shapes, is read from the checkpoint's safetensors headers (the
tensors a layer has: `qweight` for INT words, `weight_packed` / an FP8 `weight` beside a `weight_scale` for FP);
bits, group size and symmetry come from the quantization_config: the global scheme, then auto_round's
`extra_config` (layer names, then regexes) or auto_gptq's `dynamic` overrides.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

logger = logging.getLogger("fastround")

_ST_DTYPES = {"I32": torch.int32, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I8": torch.int8}


class FastroundQuantConfig(QuantizationConfigMixin):
    """A checkpoint's quantization_config as written (auto-round, gptq or awq), kept verbatim so that
    save_pretrained writes it back unchanged."""

    def __init__(self, **kwargs: Any) -> None:
        if "quant_method" not in kwargs:
            raise ValueError("fastround: quantization_config has no quant_method")
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not k.startswith("_")}

    def get_loading_attributes(self) -> dict[str, Any]:
        return {}


@dataclass
class LayerPlan:
    """How one Linear is stored in the checkpoint."""

    kind: str  # "int" | "fp"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    layout: str = "gptq"  # int: gptq | gptq_v2 | awq
    encoding: str = ""  # fp: mxfp4 | mxfp8 | nvfp4_e5m3 | nvfp4
    act_nvfp4: bool = False  # nvfp4: the checkpoint declares NVFP4 activations under its static input global scale
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)


def read_headers(files: list[str]) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} over safetensors files, from their headers only."""
    out: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"fastround loads quantized checkpoints from safetensors only, got {path}")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (_ST_DTYPES.get(info["dtype"]), tuple(info["shape"]))
    return out


def _layer_overrides(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The per-layer fields a config sets for `name`: auto_round's extra_config (an exact name first, then the
    first regex that matches), auto_gptq's `dynamic` (`+:regex` entries, first match)."""
    extra = config.get("extra_config") or {}
    if name in extra:
        return dict(extra[name])
    for pattern, fields in extra.items():
        try:
            if re.search(pattern, name):
                return dict(fields)
        except re.error:
            continue
    for pattern, fields in (config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue
        raw = pattern[2:] if pattern.startswith("+:") else pattern
        try:
            if re.match(raw, name):
                return dict(fields)
        except re.error:
            continue
    return {}


def int_layout(config: dict[str, Any]) -> str:
    """The INT word layout a config's tensors use."""
    method = str(config.get("quant_method", "")).lower()
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"fastround: AWQ version {version!r} is not supported (only the GEMM layout)")
        return "awq"
    if method == "gptq":
        return "gptq_v2" if str(config.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else "gptq"
    packing = str(config.get("packing_format", "auto_round:auto_gptq")).lower()
    if "awq" in packing:
        return "awq"
    if packing in ("auto_round:auto_gptq", "auto_gptq", "auto_round:gptq"):
        return "gptq"
    if packing in ("auto_round", "auto_round:gptqmodel", "gptqmodel"):
        return "gptq_v2"
    raise ValueError(f"fastround: packing_format {packing!r} stores no INT layout fastround reads")


def _fp_encoding(fields: dict[str, Any], shapes: dict[str, tuple[Any, tuple[int, ...]]], in_features: int,
                 name: str) -> str:
    data_type = str(fields.get("data_type", ""))
    bits = int(fields.get("bits", 4))
    if "weight_global_scale" in shapes:
        # NVFP4 (data_type nv_fp): E4M3 scales per 16 inputs under a per-tensor global scale
        if shapes["weight_scale"][0] != torch.float8_e4m3fn or shapes["weight_scale"][1][1] * 16 != in_features:
            raise ValueError(f"fastround: layer {name}: NVFP4 weight_scale must be float8_e4m3fn [out, in/16], got "
                             f"{shapes['weight_scale'][0]} {shapes['weight_scale'][1]}")
        return "nvfp4"
    if "input_global_scale" in shapes:
        raise ValueError(f"fastround: layer {name} has an input_global_scale but no weight_global_scale")
    if "weight" in shapes and "weight_packed" not in shapes:
        return "mxfp8"
    scale_cols = shapes["weight_scale"][1][1]
    # NVFP4_E5M3 (data_type nvfp4_v2) has groups of 16; MXFP4 of 32
    if data_type.startswith("nv") or (bits == 4 and scale_cols * 16 == in_features and not data_type.startswith("mx")):
        return "nvfp4_e5m3"
    if scale_cols * 32 != in_features:
        raise ValueError(f"fastround: layer {name}: weight_scale {shapes['weight_scale'][1]} does not fit MXFP groups")
    return "mxfp4"


def _nvfp4_activations(fields: dict[str, Any], shapes: dict[str, Any], name: str) -> bool:
    """Whether an NVFP4 layer's inputs are quantize-dequantized at load, as upstream's NVFP4QuantLinear does in every
    forward (W4A4: act_bits 4, nv_fp4_with_static_gs under the stored input_global_scale)."""
    act_bits = int(fields.get("act_bits") or 16)
    if act_bits >= 16:
        return False
    if act_bits != 4 or "nv_fp" not in str(fields.get("act_data_type") or ""):
        raise ValueError(f"fastround: layer {name}: NVFP4 weights with act_bits {act_bits} / act_data_type "
                         f"{fields.get('act_data_type')!r} are not loadable (only nv_fp4 activations or none)")
    if "input_global_scale" not in shapes:
        raise ValueError(f"fastround: layer {name} declares NVFP4 activations but has no input_global_scale")
    return True


def plan_layers(config: dict[str, Any], headers: dict[str, tuple[Any, tuple[int, ...]]],
                linear_shapes: dict[str, tuple[int, int]]) -> dict[str, LayerPlan]:
    """Which Linear of the model (name -> (out, in)) is stored quantized, and how."""
    by_module: dict[str, dict[str, tuple[Any, tuple[int, ...]]]] = {}
    for key, spec in headers.items():
        module, _, suffix = key.rpartition(".")
        by_module.setdefault(module, {})[suffix] = spec
    method = str(config.get("quant_method", "")).lower()
    g_bits = int(config.get("bits", config.get("w_bit", 4)))
    g_group = int(config.get("group_size", config.get("q_group_size", 128)))
    g_sym = (not bool(config.get("zero_point", False))) if method == "awq" else bool(config.get("sym", True))
    plans: dict[str, LayerPlan] = {}
    for module, shapes in by_module.items():
        target = _module_name(module, linear_shapes)
        if target is None:
            continue
        out_f, in_f = linear_shapes[target]
        fields = {"bits": g_bits, "group_size": g_group, "sym": g_sym, "data_type": config.get("data_type", "int"),
                  **_layer_overrides(config, module)}
        if "qweight" in shapes:
            layout = int_layout(config)
            plan = LayerPlan("int", int(fields["bits"]), int(fields["group_size"]), bool(fields["sym"]), layout)
        elif "weight_scale" in shapes and ("weight_packed" in shapes or "weight" in shapes):
            plan = LayerPlan("fp", encoding=_fp_encoding(fields, shapes, in_f, module))
            if plan.encoding == "nvfp4":
                plan.act_nvfp4 = _nvfp4_activations({**config, **fields}, shapes, module)
        else:
            continue
        plan.shapes = {k: v for k, v in shapes.items() if v[0] is not None}
        plans[target] = plan
    return plans


def _module_name(checkpoint_prefix: str, linear_shapes: dict[str, Any]) -> str | None:
    if checkpoint_prefix in linear_shapes:
        return checkpoint_prefix
    # A checkpoint saved from the base model lacks the task model's prefix (e.g. "model.").
    hits = [n for n in linear_shapes if n.endswith("." + checkpoint_prefix)]
    return hits[0] if len(hits) == 1 else None


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (module.out_features, module.in_features)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2 Conv1D: weight [in, out]
            out[name] = (int(module.weight.shape[1]), int(module.weight.shape[0]))
    return out


def convert_model(model: torch.nn.Module, config: dict[str, Any], checkpoint_files: list[str]) -> dict[str, LayerPlan]:
    """Replaces every Linear the checkpoint stores quantized with a QuantLinear / FPQuantLinear (on the Linear's
    device, meta while transformers builds the model). Returns the plan per layer."""
    from fastround.quant_linear import FPQuantLinear, QuantLinear

    plans = plan_layers(config, read_headers(checkpoint_files), _linear_shapes(model))
    for name, plan in plans.items():
        old = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = old.weight.device
        out_f, in_f = _linear_shapes_of(old)
        bias = plan.shapes.get("bias")
        bias_dtype = bias[0] if bias else torch.float16
        if plan.kind == "int":
            new: torch.nn.Module = QuantLinear(in_f, out_f, plan.bits, plan.group_size, plan.sym, plan.layout,
                                               bias=bias is not None, g_idx="g_idx" in plan.shapes,
                                               shapes=plan.shapes, device=device, bias_dtype=bias_dtype)
        else:
            new = FPQuantLinear(in_f, out_f, plan.encoding, bias=bias is not None, device=device,
                                bias_dtype=bias_dtype, act_nvfp4=plan.act_nvfp4,
                                input_global_scale="input_global_scale" in plan.shapes)
        setattr(parent, child, new)
    logger.info("fastround: %d quantized layer(s) loaded on fastround's layers (%s)", len(plans),
                ", ".join(sorted({p.layout if p.kind == "int" else p.encoding for p in plans.values()})) or "none")
    return plans


# The per-layer tensors of rotated checkpoints (rotation.LinearRotation.export_buffer, quarot.QuaRotPlan.layer_buffers)
ROTATION_BUFFERS = ("hadamard_matrix", "spinquant_r1_type", "spinquant_r1_size", "spinquant_r1_matrix",
                    "spinquant_r4_type", "spinquant_r4_size", "spinquant_r4_matrix")
# The model-level matrix the load side reads back: a random R3 (upstream saves it and its loader ignores it)
R3_MATRIX = "spinquant_R3_head"


def preregister_rotation_buffers(model: torch.nn.Module, config: dict[str, Any],
                                 checkpoint_files: list[str]) -> list[str]:
    """Registers, on each module the checkpoint gives one, the rotation buffers the export writes (hadamard_matrix
    of a random Hadamard rotation, QuaRot's spinquant_r{1,4}_{type,size,matrix}, and the model's spinquant_R3_head
    of a random R3) so that transformers loads them; the same shape, dtype and device as the module's other tensors
    (meta while transformers builds the model).
    Only for a config with rotation_config / spinquant_config: other checkpoints load as before.
    Returns the registered "module.buffer" names."""
    if not (config.get("rotation_config") or config.get("spinquant_config")):
        return []
    if config.get("spinquant_config"):
        from fastround.quarot import check_loadable

        check_loadable(config["spinquant_config"])
    # after convert_model: the quantized layers are fastround's modules, no longer nn.Linear
    modules = dict(model.named_modules())
    registered = []
    spinquant = config.get("spinquant_config") or {}
    for key, (dtype, shape) in read_headers(checkpoint_files).items():
        module_name, _, buf = key.rpartition(".")
        if buf == R3_MATRIX and spinquant.get("r3") and spinquant.get("random_r3") and dtype is not None:
            target = module_name if module_name in modules else ""  # the task model, or the base model's root
            like = next(iter(model.parameters()))
            model.get_submodule(target).register_buffer(buf, torch.zeros(shape, dtype=dtype, device=like.device))
            registered.append(f"{target}.{buf}" if target else buf)
            continue
        if buf not in ROTATION_BUFFERS:
            continue
        target = _module_name(module_name, modules) if module_name else None
        if target is None:
            raise ValueError(f"fastround: checkpoint tensor {key} belongs to no module of the model")
        if dtype is None:
            raise ValueError(f"fastround: checkpoint tensor {key} has a dtype fastround does not read")
        module = model.get_submodule(target)
        like = next(iter(module.buffers()), None)
        if like is None:
            like = next(iter(module.parameters()))
        module.register_buffer(buf, torch.zeros(shape, dtype=dtype, device=like.device))
        registered.append(f"{target}.{buf}")
    return registered


def mxfp4_activation_layers(config: dict[str, Any], names: list[str]) -> set[str]:
    """The layers whose checkpoint declares dynamic MXFP4 activations (act_bits 4, an mx_fp act_data_type, an mx_fp
    weight: the MXFP4 presets), from quantization_config and its extra_config entry for the layer. Upstream's fast
    path takes every layer of any mx_fp checkpoint (MXFP8 and 16-bit activations too); here only these."""
    out = set()
    for name in names:
        cfg = {**config, **_layer_overrides(config, name)}
        if (int(cfg.get("act_bits") or 16) == 4 and "mx_fp" in str(cfg.get("act_data_type") or "")
                and "mx_fp" in str(cfg.get("data_type") or "")):
            out.add(name)
    return out


def apply_rotation_hooks(model: torch.nn.Module, config: dict[str, Any], plans: dict[str, LayerPlan]) -> list[str]:
    """Registers the online rotations of a loaded checkpoint through the modules that apply them at quantization
    (fastround.rotation for rotation_config, fastround.quarot for spinquant_config). Returns the hooked layers.

    rotation_config: the rotated layers are the quantized ones not named lm_head (what the export rotates; upstream's
    loader hooks every Linear not named lm_head, which is the same set when no Linear is kept in full precision).
    For random_hadamard a layer without its own hadamard_matrix (upstream saves one shared copy: safetensors keeps
    one name per shared tensor) takes the checkpoint's, which must then be one matrix."""
    hooked: list[str] = []
    rotation_config = config.get("rotation_config")
    if rotation_config:
        from fastround import rotation

        if not isinstance(rotation_config, dict):
            raise ValueError(f"fastround: rotation_config must be a dict, got {type(rotation_config).__name__}")
        if rotation_config.get("algorithm", "hadamard") != "hadamard":
            raise ValueError(f"fastround: rotation_config algorithm {rotation_config.get('algorithm')!r} is not "
                             "loadable (hadamard only)")
        data_type = str(config.get("data_type", "mx_fp"))
        known = {f.name for f in dataclass_fields(rotation.RotationConfig)} - {"algorithm"}
        cfg = rotation.RotationConfig(**{k: v for k, v in rotation_config.items() if k in known})
        # what the checkpoint's own fields resolve to: AR_FUSE_ONLINE_ROTATION steers quantization, not loading
        cfg.fuse_online_to_weight = bool(cfg.fuse_online_to_weight)
        if rotation.resolve_backend(cfg, data_type) == "inplace":
            # upstream's packed export of an inplace rotation (an int scheme, or fused / inplace_* asked for): its
            # loader would hook every Linear as the per-linear transform, which this model was not rotated for
            raise ValueError(f"fastround: rotation_config {rotation_config} with data_type {data_type!r} is upstream's "
                             "inplace backend, whose online hooks (down_proj / o_proj) and fused norms no checkpoint "
                             "describes; it cannot be loaded (quantize it again with format='fake' and keep the "
                             "in-memory model, or use the quarot rotation)")
        names = [n for n in plans if "lm_head" not in n]
        buffers = {n: model.get_submodule(n).hadamard_matrix for n in names
                   if getattr(model.get_submodule(n), "hadamard_matrix", None) is not None}
        if rotation_config.get("hadamard_type") == "random_hadamard" and len(buffers) < len(names):
            stored = [m for key, m in model.named_buffers() if key.endswith(".hadamard_matrix")]
            if not stored:
                raise ValueError("fastround: rotation_config is random_hadamard but the checkpoint has no "
                                 "hadamard_matrix tensor")
            if any(not torch.equal(m, stored[0]) for m in stored[1:]):
                missing = sorted(set(names) - set(buffers))[0]
                raise ValueError(f"fastround: {missing} has no hadamard_matrix and the checkpoint's differ, so "
                                 "which one it was rotated with is unknown")
            for n in names:
                buffers.setdefault(n, stored[0])
        hooked += rotation.register_online_hooks(model, rotation_config, data_type, buffers, names=names,
                                                 act_mxfp4=mxfp4_activation_layers(config, names))
    if config.get("spinquant_config"):
        from fastround import quarot

        by_pos = quarot.register_online_hooks(model, config["spinquant_config"])
        hooked += by_pos["r1"] + by_pos["r4"] + by_pos["r3"]
    if hooked:
        logger.info("fastround: online rotation hooks on %d layer(s)", len(hooked))
    return hooked


def _linear_shapes_of(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    return int(module.weight.shape[1]), int(module.weight.shape[0])


class FastroundHfQuantizer(HfQuantizer):
    """transformers' HfQuantizer over fastround's layers; loads pre-quantized checkpoints only."""

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.plans: dict[str, LayerPlan] = {}
        self.rotation_buffers: list[str] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.device_map = kwargs.get("device_map")

    def _config_dict(self) -> dict[str, Any]:
        cfg = self.quantization_config
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("fastround's transformers quantizer loads pre-quantized checkpoints only; quantize with "
                             "fastround.AutoRound first")
        if not checkpoint_files:
            raise ValueError("fastround: transformers passed no checkpoint files to read the packed layout from")
        config = self._config_dict()
        self.plans = convert_model(model, config, list(checkpoint_files))
        self.rotation_buffers = preregister_rotation_buffers(model, config, list(checkpoint_files))

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for name in self.plans:
            for buf_name, buf in model.get_submodule(name).named_buffers(recurse=False):
                if buf.device.type == "meta":
                    raise ValueError(f"fastround: the checkpoint has no tensor {name}.{buf_name}")
        for key in self.rotation_buffers:
            if model.get_buffer(key).device.type == "meta":
                raise ValueError(f"fastround: the checkpoint's tensor {key} was not loaded")
        apply_rotation_hooks(model, self._config_dict(), self.plans)
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True


__all__ = ["FastroundHfQuantizer", "FastroundQuantConfig", "LayerPlan", "ROTATION_BUFFERS", "apply_rotation_hooks",
           "convert_model", "int_layout", "plan_layers", "preregister_rotation_buffers", "read_headers"]
