"""The regular AutoRound flow on a model in memory: resolve per-layer schemes, capture the first block's inputs
from calibration data when the algorithm needs them, then quantize block by block through the C++ kernels.
RTN and OPT-RTN run here; SignRound (iters > 0) tunes each block in the same loop (signround.py)."""

from __future__ import annotations

import logging
import os
import random
import dataclasses
from dataclasses import asdict
from typing import Any

import torch

from fastround import _C
from fastround.layer_plan import LayerPlan, is_quantized, plan_layers, quantizes_weight
from fastround.mapped import PageReleaser, span
from fastround.modeling import amp_dtype, conv1d_type, is_moe_model, load_model, split_fused_experts
from fastround.quantized import NVFP4_ENCODING, ExportContext, QuantizedLayer
from fastround.rotation import (
    INPLACE_FORMATS,
    ROTATION_FORMATS,
    LinearRotation,
    RotationConfig,
    is_custom_matrix,
    parse_rotation_config,
    resolve_backend,
)
from fastround.schemes import QuantizationScheme, SchemeLike, is_nvfp4, scheme_to_job

logger = logging.getLogger("fastround")

_DEFAULT_DATASET = "NeelNanda/pile-10k"
# Encodings whose data type upstream's regular flow quantizes without any search (it registers no opt_rtn_nvfp4_v2
# function); their model-free kernels search only in model-free.
_NO_REGULAR_OPT_RTN = frozenset({"nvfp4_e5m3"})


