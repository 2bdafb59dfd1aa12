"""Crash-safe resume, parallel shards and hub streaming of the model-free run.

1. Resume: the CLI is SIGKILLed once two shards are recorded in `<out>/.fastround-partial/fastround-resume.json`;
   rerunning the same command resumes (and skips the finished shards), and the result equals an uninterrupted
   run byte for byte. A rerun with another option, or after a source shard changed, starts over and says why.
2. Parallel shards: shard_parallelism 1/2/3 x threads 1/2 (argument or AR_MODEL_FREE_SHARD_PARALLELISM)
   write identical bytes.
3. Hub streaming against tests/hub_server.py: each shard is downloaded once, deleted after use, at most two
   on disk at a time; cached shards are read in place and kept; fully cached + HF_HUB_OFFLINE makes no request.

The checkpoint is built here (9 shards of ~0.5-3.6 MB, a LlamaForCausalLM config). Quantization of such a
shard takes ~20 ms, so the killed run is slowed down legitimately: a logging handler on the "fastround"
logger sleeps after each "[model_free] shard k/n ..." message (sent from the worker thread once that shard is
committed), and the script then runs `python -m fastround` itself (runpy) with the CLI's argv. One killed
run is made per module; each rerun works on a copy of the folder it left (the fingerprint leaves output_dir
out, so a copy is the same partial output).

Known failures (bugs in python/fastround, left failing on purpose):
- test_cli_logs_each_message_once / test_cli_verbose_shows_debug_messages: CLI logging (see docstrings).
- test_hub_parallel_late_fetch_downloads_each_shard_once: ShardStreamer.fetch() prefetches its `upcoming`
  shards even when another worker already fetched and released them, so they are downloaded again, and a
  download still running when the core publishes leaves `.fastround-partial/source-shards/` in the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import fastround  # a broken build must fail here, not skip

from hub_server import HubServer, hub, hub_endpoint, populate_cache  # noqa: E402,F401  (hub: a fixture)

STAGING = ".fastround-partial"
MANIFEST = "fastround-resume.json"
DOWNLOADS = "source-shards"
REPO = "org/tiny"
LAYERS = 8
N_SHARDS = LAYERS + 1  # the embedding, then one shard per decoder layer (the last also holds norm + lm_head)
KILL_AFTER = 2  # finished shards recorded before the SIGKILL
SLOW_S = 0.6  # sleep after each finished shard in the killed run


# ---- checkpoint ---------------------------------------------------------------------------------------------


def build_checkpoint(path: Path, layers: int = LAYERS, hidden: int = 384, inter: int = 1024, vocab: int = 640) -> Path:
    """A deterministic sharded Llama checkpoint written tensor by tensor (no model is built)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ).save_pretrained(str(path))
    gen = torch.Generator().manual_seed(20240917)
    kv = hidden // 6 * 2

    def t(*shape: int) -> torch.Tensor:
        return (0.05 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": t(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": t(hidden, hidden),
                p + "self_attn.k_proj.weight": t(kv, hidden),
                p + "self_attn.v_proj.weight": t(kv, hidden),
                p + "self_attn.o_proj.weight": t(hidden, hidden),
                p + "mlp.gate_proj.weight": t(inter, hidden),
                p + "mlp.up_proj.weight": t(inter, hidden),
                p + "mlp.down_proj.weight": t(hidden, inter),
                p + "input_layernorm.weight": 1 + t(hidden),
                p + "post_attention_layernorm.weight": 1 + t(hidden),
            }
        )
    shards[-1]["model.norm.weight"] = 1 + t(hidden)
    shards[-1]["lm_head.weight"] = t(vocab, hidden)
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    # Side files the output must carry verbatim, one nested.
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64, "note": "caf\u00e9"}\n', encoding="utf-8")
    (path / "original").mkdir(exist_ok=True)
    (path / "original" / "params.json").write_text('{"dim": 384}\n')
    return path


