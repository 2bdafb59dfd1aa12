"""`fastround` command line: upstream auto-round's flags; model-free runs through the same AutoRound API."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

logger = logging.getLogger("fastround")


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text.strip("'\"")


class _Lenient:
    """Parses `{k_proj:{bits:8},v_proj:{bits:8}}`: JSON objects with bare keys and values."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def parse(self) -> Any:
        value = self._value()
        self._ws()
        if self.i != len(self.s):
            raise ValueError(f"unexpected text at {self.i}: {self.s[self.i:]!r}")
        return value

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def _value(self) -> Any:
        self._ws()
        if self.s.startswith("{", self.i):
            self.i += 1
            out: dict[str, Any] = {}
            self._ws()
            if self.s.startswith("}", self.i):
                self.i += 1
                return out
            while True:
                key = self._atom(":")
                self._ws()
                if not self.s.startswith(":", self.i):
                    raise ValueError(f"expected ':' after key {key!r}")
                self.i += 1
                out[str(key)] = self._value()
                self._ws()
                if self.s.startswith(",", self.i):
                    self.i += 1
                    continue
                if self.s.startswith("}", self.i):
                    self.i += 1
                    return out
                raise ValueError(f"expected ',' or '}}' at {self.i}")
        return _scalar(self._atom(",}"))

    def _atom(self, stops: str) -> str:
        self._ws()
        if self.i < len(self.s) and self.s[self.i] in "'\"":
            quote = self.s[self.i]
            end = self.s.index(quote, self.i + 1)
            text, self.i = self.s[self.i + 1 : end], end + 1
            return text
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in stops:
            self.i += 1
        return self.s[start : self.i].strip()


