"""Keeps benchmarks/model_free.py and regular_flow.py from rotting: a tiny run of each mode (no timing is
asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "model_free.py"
REGULAR = SCRIPT.with_name("regular_flow.py")


class Started:
    """A benchmark script's process, started when the module's first test asks (they all run side by side)."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def result(self) -> subprocess.CompletedProcess:
        stdout, stderr = self.proc.communicate(timeout=600)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)


def _model_free(root: Path, *args: str) -> tuple[Started, Path]:
    out = root / "result.json"
    return Started([sys.executable, str(SCRIPT), "--workdir", str(root / "work"), "--json", str(out), *args]), out


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Started, Path]]:
    """name -> (its process, its output): the three tiny runs below are independent, so they overlap."""
    # $OUT is where the device run hands results back; the JSON names it, never the machine's path
    out = tmp_path_factory.mktemp("regular") / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), HF_HUB_OFFLINE="1")
    regular = Started([sys.executable, str(REGULAR), "--shape", "tiny", "--layers", "2", "--vocab", "1024",
                       "--only", "upstream", "--devices", "cpu", "--no_prime", "--workdir", str(out / "work"),
                       "--json", str(out / "regular.json")], env)
    return {
        "regular": (regular, out),
        "table": _model_free(tmp_path_factory.mktemp("table"), "--layers", "1", "--vocab", "256", "--schemes",
                             "W4A16,MXFP4", "--tools", "read,fastround"),
        "kernels": _model_free(tmp_path_factory.mktemp("kernels"), "--kernels", "--kernel_shape", "64,256"),
    }


def run(started: dict[str, tuple[Started, Path]], name: str) -> dict:
    proc, out = started[name]
    r = proc.result()
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_end_to_end_table(started):
    res = run(started, "table")
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


def test_kernel_micro_benchmark(started):
    res = run(started, "kernels")
    names = {(k["kernel"], k["path"]) for k in res["kernels"]}
    for kernel in ("int4_sym_g128", "mxfp4_optrtn", "nvfp4_e5m3_plain"):
        assert (kernel, "reference") in names and (kernel, "fast") in names
        # the fast path on every instruction set this CPU runs, scalar included
        assert {k["isa"] for k in res["kernels"] if k["kernel"] == kernel and k["path"] == "fast"} >= {"scalar",
                                                                                                     res["isa"]}


def test_regular_flow_upstream(started):
    proc, out = started["regular"]
    r = proc.result()
    assert r.returncode == 0, r.stdout + r.stderr
    text = (out / "regular.json").read_text()
    assert str(out) not in text and "$OUT/regular.json" in text
    res = json.loads(text)
    (run,) = res["runs"]
    assert (run["tool"], run["scheme"], run["device"], run["ok"]) == ("upstream", "W4A16", "cpu", True)
    # the regular flow ran (not upstream's model-free auto-routing) and packed every Linear of both blocks
    assert run["compressor"].endswith("CompressionOrchestrator")
    assert run["qweights"] == 2 * 7 and run["output_gb"] > 0
    assert run["versions"]["version"] == "0.16.1"
    # hidden 512, intermediate 1536, 8 heads of 64, 2 kv heads: one block's parameters in float32
    block = 2 * 512 * 512 + 2 * 128 * 512 + 3 * 1536 * 512 + 2 * 512
    assert run["block_fp32_gb"] == res["checkpoint"]["block_fp32_gb"] == 4 * block / 1e9
    model = 2 * (2 * block + 2 * 1024 * 512 + 512)  # blocks, embedding, head, final norm in bf16
    assert model < run["model_gb"] * 1e9 < model + 65536  # plus the safetensors headers
    assert 0 < run["runtime_rss_gb"] < run["peak_rss_gb"]
    assert run["rss_over_model_blocks"] == (run["peak_rss_gb"] - run["model_gb"]) / run["block_fp32_gb"]
    assert run["init_s"] > 0 and run["quantize_s"] > 0 and run["hf_import_s"] >= 0
    assert run["seconds"] > run["import_s"] + run["hf_import_s"] + run["init_s"] + run["quantize_s"]
    assert run["gpu_peak_alloc_gb"] is None
    assert "| cpu | W4A16 | upstream | " in r.stdout
