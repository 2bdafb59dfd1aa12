"""Shared pytest fixtures. Must not import fastround at import time: the
harness self-tests run before (and independently of) the C++ build."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

# Make `import checkpoints` / `import oracle` work regardless of pytest's
# import mode or the directory pytest is launched from.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """checkpoint(kind, dtype="bfloat16") -> directory, built once per session.

    Treat the returned directory as read-only: it is shared by every test.
    """
    import checkpoints

    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, dtype: str = "bfloat16") -> Path:
        key = (kind, dtype)
        if key not in built:
            built[key] = checkpoints.build(kind, root / f"{kind}-{dtype}", dtype)
        return built[key]

    return get


@pytest.fixture(scope="session")
def oracle_tmp(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """oracle_tmp(name) -> a fresh, not-yet-existing path for an oracle output dir."""
    root = tmp_path_factory.mktemp("oracle")
    counter = iter(range(1 << 30))

    def make(name: str = "out") -> Path:
        return root / f"{name}-{next(counter)}"

    return make
