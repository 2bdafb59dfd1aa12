"""Hadamard rotation in the regular flow (fastround.rotation, transforms-and-formats.md §1.5): MXFP4 RTN checkpoints
with `hadamard` and `random_hadamard` against auto-round 0.16.1's, upstream's resolution rules (and the QUIRKs not
copied), the function a rotated model computes, the load-side hooks and the CLI flags."""

from __future__ import annotations

import atexit
import glob
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastround import rotation as R
from fastround import transform_ops as T

COMMON = {"iters": 0, "disable_opt_rtn": True, "disable_model_free": True, "device_map": "cpu", "nsamples": 8,
          "seqlen": 32, "batch_size": 4}


def _texts(n: int = 12) -> list[str]:
    rng = np.random.default_rng(7)
    # upstream asks for calibration data whenever a rotation config is given (its RotationConfig has no
    # need_calib); the test checkpoints' tokenizer knows the words w0..w39
    return [" ".join(f"w{int(i)}" for i in rng.integers(0, 40, size=int(rng.integers(40, 60)))) for _ in range(n)]


_UPSTREAM_SCRIPT = """
import json, sys
from auto_round import AutoRound
kw = json.loads(sys.argv[1])
ar = AutoRound(kw.pop("src"), enable_torch_compile=False, **kw)
_, folder = ar.quantize_and_save(sys.argv[2], format="auto_round")
print("FOLDER=" + folder)
"""


# Upstream runs from one process per test session that imports auto_round once (~6 CPU-seconds): each run in a
# child forked before anything ran there, so it starts from the same unpatched state as a fresh process (see _run).
# The server reads one JSON list of jobs per line and answers one line per list; each child writes its output to
# its own log file, which a run that succeeded ends with FOLDER=.
_UPSTREAM_FORKS = """
import json, os, sys, traceback
from auto_round import AutoRound
for line in sys.stdin:
    failed = []
    for i, (kw, out, log) in enumerate(json.loads(line)):
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            code = 0
            try:
                if "signround_config" in kw:  # iters / lr through SignRound's config object (test_rotation_tune)
                    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
                    kw["alg_configs"] = [SignRoundConfig(**kw.pop("signround_config"))]
                fmt = kw.pop("format", "auto_round")
                ar = AutoRound(kw.pop("src"), enable_torch_compile=False, **kw)
                _, folder = ar.quantize_and_save(out, format=fmt)
                print("FOLDER=" + folder)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(i)
    print("DONE " + json.dumps(failed), flush=True)
"""
_server: subprocess.Popen | None = None


def _upstream_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-c", _UPSTREAM_FORKS], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        atexit.register(_server.kill)
    return _server


class UpstreamRuns:
    """Upstream quantize_and_save runs, each {"src": ..., **AutoRound kwargs} into its out folder (an optional
    "format", "auto_round" by default; an optional "signround_config": {"iters", "lr"} becomes
    alg_configs=[SignRoundConfig(...)]), in the
    session's upstream process; they run while the caller does its own work. wait() -> [(folder, log)]. One
    UpstreamRuns at a time: wait() before starting the next."""

    def __init__(self, jobs: list[tuple[dict[str, Any], Path]]) -> None:
        self.jobs = [(kw, str(out), str(Path(str(out) + ".log"))) for kw, out in jobs]
        self.server = _upstream_server()
        assert self.server.stdin is not None
        self.server.stdin.write(json.dumps(self.jobs) + "\n")
        self.server.stdin.flush()

    def wait(self) -> list[tuple[Path, str]]:
        assert self.server.stdout is not None
        said = []  # anything the server printed outside the children's logs, for the failure message
        watchdog = threading.Timer(900, self.server.kill)  # a hung run fails the test instead of hanging it
        watchdog.start()
        try:
            for line in self.server.stdout:
                if line.startswith("DONE "):
                    failed = json.loads(line[5:])
                    break
                said.append(line)
            else:
                failed = None  # the server died (or the watchdog killed it)
        finally:
            watchdog.cancel()
        logs = [Path(log).read_text() if Path(log).exists() else "" for _, _, log in self.jobs]
        assert failed == [], "".join(said)[-3000:] + "".join(log[-3000:] for log in logs)
        return [(Path(log.split("FOLDER=")[-1].strip()), log) for log in logs]


