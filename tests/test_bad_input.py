"""Bad input fails with one clear error, changes nothing in the source and leaves no output that looks
complete; the CLI exits non-zero; an interrupted run cleans up and re-raises KeyboardInterrupt."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import fastround  # a broken build must fail here, not skip
_C = fastround._C


# ----------------------------------------------------------------------------------------------
# helpers


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest); folders listed too."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


STAGING = ".fastround-partial"


def assert_no_complete_output(out: Path, existed_before: bool, resumable: bool = False) -> None:
    """Nothing that looks finished: no output dir at all (or the pre-existing one left empty), unless
    `resumable` shards were finished, which wait in the hidden staging folder beside their manifest."""
    if not resumable:
        if not existed_before:
            assert not out.exists(), f"output dir {out} was left behind: {sorted(os.listdir(out))}"
            return
        assert not (out / "config.json").exists(), "config.json written despite the failure"
        leftovers = sorted(p.name for p in out.rglob("*.safetensors"))
        assert not leftovers, f"safetensors left in the output dir: {leftovers}"
        return
    assert sorted(p.name for p in out.iterdir()) == [STAGING], f"left in output dir: {sorted(os.listdir(out))}"
    manifest = json.loads((out / STAGING / "fastround-resume.json").read_text())
    kept = sorted(p.name for p in (out / STAGING).glob("*.safetensors"))
    assert kept and kept == sorted(r["output"] for r in manifest["shards"]), (kept, manifest["shards"])


def st_bytes(tensors: dict[str, dict], data: bytes, metadata: dict | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _bf16(arr: np.ndarray) -> bytes:
    return (np.ascontiguousarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def tiny_tensors(q_dtype: str = "BF16", rows: int = 64, cols: int = 128) -> tuple[dict, bytes]:
    """q_proj weight (dtype q_dtype), a norm weight, and int non-weight buffers; valid offsets."""
    rng = np.random.default_rng(0)
    parts: list[tuple[str, str, list[int], bytes]] = []
    if q_dtype == "BF16":
        qb = _bf16(rng.standard_normal((rows, cols)) * 0.05)
    elif q_dtype == "I8":
        qb = rng.integers(-128, 127, (rows, cols), dtype=np.int8).tobytes()
    elif q_dtype == "I32":
        qb = rng.integers(-1000, 1000, (rows, cols), dtype="<i4").tobytes()
    else:
        raise AssertionError(q_dtype)
    parts.append(("model.layers.0.self_attn.q_proj.weight", q_dtype, [rows, cols], qb))
    parts.append(("model.norm.weight", "BF16", [cols], _bf16(np.ones(cols))))
    parts.append(("model.layers.0.self_attn.step_counter", "I64", [4], np.arange(4, dtype="<i8").tobytes()))
    parts.append(("model.layers.0.mlp.lookup", "I32", [2, 4], np.arange(8, dtype="<i4").tobytes()))
    header: dict[str, dict] = {}
    data = b""
    for name, dt, shape, raw in parts:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 32,
    "max_position_embeddings": 32,
}


def make_tiny(root: Path, shard: bytes | None = None, name: str = "model.safetensors") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    if shard is None:
        shard = st_bytes(*tiny_tensors())
    (root / name).write_bytes(shard)
    return root


def run_api(src: Path, out: Path, fmt: str = "auto_round", **kwargs) -> None:
    kwargs.setdefault("scheme", "W4A16")
    ar = fastround.AutoRound(str(src), model_free=True, show_progress=False, **kwargs)
    ar.quantize_and_save(str(out), format=fmt)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastround", *args, "--no_progress"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=180,
    )


def expect_failure(
    call: Callable[[], None],
    src: Path,
    out: Path,
    exc: type[BaseException],
    needles: list[str],
) -> BaseException:
    """Run `call`, expecting `exc` whose message names every needle; source unchanged; no output."""
    before = snapshot(src) if src.exists() else None
    out_existed = out.exists()
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"error message does not name {needle!r}: {msg}"
    if before is not None:
        assert snapshot(src) == before, "the source folder changed"
    assert_no_complete_output(out, out_existed)
    return info.value


def expect_cli_failure(args: list[str], src: Path, out: Path, needles: list[str]) -> str:
    before = snapshot(src) if src.exists() else None
    out_existed = out.exists()
    r = run_cli(*args)
    assert r.returncode != 0, f"CLI exited 0 on bad input; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, f"CLI printed a traceback:\n{r.stderr}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("fastround: error")]
    assert len(errors) == 1, f"expected exactly one error line, got:\n{r.stderr}"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"CLI error does not name {needle!r}: {errors[0]}"
    if before is not None:
        assert snapshot(src) == before, "the source folder changed"
    assert_no_complete_output(out, out_existed)
    return errors[0]


@pytest.fixture
def llama_copy(checkpoint, tmp_path) -> Path:
    """A private, writable copy of the sharded llama checkpoint."""
    dst = tmp_path / "src"
    shutil.copytree(checkpoint("llama"), dst)
    return dst


# ----------------------------------------------------------------------------------------------
# sanity: the hand-made checkpoint is valid, and int buffers pass through


def test_tiny_checkpoint_is_valid_and_int_buffers_pass_through(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    before = snapshot(src)
    run_api(src, out)
    assert snapshot(src) == before
    from safetensors import safe_open

    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == ["model.safetensors"]
    with safe_open(str(files[0]), "np") as f:
        keys = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.qweight" in keys
        assert "model.layers.0.self_attn.q_proj.weight" not in keys
        np.testing.assert_array_equal(f.get_tensor("model.layers.0.self_attn.step_counter"), np.arange(4))
        np.testing.assert_array_equal(
            f.get_tensor("model.layers.0.mlp.lookup"), np.arange(8, dtype=np.int32).reshape(2, 4)
        )
    assert not (out / ".fastround-partial").exists()


# ----------------------------------------------------------------------------------------------
# paths


def test_missing_path(tmp_path):
    src = tmp_path / "does-not-exist"
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, FileNotFoundError, [str(src)])
    assert not src.exists()


def test_config_but_no_safetensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(TINY_CONFIG))
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, FileNotFoundError, [str(src)])


def test_no_config_json(tmp_path):
    src = make_tiny(tmp_path / "src")
    (src / "config.json").unlink()
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, FileNotFoundError, [str(src), "config.json"])


def test_source_is_a_file(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(st_bytes(*tiny_tensors()))
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src.parent, out, ValueError, [str(src)])


# ----------------------------------------------------------------------------------------------
# malformed shards


def test_truncated_shard(llama_copy, tmp_path):
    shard = sorted(llama_copy.glob("*.safetensors"))[2]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    err = expect_failure(lambda: run_api(llama_copy, out), llama_copy, out, fastround.CheckpointError, [shard.name])
    assert isinstance(err, ValueError)


def test_truncated_inside_header(tmp_path):
    raw = st_bytes(*tiny_tensors())
    src = make_tiny(tmp_path / "src", raw[:40])
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, fastround.CheckpointError, ["model.safetensors"])


@pytest.mark.parametrize("size", [3, 4096], ids=["shorter-than-length-field", "4KiB"])
def test_garbage_shard(tmp_path, size):
    rng = np.random.default_rng(size)
    src = make_tiny(tmp_path / "src", rng.integers(0, 256, size, dtype=np.uint8).tobytes(), "model-garbage.safetensors")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, fastround.CheckpointError, ["model-garbage.safetensors"])


def test_header_not_json(tmp_path):
    junk = b"{not json at all" + b" " * 8
    raw = struct.pack("<Q", len(junk)) + junk + b"\0" * 64
    src = make_tiny(tmp_path / "src", raw, "bad-header.safetensors")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, fastround.CheckpointError, ["bad-header.safetensors"])


def test_data_offsets_out_of_range(tmp_path):
    header, data = tiny_tensors()
    name = "model.layers.0.self_attn.step_counter"
    header[name]["data_offsets"] = [len(data) - 16, len(data) + 16]
    src = make_tiny(tmp_path / "src", st_bytes(header, data), "model-oob.safetensors")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, fastround.CheckpointError, ["model-oob.safetensors", name])


def test_data_offsets_size_mismatch(tmp_path):
    header, data = tiny_tensors()
    name = "model.norm.weight"
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b, e - 2]  # one element short for its shape
    src = make_tiny(tmp_path / "src", st_bytes(header, data), "model-short.safetensors")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, fastround.CheckpointError, ["model-short.safetensors", name])


@pytest.mark.parametrize(
    "name,shape",
    [
        ("model.layers.0.mlp.huge_buffer", [2**62, 4]),  # copied tensor: 2^62*4*2 bytes wraps to 0
        ("model.layers.0.mlp.gate_proj.weight", [2**61, 128]),  # a weight to quantize: wraps to 0 too
    ],
    ids=["copied", "quantized"],
)
def test_shape_byte_size_overflow(tmp_path, name, shape):
    """A shape whose byte size overflows 64 bits must not pass as a zero-byte tensor."""
    header, data = tiny_tensors()
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [len(data), len(data)]}
    src = make_tiny(tmp_path / "src", st_bytes(header, data), "model-overflow.safetensors")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, fastround.CheckpointError, ["model-overflow.safetensors", name])


@pytest.mark.parametrize("dtype", ["Q7", "F8_E9M9"])
def test_unknown_dtype_in_header(tmp_path, dtype):
    header, data = tiny_tensors()
    header["model.norm.weight"]["dtype"] = dtype
    src = make_tiny(tmp_path / "src", st_bytes(header, data), "model-dtype.safetensors")
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out), src, out, fastround.CheckpointError, ["model-dtype.safetensors", "model.norm.weight"]
    )


def test_index_not_json(llama_copy, tmp_path):
    (llama_copy / "model.safetensors.index.json").write_text("{not json")
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(llama_copy, out), llama_copy, out, fastround.CheckpointError, ["model.safetensors.index.json"]
    )


def test_config_not_json(tmp_path):
    src = make_tiny(tmp_path / "src")
    (src / "config.json").write_text("{not json")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out), src, out, ValueError, ["config.json"])


def test_overlapping_data_offsets(tmp_path):
    a = np.arange(32, dtype="<f4").tobytes()
    header = {
        "model.layers.0.mlp.a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]},
        "model.layers.0.mlp.b": {"dtype": "F32", "shape": [32], "data_offsets": [64, 192]},
    }
    src = make_tiny(tmp_path / "src", st_bytes(header, a + a), "model-overlap.safetensors")
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out),
        src,
        out,
        fastround.CheckpointError,
        ["model-overlap.safetensors", "model.layers.0.mlp.a", "model.layers.0.mlp.b"],
    )


def test_index_lists_missing_shard(llama_copy, tmp_path):
    victim = sorted(llama_copy.glob("*.safetensors"))[1]
    victim.unlink()
    out = tmp_path / "out"
    expect_failure(lambda: run_api(llama_copy, out), llama_copy, out, FileNotFoundError, [victim.name])


def test_index_names_unknown_shard(llama_copy, tmp_path):
    index_path = llama_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = sorted(index["weight_map"])[3]
    index["weight_map"][key] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(llama_copy, out), llama_copy, out, FileNotFoundError, ["model-99999-of-99999.safetensors"]
    )


def test_late_bad_shard_writes_nothing(llama_copy, tmp_path):
    """The defect is in the last shard processed: earlier shards must not be left in the output."""
    index = json.loads((llama_copy / "model.safetensors.index.json").read_text())
    order = list(dict.fromkeys(index["weight_map"].values()))
    last = llama_copy / order[-1]
    raw = last.read_bytes()
    last.write_bytes(raw[: len(raw) - 7])
    out = tmp_path / "out"
    expect_failure(lambda: run_api(llama_copy, out), llama_copy, out, fastround.CheckpointError, [last.name])


# ----------------------------------------------------------------------------------------------
# unsupported tensors and options


@pytest.mark.parametrize("q_dtype", ["I8", "I32"])
def test_int_weight_to_quantize(tmp_path, q_dtype):
    src = make_tiny(tmp_path / "src", st_bytes(*tiny_tensors(q_dtype)))
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out), src, out, ValueError, ["model.layers.0.self_attn.q_proj.weight", q_dtype]
    )


def test_int_weight_ignored_passes_through(tmp_path):
    src = make_tiny(tmp_path / "src", st_bytes(*tiny_tensors("I8")))
    out = tmp_path / "out"
    run_api(src, out, ignore_layers="q_proj")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == np.int8


def _with_nonfinite(q_dtype: str = "BF16") -> bytes:
    """The tiny shard with 3 NaN and 2 Inf planted in q_proj.weight (stored as q_dtype)."""
    header, data = tiny_tensors()
    name = "model.layers.0.self_attn.q_proj.weight"
    b, e = header[name]["data_offsets"]
    w = np.frombuffer(data[b:e], "<u2").copy()
    w[[0, 5, 700, 4000, 8191]] = [0x7FC0, 0xFFC0, 0x7F81, 0x7F80, 0xFF80]  # bf16 NaN x3, +Inf, -Inf
    if q_dtype == "F32":
        raw = (w.astype("<u4") << 16).tobytes()
        header = {k: dict(v) for k, v in header.items()}
        for k, v in header.items():  # widen q_proj in place; the tensors after it move along
            lo, hi = v["data_offsets"]
            shift = len(raw) - (e - b) if lo >= e else 0
            v["data_offsets"] = [lo + shift, hi + shift]
        header[name] = {"dtype": "F32", "shape": header[name]["shape"], "data_offsets": [b, b + len(raw)]}
        return st_bytes(header, data[:b] + raw + data[e:])
    return st_bytes(header, data[:b] + w.tobytes() + data[e:])


@pytest.mark.parametrize("q_dtype", ["BF16", "F32"])
@pytest.mark.parametrize("scheme", ["W4A16", "W8A16", "MXFP4", "NVFP4_E5M3"])
def test_nonfinite_weight_is_refused(tmp_path, scheme, q_dtype):
    """Deviation (docs/compatibility.md): upstream quantizes a weight holding NaN/Inf into NaN scales
    without a word; fastround refuses it, naming the shard, the tensor and how many such values it holds."""
    src = make_tiny(tmp_path / "src", _with_nonfinite(q_dtype))
    out = tmp_path / "out"
    err = expect_failure(
        lambda: run_api(src, out, scheme=scheme),
        src,
        out,
        fastround.CheckpointError,
        ["model.safetensors", "model.layers.0.self_attn.q_proj.weight", "5 NaN/Inf value(s) of 8192"],
    )
    assert "ignore the layer" in str(err)


def test_nonfinite_weight_kept_when_ignored(tmp_path):
    src = make_tiny(tmp_path / "src", _with_nonfinite())
    out = tmp_path / "out"
    run_api(src, out, ignore_layers="q_proj")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        kept = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert int((~kept.float().isfinite()).sum()) == 5


def _fp8_source(root: Path, scale: np.ndarray) -> Path:
    """One FP8 layer [64, 128] with a [1, 1] block scale_inv of the given array's dtype and values."""
    rng = np.random.default_rng(1)
    w = rng.integers(0, 0x78, (64, 128), dtype=np.uint8)  # finite E4M3 codes
    dt = {np.dtype("<f4"): "F32", np.dtype("<i4"): "I32"}[scale.dtype]
    header = {
        "model.layers.0.mlp.up_proj.weight": {"dtype": "F8_E4M3", "shape": [64, 128], "data_offsets": [0, w.nbytes]},
        "model.layers.0.mlp.up_proj.weight_scale_inv": {
            "dtype": dt, "shape": [1, 1], "data_offsets": [w.nbytes, w.nbytes + scale.nbytes]},
    }  # fmt: skip
    make_tiny(root, st_bytes(header, w.tobytes() + scale.tobytes()))
    cfg = dict(TINY_CONFIG, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def test_fp8_int32_scale_inv_is_refused(tmp_path):
    """The fuzzing finding of issue 8: an int32 weight_scale_inv used to throw inside the parallel dequant loop
    (std::terminate, SIGABRT, .fastround-partial left behind). It is refused while planning."""
    src = _fp8_source(tmp_path / "src", np.array([[3]], "<i4"))
    out = tmp_path / "out"
    err = expect_failure(
        lambda: run_api(src, out), src, out, fastround.CheckpointError,
        ["model.safetensors", "model.layers.0.mlp.up_proj.weight", "weight_scale_inv has dtype I32"],
    )  # fmt: skip
    assert isinstance(err, ValueError)


def test_fp8_nan_scale_is_refused(tmp_path):
    """A NaN scale_inv dequantizes the weight to NaN: the same refusal, naming the FP8 weight."""
    src = _fp8_source(tmp_path / "src", np.array([[np.nan]], "<f4"))
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out), src, out, fastround.CheckpointError,
        ["model.layers.0.mlp.up_proj.weight", "dequantizes to 8192 NaN/Inf value(s) of 8192"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "scheme", ["W3A16", "FPW8A16", "GGUF:Q4_K_M", "NVFP4", "INT8_W8A8", "FP8_STATIC", "MXFP4_RCEIL", "NOPE"]
)
def test_unsupported_scheme(tmp_path, scheme):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out, scheme=scheme), src, out, ValueError, [scheme])


