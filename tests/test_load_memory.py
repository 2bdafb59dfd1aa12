"""The regular flow's memory on a memory-mapped checkpoint: the pages of a weight that was read and then
quantized (or written to the output) go back to the page cache (fastround.mapped) without changing what any
tensor reads, and pages this process wrote to (private copies) are never dropped."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastround.mapped import release_file_pages

PAGE = os.sysconf("SC_PAGE_SIZE")

def _resident(path: Path) -> int:
    """Bytes of this process's mappings of `path` that are resident (the Rss lines of /proc/self/smaps)."""
    target = str(path.resolve())
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) >= 6 and head[5] == target
            elif inside and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _mapped_blob(tmp_path: Path, size: int) -> tuple[Path, torch.Tensor]:
    """A file of random bytes mapped privately (as transformers maps a safetensors checkpoint)."""
    path = tmp_path / "blob.bin"
    gen = torch.Generator().manual_seed(3)
    path.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).numpy().tobytes())
    return path, torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)


def test_release_drops_read_pages_and_keeps_bytes(tmp_path) -> None:
    size = 256 * PAGE
    path, mapped = _mapped_blob(tmp_path, size)
    copy = mapped.clone()  # reads every page through the mapping
    assert _resident(path) == size
    assert release_file_pages([mapped]) == size
    assert _resident(path) == 0
    assert torch.equal(mapped, copy)  # read again from the page cache
    assert torch.equal(mapped, torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))


def test_release_keeps_pages_written_in_place(tmp_path) -> None:
    size = 64 * PAGE
    path, mapped = _mapped_blob(tmp_path, size)
    mapped[PAGE + 5] ^= 0xFF  # a private copy of page 1; the file keeps its byte
    want = mapped.clone()
    assert release_file_pages([mapped]) == 0  # the range holds a written page: left alone
    assert torch.equal(mapped, want)
    # A range that starts past the written page is released; one that straddles page boundaries loses only
    # its whole pages, so the neighbours' bytes stay mapped.
    assert release_file_pages([mapped[2 * PAGE:]]) == size - 2 * PAGE
    assert release_file_pages([mapped[2 * PAGE + 1:5 * PAGE - 1]]) == PAGE  # page 3 only
    assert torch.equal(mapped, want)
    assert mapped[PAGE + 5] != path.read_bytes()[PAGE + 5]


def test_release_leaves_anonymous_memory() -> None:
    values = torch.arange(1 << 20, dtype=torch.float32)  # [1M] 4 MB of the process's own memory
    want = values.clone()
    assert release_file_pages([values, values[::2]]) == 0
    assert torch.equal(values, want)


def _llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path))
    return path


def test_rtn_returns_the_checkpoint_pages(tmp_path) -> None:
    """RTN reads every weight once (to quantize it, or to write it out); afterwards none of the checkpoint's
    pages stays resident in the process, and the weights the model keeps still read as the file stores them."""
    from safetensors.torch import load_file

    from fastround import AutoRound

    src = _llama(tmp_path / "src")
    weights = src / "model.safetensors"
    ar = AutoRound(str(src), scheme="W4A16", iters=0, disable_opt_rtn=True, disable_model_free=True,
                   device_map="cpu")
    ar.quantize_and_save(str(tmp_path / "out"), format="auto_round")
    size = weights.stat().st_size
    # Only pages shared by two tensors (at most one per tensor boundary) may stay.
    assert _resident(weights) <= 32 * PAGE < size // 4
    stored = load_file(str(weights))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(ar.model.get_parameter(name), stored[name]), name