def _run(which: str, src: Path, out: Path, **kwargs: Any) -> Path:
    if which == "upstream":
        # A fresh process per run: upstream patches WrapperLinear / QuantLinear once per process with the first
        # run's transform (idempotent guards), so a second rotation in one process reuses the first's matrices.
        kw = dict(COMMON, dataset=_texts(), src=str(src), **kwargs)
        run = subprocess.run([sys.executable, "-c", _UPSTREAM_SCRIPT, json.dumps(kw), str(out)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return Path(run.stdout.split("FOLDER=")[-1].strip())
    from fastround import AutoRound

    ar = AutoRound(str(src), dataset=_texts(), **COMMON, **kwargs)
    _, folder = ar.quantize_and_save(str(out), format="auto_round")
    return Path(folder)


def _nibbles(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t & 15, t >> 4], -1)


def _assert_same_rotated_checkpoint(ours: Path, theirs: Path, zero_signs: bool = True) -> None:
    """Every tensor byte-equal, except (a) with zero_signs (RTN), E2M1 zeros may differ in sign: upstream rotates
    with an fp32 BLAS matmul whose FMA noise leaves tiny signed residues where the exact product is 0 (a constant
    row), the FWHT gives exact zeros (docs/compatibility.md); (b) hadamard_matrix: upstream writes one shared copy,
    fastround one per rotated layer, all equal to it."""
    a = safe_open(str(ours / "model.safetensors"), "pt")
    b = safe_open(str(theirs / "model.safetensors"), "pt")
    up_matrices = [k for k in b.keys() if k.endswith(".hadamard_matrix")]
    our_matrices = [k for k in a.keys() if k.endswith(".hadamard_matrix")]
    assert set(a.keys()) - set(our_matrices) == set(b.keys()) - set(up_matrices)
    assert set(up_matrices) <= set(our_matrices)
    for k in our_matrices:
        assert torch.equal(a.get_tensor(k), b.get_tensor(up_matrices[0])), k
    flips = total = 0
    for k in sorted(set(b.keys()) - set(up_matrices)):
        x, y = a.get_tensor(k), b.get_tensor(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if k.endswith("weight_packed"):
            nx, ny = _nibbles(x), _nibbles(y)
            diff = nx != ny
            assert bool((((nx[diff] & 7) == 0) & ((ny[diff] & 7) == 0)).all()), f"{k}: E2M1 values differ"
            flips += int(diff.sum())
            total += nx.numel()
        else:
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k
    assert flips < (0.02 * total if zero_signs else 1)  # the planted constant rows, and a few tiny values
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert qa == qb
    assert json.loads((ours / "quantization_config.json").read_text()) == json.loads(
        (theirs / "quantization_config.json").read_text())


MXFP4_RTN_ROTATIONS = ["hadamard", "random_hadamard"]


@pytest.fixture(scope="module")
def upstream_mxfp4_rtn(checkpoint, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """rotation_config -> (upstream's out folder, its checkpoint folder), both runs from one UpstreamRuns."""
    src = checkpoint("llama_aligned")
    root = tmp_path_factory.mktemp("rotation_upstream")
    outs = [root / f"up_{rc}" for rc in MXFP4_RTN_ROTATIONS]
    runs = UpstreamRuns([(dict(COMMON, dataset=_texts(), src=str(src), scheme="MXFP4", rotation_config=rc), out)
                         for rc, out in zip(MXFP4_RTN_ROTATIONS, outs)]).wait()
    return {rc: (out, folder) for rc, out, (folder, _) in zip(MXFP4_RTN_ROTATIONS, outs, runs)}


@pytest.mark.parametrize("rotation_config", MXFP4_RTN_ROTATIONS)
def test_mxfp4_rtn_matches_upstream(checkpoint, tmp_path, upstream_mxfp4_rtn, rotation_config) -> None:
    src = checkpoint("llama_aligned")
    up_root, theirs = upstream_mxfp4_rtn[rotation_config]
    ours = _run("fastround", src, tmp_path / "fr", scheme="MXFP4", rotation_config=rotation_config)
    assert ours.relative_to(tmp_path / "fr") == theirs.relative_to(up_root)
    _assert_same_rotated_checkpoint(ours, theirs)


def test_config_forms_give_the_same_checkpoint(checkpoint, tmp_path) -> None:
    """"default", a dict and upstream's RotationConfig object are the same run as "hadamard"."""
    from auto_round.algorithms.transforms.hadamard.config import RotationConfig as UpConfig

    src = checkpoint("llama_aligned")
    ref = _run("fastround", src, tmp_path / "a", scheme="MXFP4", rotation_config="hadamard")
    for i, form in enumerate(["default", {"hadamard_type": "hadamard", "backend": "transform"}, UpConfig()]):
        out = _run("fastround", src, tmp_path / f"b{i}", scheme="MXFP4", rotation_config=form)
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]["rotation_config"]
        expect = {"algorithm": "hadamard", "layerwise": False, "backend": "auto", "block_size": 32,
                  "hadamard_type": "hadamard", "fuse_online_to_weight": None, "allow_online_rotation": True}
        if not isinstance(form, str):  # as upstream: a dict's or object's unset block_size stays None (32 is used)
            expect["block_size"] = None
        if isinstance(form, dict):
            expect["backend"] = "transform"
        assert cfg == expect


# ---- the function a rotated model computes ----

def _tiny(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**common)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    for p in model.parameters():  # from_config leaves biases at zero: make them count
        if p.dim() == 1:
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
def test_rotation_leaves_logits_unchanged(kind, hadamard_type) -> None:
    model = _tiny(kind)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    rot = R.LinearRotation(R.RotationConfig(hadamard_type=hadamard_type), "mx_fp")
    for name, module in model.named_modules():
        if rot.is_target(name, module, {"bits": 4}):
            w = module.weight.data.clone()
            rot.rotate_module(name, module)
            assert not torch.equal(module.weight.data, w)
    assert not any("lm_head" in n for n in rot.rotated) and len(rot.rotated) == 14
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=2e-5)


@pytest.mark.parametrize("hadamard_type", ["hadamard", "random_hadamard"])
def test_load_side_hooks_restore_the_function(hadamard_type) -> None:
    """register_online_hooks (rotation_config + hadamard_matrix buffers) on weights rotated offline."""
    model = _tiny("qwen2")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    rot = R.LinearRotation(R.RotationConfig(hadamard_type=hadamard_type), "mx_fp")
    buffers = {}
    for name, module in model.named_modules():
        if rot.is_target(name, module, {"bits": 4}):
            module.weight.data = rot.apply(module.weight.data)  # no hook: what a checkpoint holds
            buffers[name] = rot.matrix
    cfg = dict(rot.config.model_dump())
    hooked = R.register_online_hooks(model, cfg, "mx_fp", buffers if rot.random else None)
    assert set(hooked) == set(buffers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=2e-5)


def test_in_memory_quantized_model_keeps_its_hooks(checkpoint) -> None:
    """quantize() returns rotated qdq weights with their online hooks: each layer equals x·M^T through the qdq
    weight, which is what the exported checkpoint computes once loaded."""
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    ar = AutoRound(str(src), scheme="MXFP4", rotation_config="hadamard", **{**COMMON, "dataset": _texts()})
    model, _ = ar.quantize()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, dtype=layer.weight.dtype)
    want = torch.nn.functional.linear(T.hadamard_transform(x, 32), layer.weight)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert ar.rotation.rotated and all("lm_head" not in n for n in ar.rotation.rotated)