def resolve_scheme(scheme: SchemeLike, overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The global scheme with every field set (act_* resolved as upstream's entry does), and its preset name."""
    import json

    job = {"source_dir": "", "output_dir": "", "scheme": scheme_to_job(scheme), "overrides": overrides,
           "fill_act_defaults": True, "regular_flow": True}
    try:
        fields = json.loads(_C.resolve_job_scheme(json.dumps(job)))
    except ValueError as exc:
        raise ValueError(f"scheme {scheme!r}: {exc}") from exc
    full = asdict(QuantizationScheme())
    full.update({k: None for k in full})
    full.update(fields)
    name = scheme.upper() if isinstance(scheme, str) and not overrides else ""
    return full, name


def _device_of(device_map: Any) -> torch.device:
    if device_map is None or device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device(f"cuda:{device_map}" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = str(device_map).split(",")[0].strip()
    if text.isdigit():
        return torch.device(f"cuda:{text}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"device_map {device_map!r} names no device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map {device_map!r}: CUDA is not available on this machine")
    return dev


def encoding_name(cfg: dict[str, Any], fmt: str) -> str:
    if is_nvfp4(cfg["data_type"], cfg["bits"]):
        return NVFP4_ENCODING
    enc = _C.encoding_for(int(cfg["bits"]), str(cfg["data_type"]), fmt)
    if enc is None:
        raise ValueError(f"bits={cfg['bits']} data_type={cfg['data_type']} has no encoding")
    return enc.name


class Compressor:
    """Upstream's CompressionOrchestrator for RTN / OPT-RTN / SignRound; created by `AutoRound(...)`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        platform: str = "hf",
        scheme: SchemeLike = "W4A16",
        overrides: dict[str, Any] | None = None,
        layer_config: dict | None = None,
        dataset: Any = _DEFAULT_DATASET,
        iters: int = 200,
        seqlen: int = 2048,
        nsamples: int = 128,
        batch_size: int = 8,
        low_gpu_mem_usage: bool = False,
        device_map: Any = 0,
        seed: int = 42,
        ignore_layers: str = "",
        quant_lm_head: bool = False,
        to_quant_block_names: Any = None,
        quant_nontext_module: bool = False,
        disable_opt_rtn: bool | None = None,
        amp: bool = True,
        model_dtype: Any = None,
        trust_remote_code: bool = True,
        format: str | None = None,
        threads: int | None = None,
        rotation_config: Any = None,
        **unused: Any,
    ) -> None:
        if iters is None:
            iters = 200
        if iters < 0:
            logger.warning("iters must be >= 0; reset to 200")
            iters = 200
        self.signround = None
        if iters > 0:
            from fastround.tune_settings import SignRoundSettings

            self.signround = SignRoundSettings.from_kwargs(iters, unused)
        else:
            for key in ("lr", "minmax_lr", "momentum", "nblocks", "enable_minmax_tuning", "enable_quanted_input"):
                if unused.pop(key, None) is not None:
                    logger.error("%s only applies to SignRound (iters > 0); ignored", key)
        if unused:
            logger.info("ignoring arguments not used by this algorithm: %s", ", ".join(sorted(unused)))
        self.scheme_arg = scheme
        self.scheme, self.scheme_name = resolve_scheme(scheme, dict(overrides or {}))
        if self.signround is not None:
            from fastround.tune_layers import require_tunable

            require_tunable(self.scheme, f"scheme {scheme!r}")
        self.rotation = None  # fastround.rotation.LinearRotation of the per-linear transform backend
        self.quarot = None  # fastround.quarot.QuaRotConfig (QuaRot's fixed rotations), applied in quantize()
        self.quarot_plan = None
        self.inplace = None  # RotationConfig of the inplace (QuaRot-style) backend, applied in quantize()
        self.inplace_plan = None  # fastround.rotation_inplace.InplacePlan once applied
        data_type = str(self.scheme["data_type"])
        parsed_rotation = parse_rotation_config(rotation_config, data_type)
        if isinstance(parsed_rotation, RotationConfig):
            if resolve_backend(dataclasses.replace(parsed_rotation), data_type) == "inplace":
                resolve_backend(parsed_rotation, data_type)  # strips the inplace_ prefix
                self.inplace = parsed_rotation
                self._check_inplace(parsed_rotation, format)
            else:
                self.rotation = LinearRotation(parsed_rotation, data_type)
        elif parsed_rotation is not None:
            self.quarot = parsed_rotation
        self.user_layer_config = dict(layer_config or {})
        self.dataset = dataset if dataset is not None else _DEFAULT_DATASET
        self.iters = iters
        self.seqlen, self.nsamples, self.batch_size = int(seqlen), int(nsamples), int(batch_size)
        self.low_gpu_mem_usage = bool(low_gpu_mem_usage)
        self.device = _device_of(device_map)
        self.seed = int(seed)
        self.ignore_layers = ignore_layers or ""
        self.quant_lm_head = bool(quant_lm_head)
        self.to_quant_block_names = to_quant_block_names
        self.quant_nontext_module = bool(quant_nontext_module)
        self.amp = bool(amp)
        self.format = format
        self.threads = threads
        self.tokenizer = tokenizer
        self.source_dir: str | None = None
        if isinstance(model, (str, os.PathLike)):
            self.model_name = os.fspath(model)
            self.model, self.tokenizer, self.source_dir = load_model(
                self.model_name, tokenizer, platform=platform, trust_remote_code=trust_remote_code,
                model_dtype=model_dtype,
            )
        elif isinstance(model, torch.nn.Module):
            self.model = model
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            path = getattr(getattr(model, "config", None), "_name_or_path", "")
            self.source_dir = path if path and os.path.isdir(path) else None
        else:
            raise TypeError(f"model must be a hub id, a local folder or a torch.nn.Module, got {type(model).__name__}")
        self.disable_opt_rtn, self.use_imatrix = self._opt_rtn_choice(disable_opt_rtn)
        if self.signround is not None:
            self.use_imatrix = True  # SignRound always calibrates (no imatrix: the data feeds the tuning)
        self.explicit_opt_rtn = disable_opt_rtn is False
        self.plan: LayerPlan | None = None
        self.layers: dict[str, QuantizedLayer] = {}
        self.quantized = False
        self._immediate_format: str | None = None  # set by quantize_and_save for one packed format
        self._packer: Any = None  # that format's LayerPacker while quantizing
        self.layer_config: dict[str, dict[str, Any]] = {}
        self.model_free = False
        self.resume_dir: str | None = None  # SignRound commits tuned blocks here (quantize_and_save's output_dir)
        self.tune_state: Any = None

    # -- routing ---------------------------------------------------------------------------------------------
    def _opt_rtn_choice(self, disable_opt_rtn: bool | None) -> tuple[bool, bool]:
        """(plain RTN?, collect an imatrix from calibration data?) as upstream 0.16.1 decides for iters=0. Without
        an imatrix the run is zero-shot, but unless plain RTN was asked for, each layer whose data type has an
        OPT-RTN search still runs it (unweighted), as upstream's optimized quantizer does on the zero-shot path."""
        s = self.scheme
        bits, act_bits, dt = int(s["bits"]), int(s.get("act_bits") or 16), str(s["data_type"])
        if disable_opt_rtn is None and dt == "int" and bits >= 8 and act_bits >= 8:
            logger.warning("disable_opt_rtn is turned on for W8A16/W8A8 quantization to improve efficiency")
            disable_opt_rtn = True
        if disable_opt_rtn:
            return True, False
        weight_scheme = isinstance(self.scheme_arg, str) and self.scheme_arg.upper().startswith("W")
        imatrix = s.get("sym") is not False and (
            (dt == "int" and bits < 8) or (dt in ("mx_fp", "mx_int") and bits <= 8) or (dt == "nv_fp" and bits == 4)
            or weight_scheme
        )
        return False, imatrix

    # -- quantize ----------------------------------------------------------------------------------------------
    def quantize(self) -> tuple[torch.nn.Module, dict[str, dict[str, Any]]]:
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        if self.threads:
            _C.set_num_threads(int(self.threads))
        model = self.model
        dtype = amp_dtype(model, self.amp, self.device)
        # Cast by the block loop, a block at a time (the same tensors in the same dtype as one model.to(dtype)).
        cast_to = dtype if next(model.parameters()).dtype != dtype else None
        split_fused_experts(model)  # expert views of the fused tensors: split before the cast or after, alike
        # the format check first: a refusal must leave the caller's model unrotated
        fmt = (self.format or "auto_round").replace(" ", "").split(",")[0]
        if self.inplace is None or self.format is not None:  # an inplace model may stay in memory (no format)
            self._check_rotation_format(fmt)
        from fastround import blockloop

        try:  # from the rotation on: the finally restores the inference numerics whatever raises
            if self.quarot is not None and self.quarot_plan is None:
                from fastround.quarot import apply_quarot

                # upstream's model-level pre-quantization stage: the whole model, in its loaded dtype, fp64 inside
                # (SignRound: a full-size R1 in upstream's staged numerics, so that the tuned codes are its bytes)
                self.quarot_plan = apply_quarot(model, self.quarot, tuning=self.signround is not None)
                for name, tensor in self.quarot_plan.model_tensors().items():
                    if tensor.is_floating_point():
                        model.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
                    else:
                        model.register_buffer(name, tensor)
            if self.inplace is not None and self.inplace_plan is None:
                from fastround.rotation_inplace import apply_inplace, inplace_group_size

                # upstream's model-level pre-quantization stage: the whole model, in its loaded dtype, fp64 inside
                cfg = self.inplace
                self.inplace_plan = apply_inplace(
                    model, cfg.hadamard_type, inplace_group_size(cfg.block_size, self.scheme.get("group_size")),
                    self._inplace_fuse(), cfg.allow_online_rotation)
            self.plan = plan_layers(
                model, self.scheme, self.user_layer_config, ignore_layers=self.ignore_layers,
                quant_lm_head=self.quant_lm_head, to_quant_block_names=self.to_quant_block_names,
                quant_nontext_module=self.quant_nontext_module, w8_asym_allowed="llm_compressor" in fmt,
            )
            self.layer_config = self.plan.layer_config
            for name in self.plan.quantized():
                if quantizes_weight(self.layer_config[name]):
                    encoding_name(self.layer_config[name], fmt)  # fail early on a scheme no encoding holds
            self._packer = self._immediate_packer()
            if self.signround is not None:
                if self.rotation is not None:
                    from fastround.signround import amp_of

                    # upstream builds its activation rotation in the dtype the model was loaded in
                    self.rotation.use_tuning_numerics(next(model.parameters()).dtype, amp_of(self, dtype))
                if cast_to is not None:
                    model.to(cast_to)  # tuning forwards whole blocks and the chain: cast once, as upstream
                blockloop.run_tuned(self, model, fmt)
            else:
                blockloop.run(self, model, fmt, cast_to)
        finally:
            self._packer = None
            if self.rotation is not None:
                self.rotation.use_tuning_numerics(None)
            if self.quarot_plan is not None:
                self.quarot_plan.use_tuning_numerics(False)
        self.quantized = True
        return model, self.layer_config

    def _inplace_fuse(self) -> bool | None:
        """fuse_online_to_weight: explicit, then AR_FUSE_ONLINE_ROTATION, then None (the model's layout decides)."""
        assert self.inplace is not None
        if self.inplace.fuse_online_to_weight is not None:
            return bool(self.inplace.fuse_online_to_weight)
        if os.environ.get("AR_FUSE_ONLINE_ROTATION", "").lower() in ("1", "true", "yes", "on"):
            return True
        return None

    def _check_inplace(self, cfg: RotationConfig, fmt: str | None) -> None:
        from fastround.rotation_inplace import PRESETS, custom_block_matrix, inplace_group_size

        if is_custom_matrix(cfg.hadamard_type):  # its shape and orthogonality now; its fit to the model at rotation
            custom_block_matrix(cfg.hadamard_type, inplace_group_size(cfg.block_size, self.scheme.get("group_size")))
        elif cfg.hadamard_type not in PRESETS:
            raise ValueError(f"rotation_config: the inplace backend supports hadamard_type {list(PRESETS)}, got "
                             f"{cfg.hadamard_type!r}")
        if not cfg.allow_online_rotation and cfg.fuse_online_to_weight is False:
            # upstream rotates every weight and registers no hook (a model that no longer computes its function)
            raise ValueError("rotation_config: allow_online_rotation=False with fuse_online_to_weight=False leaves "
                             "the unfused inplace rotation without its online hooks; allow online rotation or fuse")
        for name in (fmt or "").replace(" ", "").split(","):
            if name and name.split(":")[0] not in INPLACE_FORMATS:
                self._refuse_inplace_format(name)

    @staticmethod
    def _refuse_inplace_format(fmt: str) -> None:
        # upstream writes its packed formats with a rotation_config that its loader reads as the per-linear
        # transform backend: a checkpoint that loads without error and computes something else
        raise ValueError(f"format {fmt!r} cannot carry the inplace rotation backend (its online hooks on "
                         f"down_proj / o_proj and its fused norms have no serialised form a loader rebuilds); "
                         f"upstream supports only {list(INPLACE_FORMATS)} export for it: use format='fake'")

    def _check_rotation_format(self, fmt: str) -> None:
        if self.inplace is not None and fmt.split(":")[0] not in INPLACE_FORMATS:
            self._refuse_inplace_format(fmt)
        if self.inplace is not None:
            logger.warning("inplace rotation: the %s checkpoint holds the rotated weights but not the online hooks "
                           "(down_proj / o_proj, or every linear unfused); loaded as is it does not compute the "
                           "quantized model (as upstream's)", fmt)
        if (self.rotation is not None or self.quarot is not None) and self._writer_family(fmt) not in ROTATION_FORMATS:
            raise ValueError(f"format {fmt!r} cannot carry rotation_config (a rotated checkpoint needs its online "
                             f"activation rotation at load time); use one of {list(ROTATION_FORMATS)}")

    def _writer_family(self, fmt: str) -> str:
        """The writer a format name resolves to for this scheme (auto_round:llm_compressor is written by the
        llm_compressor writer, which has no rotation_config); a name the scheme cannot use keeps its prefix, and
        its own format check refuses it."""
        from fastround import export

        try:
            return export.resolve_format(fmt, self.scheme).family
        except ValueError:
            return fmt.split(":")[0]

    def rotate_layer(self, name: str, module: torch.nn.Module) -> None:
        """The transform backend's weight rotation and online hook for one layer, just before it is calibrated or
        quantized and after the block was cast to the run's dtype (upstream rotates at the first weight qdq)."""
        if self.rotation is not None and self.rotation.is_target(name, module, self.layer_config.get(name)):
            self.rotation.rotate_module(name, module)

    def _immediate_packer(self) -> Any:
        """Upstream's immediate packing: with one packed format, each layer is packed as soon as it is quantized
        and its float weight released, so RTN holds the model plus about one block, not a second copy."""
        if self._immediate_format is None:
            return None
        if self.signround is not None and self.plan is not None and self.plan.has_outside:
            return None  # the lm_head's second calibration pass runs the tuned blocks' float weights
        from fastround import export
        from fastround.export.packing import format_packer

        ctx = self.export_context()
        fmt = export.resolve_format(self._immediate_format, ctx.scheme, ctx.layer_config, ctx.regex_config)
        if fmt.family == "fake":
            return None
        return format_packer(ctx, fmt, check=False)

    # -- export ------------------------------------------------------------------------------------------------
    def export_context(self) -> ExportContext:
        from fastround.modeling import find_block_names

        assert self.plan is not None
        settings = {
            "iters": self.iters, "nsamples": self.nsamples, "seqlen": self.seqlen, "batch_size": self.batch_size,
            "dataset": self.dataset if isinstance(self.dataset, str) else None, "amp": self.amp,
            "low_gpu_mem_usage": self.low_gpu_mem_usage, "disable_opt_rtn": self.disable_opt_rtn,
            # upstream runs a rotation through its data-driven loop (a rotation config always asks for data)
            "zero_shot": not self.use_imatrix and self.rotation is None,
            "enable_quanted_input": False,
        }
        if self.signround is not None:
            settings.update(self.signround.record(int(self.scheme["bits"])))
            settings["scale_dtype"] = self.signround.scale_dtype
        return ExportContext(
            model=self.model, tokenizer=self.tokenizer, layers=self.layers, layer_config=self.layer_config,
            scheme=self.scheme, block_names=self.plan.block_names, settings=settings, source_dir=self.source_dir,
            user_layer_config=self.user_layer_config, regex_config=self.plan.regex_config,
            all_block_names=find_block_names(self.model, True), rotation=self.rotation,
            quarot=(self.quarot, self.quarot_plan) if self.quarot_plan is not None else None,
        )

    def save_quantized(
        self, output_dir: str | None = None, format: str | None = None, inplace: bool = True,
        return_folders: bool = False, **kwargs: Any,
    ) -> Any:
        """Write the quantized model (upstream's save_quantized files) in each format of a comma list."""
        if not self.quantized:
            logger.warning("call quantize() before save_quantized(); nothing was saved")
            return None
        from fastround import export

        if output_dir is None:
            return (self.model, None) if return_folders else self.model
        for fmt in (format or self.format or "auto_round").replace(" ", "").split(","):
            self._check_rotation_format(fmt)
        folders = export.save_all(self.export_context(), output_dir, format or self.format or "auto_round",
                                  shard_writer=bool(kwargs.get("_shard_writer", False)))
        folder: Any = folders[0] if len(folders) == 1 else folders
        return (self.model, folder) if return_folders else self.model

    def quantize_and_save(
        self, output_dir: str = "tmp_autoround", format: str | None = None, inplace: bool = True, **kwargs: Any
    ) -> tuple[torch.nn.Module, Any]:
        """quantize() then save into `<output_dir>/<model>-w4g128` (per-format subfolders for several)."""
        from fastround import export

        format = format or self.format or "auto_round"
        formats = export.parse_formats(format, self.scheme.get("bits"))
        for fmt in formats:
            export.check_format(fmt, self.scheme, self.scheme_name)
            self._check_rotation_format(fmt)
        export.check_output_dir(output_dir, self.source_dir)
        self._immediate_format = formats[0] if len(formats) == 1 and inplace else None
        self.resume_dir = output_dir if self.signround is not None else None
        try:
            self.quantize()
        finally:
            self._immediate_format = None
            self.resume_dir = None
        folder = os.path.join(output_dir, export.output_folder_name(self.model_name, self.scheme, formats))
        ctx = self.export_context()
        resolved = export.resolve_formats(",".join(formats), ctx.scheme, ctx.layer_config, ctx.regex_config)
        streamed = export.uses_shard_writer(resolved, ctx, inplace=inplace, need_calib=self.use_imatrix)
        saved = self.save_quantized(folder, ",".join(formats), return_folders=True, _shard_writer=streamed)
        if self.tune_state is not None:
            self.tune_state.finish()  # the output is complete: the tuned blocks need not be kept
            self.tune_state = None
        return saved


def record_layer(
    comp: Compressor, name: str, module: torch.nn.Module, cfg: dict[str, Any], fmt: str,
    imatrix: torch.Tensor | None, opt_rtn: bool, release: PageReleaser | None = None,
) -> None:
    """Quantize one layer through the C++ kernels, keep its codes for export, and leave the qdq weight (or its
    packed form). With `release`, the source weight's pages go back once it is replaced (see fastround.mapped)."""
    from fastround import ops

    conv = type(module) is conv1d_type()
    w = module.weight.data
    w2 = (w.t() if conv else w).detach().to("cpu").contiguous()  # [out, in]
    enc = encoding_name(cfg, fmt)
    gs = int(cfg["group_size"])
    opt_rtn = opt_rtn and enc not in _NO_REGULAR_OPT_RTN
    codes, scales, zeros = ops.encode_weight(w2, enc, int(cfg["bits"]), gs, bool(cfg["sym"]), opt_rtn, imatrix)
    if comp._packer is None:
        # The source weight lets the dequantizer keep upstream's -0.0 where a sym value rounds to zero.
        qdq = ops.dequantize_codes(codes, scales, zeros, enc, int(cfg["bits"]), gs, bool(cfg["sym"]), w2.dtype, w2)
        module.weight.data = (qdq.t() if conv else qdq).to(w.device).contiguous()
    record_codes(comp, name, module, cfg, fmt, codes, scales, zeros)
    source = span(w)
    if release is not None and source is not None:
        release([source])  # while `w` still holds the mapping: the range cannot have been reused


def record_codes(
    comp: Compressor, name: str, module: torch.nn.Module, cfg: dict[str, Any], fmt: str,
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    global_scales: dict[str, torch.Tensor] | None = None,
) -> None:
    """Keep a quantized layer's codes for export (RTN's or SignRound's; the module already holds its qdq weight),
    or pack them now and free the float weight when one packed format is being written."""
    conv = type(module) is conv1d_type()
    bias = module.bias.data.detach().to("cpu") if getattr(module, "bias", None) is not None else None
    layer = QuantizedLayer(
        name=name, encoding=encoding_name(cfg, fmt),
        scheme={k: cfg.get(k) for k in ("bits", "group_size", "sym", "data_type", "act_bits", "act_group_size",
                                        "act_sym", "act_data_type", "act_dynamic")},
        codes=codes.to("cpu"), scales=scales.to("cpu"),
        zeros=None if zeros is None or zeros.numel() == 0 else zeros.to("cpu"),  # FP encodings: no zero points
        bias=bias, conv1d=conv, global_scales=dict(global_scales or {}),
    )
    comp.layers[name] = layer
    if comp._packer is not None:
        # Packed now; the float weight and the codes go (the module is replaced by its packed form on export).
        layer.packed = comp._packer.pack(layer)
        layer.codes = torch.empty(codes.shape, dtype=torch.uint8, device="meta")
        module.weight = torch.nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)


def is_expert_layer(name: str) -> bool:
    return "expert" in name and "shared_expert" not in name


def layer_opt_rtn(comp: Compressor, name: str, moe: bool) -> bool:
    """Whether the layer searches its scale: off for plain RTN, and for MoE experts unless asked explicitly."""
    if comp.disable_opt_rtn:
        return False
    if moe and is_expert_layer(name) and not comp.explicit_opt_rtn:
        return False
    return True


__all__ = ["Compressor", "is_quantized", "is_moe_model", "record_layer", "record_codes", "layer_opt_rtn"]