def shard_names(src: Path) -> list[str]:
    return sorted(p.name for p in src.glob("*.safetensors"))


def rewrite_shard_same_size(shard: Path) -> None:
    """New tensor values, same names/shapes/dtypes: the file keeps its size, only contents and mtime change."""
    from safetensors.torch import load_file, save_file

    before = shard.stat().st_size
    tensors = {k: -v for k, v in load_file(str(shard)).items()}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert shard.stat().st_size == before


# ---- running ------------------------------------------------------------------------------------------------


def run_api(src: Path | str, out: Path, scheme: str = "W4A16", **kwargs) -> dict:
    """The same job the CLI runs (model_free, defaults), through the Python API; returns the summary."""
    kwargs.setdefault("threads", 1)
    kwargs.setdefault("shard_parallelism", 1)
    ar = fastround.AutoRound(str(src), scheme=scheme, model_free=True, show_progress=False, **kwargs)
    ar.quantize_and_save(str(out))
    return ar.summary


def cli_args(src: Path, out: Path, scheme: str = "W4A16", parallelism: int = 1, threads: int = 1) -> list[str]:
    return [str(src), "--model_free", "--scheme", scheme, "--output_dir", str(out),
            "--shard_parallelism", str(parallelism), "--threads", str(threads), "--no_progress"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AR_MODEL_FREE_SHARD_PARALLELISM", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "fastround", *args], capture_output=True, text=True,
                       env=cli_env(), timeout=240)
    assert r.returncode == 0, f"CLI failed (rc {r.returncode}):\n{r.stderr}"
    return r


SLOW_CLI = """\
import logging, runpy, sys, time

delay = float(sys.argv[1])
debug = sys.argv[2] == "debug"


class SleepAfterShard(logging.Handler):
    # "[model_free] shard k/n (...)" is logged from the worker thread right after shard k is committed.
    def emit(self, record):
        if record.getMessage().startswith("[model_free] shard "):
            time.sleep(delay)


logger = logging.getLogger("fastround")
logger.addHandler(SleepAfterShard())
if debug:  # what -v should do (see test_cli_verbose_shows_debug_messages)
    logger.setLevel(logging.DEBUG)
sys.argv = ["fastround", *sys.argv[3:]]
runpy.run_module("fastround", run_name="__main__", alter_sys=True)
"""


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / STAGING / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wrapped_cli(tmp: Path, delay: float, debug: bool = False) -> list[str]:
    """argv prefix running `python -m fastround` with a sleep after each shard, and DEBUG records when asked."""
    script = tmp / "slow_cli.py"
    script.write_text(SLOW_CLI)
    return [sys.executable, str(script), str(delay), "debug" if debug else "info"]


def run_cli_and_kill(src: Path, out: Path, tmp: Path, after: int = KILL_AFTER, **kw) -> dict:
    """Starts the (slowed) CLI, SIGKILLs it once `after` shards are recorded; returns the manifest it left."""
    log = tmp / "killed-run.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*wrapped_cli(tmp, SLOW_S), *cli_args(src, out, **kw)],
                                stdout=err, stderr=subprocess.STDOUT, env=cli_env())
        deadline = time.monotonic() + 120
        killed = False
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                m = read_manifest(out)
                if m is not None and len(m["shards"]) >= after:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None and not killed:
                proc.kill()
            proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert killed and proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-way (rc {proc.returncode}); log:\n{text}")
    manifest = read_manifest(out)
    assert manifest is not None and KILL_AFTER <= len(manifest["shards"]) < N_SHARDS, manifest
    return manifest


# ---- comparing ----------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, object]:
    """Every entry under root, hidden ones included: bytes for files, a marker for folders and symlinks."""
    out: dict[str, object] = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("symlink", os.readlink(p))
        elif p.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


