"""What the regular flow hands from quantization to export: each layer in the unpacked form every producer
(RTN, OPT-RTN, SignRound) gives the packers, and the run facts the formats write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


NVFP4_ENCODING = "nvfp4"  # E2M1 codes, E4M3 group scales, global scales: packed in Python (export/packing.py)


@dataclass
class QuantizedLayer:
    """One quantized Linear / Conv1D, before packing (the C++ CodesBuffers of its encoding-table row)."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    encoding: str  # encoding-table row: int_gptq, int_awq, mxfp4, mxfp8, nvfp4_e5m3; nvfp4 (Python-side)
    scheme: dict[str, Any]  # effective scheme fields (bits, group_size, sym, data_type, act_*)
    codes: torch.Tensor  # [out, in] uint8: INT codes in [0, 2^bits); E2M1 nibbles; E4M3 bytes
    # INT [out, G] float16 (OPT-RTN: the weight's dtype, cast to fp16 when packed); MXFP [out, in/32] uint8 E8M0;
    # NVFP4_E5M3 [out, in/16] uint8 UE5M3; NVFP4 [out, in/16] uint8 E4M3 bytes
    scales: torch.Tensor
    zeros: torch.Tensor | None  # INT [out, G] int32 zero points; None for FP encodings
    bias: torch.Tensor | None
    conv1d: bool = False  # the module is HF Conv1D (weight stored [in, out]); codes are still [out, in]
    # Immediate packing (one format, quantize_and_save): the format's tensors, made right after the layer was
    # quantized; `codes` is then a meta tensor that only keeps the shape.
    packed: list[tuple[str, torch.Tensor]] | None = None
    # NVFP4: weight_global_scale and (act_bits <= 8) input_global_scale, [1] fp32 each, written as they are
    global_scales: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ExportContext:
    """Everything a format writer needs once quantize() has run."""

    model: torch.nn.Module  # quantized layers hold their qdq weights (what format "fake" saves)
    tokenizer: Any | None
    layers: dict[str, QuantizedLayer]  # every quantized layer, by module path
    # upstream's resolved layer_config: every layer name -> scheme fields + scale_dtype, fixed_by_user,
    # in_blocks (unquantized layers carry bits 16); user pattern keys are kept as given
    layer_config: dict[str, dict[str, Any]]
    scheme: dict[str, Any]  # the global resolved scheme fields
    block_names: list[list[str]]  # quantized blocks per block group, e.g. [["model.layers.0", ...]]
    # run arguments written into quantization_config; the writers read iters (0: RTN, which serialises
    # upstream's RTN defaults), amp, low_gpu_mem_usage, enable_quanted_input, scale_dtype, to_quant_block_names,
    # static_kv_dtype / static_attention_dtype (+ _granularity), the SignRound ones (lr, minmax_lr, nsamples,
    # seqlen, batch_size, gradient_accumulate_steps, enable_minmax_tuning, enable_norm_bias_tuning) and
    # zero_shot (no calibration data: upstream's zero-shot block loop, which orders shard writes; absent, it
    # follows disable_opt_rtn)
    settings: dict[str, Any] = field(default_factory=dict)
    source_dir: str | None = None  # local folder of the source model (remote code, extra files), if any
    user_layer_config: dict[str, Any] = field(default_factory=dict)  # layer_config keys as the user gave them
    # user pattern keys (and ignore names that are no quantizable layer) -> their resolved scheme dict, as
    # upstream's regex_config: written as regex entries of extra_config / gptq `dynamic` / awq's skip list
    regex_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    # every block group of the model, quantized or not (None: same as block_names); awq lists the others
    all_block_names: list[list[str]] | None = None
    # the per-linear Hadamard rotation of the run (fastround.rotation.LinearRotation), None without one: the
    # writers add its rotation_config and, for random_hadamard, each rotated layer's hadamard_matrix
    rotation: Any = None
    # QuaRot's (QuaRotConfig, QuaRotPlan) when the model was rotated: spinquant_config and per-layer buffers
    quarot: Any = None
