"""Keeps benchmarks/model_free.py from rotting: a tiny run of each mode (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "model_free.py"


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--json", str(out), *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_end_to_end_table(tmp_path):
    res = run(tmp_path, "--layers", "1", "--vocab", "256", "--schemes", "W4A16,MXFP4", "--tools", "read,fastround")
    runs = {(r["tool"], r["scheme"]): r for r in res["runs"]}
    assert set(runs) == {("read", "-"), ("fastround", "W4A16"), ("fastround", "MXFP4"), ("fastround-1t", "W4A16"),
                         ("fastround-1t", "MXFP4")}
    assert all(r["ok"] and r["seconds"] > 0 and r["peak_rss_gb"] > 0 for r in runs.values())
    # the instruction set the kernels ran with is recorded, per fastround run and for the machine
    assert res["isa"] in ("scalar", "avx2", "avx512")
    assert all(r["isa"] == res["isa"] for r in runs.values() if r["tool"] != "read")
    assert runs[("read", "-")]["isa"] == ""
    # one Llama-3-8B decoder layer (218M bf16 parameters) plus the small embedding and head
    assert 0.43 < runs[("read", "-")]["source_gb"] < 0.45


def test_kernel_micro_benchmark(tmp_path):
    res = run(tmp_path, "--kernels", "--kernel_shape", "64,256")
    names = {(k["kernel"], k["path"]) for k in res["kernels"]}
    for kernel in ("int4_sym_g128", "mxfp4_optrtn", "nvfp4_e5m3_plain"):
        assert (kernel, "reference") in names and (kernel, "fast") in names
        # the fast path on every instruction set this CPU runs, scalar included
        assert {k["isa"] for k in res["kernels"] if k["kernel"] == kernel and k["path"] == "fast"} >= {"scalar",
                                                                                                     res["isa"]}
