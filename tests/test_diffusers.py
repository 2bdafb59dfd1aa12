"""Diffusers pipeline folders (model_index.json, no root config.json, a transformer/ with one).

Upstream 0.16.1 quantizes transformer/ and every other transformer* folder with a config.json, each as a
checkpoint of its own in <out>/<name>/ (model-*.safetensors names, no copy of the component's other files),
and copies every other root entry (not README.md or quantization configs) unless the output already has it.
It runs without diffusers installed, so parity is checked against it directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import oracle
import source_checkpoints as sc
from hub_server import hub  # noqa: F401  (a fixture)

import fastround  # a broken build must fail here, not skip

_ORDER_OK = oracle.ORDER_ONLY_DIFFS
_OURS = "fastround_summary.json"
_COMPONENTS = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sc.build_diffusers(tmp_path_factory.mktemp("diffusers") / "src")


def _run(src: Path, out: Path, **kwargs) -> Path:
    ar = fastround.AutoRound(str(src), model_free=True, show_progress=False, **kwargs)
    assert ar.quantize_and_save(str(out)) == (None, str(out))
    return out


def _files(root: Path) -> dict[str, str]:
    """relative path -> sha256, leaving out upstream's resume folders and our summaries."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts and p.name != _OURS
    }


def test_pipeline_matches_upstream(pipeline: Path, tmp_path: Path) -> None:
    kwargs = {"scheme": "W4A16", "group_size": 32}
    ours = _run(pipeline, tmp_path / "fast", **kwargs)
    theirs = oracle.run_upstream_api(pipeline, tmp_path / "up", **kwargs)
    for name in _COMPONENTS:
        diff = oracle.compare_checkpoints(ours / name, theirs / name)
        assert list(diff) == [], f"{name}: fastround (A) vs upstream (B):\n" + "\n".join(diff)
        assert [d for d in diff.order if not d.startswith(_ORDER_OK)] == []
    assert _files(ours) == _files(theirs)
    # every root entry but the model card is there, and the copies are the source's bytes
    src_files = _files(pipeline)
    copied = {k: v for k, v in src_files.items() if k.split("/")[0] not in _COMPONENTS and k != "README.md"}
    assert copied.items() <= _files(ours).items()
    assert "README.md" not in _files(ours)
    # the components are quantized checkpoints, not copies of the source's
    for name in _COMPONENTS:
        assert not list((ours / name).glob("diffusion_pytorch_model*")), name
        qc = json.loads((ours / name / "config.json").read_text())["quantization_config"]
        assert (qc["bits"], qc["group_size"], qc["block_name_to_quantize"]) == (4, 32, "transformer_blocks")
        assert json.loads((ours / name / _OURS).read_text())["fastround_model_free"]["quantized"]["tensors"] > 0
    assert not (ours / ".fastround-partial").exists()


def test_existing_root_entries_are_kept(pipeline: Path, tmp_path: Path) -> None:
    """As upstream: a root entry the output already has is not copied over; components are replaced."""
    out = tmp_path / "out"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "mine.txt").write_text("keep me")
    (out / "transformer").mkdir()
    (out / "transformer" / "model.safetensors").write_bytes(b"stale")
    _run(pipeline, out, scheme="W4A16", group_size=32)
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["mine.txt"]
    assert not (out / "transformer" / "model.safetensors").exists()
    assert (out / "transformer" / "model.safetensors.index.json").is_file()


def test_failure_in_a_later_component_leaves_nothing(pipeline: Path, tmp_path: Path) -> None:
    """transformer/ finishes, transformer_2 is refused: no component, copy or model_index.json is left."""
    src = tmp_path / "src"
    shutil.copytree(pipeline, src)
    bad = src / "transformer_2" / "diffusion_pytorch_model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(64, 64, dtype=torch.int8)}, str(bad))
    before = _files(src)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.weight"):
        _run(src, out, scheme="W4A16", group_size=32)
    assert not out.exists(), sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert _files(src) == before


def test_interrupted_pipeline_does_not_look_complete(pipeline: Path, tmp_path: Path) -> None:
    """A run cancelled in transformer/'s second shard keeps its resume state in the staging folder only; the
    rerun finishes with the same bytes as a clean run."""
    out = tmp_path / "out"

    def cancel_late(p: dict) -> bool:
        return (p["shard_index"], p["shard_count"]) != (2, 2)

    job = fastround.ModelFreeCompressor(str(pipeline), scheme="W4A16", group_size=32, show_progress=False)._job(
        str(pipeline), str(out), "auto_round"
    )
    with pytest.raises(KeyboardInterrupt):
        fastround._C.run_model_free(json.dumps(job), cancel_late, None)
    assert [p.name for p in out.iterdir()] == [".fastround-partial"]
    _run(pipeline, out, scheme="W4A16", group_size=32)
    assert _files(out) == _files(_run(pipeline, tmp_path / "clean", scheme="W4A16", group_size=32))


def test_folder_without_config_or_transformer_raises(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "vae").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        _run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_pipeline_is_downloaded_whole(pipeline: Path, tmp_path: Path, hub, monkeypatch) -> None:  # noqa: F811
    """Its shards live in component folders, so it is fetched whole (not streamed), then run as a local one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.add_repo("org/toy-pipeline", pipeline)
    ours = _run("org/toy-pipeline", tmp_path / "hub", scheme="W4A16", group_size=32)
    assert _files(ours) == _files(_run(pipeline, tmp_path / "local", scheme="W4A16", group_size=32))
