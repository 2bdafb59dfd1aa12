#!/usr/bin/env python3
"""Held-out perplexity of RTN, OPT-RTN and SignRound on fastround-llama-tiny, with fastround or upstream auto-round.

For each scheme and method the tool quantizes the model in memory (iters=0; RTN with disable_opt_rtn=True,
OPT-RTN with disable_opt_rtn=False; disable_model_free=True so that both stay in the regular flow), calibrating
on the committed models/fastround-llama-tiny/calibration.jsonl (128 pieces of the training text, never the
held-out one). The held-out text is then scored with fastround.eval.perplexity twice: on the model quantize()
returns (qdq weights in memory) and on the folder save_quantized() writes. Only the "fake" format (qdq weights
as a plain checkpoint) loads back without a packed-kernel backend, so with --format auto_round the folder is
checked for its quantization config instead; with "fake" the two perplexities must agree.

    python scripts/accuracy_table.py run --tool fastround
    python scripts/accuracy_table.py run --tool upstream --schemes W4A16
    python scripts/accuracy_table.py run --tool fastround --methods light,default,best --device cuda:0
    # rebuild the calibration file from the training text (scripts/prepare_corpus.py --out /tmp/corpus)
    python scripts/accuracy_table.py calibration --corpus /tmp/corpus
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "fastround-llama-tiny"
SCHEMES = ("W4A16", "W2A16G64", "W8A16")
# label -> AutoRound arguments: RTN / OPT-RTN (iters=0) and SignRound with upstream's CLI recipes (light: 50 iters,
# lr 5e-3; default: 200; best: 1000). nsamples / seqlen / batch_size come from the command line for every row.
METHODS: dict[str, dict[str, Any]] = {
    "RTN": {"iters": 0, "disable_opt_rtn": True},
    "OPT-RTN": {"iters": 0, "disable_opt_rtn": False},
    "light": {"iters": 50, "lr": 5e-3},
    "default": {"iters": 200},
    "best": {"iters": 1000},
}
# The in-memory model and its fake checkpoint hold the same bf16 weights; only summation order may differ.
AGREE_REL = 1e-4

logger = logging.getLogger("fastround.accuracy")


def calibration_texts(train_text: str, count: int, chars: int, seed: int) -> list[str]:
    """`count` slices of `chars` characters, each starting at a paragraph, at seeded positions."""
    starts = [0] + [m.end() for m in re.finditer("\n\n", train_text)]
    starts = [s for s in starts if s + chars <= len(train_text)]
    picks = sorted(random.Random(seed).sample(starts, count))
    return [train_text[s : s + chars] for s in picks]


def write_calibration(args: argparse.Namespace) -> None:
    train = (args.corpus / "train.txt").read_text(encoding="utf-8")
    # ~3.7 characters per token on this corpus: 6 characters a token leaves every piece over seqlen.
    texts = calibration_texts(train, args.nsamples, 6 * args.seqlen, args.seed)
    held_out = (args.model / "validation.txt").read_text(encoding="utf-8")
    leaked = [i for i, t in enumerate(texts) if t[:200] in held_out]
    if leaked:
        raise RuntimeError(f"{args.corpus / 'train.txt'}: calibration pieces {leaked} also occur in validation.txt")
    with open(args.out, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    logger.info("%s: %d pieces, %d bytes", args.out, len(texts), args.out.stat().st_size)


def _perplexity_fn() -> Any:
    """fastround.eval.perplexity loaded by file path: it needs only torch, so upstream runs need no build."""
    spec = importlib.util.spec_from_file_location("fastround_eval", REPO / "python" / "fastround" / "eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.perplexity


def _autoround_class(tool: str) -> Any:
    if tool == "upstream":
        from auto_round import AutoRound
    else:
        from fastround import AutoRound
    return AutoRound


def _check_packed(folder: Path, fmt: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in config:
        raise RuntimeError(f"{folder / 'config.json'}: format {fmt} wrote no quantization_config")
    if not list(folder.glob("*.safetensors")):
        raise RuntimeError(f"{folder}: format {fmt} wrote no safetensors")


def _shown(path: Path) -> str:
    """A path as results record it: relative to the repo when inside it (results are committed)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    perplexity = _perplexity_fn()
    AutoRound = _autoround_class(args.tool)
    held_out = (args.model / "validation.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def score(model_or_folder: Any) -> float:
        tok = tokenizer if isinstance(model_or_folder, torch.nn.Module) else None
        return perplexity(model_or_folder, held_out, seqlen=args.ppl_seqlen, tokenizer=tok, device=args.score_device)

    results: dict[str, Any] = {"tool": args.tool, "format": args.format, "calibration": _shown(args.calibration),
                               "bf16": score(args.model), "rows": []}
    logger.info("bf16: held-out perplexity %.4f", results["bf16"])
    extra = {"enable_torch_compile": False} if args.tool == "upstream" else {}
    for scheme in [s for s in args.schemes.split(",") if s]:
        for label in [m for m in args.methods.split(",") if m]:
            if label not in METHODS:
                raise SystemExit(f"unknown method {label!r}; choose from {', '.join(METHODS)}")
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
            start = time.perf_counter()
            ar = AutoRound(
                model, tokenizer=tokenizer, scheme=scheme, disable_model_free=True, dataset=str(args.calibration),
                nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device_map=args.device,
                **METHODS[label], **extra,
            )
            qmodel, _ = ar.quantize()
            seconds = time.perf_counter() - start
            qmodel.to(args.score_device)
            in_memory = score(qmodel)
            with tempfile.TemporaryDirectory(prefix=f"acc-{args.tool}-{scheme}-{label}-", dir=args.tmp) as tmp:
                ar.save_quantized(tmp, format=args.format)
                if args.format == "fake":
                    saved: float | None = score(tmp)
                    if abs(saved - in_memory) > AGREE_REL * in_memory:
                        raise RuntimeError(
                            f"{args.tool} {scheme} {label}: the saved fake checkpoint scores {saved:.6f}, "
                            f"the quantized model in memory {in_memory:.6f}"
                        )
                else:
                    saved = None
                    _check_packed(Path(tmp), args.format)
            row = {"scheme": scheme, "method": label, "ppl": saved if saved is not None else in_memory,
                   "ppl_in_memory": in_memory, "ppl_saved": saved, "quantize_s": round(seconds, 2)}
            results["rows"].append(row)
            logger.info("%s %s %s: held-out perplexity %.4f (in memory %.4f), quantize %.1f s",
                        args.tool, scheme, label, row["ppl"], in_memory, seconds)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration sample length in tokens")
    sub = p.add_subparsers(dest="command", required=True)

    cal = sub.add_parser("calibration", help="write the calibration .jsonl from the training text")
    cal.add_argument("--corpus", type=Path, required=True, help="folder with train.txt (scripts/prepare_corpus.py)")
    cal.add_argument("--out", type=Path, default=MODEL / "calibration.jsonl")
    cal.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="quantize every scheme with RTN and OPT-RTN and score the held-out text")
    run.add_argument("--tool", choices=("fastround", "upstream"), required=True)
    run.add_argument("--calibration", type=Path, default=MODEL / "calibration.jsonl")
    run.add_argument("--schemes", default=",".join(SCHEMES))
    run.add_argument("--methods", default="RTN,OPT-RTN")
    run.add_argument("--device", default="cpu", help="device_map for quantizing")
    run.add_argument("--score_device", default="cpu", help="device the perplexity is computed on")
    run.add_argument("--format", choices=("fake", "auto_round"), default="fake")
    run.add_argument("--batch_size", type=int, default=8)
    run.add_argument("--ppl_seqlen", type=int, default=512)
    run.add_argument("--tmp", type=Path, default=None, help="parent of the temporary output folders")
    run.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "calibration":
        write_calibration(args)
        return
    if not args.calibration.is_file():
        raise FileNotFoundError(f"calibration file {args.calibration} does not exist (see the `calibration` command)")
    results = run_table(args)
    text = json.dumps(results, indent=1)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    for row in results["rows"]:
        print(f"| {row['scheme']} | {args.tool} {row['method']} | {row['ppl']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
