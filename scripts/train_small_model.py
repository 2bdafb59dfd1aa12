#!/usr/bin/env python3
"""Train fastround-llama-tiny: a small Llama causal LM with its own byte-level BPE tokenizer, used as
the project's accuracy model (held-out perplexity of RTN / OPT-RTN schemes against bf16).

Every Linear has both dims multiples of 128 (hidden 256, intermediate 768, 8 heads of 32, vocab
4096), so every scheme, group size 32/64/128 included, quantizes every layer; the bf16 weights stay
under 16 MB so the model is committed to the repo.

Stages (each skipped when its output already exists):
  1. tokenizer: byte-level BPE trained on the corpus (scripts/prepare_corpus.py) -> TOKENIZER_DIR
  2. tokens: the training text encoded once -> --tokens (uint16 .npy), carried to the GPU host
  3. training: AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA, seeded sampling of
     windows; the weights with the best held-out loss are kept and saved as bf16 safetensors
  4. held-out perplexity of the saved model with fastround.eval.perplexity at --ppl_seqlens

    # on CPU: tokenizer, tokens, a 5-step smoke run
    python scripts/train_small_model.py --corpus /tmp/corpus --tokens .devmodel/train-tokens.npy \
        --out /tmp/smoke --tokenizer models/fastround-llama-tiny --max_steps 5 --batch_size 2 --device cpu
    # on the GPU host: the real run (the corpus is not needed once the tokens exist)
    python scripts/train_small_model.py --tokens .devmodel/train-tokens.npy --out models/fastround-llama-tiny
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("fastround.train")

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# ChatML, the template most small open chat models use; the base model is not instruction-tuned,
# the template is there so chat-style calibration and export code paths have something to render.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_eval_module():
    """fastround/eval.py by file path: the package's __init__ imports the C++ extension, which the
    GPU host does not have built."""
    path = REPO / "python" / "fastround" / "eval.py"
    spec = importlib.util.spec_from_file_location("fastround_eval_standalone", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tokenizer(train_text: Path, vocab_size: int, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train([str(train_text)], trainer)
    if core.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE ended with {core.get_vocab_size()} tokens, not {vocab_size}: corpus too small?")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_text(tokenizer, text: str) -> np.ndarray:
    """Token ids of the whole text, as tokenizing it in one call would give them.

    Cut before each "\\n\\n" + paragraph: the byte-level pre-tokenizer splits a text at every such
    point in the same way, so the pieces can be encoded as a batch (much faster) and concatenated.
    """
    paragraphs = text.split("\n\n")
    pieces = [paragraphs[0]] + ["\n\n" + p for p in paragraphs[1:]]
    encoded = tokenizer.backend_tokenizer.encode_batch(pieces, add_special_tokens=False)
    ids = np.fromiter((i for enc in encoded for i in enc.ids), dtype=np.int64)
    if ids.max(initial=0) >= 2**16:
        raise ValueError("token ids do not fit uint16")
    return ids.astype(np.uint16)


def save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its own class name, which transformers 4 cannot load; the 4.x name loads in both.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_length,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace, total_steps: int) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int, autocast) -> float:
    """Mean next-token NLL over the held-out windows [n, seqlen]."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]  # [b, seqlen]
        with autocast():
            logits = model(input_ids=batch, use_cache=False).logits  # [b, seqlen, vocab]
        pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        total += torch.nn.functional.cross_entropy(pred, batch[:, 1:].reshape(-1), reduction="sum").item()
        count += pred.shape[0]
    model.train()
    return total / count