@pytest.mark.parametrize("override", [{"bits": 3}, {"bits": 5}, {"group_size": 0}, {"data_type": "fp"}])
def test_unsupported_override(tmp_path, override):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    (key,) = override
    expect_failure(lambda: run_api(src, out, **override), src, out, ValueError, [key])


def test_layer_config_bits3(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out, layer_config={"q_proj": {"bits": 3}}), src, out, ValueError, ["q_proj", "bits"]
    )


def test_layer_config_unknown_scheme(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out, layer_config={"q_proj": "NOT_A_SCHEME"}), src, out, ValueError, ["q_proj", "NOT_A_SCHEME"]
    )


def test_layer_config_unknown_field(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_failure(
        lambda: run_api(src, out, layer_config={"q_proj": {"bitz": 8}}), src, out, ValueError, ["q_proj", "bitz"]
    )


def test_invalid_ignore_regex(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out, ignore_layers="a(b"), src, out, ValueError, ["a(b"])


def test_output_dir_is_source(llama_copy):
    before = snapshot(llama_copy)
    with pytest.raises(ValueError, match="output_dir") as info:
        run_api(llama_copy, llama_copy)
    assert str(llama_copy) in str(info.value)
    assert snapshot(llama_copy) == before, "the source folder changed"


def test_output_dir_is_source_spelled_differently(llama_copy):
    before = snapshot(llama_copy)
    alias = llama_copy / "original" / ".." / "."
    with pytest.raises(ValueError, match="output_dir"):
        run_api(llama_copy, alias)
    assert snapshot(llama_copy) == before, "the source folder changed"