# ---- resolution rules ----

@pytest.mark.parametrize("value,expect", [
    ("default", "hadamard"), ("hadamard", "hadamard"), ("random_hadamard", "random_hadamard"),
    ({"hadamard_type": "random_hadamard", "block_size": 16}, "random_hadamard"),
])
def test_parse_forms(value, expect) -> None:
    cfg = R.parse_rotation_config(value)
    assert cfg.hadamard_type == expect
    from auto_round.algorithms.transforms import normalize_rotation_config

    assert cfg.model_dump() == normalize_rotation_config(value).model_dump()


def test_quarot_forms() -> None:
    from fastround.quarot import QuaRotConfig

    assert R.parse_rotation_config("quarot") == QuaRotConfig()
    assert R.parse_rotation_config({"algorithm": "spinquant", "r4": True, "rotation_size": 32, "iters": 5}) == \
        QuaRotConfig(r4=True, rotation_size=32)


@pytest.mark.parametrize("value,error", [
    ("spinquant", NotImplementedError), ({"algorithm": "spinquant", "trainable_rotation": True}, NotImplementedError),
    ({"algorithm": "spinquant", "trainable_smooth": True}, NotImplementedError),
    ({"algorithm": "spinquant", "r9": 1}, ValueError),
    ("nope", ValueError), ({"backend": "gpu"}, ValueError),
    ({"hadamard_type": "hadamard", "colour": 1}, ValueError), (3, TypeError),
])
def test_parse_errors(value, error) -> None:
    with pytest.raises(error):
        R.parse_rotation_config(value)


