"""The C++ core's own test targets, run from pytest so CI runs them, and the encoding table as Python sees it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import fastround  # a broken build must fail here, not skip
from fastround import _C

BIN = Path(fastround.__file__).parent / "bin"


ISAS = [isa for isa in ("scalar", "avx2", "avx512") if _C.isa_supported(isa)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", ["1", "2"])
def test_encoding_table_walk(threads, isa):
    """Every table row, source dtype, thread count and instruction set this CPU has: fast == reference bit for
    bit, pack(reference codes) == quantize, the dequantizer reads the bytes back (cpp/tests/test_encodings.cpp)."""
    exe = BIN / "fastround-test-encodings"
    assert exe.is_file(), f"{exe} was not built"
    env = dict(os.environ, OMP_NUM_THREADS=threads, FASTROUND_ISA=isa)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = re.search(r"^(\d+) passed, (\d+) failed$", run.stdout, re.M)
    assert summary and int(summary.group(2)) == 0 and int(summary.group(1)) > 1000, run.stdout[-2000:]
    for name in ("int_gptq", "int_awq", "mxfp4", "mxfp8", "nvfp4_e5m3"):
        assert re.search(rf"^{name}\s+\d+ checks$", run.stdout, re.M), f"row {name} was not walked"


def test_table_rows_and_formats():
    rows = {e.name: e for e in _C.encodings()}
    assert list(rows) == ["int_gptq", "int_awq", "mxfp4", "mxfp8", "nvfp4_e5m3"]
    assert rows["int_gptq"].bits == [2, 4, 8] and rows["int_awq"].bits == [4]
    assert rows["int_gptq"].packing_format(True) == "auto_round:auto_gptq"
    assert rows["int_gptq"].packing_format(False) == "auto_round"
    assert rows["mxfp4"].fixed_group == 32 and rows["nvfp4_e5m3"].fixed_group == 16
    assert "fake" in rows["nvfp4_e5m3"].model_free_formats and "fake" not in rows["mxfp4"].model_free_formats
    assert rows["mxfp4"].routed_formats == ["auto_round", "llm_compressor"]


@pytest.mark.parametrize(
    ("bits", "data_type", "fmt", "name"),
    [
        (4, "int", "auto_round", "int_gptq"),
        (2, "int", "auto_round:auto_gptq", "int_gptq"),
        (4, "int", "auto_awq", "int_awq"),
        (4, "int", "auto_round:auto_awq", "int_awq"),
        (4, "mx_fp", "auto_round", "mxfp4"),
        (8, "mx_fp", "llm_compressor", "mxfp8"),
        (4, "nvfp4_v2", "auto_round", "nvfp4_e5m3"),
    ],
)
def test_encoding_for(bits, data_type, fmt, name):
    assert _C.encoding_for(bits, data_type, fmt).name == name


def test_encoding_for_full_precision_and_unserved():
    assert _C.encoding_for(16, "int") is None
    with pytest.raises(ValueError, match="bits=3 with data_type 'int'"):
        _C.encoding_for(3, "int")
    with pytest.raises(ValueError, match="bits=2 with data_type 'int'"):
        _C.encoding_for(2, "int", "auto_awq")
    with pytest.raises(ValueError, match="bits=6 with data_type 'mx_fp'"):
        _C.encoding_for(6, "mx_fp")


def test_tensor_layouts():
    gptq = _C.encoding_for(4, "int")
    assert gptq.tensors(50, 100, 4, 32) == [
        ("qweight", "I32", [16, 50]),
        ("qzeros", "I32", [4, 7]),
        ("scales", "F16", [4, 50]),
    ]
    awq = _C.encoding_for(4, "int", "auto_awq")
    assert awq.tensors(64, 256, 4, 128) == [
        ("qweight", "I32", [256, 8]),
        ("qzeros", "I32", [2, 8]),
        ("scales", "F16", [2, 64]),
    ]
    with pytest.raises(ValueError, match="out_features 50 is not a multiple of 8"):
        awq.tensors(50, 256, 4, 128)
    assert _C.encoding_for(8, "mx_fp").tensors(4, 64, 8) == [
        ("weight", "F8_E4M3", [4, 64]),
        ("weight_scale", "U8", [4, 2]),
    ]


def test_stub_lists_the_module():
    """python/fastround/_C.pyi (what type checkers and IDEs read) names exactly what the module exports."""
    import ast

    stub = Path(fastround.__file__).with_name("_C.pyi")
    assert stub.is_file(), "fastround/_C.pyi is not installed"
    tree = ast.parse(stub.read_text())
    declared = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared.add(node.target.id)
        elif isinstance(node, ast.Assign):
            declared.update(t.id for t in node.targets if isinstance(t, ast.Name))
    exported = {n for n in dir(_C) if not n.startswith("_")}
    declared = {n for n in declared if not n.startswith("_")}  # test hooks and __all__ are not the API
    assert exported - declared == set(), f"missing from _C.pyi: {sorted(exported - declared)}"
    assert declared - exported == set(), f"stale in _C.pyi: {sorted(declared - exported)}"