def assert_same_tree(got: Path, want: Path) -> None:
    a, b = tree(got), tree(want)
    only_got = sorted(set(a) - set(b))
    only_want = sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    assert not (only_got or only_want or differ), (
        f"{got} differs from {want}: only in the first {only_got}, only in the second {only_want}, "
        f"different bytes {differ}")
    assert any(k.endswith(".safetensors") for k in a), f"no weights in {got}"


def assert_finished(out: Path) -> None:
    assert (out / "config.json").is_file()
    assert not (out / STAGING).exists(), f"staging folder left behind: {list((out / STAGING).rglob('*'))}"


def shards_done(log_text: str) -> set[str]:
    """The "k/n" of every "[model_free] shard k/n (...)" line: the shards quantized by this run (a set, as
    the CLI prints each record twice; see test_cli_logs_each_message_once)."""
    return {ln.split("[model_free] shard ", 1)[1].split(" ", 1)[0] for ln in log_text.splitlines()
            if "[model_free] shard " in ln}


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Read-only, shared by every test."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("outs")
    counter = iter(range(1 << 30))
    return lambda name: root / f"{name}-{next(counter)}"


@pytest.fixture(scope="module")
def reference(src, outdir):
    """reference(scheme) -> the output of a clean, uninterrupted API run (threads 1, one shard at a time)."""
    made: dict[str, Path] = {}

    def get(scheme: str = "W4A16") -> Path:
        if scheme not in made:
            made[scheme] = outdir(f"ref-{scheme}")
            run_api(src, made[scheme], scheme)
            assert_finished(made[scheme])
        return made[scheme]

    return get


@pytest.fixture(scope="module")
def killed(src, tmp_path_factory) -> tuple[Path, dict]:
    """An output folder as a SIGKILLed `--scheme W4A16` CLI run left it, and its manifest. Tests copy it."""
    tmp = tmp_path_factory.mktemp("killed")
    out = tmp / "out"
    manifest = run_cli_and_kill(src, out, tmp)
    return out, manifest


def copy_killed(killed, dest: Path) -> Path:
    shutil.copytree(killed[0], dest, symlinks=True)
    return dest


# ---- 1. resume after SIGKILL --------------------------------------------------------------------------------


def test_killed_run_does_not_look_finished(killed):
    out, manifest = killed
    names = {p.name for p in out.iterdir()}
    assert names == {STAGING}, f"a killed run must publish nothing next to the staging folder, found {names}"
    assert not (out / "config.json").exists()
    staged = {p.name for p in (out / STAGING).iterdir()}
    recorded = {r["output"] for r in manifest["shards"]}
    assert recorded <= staged, f"recorded shards {recorded} missing from staging {staged}"
    for r in manifest["shards"]:
        assert (out / STAGING / r["output"]).stat().st_size == r["output_bytes"]


def test_rerun_same_command_resumes_and_equals_clean_run(killed, src, reference, outdir):
    out = copy_killed(killed, outdir("resumed"))
    kept = len(killed[1]["shards"])
    stamps = {r["output"]: (out / STAGING / r["output"]).stat().st_mtime_ns for r in killed[1]["shards"]}
    r = run_cli(*cli_args(src, out))
    log = r.stderr
    assert "[model_free] resuming from" in log and f"{kept} finished shard(s) kept" in log, log
    assert "discarding" not in log, log
    # Only the unfinished shards were quantized again.
    redone = shards_done(log)
    assert len(redone) == N_SHARDS - kept, f"expected {N_SHARDS - kept} shards redone, got {sorted(redone)}:\n{log}"
    assert_finished(out)
    # The kept shards were published as they were, not rewritten.
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    assert_same_tree(out, reference("W4A16"))


@pytest.fixture(scope="module")
def verbose_cli_run(src, outdir) -> subprocess.CompletedProcess:
    out = outdir("verbose")
    r = run_cli(*cli_args(src, out), "-v")
    assert_finished(out)
    return r


