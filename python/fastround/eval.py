"""Accuracy evaluation of (quantized) causal LMs: held-out perplexity and lm-eval-harness tasks.

`perplexity` follows the protocol of the GPTQ and AWQ papers (their wikitext2 / c4 numbers): the
whole text is tokenized once, cut into non-overlapping windows of `seqlen` tokens (the tail shorter
than a window is dropped), and the score is exp of the mean next-token negative log-likelihood over
all windows, each window predicting its tokens 1..seqlen-1 from fp32 logits.

This module imports only torch (and transformers / lm_eval when asked to load something), never the
C++ extension, so scripts on machines without the built extension can load it by file path.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import torch

logger = logging.getLogger("fastround")

ModelOrFolder = Any  # a transformers PreTrainedModel, or a str / os.PathLike naming a saved folder


def _is_folder_arg(model_or_folder: ModelOrFolder) -> bool:
    return isinstance(model_or_folder, (str, os.PathLike))


def _load_folder(folder: str | os.PathLike[str], tokenizer: Any, device: str | torch.device | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if device is not None:
        model.to(device)
    return model, tokenizer


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def perplexity(
    model_or_folder: ModelOrFolder,
    text: str,
    seqlen: int = 2048,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
) -> float:
    """exp(mean next-token NLL) of `text` over non-overlapping windows of `seqlen` tokens.

    model_or_folder: a causal LM in memory (then `tokenizer` is required) or a folder that
    AutoModelForCausalLM / AutoTokenizer load (the tokenizer comes from the folder unless given).
    device: where the windows run; default the model's own device. A model in memory is moved
    there when its parameters are elsewhere.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: a window needs at least 2 tokens (one to predict from, one to predict)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")

    if _is_folder_arg(model_or_folder):
        model, tokenizer = _load_folder(model_or_folder, tokenizer, device)
    else:
        model = model_or_folder
        if tokenizer is None:
            raise ValueError("perplexity: pass tokenizer= when model_or_folder is a model object, not a folder")
        if device is not None and _model_device(model) != torch.device(device):
            model.to(device)
    run_device = _model_device(model)

    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seqlen > max_positions:
        logger.warning("perplexity: seqlen=%d exceeds the model's max_position_embeddings=%d", seqlen, max_positions)

    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # [n_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(
            f"perplexity: the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            "give a longer text or a smaller seqlen"
        )
    if ids.numel() % seqlen:
        logger.info("perplexity: dropping the last %d tokens (shorter than seqlen=%d)", ids.numel() % seqlen, seqlen)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)  # [n_windows, seqlen]

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total_nll = 0.0  # python float (double) so thousands of windows do not lose precision
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False):
                batch = windows[start : start + batch_size].to(run_device)  # [b, seqlen]
                logits = model(input_ids=batch, use_cache=False).logits  # [b, seqlen, vocab]
                pred = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])  # [b*(seqlen-1), vocab]
                target = batch[:, 1:].reshape(-1)  # [b*(seqlen-1)]
                total_nll += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
    finally:
        model.train(was_training)
    mean_nll = total_nll / (n_windows * (seqlen - 1))
    return math.exp(mean_nll)


def run_lm_eval(
    model_or_folder: ModelOrFolder,
    tasks: str | Sequence[str],
    batch_size: int | str = 1,
    limit: int | float | None = None,
    tokenizer: Any = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval-harness tasks (e.g. "lambada_openai,piqa") and return its results dict.

    A folder goes to lm-eval's own "hf" loader (as `auto_round eval` does); a model in memory is
    wrapped in lm-eval's HFLM with `tokenizer` (required then).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(
            "run_lm_eval needs lm-eval-harness, which is not installed: pip install 'lm-eval>=0.4.2'"
        ) from exc

    task_list = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    task_list = [t for t in task_list if t]
    if not task_list:
        raise ValueError(f"run_lm_eval: no task named in tasks={tasks!r}")

    if _is_folder_arg(model_or_folder):
        path = os.fspath(model_or_folder)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={path},dtype=auto",
            tasks=task_list,
            batch_size=batch_size,
            limit=limit,
            device=device,
        )
    else:
        if tokenizer is None:
            raise ValueError("run_lm_eval: pass tokenizer= when model_or_folder is a model object, not a folder")
        lm = HFLM(pretrained=model_or_folder, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=task_list, batch_size=batch_size, limit=limit)
    try:
        from lm_eval.utils import make_table

        logger.info("lm-eval results:\n%s", make_table(results))
    except ImportError:  # make_table moved between lm-eval releases; the dict is what callers use
        pass
    return results