def parse_layer_config(text: str | None) -> dict | None:
    """JSON first, then JSON with stray backslashes escaped, then the lenient `{k:v}` form."""
    if not text:
        return None
    for candidate in (text, re.sub(r'\\(?!["\\/bfnrtu])', r"\\\\", text)):
        try:
            value = json.loads(candidate)
            break
        except json.JSONDecodeError:
            continue
    else:
        try:
            value = _Lenient(text).parse()
        except (ValueError, IndexError) as e:
            raise ValueError(f"--layer_config: cannot parse {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"--layer_config must describe a dict, got {text!r}")
    return value


DEFAULT_TASKS = (
    "lambada_openai,hellaswag,winogrande,piqa,mmlu,wikitext,truthfulqa_mc1,openbookqa,boolq,arc_easy,arc_challenge"
)

# Upstream's CLI recipes: each value fills a flag only when the user left it unset.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"batch_size": 8, "iters": 200, "seqlen": 2048, "nsamples": 128},
    "best": {"batch_size": 8, "iters": 1000, "seqlen": 2048, "nsamples": 512},
    "light": {"batch_size": 8, "iters": 50, "seqlen": 2048, "nsamples": 128, "lr": 5e-3},
    "rtn": {"batch_size": 8, "iters": 0, "seqlen": 2048, "nsamples": 1, "disable_opt_rtn": True},
    "opt_rtn": {"batch_size": 8, "iters": 0, "seqlen": 2048, "nsamples": 128, "disable_opt_rtn": False},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastround", description="Quantize an LLM checkpoint (AutoRound-compatible).")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="hub id or local checkpoint folder")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", default=None)
    p.add_argument("--scheme", default="W4A16", type=lambda s: s.upper())
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--asym", action="store_true", help="asymmetric quantization (sym=False)")
    p.add_argument("--data_type", "--dtype", dest="data_type", default=None)
    p.add_argument("--act_bits", type=int, default=None)
    p.add_argument("--act_group_size", type=int, default=None)
    p.add_argument("--act_data_type", default=None)
    p.add_argument("--layer_config", default=None, help='e.g. "{k_proj:{bits:8},v_proj:{bits:8}}"')
    p.add_argument("--ignore_layers", "--fp_layers", dest="ignore_layers", default="")
    p.add_argument("--quant_lm_head", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--quant_nontext_module", action="store_true")
    p.add_argument("--format", default="auto_round")
    p.add_argument("--output_dir", default="./tmp_autoround")
    p.add_argument("--iters", "--iter", type=int, default=None)
    p.add_argument("--dataset", default=None, help="calibration data, e.g. ./calib.json,NeelNanda/pile-10k:num=64")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch_size", "--bs", "--train_bs", dest="batch_size", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    # SignRound (iters > 0); None keeps upstream's default
    p.add_argument("--lr", type=float, default=None, help="rounding lr (default 1/iters)")
    p.add_argument("--minmax_lr", type=float, default=None, help="range-factor lr (default: lr)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--nblocks", type=int, default=None)
    p.add_argument("--gradient_accumulate_steps", type=int, default=None)
    p.add_argument("--dynamic_max_gap", type=int, default=None)
    p.add_argument("--scale_dtype", default=None, help="float16 (default), bfloat16 or float32")
    p.add_argument("--disable_minmax_tuning", action="store_true")
    p.add_argument("--disable_quanted_input", action="store_true")
    p.add_argument("--not_use_best_mse", action="store_true")
    p.add_argument("--enable_deterministic_algorithms", action="store_true")
    p.add_argument("--enable_alg_ext", action="store_true")
    p.add_argument("--enable_norm_bias_tuning", action=argparse.BooleanOptionalAction, default=False,
                   help="also tune norm weights and biases (experimental)")
    p.add_argument("--enable_adam", action=argparse.BooleanOptionalAction, default=False,
                   help="AdamRound: tune with AdamW instead of sign-SGD")
    p.add_argument("--low_gpu_mem_usage", action="store_true")
    p.add_argument("--disable_amp", action="store_true")
    p.add_argument("--model_dtype", default=None)
    p.add_argument("--to_quant_block_names", default=None)
    p.add_argument("--tasks", nargs="?", const=DEFAULT_TASKS, default=None,
                   help="evaluate the last exported format with lm-eval afterwards (comma list)")
    p.add_argument("--eval_bs", type=int, default=None)
    p.add_argument("--limit", type=float, default=None)
    opt = p.add_mutually_exclusive_group()
    opt.add_argument("--disable_opt_rtn", action="store_true", default=None)
    opt.add_argument("--enable_opt_rtn", action="store_true")
    rot = p.add_argument_group("rotation (Hadamard: per-linear transform backend for MXFP/NVFP schemes, inplace "
                               "QuaRot-style backend for the others, exported as fake)")
    rot.add_argument("--algorithm", default=None, help="'hadamard' (per-linear rotation) or 'quarot'")
    rot.add_argument("--rotation_type", "--rotation-hadamard-type", dest="rotation_type", default=None,
                     choices=["hadamard", "random_hadamard", "quarot_hadamard"])
    rot.add_argument("--rotation_backend", default=None, choices=["auto", "inplace", "transform"])
    rot.add_argument("--rotation_block_size", type=int, default=None)
    rot.add_argument("--fuse_online_to_weight", action=argparse.BooleanOptionalAction, default=None)
    rot.add_argument("--allow_online_rotation", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--model_free", action="store_true")
    p.add_argument("--disable_model_free", action="store_true")
    p.add_argument("--device_map", "--device", dest="device_map", default="0")
    tc = p.add_mutually_exclusive_group()
    tc.add_argument("--enable_torch_compile", action="store_true")
    tc.add_argument("--disable_torch_compile", action="store_true")
    p.add_argument("--pad_partial_groups", action="store_true", help="pad in_features to whole groups like upstream")
    p.add_argument("--threads", type=int, default=None, help="C++ kernel threads (default: all cores)")
    p.add_argument(
        "--shard_parallelism",
        type=int,
        default=None,
        help="source shards quantized at once (default: $AR_MODEL_FREE_SHARD_PARALLELISM, else from free memory)",
    )
    p.add_argument("--no_stream", action="store_true", help="download a hub model whole instead of shard by shard")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    lib = logging.getLogger("fastround")  # the library's fallback handler would print every line twice
    for h in list(lib.handlers):
        if getattr(h, "_fastround_default", False):
            lib.removeHandler(h)
    lib.setLevel(level)


def list_command(argv: list[str]) -> int:
    what = argv[0] if argv else "format"
    if what not in ("format", "formats"):
        print(f"fastround list: unknown item {what!r} (try: fastround list format)", file=sys.stderr)
        return 2
    from fastround import export

    for name, schemes in export.list_formats().items():
        print(f"{name}: {', '.join(schemes)}")
    return 0


def eval_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastround eval", description="Perplexity and lm-eval tasks of a model.")
    p.add_argument("model", help="hub id, local folder or quantized checkpoint")
    p.add_argument("--ppl", metavar="TEXT_FILE", default=None, help="perplexity on this text file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--tasks", default=None)
    p.add_argument("--eval_bs", "--batch_size", dest="eval_bs", type=int, default=None)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=("auto", "fastround", "upstream"), default="fastround",
                   help="who loads an auto-round / gptq / awq checkpoint: fastround's layers (default), "
                        "upstream's packages, or auto (fastround where upstream's package is missing)")
    args = p.parse_args(argv)
    if not args.ppl and not args.tasks:
        p.error("give --ppl TEXT_FILE and/or --tasks")
    from fastround import eval as fr_eval

    try:
        from fastround import hf

        try:
            serving = hf.use(args.backend)
            logger.info("quantized checkpoints load through: %s", serving)
        except ImportError:  # transformers missing: nothing quantized can load anyway
            pass
        if args.ppl:
            with open(args.ppl, encoding="utf-8") as f:
                text = f.read()
            ppl = fr_eval.perplexity(args.model, text, seqlen=args.seqlen, device=args.device)
            print(f"perplexity {ppl:.4f} (seqlen {args.seqlen}, {args.ppl})")
        if args.tasks:
            results = fr_eval.run_lm_eval(args.model, args.tasks, batch_size=args.eval_bs, limit=args.limit)
            print(json.dumps(results, indent=2, default=str))
    except (ValueError, OSError, ImportError) as e:
        print(f"fastround eval: error: {e}", file=sys.stderr)
        return 1
    return 0


def rotation_config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """upstream's CLI: --rotation_type (or --algorithm hadamard) turns rotation on; the other flags fill the
    fields they name. quarot_hadamard is the inplace backend's preset (upstream's CLI passes the bare name, which
    its RotationConfig then rejects)."""
    names = [n.strip().lower() for n in (args.algorithm or "").split(",") if n.strip()]
    if "quarot" in names:
        return "quarot"
    if not args.rotation_type and "hadamard" not in names:
        return None
    rtype = args.rotation_type or "hadamard"
    cfg: dict[str, Any] = {"hadamard_type": "inplace_quarot_hadamard" if rtype == "quarot_hadamard" else rtype}
    for key, value in (("backend", args.rotation_backend), ("block_size", args.rotation_block_size),
                       ("fuse_online_to_weight", args.fuse_online_to_weight),
                       ("allow_online_rotation", args.allow_online_rotation)):
        if value is not None:
            cfg[key] = value
    return cfg


def main(argv: list[str] | None = None, recipe: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if recipe is None and argv and argv[0] in ("list", "eval", "quantize", "help"):
        cmd, argv = argv[0], argv[1:]
        if cmd == "list":
            return list_command(argv)
        if cmd == "eval":
            _setup_logging(False)
            return eval_command(argv)
        if cmd == "help":
            build_parser().print_help()
            return 0
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    for key, value in RECIPES.get(recipe or "default", {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    model = args.model or args.model_pos
    if not model:
        print("fastround: error: a model (positional or --model) is required", file=sys.stderr)
        return 2
    from fastround.autoround import AutoRound

    extra: dict[str, Any] = {}
    if args.dataset is not None:
        extra["dataset"] = args.dataset
    if args.model_dtype is not None:
        extra["model_dtype"] = args.model_dtype
    if args.to_quant_block_names is not None:
        extra["to_quant_block_names"] = args.to_quant_block_names
    for key in ("lr", "minmax_lr", "momentum", "nblocks", "gradient_accumulate_steps", "dynamic_max_gap",
                "scale_dtype"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    for flag, key in (("disable_minmax_tuning", "enable_minmax_tuning"),
                      ("disable_quanted_input", "enable_quanted_input")):
        if getattr(args, flag):
            extra[key] = False
    for key in ("not_use_best_mse", "enable_deterministic_algorithms", "enable_alg_ext", "enable_norm_bias_tuning",
                "enable_adam"):
        if getattr(args, key):
            extra[key] = True
    rotation = rotation_config_from_args(args)
    if rotation is not None:
        extra["rotation_config"] = rotation
    try:
        compressor = AutoRound(
            model,
            scheme=args.scheme,
            layer_config=parse_layer_config(args.layer_config),
            iters=200 if args.iters is None else args.iters,
            nsamples=128 if args.nsamples is None else args.nsamples,
            seqlen=2048 if args.seqlen is None else args.seqlen,
            batch_size=8 if args.batch_size is None else args.batch_size,
            seed=args.seed,
            low_gpu_mem_usage=args.low_gpu_mem_usage,
            amp=not args.disable_amp,
            device_map=args.device_map,
            ignore_layers=args.ignore_layers,
            quant_lm_head=args.quant_lm_head,
            quant_nontext_module=args.quant_nontext_module,
            disable_opt_rtn=False if args.enable_opt_rtn else args.disable_opt_rtn,
            model_free=args.model_free,
            disable_model_free=args.disable_model_free,
            bits=args.bits,
            group_size=args.group_size,
            sym=False if args.asym else None,
            data_type=args.data_type,
            act_bits=args.act_bits,
            act_group_size=args.act_group_size,
            act_data_type=args.act_data_type,
            threads=args.threads,
            format=args.format,
            show_progress=not args.no_progress,
            pad_partial_groups=args.pad_partial_groups,
            shard_parallelism=args.shard_parallelism,
            stream=not args.no_stream,
            **extra,
        )
        _, folders = compressor.quantize_and_save(args.output_dir, format=args.format)
        if args.tasks:
            from fastround import eval as fr_eval

            last = folders[-1] if isinstance(folders, list) else folders
            results = fr_eval.run_lm_eval(last, args.tasks, batch_size=args.eval_bs, limit=args.limit)
            print(json.dumps(results, indent=2, default=str))
    except (ValueError, TypeError, OSError, NotImplementedError, ImportError) as e:
        print(f"fastround: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastround: interrupted; no complete output was written (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


def main_rtn() -> int:
    return main(recipe="rtn")


def main_opt_rtn() -> int:
    return main(recipe="opt_rtn")


def main_best() -> int:
    return main(recipe="best")


def main_light() -> int:
    return main(recipe="light")


if __name__ == "__main__":
    sys.exit(main())