@pytest.mark.parametrize("sub", ["quantized", "a/b"])
def test_output_dir_inside_source(llama_copy, sub):
    out = llama_copy / sub
    expect_failure(lambda: run_api(llama_copy, out), llama_copy, out, ValueError, ["output_dir", str(out)])


def test_output_dir_inside_source_via_symlink(llama_copy, tmp_path):
    link = tmp_path / "alias"
    link.symlink_to(llama_copy, target_is_directory=True)
    out = link / "quantized"
    expect_failure(lambda: run_api(llama_copy, out), llama_copy, out, ValueError, ["output_dir"])


def test_output_dir_is_a_file(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="output_dir"):
        run_api(src, out)
    assert out.read_text() == "keep me"


def test_bad_format(tmp_path):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_failure(lambda: run_api(src, out, fmt="gguf:q4_k_m"), src, out, ValueError, ["gguf:q4_k_m"])


# ----------------------------------------------------------------------------------------------
# CLI: non-zero exit, one error line, nothing written


def test_cli_missing_path(tmp_path):
    src, out = tmp_path / "nope", tmp_path / "out"
    expect_cli_failure([str(src), "--model_free", "--output_dir", str(out)], tmp_path, out, [str(src)])


def test_cli_truncated_shard(llama_copy, tmp_path):
    shard = sorted(llama_copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    expect_cli_failure([str(llama_copy), "--model_free", "--output_dir", str(out)], llama_copy, out, [shard.name])


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--scheme", "W3A16"], "W3A16"),
        (["--scheme", "NOPE"], "NOPE"),
        (["--layer_config", "{q_proj:{bits:3}}"], "q_proj"),
        (["--ignore_layers", "a(b"], "a(b"),
        (["--format", "gguf:q4_k_m"], "gguf:q4_k_m"),
    ],
    ids=["W3A16", "NOPE", "layer_config-bits3", "bad-regex", "gguf-format"],
)
def test_cli_bad_option(tmp_path, extra, needle):
    src = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    expect_cli_failure([str(src), "--model_free", "--output_dir", str(out), *extra], src, out, [needle])


