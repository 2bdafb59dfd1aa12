"""Hugging Face glue: resolving hub ids and finding modules upstream refuses to pack."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger("fastround")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


_WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pth", "*.pt"]


def is_hub_id(model: str) -> bool:
    return not (os.path.isdir(model) or os.path.isabs(model) or model.startswith((".", "~")) or not _HUB_ID.match(model))


@dataclass
class ModelSource:
    """Where model-free reads from: a local folder, or a hub repo whose shards are streamed.

    For a streamed repo `directory` holds the metadata (config, index, tokenizer) and `remote_shards` the
    weight files still to fetch; `fetch`/`release` are the callbacks the C++ core drives.
    """

    directory: str
    remote_shards: list[str] = field(default_factory=list)
    revision: str = ""
    streamer: ShardStreamer | None = None


class ShardStreamer:
    """Fetches hub shards one at a time (prefetching the next ones) and deletes those it downloaded."""

    def __init__(self, repo_id: str, revision: str, max_prefetch: int = 2) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self._pool = ThreadPoolExecutor(max_workers=max_prefetch, thread_name_prefix="fastround-fetch")
        self._futures: dict[str, Future[str]] = {}
        self._downloaded: set[str] = set()
        self._released: set[str] = set()  # done with: never prefetched again
        self._dest_dirs: set[str] = set()
        self._lock = threading.Lock()

    def _cached(self, shard: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(self.repo_id, shard, revision=self.revision)
        return path if isinstance(path, str) else None

    def _download(self, shard: str, dest_dir: str) -> str:
        from huggingface_hub import hf_hub_download

        logger.debug("downloading %s from %s", shard, self.repo_id)
        return hf_hub_download(self.repo_id, shard, revision=self.revision, local_dir=dest_dir)

    def _submit(self, shard: str, dest_dir: str, prefetch: bool = False) -> Future[str] | None:
        with self._lock:
            if prefetch and shard in self._released:
                return None  # another worker already quantized and released it
            self._dest_dirs.add(dest_dir)
            fut = self._futures.get(shard)
            if fut is None:
                cached = self._cached(shard)
                if cached is not None:  # already in the HF cache: read in place, never deleted
                    fut = Future()
                    fut.set_result(cached)
                else:
                    self._downloaded.add(shard)
                    fut = self._pool.submit(self._download, shard, dest_dir)
                self._futures[shard] = fut
            return fut

    def fetch(self, shard: str, dest_dir: str, upcoming: list[str]) -> str:
        fut = self._submit(shard, dest_dir)
        for nxt in upcoming:
            self._submit(nxt, dest_dir, prefetch=True)
        try:
            return fut.result()
        except Exception as e:
            raise FileNotFoundError(f"could not fetch shard '{shard}' of '{self.repo_id}': {e}") from e

    def release(self, shard: str) -> None:
        with self._lock:
            fut = self._futures.pop(shard, None)
            ours = shard in self._downloaded
            self._downloaded.discard(shard)
            self._released.add(shard)
        if fut is not None and ours and fut.done() and fut.exception() is None:
            try:
                os.remove(fut.result())
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Stops prefetching and deletes whatever was downloaded but not released (a failed or cancelled run)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            leftovers = [f for s, f in self._futures.items() if s in self._downloaded]
            self._futures.clear()
            self._downloaded.clear()
        for fut in leftovers:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                try:
                    os.remove(fut.result())
                except FileNotFoundError:
                    pass
        for d in self._dest_dirs:  # our download folder: hf_hub_download's local_dir metadata goes too
            shutil.rmtree(d, ignore_errors=True)
            parent = os.path.dirname(d)
            try:
                os.rmdir(parent)  # the core's staging folder, once nothing else is in it
            except OSError:
                pass


def resolve_source(model: str, stream: bool = True) -> ModelSource:
    """A local folder as is; a hub id from the cache when complete, else streamed shard by shard."""
    if not is_hub_id(model) or os.path.exists(model):
        return ModelSource(os.path.expanduser(model))
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(f"model path '{model}' does not exist and huggingface_hub cannot be imported: {e}") from e
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        meta = snapshot_download(model, ignore_patterns=_WEIGHT_PATTERNS, local_files_only=offline)
    except Exception as e:  # offline, unknown repo, no network: say which model and why
        raise FileNotFoundError(
            f"model '{model}' is not a local folder and could not be fetched from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set and it is not in the cache)' if offline else ''}: {e}"
        ) from e
    revision = os.path.basename(os.path.normpath(meta))
    from fastround import _C

    if _C.diffusion_components(meta):
        # A diffusers pipeline keeps its weights in component folders: fetch it whole rather than stream.
        logger.info("%s is a diffusers pipeline; downloading it whole (revision %s)", model, revision[:12])
        return ModelSource(snapshot_download(model, revision=revision, local_files_only=offline))
    shards = _list_shards(model, meta, revision, offline)
    streamer = ShardStreamer(model, revision)
    missing = [s for s in shards if streamer._cached(s) is None]
    if not missing:
        streamer.close()
        return ModelSource(meta)  # the cache holds the whole checkpoint: read it in place
    if offline or not stream:
        streamer.close()
        if offline:
            raise FileNotFoundError(
                f"model '{model}': shard(s) {', '.join(missing)} are not in the local cache and HF_HUB_OFFLINE is set"
            )
        return ModelSource(snapshot_download(model, revision=revision))
    logger.info("streaming %d of %d shard(s) of %s (revision %s)", len(missing), len(shards), model, revision[:12])
    return ModelSource(meta, remote_shards=shards, revision=revision, streamer=streamer)


def resolve_model_folder(model: str, platform: str = "hf") -> str:
    """A local folder, or a hub id downloaded whole (the regular flow loads every weight anyway)."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if not is_hub_id(model):
        raise FileNotFoundError(f"model '{model}' is neither a local folder nor a valid hub id")
    if platform == "model_scope":
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError as e:
            raise ImportError(f"platform='model_scope' needs the modelscope package to fetch '{model}'") from e
        return ms_download(model)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(f"model '{model}' is not a local folder and huggingface_hub is missing: {e}") from e
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(model, local_files_only=offline)
    except Exception as e:  # offline, unknown repo, no network: say which model and why
        raise FileNotFoundError(
            f"model '{model}' is not a local folder and could not be fetched from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set and it is not in the cache)' if offline else ''}: {e}"
        ) from e


