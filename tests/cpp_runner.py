"""Runs one of the C++ test executables installed with fastround (fastround/bin) and checks its summary line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import fastround


def run_cpp_test(name: str, min_passed: int) -> None:
    exe = Path(fastround.__file__).parent / "bin" / name
    assert exe.is_file(), f"{exe} was not built"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = re.search(r"^(\d+) passed, (\d+) failed$", run.stdout, re.M)
    assert summary and int(summary.group(2)) == 0 and int(summary.group(1)) > min_passed, run.stdout[-2000:]
