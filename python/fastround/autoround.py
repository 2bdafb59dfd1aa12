"""The AutoRound entry point: same arguments as upstream auto-round; model-free runs in C++."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from typing import Any

from fastround import _C
from fastround._hf import ModelSource, detect_unpackable_modules, resolve_source
from fastround.schemes import QuantizationScheme, SchemeLike, layer_config_to_job, scheme_to_job

logger = logging.getLogger("fastround")

# Keyword arguments ModelFreeCompressor takes as scheme overrides: every QuantizationScheme field, as upstream.
_SCHEME_FIELDS = tuple(f.name for f in fields(QuantizationScheme))
# Formats the model-free core writes (the encoding table's union); which a scheme accepts is checked there.
_MODEL_FREE_FORMATS = tuple(dict.fromkeys(f for enc in _C.encodings() for f in enc.model_free_formats))
_PARALLELISM_ENV = "AR_MODEL_FREE_SHARD_PARALLELISM"  # upstream's knob, honoured as the default

REGULAR_FLOW_MISSING = (
    "the regular (calibration/tuning) AutoRound flow is not available in this fastround version; "
    "use model_free=True, or iters=0 with disable_opt_rtn=True and a model-free scheme"
)


def _first_format(fmt: str | None) -> str:
    return str(fmt or "auto_round").lower().replace(" ", "").split(",")[0]


def is_model_free_supported(scheme: SchemeLike, overrides: dict[str, Any] | None = None) -> bool:
    """Whether model-free mode can produce `scheme` (after overrides). Never raises."""
    try:
        job = {"source_dir": "", "output_dir": "", "scheme": scheme_to_job(scheme), "overrides": overrides or {}}
        _C.resolve_job_scheme(json.dumps(job))
        return True
    except (ValueError, TypeError):
        return False


def _routable_format(fmt: str, scheme: SchemeLike, overrides: dict[str, Any]) -> bool:
    """Whether upstream auto-routes an RTN request in format `fmt` to model-free: the encoding table says."""
    try:
        job = {"source_dir": "", "output_dir": "", "scheme": scheme_to_job(scheme), "overrides": overrides or {}}
        fields = json.loads(_C.resolve_job_scheme(json.dumps(job)))
        enc = _C.encoding_for(int(fields.get("bits", 16)), str(fields.get("data_type", "int")), fmt)
    except (ValueError, TypeError):
        return False
    return fmt == "auto_round" if enc is None else fmt in enc.routed_formats


class ModelFreeCompressor:
    """Quantizes a safetensors checkpoint tensor by tensor in C++, without loading the model."""

    def __init__(
        self,
        model_name_or_path: str,
        output_dir: str | None = None,
        scheme: SchemeLike = "W4A16",
        layer_config: dict | None = None,
        ignore_layers: str = "",
        format: str | None = None,
        device: str = "cpu",
        quant_lm_head: bool = False,
        quant_nontext_module: bool = False,
        *,
        overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = True,
        threads: int | None = None,
        show_progress: bool = True,
        pad_partial_groups: bool = False,
        disable_opt_rtn: bool | None = None,
        shard_parallelism: int | None = None,
        stream: bool = True,
        _resolved_by_entry: bool = False,
        **unused: Any,
    ) -> None:
        if not isinstance(model_name_or_path, str):
            raise ValueError("model_free=True requires `model` to be a HuggingFace ID or local path string.")
        del device  # the C++ core runs on the CPU
        self.model_name_or_path = model_name_or_path
        self.output_dir = output_dir
        self.format = format
        self.scheme = scheme
        self.layer_config = layer_config_to_job(layer_config)
        self.ignore_layers = ignore_layers or ""
        self.quant_lm_head = bool(quant_lm_head)
        self.quant_nontext_module = bool(quant_nontext_module)
        # Upstream takes the scheme fields as keyword arguments and sets each non-None one on the scheme.
        given = {**(overrides or {}), **{k: unused.pop(k) for k in _SCHEME_FIELDS if k in unused}}
        self.overrides = {k: v for k, v in given.items() if v is not None}
        if self.overrides.pop("rotation_config", None):
            raise ValueError("rotation_config is not supported by model-free mode")
        self.trust_remote_code = trust_remote_code
        self.threads = threads or 0
        self.show_progress = show_progress
        self.pad_partial_groups = bool(pad_partial_groups)
        self.disable_opt_rtn = disable_opt_rtn
        self.shard_parallelism = _parallelism(shard_parallelism)
        self.stream = stream
        # Upstream's AutoRound entry fills unset act_* fields before model-free sees the scheme; its class does not.
        self.fill_act_defaults = bool(_resolved_by_entry)
        self.model = None
        self.model_free = True
        self.quantized = False
        if unused:
            logger.debug("model-free ignores arguments: %s", ", ".join(sorted(unused)))
        # Fail on a bad scheme now, as upstream does at construction.
        _C.resolve_job_scheme(json.dumps(self._job("", "", "auto_round")))

    def _job(
        self, source_dir: str, output_dir: str, fmt: str, detected: list[str] | None = None, src: ModelSource | None = None
    ) -> dict[str, Any]:
        return {
            "source_dir": source_dir,
            "output_dir": output_dir,
            "scheme": scheme_to_job(self.scheme),
            "overrides": self.overrides,
            "layer_config": self.layer_config,
            "ignore_layers": self.ignore_layers,
            "quant_lm_head": self.quant_lm_head,
            "quant_nontext_module": self.quant_nontext_module,
            "detected_ignore": detected or [],
            "format": fmt,
            "threads": self.threads,
            "pad_partial_groups": self.pad_partial_groups,
            "disable_opt_rtn": self.disable_opt_rtn,
            "shard_parallelism": self.shard_parallelism,
            "remote_shards": src.remote_shards if src else [],
            "source_revision": src.revision if src else "",
            "fill_act_defaults": self.fill_act_defaults,
        }

    def quantize(self) -> Any:
        raise NotImplementedError(REGULAR_FLOW_MISSING)

    def run(self) -> str:
        """Upstream's driver call: quantize into the constructor's output_dir and format; returns the folder."""
        return self.quantize_and_save(self.output_dir or "tmp_autoround", self.format or "auto_round")[1]

    def quantize_and_save(
        self, output_dir: str = "tmp_autoround", format: str = "auto_round", inplace: bool = True, **kwargs: Any
    ) -> tuple[None, str]:
        if _first_format(format) not in _MODEL_FREE_FORMATS:
            raise ValueError(
                f"format '{format}' is not supported by model-free output (use one of {list(_MODEL_FREE_FORMATS)}); "
                + REGULAR_FLOW_MISSING
            )
        src = resolve_source(self.model_name_or_path, stream=self.stream)
        source = src.directory
        if not os.path.exists(source):
            raise FileNotFoundError(f"[model_free] model path '{source}' does not exist")
        detected = []
        if os.path.isdir(source):
            # A diffusers pipeline is scanned per transformer component, as upstream does.
            for sub in _C.diffusion_components(os.fspath(source)) or [""]:
                found = detect_unpackable_modules(os.path.join(source, sub), self.trust_remote_code)
                detected += [d for d in found if d not in detected]
        job = self._job(os.fspath(source), os.fspath(output_dir), format, detected, src)
        try:
            summary = json.loads(_run_with_progress(json.dumps(job), self.show_progress, src))
        finally:
            if src.streamer is not None:
                src.streamer.close()
        self.quantized = True
        self.summary = summary
        logger.info(
            "model-free quantization done: %d layers quantized, %d kept, output in %s",
            len(summary["quantized_layers"]),
            len(summary["ignored_layers"]),
            summary["output_dir"],
        )
        return None, os.fspath(output_dir)


def _parallelism(value: int | None) -> int:
    """Shards in flight: the argument, else upstream's environment variable, else 0 (the core decides)."""
    if value is not None:
        if int(value) < 0:
            raise ValueError(f"shard_parallelism must be >= 0, got {value}")
        return int(value)
    env = os.environ.get(_PARALLELISM_ENV, "").strip()
    if env:
        try:
            if int(env) > 0:
                return int(env)
        except ValueError:
            pass
        logger.warning("ignoring %s=%r (not a positive integer); choosing from free memory", _PARALLELISM_ENV, env)
    return 0


