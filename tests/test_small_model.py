"""The shipped accuracy model (models/fastround-llama-tiny) and the corpus script that feeds it."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "fastround-llama-tiny"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_linear_quantizes_under_every_group_size() -> None:
    from safetensors import safe_open

    weights = MODEL / "model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    linear = 0
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            tensor = f.get_slice(name)
            assert tensor.get_dtype() == "BF16", name
            shape = tensor.get_shape()
            if len(shape) == 2 and name.endswith("proj.weight"):
                linear += 1
                assert shape[0] % 128 == 0 and shape[1] % 128 == 0, (name, shape)
    config = json.loads((MODEL / "config.json").read_text())
    assert linear == 7 * config["num_hidden_layers"]
    assert config["tie_word_embeddings"] is False


def test_model_is_trained() -> None:
    from transformers import AutoTokenizer

    from fastround.eval import perplexity

    text = (MODEL / "validation.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    assert tokenizer.decode(tokenizer(text[:2000]).input_ids) == text[:2000]  # byte-level: lossless
    # Four windows of 512 are enough to tell a trained model (about 46) from a random one (thousands).
    head = tokenizer.decode(tokenizer(text).input_ids[: 4 * 512])
    ppl = perplexity(MODEL, head, seqlen=512)
    assert 10 < ppl < 120


def test_rst_cleaning_keeps_prose_only() -> None:
    corpus = _load_script("prepare_corpus")
    page = """.. SPDX-License-Identifier: GPL-2.0

=========
The title
=========

The scheduler picks the next task to run on each CPU, and it does so with :c:func:`pick_next_task`
when the current task blocks or its slice ends. See ``sched.h`` for details.

Run it like this::

    echo 1 > /proc/sys/kernel/sched_foo
    cat /sys/kernel/debug/sched/features

.. code-block:: c

    static int foo(void) { return 0; }

+--------+--------+
| field  | value  |
+--------+--------+

.. note::

   A note body is prose too and stays in the corpus because readers see it as text.

- A list item that reads like a sentence about the kernel stays as well.
"""
    text = corpus.clean_page(page)
    paragraphs = text.split("\n\n")
    assert paragraphs[0].startswith("The scheduler picks the next task")
    assert "pick_next_task when the current task" in paragraphs[0] and "sched.h for details" in paragraphs[0]
    for gone in ("Run it like this", "echo 1", "static int", "field", "SPDX", "The title", "=="):
        assert gone not in text, gone
    assert "A note body is prose too" in text
    assert "A list item that reads like a sentence" in text


def test_deb_reader_and_split(tmp_path: Path) -> None:
    corpus = _load_script("prepare_corpus")
    page = ("The driver registers a device and waits for an interrupt before it reads the data.\n" * 3).encode()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for rel in ("PCI/a.rst.txt", "translations/it_IT/a.rst.txt", "PCI/b.rst.txt"):
            info = tarfile.TarInfo(corpus.SOURCES_PREFIX + rel)
            info.size = len(page)
            tar.addfile(info, io.BytesIO(page))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b"x"), (b"data.tar.xz", data.getvalue())]
    blob = b"!<arch>\n"
    for name, body in members:
        header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        blob += header + str(len(body)).encode().ljust(10) + b"`\n" + body + (b"\n" if len(body) % 2 else b"")
    deb = tmp_path / "linux-doc-6.1_0_all.deb"
    deb.write_bytes(blob)
    pages = corpus.extract_pages(deb)
    assert [p.path for p in pages] == ["PCI/a.rst.txt", "PCI/b.rst.txt"]  # translations skipped
    assert pages[0].text.startswith("The driver registers a device")

    (tmp_path / "not.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not a Debian package"):
        corpus.extract_pages(tmp_path / "not.deb")
    # The split depends on the path alone and holds out about 2 % of the pages.
    paths = [f"dir{i}/page{i}.rst.txt" for i in range(5000)]
    held = [p for p in paths if corpus.is_validation(p)]
    assert held == [p for p in paths if corpus.is_validation(p)]
    assert 0.01 < len(held) / len(paths) < 0.03


def test_encode_text_matches_one_call(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    trainer = _load_script("train_small_model")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = (MODEL / "validation.txt").read_text(encoding="utf-8")[:20000]
    ids = trainer.encode_text(tokenizer, text)
    assert ids.dtype.name == "uint16"
    assert torch.equal(torch.from_numpy(ids.astype("int64")), tokenizer(text, return_tensors="pt").input_ids[0])


def _head_windows(tokenizer, windows: int, seqlen: int) -> str:
    """The held-out text cut to its first `windows` windows of `seqlen` tokens (byte-level BPE: lossless)."""
    text = (MODEL / "validation.txt").read_text(encoding="utf-8")
    return tokenizer.decode(tokenizer(text).input_ids[: windows * seqlen])


def _rtn(scheme: str):
    from transformers import AutoModelForCausalLM

    from fastround import AutoRound

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")
    ar = AutoRound(model, scheme=scheme, iters=0, disable_opt_rtn=True, disable_model_free=True, device_map="cpu")
    quantized, _ = ar.quantize()
    return quantized


def test_w4a16_rtn_costs_little_perplexity() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastround.eval import perplexity

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    head = _head_windows(tokenizer, 20, 512)
    bf16_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")
    bf16 = perplexity(bf16_model, head, seqlen=512, tokenizer=tokenizer)
    w4_model = _rtn("W4A16")
    # Every quantized Linear holds 4-bit group-128 qdq weights: at most 16 distinct values per group.
    q_proj = w4_model.model.layers[0].self_attn.q_proj.weight.detach().float()  # [256, 256]
    assert not torch.equal(q_proj, bf16_model.model.layers[0].self_attn.q_proj.weight.detach().float())
    assert max(len(torch.unique(g)) for g in q_proj.reshape(-1, 128)) <= 16
    w4 = perplexity(w4_model, head, seqlen=512, tokenizer=tokenizer)
    w2 = perplexity(_rtn("W2A16G64"), head, seqlen=512, tokenizer=tokenizer)
    assert w4 != bf16
    assert abs(w4 - bf16) < 0.05 * bf16, (bf16, w4)
    assert w2 > 1.1 * w4, (w4, w2)


def test_calibration_file_is_training_text_upstream_reads() -> None:
    from auto_round.calib_dataset import get_dataloader
    from transformers import AutoTokenizer

    from fastround.calib import get_calibration_batches

    path = MODEL / "calibration.jsonl"
    assert path.stat().st_size < 500 * 1024
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(texts) == 128
    held_out = (MODEL / "validation.txt").read_text(encoding="utf-8")
    assert not any(t[:200] in held_out for t in texts)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ours, batch_size = get_calibration_batches(str(path), tokenizer, seqlen=512, nsamples=128)
    theirs = list(get_dataloader(tokenizer, 512, str(path), seed=42, bs=8, nsamples=128))
    assert batch_size == 8
    ours_ids = torch.cat([b["input_ids"] for b in ours])
    assert ours_ids.shape == (128, 512)
    assert torch.equal(ours_ids, torch.cat([b["input_ids"] for b in theirs]))