@pytest.mark.parametrize("fields,data_type", [
    ({}, "mx_fp"), ({}, "nv_fp"), ({}, "int"), ({"fuse_online_to_weight": True}, "mx_fp"),
    ({"backend": "transform"}, "mx_fp"), ({"hadamard_type": "inplace_hadamard"}, "mx_fp"),
    ({"hadamard_type": "inplace_quarot_hadamard"}, "mx_fp"), ({"backend": "inplace", "hadamard_type": "inplace_hadamard"}, "int"),
])
def test_backend_resolution_equals_upstream(fields, data_type) -> None:
    from auto_round.algorithms.transforms.hadamard.config import RotationConfig as UpConfig
    from auto_round.algorithms.transforms.hadamard.dispatcher import resolve_hadamard_backend

    up, ours = UpConfig(**fields), R.RotationConfig(**fields)
    assert R.resolve_backend(ours, data_type) == resolve_hadamard_backend(up, data_type)
    assert ours.hadamard_type == up.hadamard_type


def test_inplace_prefix_quirk_is_not_copied() -> None:
    """Upstream strips 8 characters whatever they are: backend="inplace" with hadamard_type "hadamard" became ""
    and "inplace_random" became "random"; here only a literal prefix goes and inplace_random is random_hadamard."""
    from auto_round.algorithms.transforms.hadamard.config import RotationConfig as UpConfig
    from auto_round.algorithms.transforms.hadamard.dispatcher import resolve_hadamard_backend

    up = UpConfig(backend="inplace", hadamard_type="hadamard")
    resolve_hadamard_backend(up, "int")
    assert up.hadamard_type == ""  # upstream's QUIRK
    ours = R.RotationConfig(backend="inplace", hadamard_type="hadamard")
    assert R.resolve_backend(ours, "int") == "inplace" and ours.hadamard_type == "hadamard"
    ours = R.RotationConfig(hadamard_type="inplace_random")
    assert R.resolve_backend(ours, "mx_fp") == "inplace" and ours.hadamard_type == "random_hadamard"


@pytest.mark.parametrize("fields,data_type,match", [
    ({"backend": "transform", "fuse_online_to_weight": True}, "mx_fp", "fuse_online_to_weight"),
    ({"backend": "transform"}, "int", "MXFP"),
    ({"backend": "transform", "allow_online_rotation": False}, "nv_fp", "allow_online_rotation"),
])
def test_transform_backend_errors(fields, data_type, match) -> None:
    with pytest.raises(ValueError, match=match):
        R.resolve_backend(R.RotationConfig(**fields), data_type)


