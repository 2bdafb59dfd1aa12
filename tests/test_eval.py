"""fastround.eval: perplexity against a hand-written computation on a tiny model, window handling,
folder loading, bad input, and run_lm_eval's message when lm-eval-harness is missing."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastround.eval import perplexity, run_lm_eval  # noqa: E402

_WORDS = (
    "the kernel maps a page when a task touches memory and the scheduler picks the next task "
    "while the driver waits for an interrupt from the device"
).split()


def _text(n_words: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(_WORDS), (n_words,), generator=gen)
    return " ".join(_WORDS[i] for i in picks.tolist())


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(_WORDS)))}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init so the NLL depends on the context
        for param in model.parameters():
            param.mul_(8.0 if param.dim() == 2 else 1.0)
    return model, tokenizer


def _manual_ppl(model: torch.nn.Module, ids: list[int], seqlen: int) -> float:
    """The textbook definition, one window and one position at a time."""
    nlls: list[float] = []
    for w in range(len(ids) // seqlen):
        window = torch.tensor([ids[w * seqlen : (w + 1) * seqlen]])
        with torch.no_grad():
            logits = model(input_ids=window).logits[0].double()  # [seqlen, vocab]
        logprobs = torch.log_softmax(logits, dim=-1)
        for pos in range(seqlen - 1):
            nlls.append(-logprobs[pos, window[0, pos + 1]].item())
    return math.exp(sum(nlls) / len(nlls))


def test_matches_manual_computation(tiny) -> None:
    model, tokenizer = tiny
    text = _text(3 * 16 + 5)  # three whole windows and a 5-token tail
    ids = tokenizer(text).input_ids
    assert len(ids) == 53
    got = perplexity(model, text, seqlen=16, tokenizer=tokenizer)
    assert got == pytest.approx(_manual_ppl(model, ids, 16), rel=1e-5)
    # A perplexity near the vocabulary size would mean the test model predicts nothing.
    assert got != pytest.approx(len(tokenizer.get_vocab()), rel=0.2)


def test_tail_dropped_and_windows_not_overlapping(tiny) -> None:
    model, tokenizer = tiny
    base = _text(2 * 16, seed=1)
    ppl = perplexity(model, base, seqlen=16, tokenizer=tokenizer)
    # Words that do not fill a window change nothing ...
    assert perplexity(model, base + " " + _text(15, seed=2), seqlen=16, tokenizer=tokenizer) == pytest.approx(
        ppl, rel=1e-6
    )
    # ... one more whole window does, and it is scored on its own (no context from the window before).
    extra = _text(16, seed=3)
    combined = perplexity(model, base + " " + extra, seqlen=16, tokenizer=tokenizer)
    alone = perplexity(model, extra, seqlen=16, tokenizer=tokenizer)
    expected = math.exp((2 * math.log(ppl) + math.log(alone)) / 3)  # windows weigh equally
    assert combined == pytest.approx(expected, rel=1e-5)
    assert combined != pytest.approx(ppl, rel=1e-3)
    # Windows of another length cut the text elsewhere and give another number.
    ids = tokenizer(base).input_ids
    assert perplexity(model, base, seqlen=8, tokenizer=tokenizer) == pytest.approx(_manual_ppl(model, ids, 8), rel=1e-5)


def test_batch_size_does_not_change_the_result(tiny) -> None:
    model, tokenizer = tiny
    text = _text(5 * 16, seed=4)
    one = perplexity(model, text, seqlen=16, tokenizer=tokenizer, batch_size=1)
    # 5 windows in batches of 2 leave a last batch of 1.
    assert perplexity(model, text, seqlen=16, tokenizer=tokenizer, batch_size=2) == pytest.approx(one, rel=1e-5)


def test_bf16_model_scores_from_fp32_logits(tiny) -> None:
    model, tokenizer = tiny
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16).eval()
    text = _text(2 * 16, seed=5)
    ids = tokenizer(text).input_ids
    got = perplexity(half, text, seqlen=16, tokenizer=tokenizer)
    assert got == pytest.approx(_manual_ppl(half, ids, 16), rel=1e-5)


def test_folder_loads_model_and_tokenizer(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = _text(3 * 16, seed=6)
    expected = perplexity(model, text, seqlen=16, tokenizer=tokenizer)
    assert perplexity(str(tmp_path), text, seqlen=16) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tmp_path, text, seqlen=16, device="cpu") == pytest.approx(expected, rel=1e-5)


def test_model_left_in_its_mode(tiny) -> None:
    model, tokenizer = tiny
    model.train()
    try:
        perplexity(model, _text(16, seed=7), seqlen=16, tokenizer=tokenizer)
        assert model.training
    finally:
        model.eval()


def test_text_shorter_than_one_window(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"15 tokens, fewer than one window of seqlen=16"):
        perplexity(model, _text(15), seqlen=16, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"0 tokens"):
        perplexity(model, "", seqlen=16, tokenizer=tokenizer)


def test_bad_arguments(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    text = _text(32)
    with pytest.raises(ValueError, match="tokenizer="):
        perplexity(model, text, seqlen=16)
    with pytest.raises(ValueError, match="seqlen=1"):
        perplexity(model, text, seqlen=1, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity(model, text, seqlen=16, tokenizer=tokenizer, batch_size=0)
    with pytest.raises(TypeError, match="text must be a str"):
        perplexity(model, tokenizer(text).input_ids, seqlen=16, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="missing"):
        perplexity(str(tmp_path / "missing"), text, seqlen=16)


def test_run_lm_eval_says_how_to_install(tiny, monkeypatch) -> None:
    model, tokenizer = tiny
    # A None entry makes `import lm_eval` raise ImportError whether or not it is installed.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
    with pytest.raises(ImportError, match=r"pip install 'lm-eval>=0.4.2'"):
        run_lm_eval(model, "lambada_openai", batch_size=1, limit=2, tokenizer=tokenizer)