def train(args: argparse.Namespace, tokenizer, tokens: np.ndarray, valid_ids: np.ndarray) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(args, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters (%.1f MB in bf16)", n_params / 1e6, 2 * n_params / 1e6)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # RMSNorm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        **({"fused": True} if device.type == "cuda" else {}),
    )

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    data = torch.from_numpy(tokens.astype(np.int64)).to(device)  # [n_tokens]
    n_valid = len(valid_ids) // args.seqlen
    valid = torch.from_numpy(valid_ids[: n_valid * args.seqlen].astype(np.int64)).to(device)
    valid = valid.view(n_valid, args.seqlen)  # [n_valid, seqlen]
    if n_valid == 0:
        raise ValueError(f"the held-out text has fewer than seqlen={args.seqlen} tokens")
    tokens_per_step = args.batch_size * args.seqlen
    steps_for_epochs = int(args.epochs * len(tokens) / tokens_per_step)
    total_steps = args.max_steps if args.max_steps is not None else steps_for_epochs
    logger.info(
        "data: %d train tokens, %d held-out windows of %d; %d steps of %d tokens (%.1f epochs)",
        len(tokens), n_valid, args.seqlen, total_steps, tokens_per_step, total_steps * tokens_per_step / len(tokens),
    )

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    offsets = torch.arange(args.seqlen + 1, device=device)  # [seqlen + 1]
    log_path = args.out / "train_log.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w", encoding="utf-8")
    best = {"val_loss": float("inf"), "step": -1}
    best_state: dict[str, torch.Tensor] | None = None
    model.train()
    t0 = time.time()
    step = 0
    while step < total_steps:
        lr = lr_at(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(tokens) - args.seqlen - 1, (args.batch_size,), generator=gen).to(device)
        window = data[starts[:, None] + offsets]  # [batch, seqlen + 1]
        with autocast():
            logits = model(input_ids=window[:, :-1], use_cache=False).logits  # [batch, seqlen, vocab]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1

        if step == args.timing_steps and args.max_steps is None and args.time_budget_s > 0:
            # Fit the schedule to the time budget once the step time is known.
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t0) / step
            affordable = int(args.time_budget_s / per_step)
            if affordable < total_steps:
                logger.info("time budget %.0fs at %.1f ms/step: %d steps instead of %d",
                            args.time_budget_s, 1e3 * per_step, affordable, total_steps)
                total_steps = max(affordable, args.warmup_steps + 1)
        last = step == total_steps
        record = None
        if step % args.log_every == 0 or last:
            record = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "grad_norm": round(grad_norm.item(), 4),
                      "tokens": step * tokens_per_step, "elapsed_s": round(time.time() - t0, 2)}
        if step % args.eval_every == 0 or last:
            val_loss = held_out_loss(model, valid, args.batch_size, autocast)
            record = record or {"step": step, "elapsed_s": round(time.time() - t0, 2)}
            record["val_loss"] = round(val_loss, 5)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if record is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("%s", " ".join(f"{k}={v}" for k, v in record.items()))
    log.close()
    elapsed = time.time() - t0
    assert best_state is not None  # the last step always evaluates
    model.load_state_dict(best_state)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(args.out)
    logger.info("kept the weights of step %d (held-out loss %.4f); trained in %.1fs", best["step"], best["val_loss"], elapsed)
    return {
        "parameters": n_params,
        "steps": total_steps,
        "tokens_per_step": tokens_per_step,
        "train_tokens": int(len(tokens)),
        "epochs": total_steps * tokens_per_step / len(tokens),
        "best_step": best["step"],
        "best_val_loss_fp32_master_autocast": best["val_loss"],
        "train_seconds": round(elapsed, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, help="folder with train.txt / validation.txt from prepare_corpus.py")
    p.add_argument("--tokens", type=Path, required=True, help="uint16 .npy of the encoded train.txt (made if missing)")
    p.add_argument("--out", type=Path, required=True, help="where the trained model is saved")
    p.add_argument("--tokenizer", type=Path, help="folder holding (or to receive) the tokenizer (default: --out)")
    p.add_argument("--tokenize_only", action="store_true", help="stop after the tokenizer and the token file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=20251202)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--intermediate_size", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max_length", type=int, default=1024, help="max_position_embeddings and training seqlen cap")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--epochs", type=float, default=8.0, help="passes over the training tokens")
    p.add_argument("--max_steps", type=int, help="exact number of steps (overrides --epochs and the time budget)")
    p.add_argument("--time_budget_s", type=float, default=300.0, help="shorten the schedule to fit (0: no limit)")
    p.add_argument("--timing_steps", type=int, default=30, help="steps timed before fitting the time budget")
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--ppl_seqlens", default="512,1024", help="held-out perplexity window lengths, comma separated")
    args = p.parse_args(argv)
    if args.seqlen > args.max_length:
        p.error(f"--seqlen {args.seqlen} exceeds --max_length {args.max_length}")
    for name in ("hidden_size", "intermediate_size", "vocab_size"):
        if getattr(args, name) % 128:
            p.error(f"--{name} {getattr(args, name)} is not a multiple of 128")
    args.tokenizer = args.tokenizer or args.out
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    if (args.tokenizer / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        if args.corpus is None:
            raise FileNotFoundError(f"no tokenizer in {args.tokenizer} and no --corpus to train one on")
        tokenizer = train_tokenizer(args.corpus / "train.txt", args.vocab_size, args.max_length)
        save_tokenizer(tokenizer, args.tokenizer)
        logger.info("tokenizer: %d tokens -> %s", len(tokenizer), args.tokenizer)
    digest = tokenizer_digest(tokenizer)

    # The held-out text lives beside the tokenizer (committed): copy it there on the first run.
    valid_text_path = args.tokenizer / "validation.txt"
    if args.corpus is not None and not valid_text_path.is_file():
        shutil.copyfile(args.corpus / "validation.txt", valid_text_path)
    if not valid_text_path.is_file():
        raise FileNotFoundError(f"{valid_text_path}: missing held-out text (pass --corpus once)")
    valid_text = valid_text_path.read_text(encoding="utf-8")

    meta_path = args.tokens.with_suffix(".json")
    if args.tokens.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("tokenizer") != digest:
            raise ValueError(f"{args.tokens} was made with tokenizer {meta.get('tokenizer')}, not {digest}: delete it")
        tokens = np.load(args.tokens)
    else:
        if args.corpus is None:
            raise FileNotFoundError(f"{args.tokens} does not exist and no --corpus to make it from")
        tokens = encode_text(tokenizer, (args.corpus / "train.txt").read_text(encoding="utf-8"))
        args.tokens.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.tokens, tokens)
        meta_path.write_text(json.dumps({"tokenizer": digest, "tokens": int(len(tokens))}) + "\n")
        logger.info("tokens: %d -> %s", len(tokens), args.tokens)
    if args.tokenize_only:
        return

    valid_ids = encode_text(tokenizer, valid_text)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "tokenizer_sha256_16": digest,
               "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}
    summary.update(train(args, tokenizer, tokens, valid_ids))
    if args.tokenizer.resolve() != args.out.resolve():
        save_tokenizer(tokenizer, args.out)
        shutil.copyfile(valid_text_path, args.out / "validation.txt")

    evaluation = load_eval_module()
    ppl = {}
    for seqlen in (int(s) for s in args.ppl_seqlens.split(",") if s):
        ppl[str(seqlen)] = evaluation.perplexity(str(args.out), valid_text, seqlen=seqlen, device=args.device)
        logger.info("held-out perplexity (bf16 weights, seqlen %d, %s): %.4f", seqlen, args.device, ppl[str(seqlen)])
    summary["heldout_ppl_bf16"] = ppl
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
