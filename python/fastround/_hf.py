"""Hugging Face glue: resolving hub ids and finding modules upstream refuses to pack."""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger("fastround")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(model: str) -> str:
    """A local checkpoint folder for `model`: the path itself, or a hub snapshot (cache first)."""
    if os.path.isdir(model) or os.path.isabs(model) or model.startswith((".", "~")) or not _HUB_ID.match(model):
        return os.path.expanduser(model)
    if os.path.exists(model):
        return model
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(f"model path '{model}' does not exist and huggingface_hub is not installed") from e
    try:
        return snapshot_download(model)
    except Exception as e:  # offline, unknown repo, no network: say which model and why
        raise FileNotFoundError(
            f"model '{model}' is not a local folder and could not be fetched from the Hugging Face hub: {e}"
        ) from e


def detect_unpackable_modules(model_dir: str, trust_remote_code: bool = True) -> list[str]:
    """Names of Embedding/Conv1d/Conv1D modules, found by building the model on the meta device.

    Upstream ignores these because they cannot be packed; failures only cost the detection.
    """
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