def _run_with_progress(job_json: str, show: bool, src: ModelSource | None = None) -> str:
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, desc="Quantizing shards")

    def progress(p: dict) -> bool:
        if bar is not None:
            if bar.total != p["bytes_total"]:
                bar.total = p["bytes_total"]
            bar.set_postfix_str(f"shard {p['shard_index']}/{p['shard_count']}", refresh=False)
            bar.update(p["bytes_done"] - bar.n)
        return True

    def log(level: int, message: str) -> None:
        logger.log(level, "%s", message)

    try:
        streamer = src.streamer if src is not None else None
        return _C.run_model_free(
            job_json,
            progress if bar is not None else None,
            log,
            streamer.fetch if streamer else None,
            streamer.release if streamer else None,
        )
    finally:
        if bar is not None:
            bar.close()


class AutoRound:
    """Upstream's entry point: model-free when asked for or auto-routed, else the regular flow (RTN / OPT-RTN /
    SignRound)."""

    def __new__(
        cls,
        model: Any,
        tokenizer: Any = None,
        platform: str = "hf",
        scheme: SchemeLike = "W4A16",
        layer_config: dict | None = None,
        dataset: Any = "NeelNanda/pile-10k",
        iters: int = 200,
        seqlen: int = 2048,
        nsamples: int = 128,
        batch_size: int = 8,
        gradient_accumulate_steps: int = 1,
        low_gpu_mem_usage: bool = False,
        device_map: Any = 0,
        enable_torch_compile: bool | None = None,
        seed: int = 42,
        *,
        ignore_layers: str = "",
        fp_layers: str | None = None,
        quant_lm_head: bool = False,
        quant_nontext_module: bool = False,
        disable_opt_rtn: bool | None = None,
        model_free: bool = False,
        disable_model_free: bool = False,
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        data_type: str | None = None,
        act_bits: int | None = None,
        act_group_size: int | None = None,
        act_sym: bool | None = None,
        act_data_type: str | None = None,
        act_dynamic: bool | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        overrides = {
            "bits": bits,
            "group_size": group_size,
            "sym": sym,
            "data_type": data_type,
            "act_bits": act_bits,
            "act_group_size": act_group_size,
            "act_sym": act_sym,
            "act_data_type": act_data_type,
            "act_dynamic": act_dynamic,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if fp_layers and not ignore_layers:
            ignore_layers = fp_layers
        blocked = any(kwargs.get(k) is not None for k in ("static_kv_dtype", "static_attention_dtype",
                                                          "rotation_config"))
        routed = (
            not blocked
            and not disable_model_free
            and isinstance(model, str)
            and iters == 0
            and disable_opt_rtn is True
            and _routable_format(_first_format(kwargs.get("format")), scheme, overrides)
            and is_model_free_supported(scheme, overrides)
        )
        if disable_opt_rtn is True and iters != 0:
            # Upstream applies disable_opt_rtn only to RTN (iters=0); MXFP/NVFP keep their search otherwise.
            logger.warning("disable_opt_rtn=True is ignored unless iters=0 (as in auto-round)")
            disable_opt_rtn = None
        if model_free and not blocked or routed:
            if not model_free:
                logger.info(
                    "Auto-routing to model-free quantization (iters=0, disable_opt_rtn=True, supported scheme). "
                    "Pass disable_model_free=True to use the regular flow."
                )
            return ModelFreeCompressor(
                model,
                scheme=scheme,
                layer_config=layer_config,
                ignore_layers=ignore_layers,
                quant_lm_head=quant_lm_head,
                quant_nontext_module=quant_nontext_module,
                overrides=overrides,
                trust_remote_code=kwargs.pop("trust_remote_code", True),
                threads=threads,
                show_progress=kwargs.pop("show_progress", True),
                pad_partial_groups=kwargs.pop("pad_partial_groups", False),
                disable_opt_rtn=disable_opt_rtn,
                shard_parallelism=kwargs.pop("shard_parallelism", None),
                stream=kwargs.pop("stream", True),
                _resolved_by_entry=True,
            )
        from fastround.compressor import Compressor

        if iters:  # SignRound's own arguments; RTN would only log them as unused
            kwargs.setdefault("gradient_accumulate_steps", gradient_accumulate_steps)
            kwargs.setdefault("enable_torch_compile", enable_torch_compile)
        return Compressor(
            model,
            tokenizer,
            platform=platform,
            scheme=scheme,
            overrides=overrides,
            layer_config=layer_config,
            dataset=dataset,
            iters=iters,
            seqlen=seqlen,
            nsamples=nsamples,
            batch_size=batch_size,
            low_gpu_mem_usage=low_gpu_mem_usage,
            device_map=kwargs.pop("device", None) or device_map,
            seed=seed,
            ignore_layers=ignore_layers,
            quant_lm_head=quant_lm_head,
            quant_nontext_module=quant_nontext_module,
            disable_opt_rtn=False if kwargs.pop("enable_opt_rtn", None) else disable_opt_rtn,
            threads=threads,
            **kwargs,
        )
