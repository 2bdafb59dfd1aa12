"""Quantize the small trained Llama the repo ships (models/fastround-llama-tiny) with the regular AutoRound flow,
then compare held-out perplexity of the bf16 model and of the quantized one.

    python3 examples/quantize_small_model.py                              # W4A16, OPT-RTN, auto_round
    python3 examples/quantize_small_model.py --scheme W2A16G64 --disable_opt_rtn --format auto_gptq

OPT-RTN calibrates on models/fastround-llama-tiny/calibration.jsonl (pieces of the training text); perplexity is
measured on validation.txt (held out), with the GPTQ/AWQ protocol of fastround.eval.perplexity."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "models" / "fastround-llama-tiny"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--format", default="auto_round")
    p.add_argument("--disable_opt_rtn", action="store_true", help="plain RTN (no calibration data)")
    p.add_argument("--dataset", default=str(MODEL / "calibration.jsonl"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--output_dir", default="examples/out")
    p.add_argument("--ppl_windows", type=int, default=40, help="held-out windows of 512 tokens (0: all)")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastround import AutoRound
    from fastround.eval import perplexity

    text = (Path(args.model) / "validation.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.ppl_windows:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.ppl_windows * 512]
        text = tokenizer.decode(ids)

    start = time.perf_counter()
    ar = AutoRound(
        args.model, scheme=args.scheme, iters=0, disable_opt_rtn=True if args.disable_opt_rtn else None,
        dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, device_map="cpu",
        disable_model_free=True,
    )
    model, folder = ar.quantize_and_save(args.output_dir, format=args.format)
    print(f"quantized {args.model} as {args.scheme} into {folder} in {time.perf_counter() - start:.1f} s")

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    ppl_bf16 = perplexity(base, text, seqlen=512, tokenizer=tokenizer)
    fake = AutoRound(
        args.model, scheme=args.scheme, iters=0, disable_opt_rtn=True if args.disable_opt_rtn else None,
        dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, device_map="cpu",
        disable_model_free=True,
    )
    qdq, _ = fake.quantize()  # the quantize-dequantized model, what the packed checkpoint stands for
    ppl_q = perplexity(qdq, text, seqlen=512, tokenizer=tokenizer)
    print(f"held-out perplexity (seqlen 512): bf16 {ppl_bf16:.3f}  {args.scheme} {ppl_q:.3f}")


if __name__ == "__main__":
    main()