def test_block_size_defaults() -> None:
    assert R.LinearRotation(R.RotationConfig(), "mx_fp").block_size == 32
    assert R.LinearRotation(R.RotationConfig(), "mx_fp").config.block_size is None  # dumped as upstream does
    assert R.parse_rotation_config("hadamard", "mx_fp").block_size == 32
    # upstream: 32 for NVFP too (its string normaliser assumes mx_fp); here the intended 16, written out
    assert R.parse_rotation_config("hadamard", "nv_fp").block_size == 16
    rot = R.LinearRotation(R.RotationConfig(), "nv_fp")
    assert rot.block_size == 16 and rot.config.block_size == 16
    assert R.LinearRotation(R.RotationConfig(block_size=64), "mx_fp").block_size == 64
    with pytest.raises(ValueError, match="power of two"):
        R.LinearRotation(R.RotationConfig(block_size=48), "mx_fp")
    assert R.LinearRotation(R.RotationConfig(block_size=48, hadamard_type="random_hadamard"), "mx_fp").matrix.shape == (48, 48)


def test_unsupported_runs_are_refused(checkpoint, tmp_path) -> None:
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    # an int scheme resolves to the inplace backend (tests/test_rotation_inplace.py), not the per-linear one
    assert AutoRound(str(src), scheme="W4A16", rotation_config="hadamard", **COMMON).rotation is None
    ar = AutoRound(str(src), scheme="MXFP4", rotation_config="hadamard", **COMMON)
    with pytest.raises(ValueError, match="rotation_config"):
        ar.quantize_and_save(str(tmp_path / "x"), format="llm_compressor")
    assert not (tmp_path / "x").exists()


def test_cli_flags() -> None:
    from fastround.cli import build_parser, rotation_config_from_args

    p = build_parser()
    assert rotation_config_from_args(p.parse_args(["m"])) is None
    assert rotation_config_from_args(p.parse_args(["m", "--algorithm", "hadamard"])) == {"hadamard_type": "hadamard"}
    assert rotation_config_from_args(p.parse_args(["m", "--algorithm", "quarot"])) == "quarot"
    args = p.parse_args(["m", "--rotation_type", "random_hadamard", "--rotation_backend", "transform",
                         "--rotation_block_size", "16", "--no-fuse_online_to_weight", "--allow_online_rotation"])
    assert rotation_config_from_args(args) == {
        "hadamard_type": "random_hadamard", "backend": "transform", "block_size": 16,
        "fuse_online_to_weight": False, "allow_online_rotation": True}
    assert rotation_config_from_args(p.parse_args(["m", "--rotation_type", "quarot_hadamard"])) == {
        "hadamard_type": "inplace_quarot_hadamard"}


def test_opt_rtn_with_rotation_runs(checkpoint, tmp_path) -> None:
    """MXFP4's default OPT-RTN (imatrix from calibration) with a rotation: an imatrix reaches the layers and the
    run writes its rotation config (not byte-compared: upstream's imatrix is of unrotated inputs)."""
    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    kw = {k: v for k, v in COMMON.items() if k != "disable_opt_rtn"}
    ar = AutoRound(str(src), scheme="MXFP4", rotation_config="random_hadamard", dataset=_texts(), **kw)
    assert ar.use_imatrix
    seen = {}
    layer = "model.layers.0.mlp.down_proj"
    from fastround import blockloop

    orig_mean = blockloop._Imatrix.mean

    def spy(self, name):
        out = orig_mean(self, name)
        if name == layer:
            seen["imatrix"] = out
        return out

    blockloop._Imatrix.mean = spy
    try:
        _, folder = ar.quantize_and_save(str(tmp_path / "o"), format="auto_round")
    finally:
        blockloop._Imatrix.mean = orig_mean
    assert seen["imatrix"] is not None
    cfg = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    assert cfg["rotation_config"]["hadamard_type"] == "random_hadamard"
