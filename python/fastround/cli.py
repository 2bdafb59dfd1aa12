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
    opt = p.add_mutually_exclusive_group()
    opt.add_argument("--disable_opt_rtn", action="store_true", default=None)
    opt.add_argument("--enable_opt_rtn", action="store_true")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    lib = logging.getLogger("fastround")  # the library's fallback handler would print every line twice
    for h in list(lib.handlers):
        if getattr(h, "_fastround_default", False):
            lib.removeHandler(h)
    lib.setLevel(level)
    model = args.model or args.model_pos
    if not model:
        print("fastround: error: a model (positional or --model) is required", file=sys.stderr)
        return 2
    from fastround.autoround import AutoRound

    try:
        compressor = AutoRound(
            model,
            scheme=args.scheme,
            layer_config=parse_layer_config(args.layer_config),
            iters=200 if args.iters is None else args.iters,
            device_map=args.device_map,
            ignore_layers=args.ignore_layers,
            quant_lm_head=args.quant_lm_head,
            quant_nontext_module=args.quant_nontext_module,
            disable_opt_rtn=True if args.disable_opt_rtn else (False if args.enable_opt_rtn else None),
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
        )
        compressor.quantize_and_save(args.output_dir, format=args.format)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        print(f"fastround: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastround: interrupted; no complete output was written (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
