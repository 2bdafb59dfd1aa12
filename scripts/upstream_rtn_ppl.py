#!/usr/bin/env python3
"""Reference perplexities of upstream auto-round's RTN and OPT-RTN on fastround-llama-tiny.

For each scheme, quantizes the model in memory with the installed `auto_round` (iters=0; plain RTN
with disable_opt_rtn=True, OPT-RTN with disable_opt_rtn=False), saves it in the "fake" format
(dequantized bf16 weights) and scores the held-out text with fastround.eval.perplexity. OPT-RTN
calibrates on --nsamples pieces of the training text (scripts/prepare_corpus.py), each long enough
for --seqlen tokens, picked with a fixed seed, never on the held-out text.

    python scripts/upstream_rtn_ppl.py --corpus /tmp/corpus --out /tmp/upstream-rtn
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ("W4A16", "W2A16G64", "W8A16")


def calibration_texts(train_text: str, count: int, chars: int, seed: int) -> list[str]:
    """`count` slices of `chars` characters, each starting at a paragraph, at seeded positions."""
    starts = [0] + [m.end() for m in re.finditer("\n\n", train_text)]
    starts = [s for s in starts if s + chars <= len(train_text)]
    picks = sorted(random.Random(seed).sample(starts, count))
    return [train_text[s : s + chars] for s in picks]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "fastround-llama-tiny")
    p.add_argument("--corpus", type=Path, required=True, help="folder with train.txt (calibration for OPT-RTN)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder for the fake-quantized models")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration sample length in tokens")
    p.add_argument("--ppl_seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    sys.path.insert(0, str(REPO / "python"))
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastround.eval import perplexity

    held_out = (args.model / "validation.txt").read_text(encoding="utf-8")
    # ~3.7 characters per token on this corpus: 6 characters a token leaves every sample over seqlen.
    calib = calibration_texts((args.corpus / "train.txt").read_text(encoding="utf-8"), args.nsamples, 6 * args.seqlen, args.seed)
    results: dict[str, float] = {"bf16": perplexity(args.model, held_out, seqlen=args.ppl_seqlen, device="cpu")}
    for scheme in [s for s in args.schemes.split(",") if s]:
        for method, opt in (("rtn", False), ("opt-rtn", True)):
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            kwargs = dict(iters=0, disable_opt_rtn=not opt, device_map="cpu")
            if opt:
                kwargs.update(dataset=calib, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8)
            out = args.out / f"{scheme}-{method}"
            AutoRound(model, tokenizer=tokenizer, scheme=scheme, **kwargs).quantize_and_save(str(out), format="fake")
            saved = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
            if len(saved) != 1:
                raise RuntimeError(f"{out}: expected one saved model folder, found {[d.name for d in saved]}")
            results[f"{scheme} {method}"] = perplexity(saved[0], held_out, seqlen=args.ppl_seqlen, device="cpu")
            logging.info("%s %s: held-out perplexity %.4f", scheme, method, results[f"{scheme} {method}"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