def _list_shards(model: str, meta: str, revision: str, offline: bool) -> list[str]:
    from fastround import _C

    shards = _C.indexed_shards(meta)  # the core's rule for which index counts
    if shards:
        return shards
    if offline:
        return ["model.safetensors"]
    from huggingface_hub import HfApi

    return sorted(f for f in HfApi().list_repo_files(model, revision=revision) if f.endswith(".safetensors") and "/" not in f)


# What the meta-device scan finds for common decoder-only text models (tests/test_loader.py checks each
# against the scan). Knowing it spares importing transformers' model classes, seconds per run.
KNOWN_UNPACKABLE: dict[str, list[str]] = {
    mt: ["embed_tokens", "rotary_emb"]
    for mt in ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "gemma",
               "gemma2", "glm4_moe")
}


def detect_unpackable_modules(model_dir: str, trust_remote_code: bool = True, use_table: bool = True) -> list[str]:
    """Names of Embedding/Conv1d/Conv1D modules, found by building the model on the meta device.

    Upstream ignores these because they cannot be packed; failures only cost the detection.
    """
    if use_table:
        try:
            with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            if not isinstance(cfg, dict):
                return []  # the core refuses a config.json that is not a JSON object, naming the file
            model_type = cfg.get("model_type")
            if not cfg.get("auto_map") and isinstance(model_type, str) and model_type in KNOWN_UNPACKABLE:
                return list(KNOWN_UNPACKABLE[model_type])
        except (OSError, ValueError):
            pass
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure means "no detection", as upstream
        logger.warning("could not build the model on the meta device to detect embeddings/Conv1D: %s", e)
        return []
    keys = ("embedding", "conv1d")
    return [
        name
        for name, module in model.named_modules()
        if name and any(k in type(module).__name__.lower() for k in keys)
    ]