def test_cli_logs_each_message_once(verbose_cli_run):
    """fastround/__init__.py gives the "fastround" logger its own StreamHandler (no handler is configured
    at import), then cli.main() calls logging.basicConfig(), and each record also propagates to that root
    handler: every line is printed twice."""
    lines = [ln for ln in verbose_cli_run.stderr.splitlines() if "[model_free] summary:" in ln]
    assert len(lines) == 1, "the summary line is printed %d times:\n%s" % (len(lines), verbose_cli_run.stderr)


def test_cli_verbose_shows_debug_messages(verbose_cli_run):
    """-v sets the root logger to DEBUG, but fastround/__init__.py pinned the "fastround" logger at INFO,
    so the core's DEBUG messages (e.g. "[model_free] 1 shard(s) in flight") never show."""
    assert "[model_free] 1 shard(s) in flight" in verbose_cli_run.stderr, verbose_cli_run.stderr


def test_resume_drops_half_written_and_truncated_shards(killed, src, reference, outdir, caplog):
    """What a SIGKILL during a write leaves: the next shard half written, and (disk trouble) a finished shard
    cut short. Both are redone; nothing else is."""
    out = copy_killed(killed, outdir("half-written"))
    stage = out / STAGING
    done = sorted(r["output"] for r in killed[1]["shards"])
    pending = sorted(f"model-{i:05d}-of-{N_SHARDS:05d}.safetensors" for i in range(1, N_SHARDS + 1))
    pending = [p for p in pending if p not in done]
    (stage / pending[0]).write_bytes(b"\x00" * 1000)  # half-written, not in the manifest
    truncated = stage / done[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])  # recorded, but its size no longer matches
    caplog.set_level(logging.INFO, logger="fastround")
    run_api(src, out, shard_parallelism=2, threads=2)  # neither is part of the fingerprint
    log = caplog.text
    assert f"{len(done) - 1} finished shard(s) kept" in log, log
    assert len(shards_done(log)) == N_SHARDS - (len(done) - 1), log
    assert_finished(out)
    assert_same_tree(out, reference("W4A16"))


def test_rerun_with_other_scheme_discards_and_says_why(killed, src, reference, outdir):
    out = copy_killed(killed, outdir("w8"))
    r = run_cli(*cli_args(src, out, scheme="W8A16"))
    warn = [ln for ln in r.stderr.splitlines() if "[model_free] discarding partial output" in ln]
    assert warn, r.stderr
    assert "WARNING" in warn[0], warn[0]
    assert why(warn[0]) == 'option scheme: "W4A16" -> "W8A16"', warn[0]
    assert "resuming" not in r.stderr
    assert len(shards_done(r.stderr)) == N_SHARDS
    assert_finished(out)
    assert_same_tree(out, reference("W8A16"))


@pytest.fixture
def private_src(src, tmp_path) -> Path:
    """A copy of the checkpoint with the same file stats (copy2 keeps mtime to the nanosecond)."""
    dst = tmp_path / "src-copy"
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def why(discard_message: str) -> str:
    """The explanation in "discarding partial output in '...' from an earlier run: <why>. Starting over; ..."."""
    return discard_message.split("from an earlier run: ", 1)[-1].split(". Starting over", 1)[0]


def _discard_message(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "[model_free] discarding partial output" in ln]
    assert lines, f"no 'discarding partial output' message:\n{text}"
    return lines[0]


def test_changed_source_shard_discards(killed, private_src, reference, outdir):
    """A finished shard's source rewritten with the same size: the partial output must not be reused."""
    record = killed[1]["shards"][-1]
    changed = record["source"]
    out = copy_killed(killed, outdir("changed-src"))
    rewrite_shard_same_size(private_src / changed)
    r = run_cli(*cli_args(private_src, out))
    msg = _discard_message(r.stderr)
    assert why(msg) == f"shard {changed} changed", msg
    assert "resuming" not in r.stderr
    assert_finished(out)
    clean = outdir("changed-src-clean")
    run_api(private_src, clean)
    assert_same_tree(out, clean)
    stale = reference("W4A16") / record["output"]
    assert (out / record["output"]).read_bytes() != stale.read_bytes(), "sanity: the rewrite changes that output"


