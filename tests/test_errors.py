"""C++ errors reach Python as the types the binding maps them to, from any thread of a parallel loop and
with any bytes in their message, and never end the process."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import fastround  # a broken build must fail here, not skip
_C = fastround._C

MAPPED = {
    "CheckpointError": fastround.CheckpointError,
    "MissingPathError": FileNotFoundError,
    "OptionError": ValueError,
    "IoError": OSError,
    "Cancelled": KeyboardInterrupt,
    "bad_alloc": MemoryError,
    "runtime_error": RuntimeError,
}


@pytest.fixture
def restore_threads():
    n = _C.max_threads()
    yield
    _C.set_num_threads(n)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(fastround.CheckpointError, ValueError)
    assert fastround.CheckpointError is _C.CheckpointError


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("throw_from", [0, 1, 999], ids=["every", "all-but-first", "last"])
@pytest.mark.parametrize("error", sorted(MAPPED))
def test_error_inside_parallel_for_reaches_python(error, throw_from, threads, restore_threads):
    """Thrown inside the OpenMP loop (by one iteration or by all threads at once), the first error is
    rethrown on the calling thread as its Python exception, instead of std::terminate."""
    _C.set_num_threads(threads)
    with pytest.raises(MAPPED[error]) as info:
        _C._parallel_for_probe(1000, throw_from, error)
    assert type(info.value) is MAPPED[error]
    if error != "bad_alloc":
        assert "[parallel_for_probe] iteration" in str(info.value)
    assert _C._parallel_for_probe(1000, 1000, "CheckpointError") == 1000  # the pool still works


def test_torch_adapter_keeps_core_mapping():
    """fastround._torch registers the same translator for itself; _C's errors keep their types."""
    import torch

    import fastround._torch as _torch

    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        _torch.quantize_int_gptq_tensor(torch.zeros(8, 32), 3, 32, True, 1)
    with pytest.raises(fastround.CheckpointError):
        _C._parallel_for_probe(4, 0, "CheckpointError")


def test_message_that_is_not_utf8(tmp_path: Path):
    """A corrupt header quoted in the message arrives as a CheckpointError, not a UnicodeDecodeError."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    header = b'{"w": \xff\xfe}   '
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(fastround.CheckpointError, match="model.safetensors") as info:
        fastround.AutoRound(str(src), model_free=True, show_progress=False).quantize_and_save(str(tmp_path / "out"))
    assert "\ufffd" in str(info.value)