def test_cli_output_inside_source(llama_copy):
    out = llama_copy / "q"
    expect_cli_failure([str(llama_copy), "--model_free", "--output_dir", str(out)], llama_copy, out, ["output_dir"])


def test_cli_relative_output_inside_source(llama_copy):
    before = snapshot(llama_copy)
    r = subprocess.run(
        [sys.executable, "-m", "fastround", ".", "--model_free", "--output_dir", "quantized", "--no_progress"],
        capture_output=True, text=True, cwd=llama_copy, timeout=180,
    )
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr
    assert sum(line.startswith("fastround: error") for line in r.stderr.splitlines()) == 1, r.stderr
    assert "output_dir" in r.stderr
    assert snapshot(llama_copy) == before
    assert not (llama_copy / "quantized").exists()


def test_cli_int_weight(tmp_path):
    src = make_tiny(tmp_path / "src", st_bytes(*tiny_tensors("I32")))
    out = tmp_path / "out"
    expect_cli_failure(
        ["--model", str(src), "--model_free", "--output_dir", str(out)],
        src,
        out,
        ["model.layers.0.self_attn.q_proj.weight"],
    )


# ----------------------------------------------------------------------------------------------
# interrupted runs


INTERRUPT_KIND = "llama_aligned"  # every in_features a multiple of 32: group 32 quantizes every Linear