def test_touched_source_shard_discards(killed, private_src, reference, outdir, caplog):
    """Same bytes, newer mtime: still discarded (the fingerprint is size + mtime), with the shard named."""
    touched = killed[1]["shards"][0]["source"]
    out = copy_killed(killed, outdir("touched-src"))
    st = (private_src / touched).stat()
    os.utime(private_src / touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    caplog.set_level(logging.INFO, logger="fastround")
    run_api(private_src, out)
    msg = _discard_message(caplog.text)
    assert why(msg) == f"shard {touched} changed", msg
    assert_finished(out)
    assert_same_tree(out, reference("W4A16"))


def test_unchanged_copy_of_source_resumes(killed, private_src, reference, outdir, caplog):
    """Control for the two tests above: the copy itself (other path, same stats) is accepted."""
    out = copy_killed(killed, outdir("copy-src"))
    caplog.set_level(logging.INFO, logger="fastround")
    run_api(private_src, out)
    assert "resuming from" in caplog.text and "discarding" not in caplog.text, caplog.text
    assert_same_tree(out, reference("W4A16"))


# ---- 2. parallel shards -------------------------------------------------------------------------------------


class _ShardThreads(logging.Handler):
    """Which threads logged "shard k/n" (they come from the C++ workers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.threads: set[int] = set()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.messages.append(msg)
        if msg.startswith("[model_free] shard "):
            self.threads.add(record.thread)


@pytest.fixture
def shard_threads():
    h = _ShardThreads()
    lg = logging.getLogger("fastround")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    yield h
    lg.removeHandler(h)
    lg.setLevel(old)


@pytest.mark.parametrize("parallelism", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_shards_write_identical_bytes(src, reference, outdir, shard_threads, monkeypatch, parallelism,
                                               threads):
    monkeypatch.delenv("AR_MODEL_FREE_SHARD_PARALLELISM", raising=False)
    out = outdir(f"p{parallelism}-t{threads}")
    run_api(src, out, shard_parallelism=parallelism, threads=threads)
    assert f"[model_free] {parallelism} shard(s) in flight" in shard_threads.messages, shard_threads.messages
    if parallelism > 1:
        assert len(shard_threads.threads) >= 2, "shards were not spread over several workers"
    assert_finished(out)
    assert_same_tree(out, reference("W4A16"))


@pytest.mark.parametrize("env", ["2", "3"])
def test_parallelism_from_environment(src, reference, outdir, shard_threads, monkeypatch, env):
    monkeypatch.setenv("AR_MODEL_FREE_SHARD_PARALLELISM", env)
    out = outdir(f"env{env}")
    run_api(src, out, shard_parallelism=None, threads=2)
    assert f"[model_free] {env} shard(s) in flight" in shard_threads.messages, shard_threads.messages
    assert len(shard_threads.threads) >= 2
    assert_same_tree(out, reference("W4A16"))


def test_parallelism_argument_beats_environment(src, reference, outdir, shard_threads, monkeypatch):
    monkeypatch.setenv("AR_MODEL_FREE_SHARD_PARALLELISM", "3")
    out = outdir("arg-over-env")
    run_api(src, out, shard_parallelism=1, threads=2)
    assert "[model_free] 1 shard(s) in flight" in shard_threads.messages, shard_threads.messages
    assert len(shard_threads.threads) == 1
    assert_same_tree(out, reference("W4A16"))


def test_parallelism_environment_via_cli(src, reference, outdir, tmp_path):
    """The CLI without --shard_parallelism takes the environment variable (-v shows the DEBUG record)."""
    out = outdir("cli-env")
    env = cli_env()
    env["AR_MODEL_FREE_SHARD_PARALLELISM"] = "3"
    args = cli_args(src, out, threads=2)
    i = args.index("--shard_parallelism")
    del args[i:i + 2]
    r = subprocess.run([*wrapped_cli(tmp_path, 0.0), *args, "-v"], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    assert "[model_free] 3 shard(s) in flight" in r.stderr, r.stderr
    assert_same_tree(out, reference("W4A16"))


# ---- 3. hub streaming ---------------------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


class DiskSampler(threading.Thread):
    """Polls the download folder (and the HF cache) for source shards: peak bytes and count on disk."""

    def __init__(self, shards_of: Path, *roots: Path) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.etags = {hashlib.sha256((shards_of / n).read_bytes()).hexdigest(): n for n in shard_names(shards_of)}
        self.peak_bytes = 0
        self.peak_count = 0
        self.peak_names: list[str] = []
        self.seen: set[str] = set()
        self.samples = 0
        self._halt = threading.Event()

    def _sample(self) -> None:
        found: dict[str, int] = {}
        for root in self.roots:
            for dirpath, _, files in os.walk(root):
                for f in files:
                    # A shard, or a download of one in progress: huggingface_hub names its temporary
                    # "...<etag>.<uuid>.incomplete", the etag of an LFS file being its sha256.
                    shard = f if f.endswith(".safetensors") else next(
                        (n for e, n in self.etags.items() if f.endswith(".incomplete") and e in f), None)
                    if shard is None:
                        continue
                    path = os.path.join(dirpath, f)
                    try:
                        found[path] = os.path.getsize(path)
                    except OSError:
                        continue
                    self.seen.add(shard)
        # The walk lists folders one after another (downloads land in a .cache subfolder), so a shard
        # deleted after its folder was listed could be counted with a download started later. Counting
        # only files that still exist now keeps files that all existed when the last folder was listed.
        still = {p: size for p, size in found.items() if os.path.exists(p)}
        total, count, names = sum(still.values()), len(still), [os.path.basename(p) for p in still]
        self.peak_bytes = max(self.peak_bytes, total)
        if count > self.peak_count:
            self.peak_count, self.peak_names = count, sorted(names)
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            time.sleep(0.001)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def downloads(srv: HubServer) -> Counter:
    return Counter(f for f in srv.downloaded() if f.endswith(".safetensors"))


def test_hub_streaming_equals_local(src, reference, outdir, hf_cache, hub):
    hub.add_repo(REPO, src)
    shards = shard_names(src)
    largest = max((src / s).stat().st_size for s in shards)
    out = outdir("hub")
    sampler = DiskSampler(src, out / STAGING / DOWNLOADS, hf_cache)
    sampler.start()
    try:
        run_api(REPO, out)
    finally:
        sampler.stop()
    assert_same_tree(out, reference("W4A16"))
    assert_finished(out)
    assert downloads(hub) == Counter(shards), f"each shard exactly once: {downloads(hub)}"
    # Deleted after use: nothing of the shards stays in the output, the staging folder or the cache.
    left = [p for p in hf_cache.rglob("*") if ".safetensors" in p.name and not p.name.endswith(".index.json")]
    assert not left, f"shards left in the HF cache: {left}"
    cache_bytes = sum(p.stat().st_size for p in hf_cache.rglob("*") if p.is_file() and not p.is_symlink())
    assert cache_bytes < 100_000, f"the cache holds {cache_bytes} bytes: only metadata belongs there"
    # At most the shard in work and the one prefetched on disk at once.
    print(f"disk sampler: {sampler.samples} samples, peak {sampler.peak_count} shard file(s) {sampler.peak_bytes} B "
          f"({sampler.peak_names}), saw {len(sampler.seen)} of {len(shards)} shards")
    assert sampler.samples > 50 and len(sampler.seen) >= len(shards) // 2, (sampler.samples, sampler.seen)
    assert 0 < sampler.peak_count <= 2, sampler.peak_names
    assert sampler.peak_bytes <= 2 * largest, (sampler.peak_bytes, largest)


def test_hub_partially_cached_reads_cached_shards_in_place(src, reference, outdir, hf_cache, hub):
    hub.add_repo(REPO, src)
    shards = shard_names(src)
    cached = shards[1::3]
    snapshot = populate_cache(hf_cache, REPO, src, files=cached)
    blobs = {s: (snapshot / s).resolve() for s in cached}
    out = outdir("hub-partial")
    run_api(REPO, out)
    assert_same_tree(out, reference("W4A16"))
    assert_finished(out)
    assert downloads(hub) == Counter(s for s in shards if s not in cached), downloads(hub)
    for s in cached:  # read in place, kept
        assert (snapshot / s).is_symlink() and blobs[s].is_file(), s
        assert blobs[s].read_bytes() == (src / s).read_bytes(), s
    left = sorted(p.name for p in hf_cache.rglob("*.safetensors"))
    assert left == sorted(cached), f"the cache must hold exactly the pre-cached shards, holds {left}"


def test_hub_fully_cached_offline_makes_no_request(src, reference, outdir, hf_cache):
    snapshot = populate_cache(hf_cache, REPO, src)
    before = tree(hf_cache)
    out = outdir("hub-offline")
    with HubServer({REPO: src}) as srv, hub_endpoint(srv.url, offline=True):
        run_api(REPO, out)
        assert srv.requests == [], [r.path for r in srv.requests]
    assert_same_tree(out, reference("W4A16"))
    assert_finished(out)
    assert tree(hf_cache) == before, "the cache must be left as it was"
    assert all((snapshot / s).resolve().is_file() for s in shard_names(src))


def test_hub_fully_cached_online_reads_in_place(src, reference, outdir, hf_cache, hub):
    hub.add_repo(REPO, src)
    populate_cache(hf_cache, REPO, src)
    out = outdir("hub-cached-online")
    run_api(REPO, out)
    assert_same_tree(out, reference("W4A16"))
    assert downloads(hub) == Counter(), downloads(hub)
    assert sorted(p.name for p in hf_cache.rglob("*.safetensors")) == shard_names(src)


def test_hub_offline_missing_shard_names_it(src, outdir, hf_cache):
    shards = shard_names(src)
    missing = shards[4]
    populate_cache(hf_cache, REPO, src, files=[f for f in (p.relative_to(src).as_posix() for p in src.rglob("*")
                                                          if p.is_file()) if f != missing])
    out = outdir("hub-offline-missing")
    with HubServer({REPO: src}) as srv, hub_endpoint(srv.url, offline=True):
        with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")) as e:
            run_api(REPO, out)
        assert srv.requests == []
    assert "HF_HUB_OFFLINE" in str(e.value)
    assert not any(s in str(e.value) for s in shards if s != missing), str(e.value)
    assert not out.exists()


def test_hub_offline_nothing_cached(outdir, hf_cache):
    out = outdir("hub-offline-empty")
    with hub_endpoint(offline=True):
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as e:
            run_api(REPO, out)
    assert REPO in str(e.value)
    assert not out.exists()


def processing_order(src: Path) -> list[str]:
    """Source shards in the order the core takes them: first appearance in the (sorted) weight_map."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return list(dict.fromkeys(index["weight_map"].values()))


def test_hub_parallel_late_fetch_downloads_each_shard_once(src, reference, outdir, hf_cache, hub, monkeypatch):
    """shard_parallelism 3, and one worker calls fetch() late after taking its shard (as a thread held up
    by the GIL would). Its `upcoming` list then names shards other workers already fetched, quantized and
    released; each must still be downloaded once, and nothing may be left in the output."""
    from fastround import _hf

    hub.add_repo(REPO, src)
    order = processing_order(src)
    late = order[3]
    real_fetch, real_download = _hf.ShardStreamer.fetch, _hf.ShardStreamer._download
    started: Counter = Counter()

    def fetch(self, shard, dest_dir, upcoming):
        if shard == late:
            time.sleep(1.0)
        return real_fetch(self, shard, dest_dir, upcoming)

    def download(self, shard, dest_dir):
        started[shard] += 1
        if started[shard] > 1:  # a second download of a shard is slow to connect: it outlives the run
            time.sleep(0.5)
        return real_download(self, shard, dest_dir)

    monkeypatch.setattr(_hf.ShardStreamer, "fetch", fetch)
    monkeypatch.setattr(_hf.ShardStreamer, "_download", download)
    out = outdir("hub-p3-late")
    run_api(REPO, out, shard_parallelism=3, threads=2)
    twice = {s: n for s, n in downloads(hub).items() if n != 1}
    leftover = sorted(p.relative_to(out).as_posix() for p in (out / STAGING).rglob("*"))
    assert not twice and not leftover, (
        f"shards downloaded again after their release: {twice}; left in the output: {leftover}")
    assert_same_tree(out, reference("W4A16"))


def test_hub_cancelled_run_resumes_without_refetching(src, reference, outdir, hf_cache, hub, monkeypatch, caplog):
    """A streamed run stopped after two shards (progress callback returns False); the rerun keeps them and
    downloads none of their sources again."""
    hub.add_repo(REPO, src)
    hub.delays.update(dict.fromkeys(shard_names(src), 0.15))
    out = outdir("hub-resume")
    real_run = fastround._C.run_model_free

    def cancel_after_two(job, progress, log, fetch, release):
        def stop_when_two_done(p):
            m = read_manifest(out)
            return m is None or len(m["shards"]) < KILL_AFTER
        return real_run(job, stop_when_two_done, log, fetch, release)

    monkeypatch.setattr(fastround._C, "run_model_free", cancel_after_two)
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        run_api(REPO, out)
    monkeypatch.setattr(fastround._C, "run_model_free", real_run)
    finished = {r["source"] for r in read_manifest(out)["shards"]}
    assert len(finished) >= KILL_AFTER and not (out / "config.json").exists()
    first = downloads(hub)
    hub.reset()
    hub.delays.clear()
    caplog.set_level(logging.INFO, logger="fastround")
    run_api(REPO, out)
    again = downloads(hub)
    assert f"{len(finished)} finished shard(s) kept" in caplog.text, caplog.text
    assert not set(again) & finished, f"finished shards fetched again: {sorted(set(again) & finished)}"
    assert all(n == 1 for n in again.values()), again
    assert set(first) | set(again) == set(shard_names(src))
    assert_finished(out)
    assert_same_tree(out, reference("W4A16"))
    assert not list(hf_cache.rglob("*.safetensors"))


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_parallelism_environment_not_positive_is_ignored(src, reference, outdir, monkeypatch, caplog, value):
    monkeypatch.setenv("AR_MODEL_FREE_SHARD_PARALLELISM", value)
    caplog.set_level(logging.INFO, logger="fastround")
    out = outdir("env-bad")
    run_api(src, out, shard_parallelism=None, threads=2)
    assert "ignoring AR_MODEL_FREE_SHARD_PARALLELISM" in caplog.text, caplog.text
    assert_same_tree(out, reference("W4A16"))


def test_parallelism_above_shard_count_is_clamped(src, reference, outdir, shard_threads):
    out = outdir("p-many")
    run_api(src, out, shard_parallelism=4 * N_SHARDS, threads=2)
    assert f"[model_free] {N_SHARDS} shard(s) in flight" in shard_threads.messages, shard_threads.messages
    assert_same_tree(out, reference("W4A16"))


def test_negative_parallelism_is_rejected(src):
    with pytest.raises(ValueError, match="shard_parallelism"):
        fastround.AutoRound(str(src), model_free=True, shard_parallelism=-1)