def _job(src: Path, out: Path) -> str:
    return json.dumps(
        {
            "source_dir": str(src),
            "output_dir": str(out),
            "scheme": "W4A16",
            "overrides": {"group_size": 32},
            "layer_config": {},
            "ignore_layers": "",
            "quant_lm_head": False,
            "quant_nontext_module": False,
            "detected_ignore": [],
            "format": "auto_round",
            "threads": 0,
        }
    )


@pytest.fixture(scope="module")
def progress_calls(checkpoint, tmp_path_factory) -> int:
    """How many times a complete run on the llama_aligned checkpoint calls progress."""
    out = tmp_path_factory.mktemp("full") / "out"
    calls = []
    summary = json.loads(_C.run_model_free(_job(checkpoint(INTERRUPT_KIND), out), lambda p: calls.append(dict(p)), None))
    assert summary["quantized_layers"], "the reference run quantized nothing"
    assert (out / "config.json").exists()
    assert len(calls) > 3
    return len(calls)


@pytest.mark.parametrize("when", ["first", "second", "middle", "last"])
@pytest.mark.parametrize("out_exists", [False, True], ids=["new-out", "existing-empty-out"])
def test_interrupt_cleans_up(checkpoint, tmp_path, progress_calls, when, out_exists):
    src = checkpoint(INTERRUPT_KIND)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    stop_at = {"first": 1, "second": 2, "middle": progress_calls // 2, "last": progress_calls}[when]
    seen = []

    def progress(p: dict) -> bool:
        seen.append(p)
        if len(seen) == stop_at:
            raise KeyboardInterrupt("user pressed ^C")
        return True

    logs: list[tuple[int, str]] = []
    before = snapshot(src)
    with pytest.raises(KeyboardInterrupt):
        _C.run_model_free(_job(src, out), progress, lambda level, msg: logs.append((level, msg)))
    assert len(seen) == stop_at, "progress was called again after it raised"
    assert snapshot(src) == before
    # Progress is reported at each shard's start and after each tensor: a stop past the first shard
    # leaves that shard finished, kept for a resume.
    finished = (out / STAGING / "fastround-resume.json").exists()
    assert finished == (when in ("middle", "last")), (when, seen[-1])
    assert_no_complete_output(out, out_exists, resumable=finished)
    if out_exists and not finished:
        assert out.is_dir() and list(out.iterdir()) == [], f"left in output dir: {list(out.iterdir())}"


def test_progress_returning_false_cancels(checkpoint, tmp_path, progress_calls):
    src = checkpoint(INTERRUPT_KIND)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _C.run_model_free(_job(src, out), lambda p: False, None)
    assert_no_complete_output(out, False)


def test_progress_other_exception_propagates(checkpoint, tmp_path):
    src = checkpoint(INTERRUPT_KIND)
    out = tmp_path / "out"

    class Boom(RuntimeError):
        pass

    def progress(p):
        raise Boom("from callback")

    with pytest.raises(Boom, match="from callback"):
        _C.run_model_free(_job(src, out), progress, None)
    assert_no_complete_output(out, False)


def test_rerun_after_interrupt_succeeds(checkpoint, tmp_path, progress_calls):
    src = checkpoint(INTERRUPT_KIND)
    out = tmp_path / "out"
    n = [0]

    def progress(p):
        n[0] += 1
        if n[0] == progress_calls // 2:
            raise KeyboardInterrupt
        return True

    with pytest.raises(KeyboardInterrupt):
        _C.run_model_free(_job(src, out), progress, None)
    json.loads(_C.run_model_free(_job(src, out), None, None))
    assert (out / "config.json").exists()
    assert not (out / ".fastround-partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
