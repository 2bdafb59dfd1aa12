"""Calibration data for the regular flow: what a user passes as `dataset=` turned into the batches upstream
auto-round 0.16.1 feeds its model (calib_dataset.get_dataloader plus LLMCalibrator.calib).

Two shapes of input, as upstream:
  * a dataset string (`name[:opt[:opt...]][,name...]`): every source is tokenized, filtered to samples of at
    least `seqlen` tokens that do not look like padding, mixed, shuffled and cut into batches of `batch_size`
    rows of exactly `seqlen` tokens (attention mask as the tokenizer gave it: all ones);
  * anything else iterable (list of strings / token tensors / dicts, a DataLoader): every item is one batch;
    items shorter than `seqlen` are skipped, longer ones are kept whole, the mask is built as upstream does
    (its last position is always 0).
In both cases iteration stops once at least `nsamples` rows were produced.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import ssl
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("fastround")

DEFAULT_DATASET = "NeelNanda/pile-10k"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# upstream's Dataset.map(batched=True) batch size; tokenizing in chunks this size keeps the bar moving
_CHUNK = 1000

Row = tuple[list[int], list[int]]  # (input_ids, attention_mask) of one tokenized sample


class CalibrationError(ValueError):
    """The calibration data cannot be built from what was passed as `dataset`."""


# ----------------------------------------------------------------------------------------------------------
# the dataset string


@dataclass
class SourceSpec:
    """One comma-separated source of a dataset string, with its options."""

    name: str
    split: list[str] | None = None
    num: int | None = None
    concat: bool = False
    apply_chat_template: bool = False
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


def parse_dataset_spec(spec: str) -> list[SourceSpec]:
    """Split a dataset string into sources. Spaces are removed first, as upstream does (a system prompt loses
    its spaces too); a value cannot contain ':' or ','."""
    sources = []
    for part in spec.replace(" ", "").split(","):
        name, *options = part.split(":")
        if not name:
            raise CalibrationError(f"dataset {spec!r}: empty source name in {part!r}")
        source = SourceSpec(name)
        for option in options:
            key, *values = option.split("=")
            if key in ("split", "num", "system_prompt") and not values:
                raise CalibrationError(f"dataset {spec!r}: option {key!r} of {name!r} needs a value ({key}=...)")
            if key == "split":
                source.split = values[0].split("+")
            elif key == "num":
                try:
                    source.num = int(values[0])
                except ValueError:
                    message = f"dataset {spec!r}: num={values[0]!r} of {name!r} is not an integer"
                    raise CalibrationError(message) from None
                if source.num < 0:
                    raise CalibrationError(f"dataset {spec!r}: num={source.num} of {name!r} is negative")
            elif key in ("concat", "apply_chat_template"):
                # a bare flag or any value but "false" turns it on
                setattr(source, key, not (values and values[0].lower() == "false"))
            elif key == "system_prompt":
                source.system_prompt = values[0]
                source.apply_chat_template = True
            else:
                logger.warning("dataset %r: unknown option %r of %r is ignored", spec, option, name)
        sources.append(source)
    return sources


# ----------------------------------------------------------------------------------------------------------
# tokenization and filtering


@dataclass
class _Stats:
    """Why samples of one source were dropped, for the error when none is left."""

    texts: int = 0
    short: int = 0
    padding: int = 0


def _render_chat(
    messages: list[dict[str, str]], tokenizer: Any, system_prompt: str, generation_prompt: bool = True
) -> str:
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:
        # templates that reject a system role (upstream retries without it)
        logger.warning("the chat template failed; retrying without the system prompt")
        messages = [m for m in messages if m["role"] != "system"]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize(
    texts: Iterable[str], tokenizer: Any, seqlen: int, source: SourceSpec, total: int | None
) -> Iterator[Row]:
    """Lazily tokenize with truncation to seqlen (no padding), chunk by chunk under a progress bar."""
    from tqdm.auto import tqdm

    if source.apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationError(
            f"dataset source {source.name!r}: apply_chat_template needs a tokenizer with a chat template"
        )
    iterator = iter(texts)
    with tqdm(total=total, desc=f"Tokenizing {source.name}", unit=" texts", leave=False) as bar:
        while True:
            chunk = [text for _, text in zip(range(_CHUNK), iterator)]
            if not chunk:
                return
            if source.apply_chat_template:
                chunk = [
                    _render_chat([{"role": "user", "content": text}], tokenizer, source.system_prompt) for text in chunk
                ]
            encoded = tokenizer(chunk, truncation=True, max_length=seqlen)
            masks = encoded.get("attention_mask") or [[1] * len(ids) for ids in encoded["input_ids"]]
            bar.update(len(chunk))
            yield from zip(encoded["input_ids"], masks)


def _drop_reason(ids: list[int], seqlen: int) -> str | None:
    """upstream's filter: at least seqlen tokens, and the last of the first seqlen not repeated over seqlen/2 times."""
    if len(ids) < seqlen:
        return "short"
    head = ids[:seqlen]
    if len(head) > 1 and seqlen > 2 and head.count(head[-1]) > seqlen // 2:
        return "padding"
    return None


def _keep(rows: Iterable[Row], seqlen: int, stats: _Stats, limit: int | None) -> list[Row]:
    kept: list[Row] = []
    if limit == 0:
        return kept
    for row in rows:
        stats.texts += 1
        reason = _drop_reason(row[0], seqlen)
        if reason == "short":
            stats.short += 1
        elif reason == "padding":
            stats.padding += 1
        else:
            kept.append(row)
            if limit is not None and len(kept) >= limit:
                break
    return kept


def _concat(rows: Iterable[Row], seqlen: int, bos: int | None, eos: int | None) -> list[Row]:
    """`concat`: strip each sample's BOS/EOS, join everything, cut into seqlen chunks that get one BOS/EOS back
    (once any sample had one); the tail that does not fill a chunk is dropped."""
    chunks: list[Row] = []
    buffer: list[int] = []
    have_bos = have_eos = False
    for ids, _ in rows:
        if ids and bos is not None and ids[0] == bos:
            ids, have_bos = ids[1:], True
        if ids and eos is not None and ids[-1] == eos:
            ids, have_eos = ids[:-1], True
        buffer.extend(ids)
        room = max(1, seqlen - have_bos - have_eos)
        while len(buffer) >= room:
            body, buffer = buffer[:room], buffer[room:]
            chunk = ([bos] if have_bos else []) + body + ([eos] if have_eos else [])
            chunks.append((chunk, [1] * seqlen))
    return chunks


def _opencode_chunks(rows: Iterable[Row], seqlen: int, bos: int | None, eos: int | None) -> list[Row]:
    """OpenCodeInstruct's built-in packing exactly as upstream runs it: its count of re-added special tokens
    grows with every sample instead of being per chunk, so later chunks come out shorter or longer than
    seqlen (the length filter then drops the short ones)."""
    chunks: list[Row] = []
    buffer: list[int] = []
    specials, have_bos, have_eos = 0, False, False
    for ids, _ in rows:
        if ids and ids[0] == bos:
            ids, specials, have_bos = ids[1:], specials + 1, True
        if ids and ids[-1] == eos:
            ids, specials, have_eos = ids[:-1], specials + 1, True
        if len(buffer) + len(ids) + specials > seqlen:
            keep = seqlen - len(buffer) - specials  # may be negative: slices then count from the end
            body, buffer = buffer + ids[:keep], ids[keep:]
            chunks.append((([bos] if have_bos else []) + body + ([eos] if have_eos else []), [1] * seqlen))
        else:
            buffer = buffer + ids
        if len(buffer) + specials == seqlen:
            chunks.append((([bos] if have_bos else []) + buffer + ([eos] if have_eos else []), [1] * seqlen))
            buffer = []
    return chunks


# ----------------------------------------------------------------------------------------------------------
# sources: local files and the hub registry


def _is_local_path(name: str) -> bool:
    # upstream's test: the name mentions json/txt and exists
    return ("json" in name or "txt" in name) and os.path.exists(name)


def _read_local(path: str, seed: int) -> list[str]:
    """Texts of a .json (list, or dict whose values are used) or .jsonl file, shuffled with random.Random(seed)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                data = json.load(f)
            elif path.endswith(".jsonl"):
                data = [json.loads(line) for line in f if line.strip()]
            else:
                raise CalibrationError(f"calibration file {path!r}: only .json and .jsonl files are supported")
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"calibration file {path!r} cannot be read: {e}") from None
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list):
        kind = type(data).__name__
        raise CalibrationError(f"calibration file {path!r}: expected a list of samples, got a JSON {kind}")
    texts = []
    for index, entry in enumerate(data):
        text = entry
        if isinstance(entry, dict):
            if len(entry) == 1:
                text = next(iter(entry.values()))
            elif "text" in entry:
                text = entry["text"]
            elif "input_ids" in entry:
                text = entry["input_ids"]
        if not isinstance(text, str):
            raise CalibrationError(
                f"calibration file {path!r}, entry {index}: expected a string, a one-key object, or an object with "
                f"'text' (or 'input_ids' holding text), got {json.dumps(entry)[:80]}"
            )
        texts.append(text.rstrip())
    random.Random(seed).shuffle(texts)
    return texts


@dataclass
class _Loaded:
    """What a source loader gives: texts to tokenize (a list, or a lazy stream) or finished rows."""

    texts: Iterable[str] | None = None
    streaming: bool = False
    total: int | None = None
    rows: list[Row] | None = None


@dataclass
class _Request:
    tokenizer: Any
    seqlen: int
    seed: int
    source: SourceSpec
    max_samples: int  # fineweb-edu's stream length


def _datasets() -> Any:
    import datasets

    return datasets


def _one_split(split: list[str] | None, default: str, allowed: list[str], label: str) -> str:
    if split is None:
        return default
    if len(split) != 1 or split[0] not in allowed:
        given = "+".join(split)
        raise CalibrationError(f"dataset {label}: split must be one of {allowed} (one at a time), got {given!r}")
    return split[0]


def _column(stream: Iterable[Mapping[str, Any]], key: str) -> Iterator[str]:
    return (row[key] for row in stream)


def _load_pile(req: _Request) -> _Loaded:
    data = _datasets().load_dataset("NeelNanda/pile-10k", split="train").shuffle(seed=req.seed)
    return _Loaded(texts=data["text"], total=len(data))


def _load_fineweb_edu(req: _Request) -> _Loaded:
    split = _one_split(req.source.split, "train", ["train"], "FineWeb-Edu")
    if req.source.name == "AI-ModelScope/fineweb-edu" or (
        req.source.name == "fineweb-edu" and os.getenv("AR_USE_MODELSCOPE", "0").lower() in ("1", "true")
    ):
        raise CalibrationError(
            f"dataset {req.source.name!r}: the ModelScope mirror is not supported; use HuggingFaceFW/fineweb-edu"
        )
    stream = _datasets().load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split=split, streaming=True)
    stream = stream.shuffle(seed=req.seed).take(req.max_samples)
    return _Loaded(texts=_column(stream, "text"), streaming=True, total=req.max_samples)


def _load_cci3(req: _Request) -> _Loaded:
    stream = _datasets().load_dataset("BAAI/CCI3-HQ", split="train", streaming=True).shuffle(seed=req.seed).take(10000)
    return _Loaded(texts=_column(stream, "text"), streaming=True, total=10000)


def _load_github_code(req: _Request) -> _Loaded:
    ds = _datasets()
    try:
        parts = [
            ds.load_dataset(
                "codeparrot/github-code-clean", config, split="train", trust_remote_code=True, streaming=True
            ).shuffle(seed=req.seed)
            for config in ("all-mit", "all-apache-2.0")
        ]
    except RuntimeError as e:
        if "Dataset scripts are no longer supported" in str(e):
            raise CalibrationError(
                f"dataset {req.source.name!r} is script-based and needs datasets<=3.6.0 (installed: {ds.__version__})"
            ) from None
        raise
    stream = ds.concatenate_datasets(parts).shuffle(seed=req.seed).take(10000)
    return _Loaded(texts=_column(stream, "code"), streaming=True, total=10000)


def _load_opencode(req: _Request) -> _Loaded:
    split = _one_split(req.source.split, "train", ["train"], "OpenCodeInstruct")
    stream = _datasets().load_dataset("nvidia/OpenCodeInstruct", split=split, streaming=True)
    stream = stream.shuffle(seed=req.seed).take(10000)
    tokenizer, source = req.tokenizer, req.source
    texts = []
    for row in stream:
        if source.apply_chat_template:
            messages = [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output"]}]
            texts.append(_render_chat(messages, tokenizer, source.system_prompt, generation_prompt=False))
        else:
            texts.append(f"{row['input']}\n\n{row['output']}")
    random.Random(req.seed).shuffle(texts)
    # upstream tokenizes these (with the chat template once more if asked) and always packs them
    rows = _tokenize(texts, tokenizer, req.seqlen, source, len(texts))
    return _Loaded(rows=_opencode_chunks(rows, req.seqlen, tokenizer.bos_token_id, tokenizer.eos_token_id))


def _load_ultrachat(req: _Request) -> _Loaded:
    splits = ["train_sft", "test_sft", "train_gen", "test_gen"]
    split = _one_split(req.source.split, "train_sft", splits, "ultrachat_200k")
    stream = _datasets().load_dataset("HuggingFaceH4/ultrachat_200k", split=split, streaming=True)
    stream = stream.shuffle(seed=req.seed).take(20000)
    # upstream ends up never applying the chat template here: the turns are joined as plain text
    req.source.apply_chat_template = False
    texts = ("".join(message["content"] for message in row["messages"]) for row in stream)
    return _Loaded(texts=texts, streaming=True, total=20000)


def _load_ultra_fineweb(req: _Request) -> _Loaded:
    split = _one_split(req.source.split, "en", ["en", "zh"], "Ultra-FineWeb")
    stream = _datasets().load_dataset("openbmb/Ultra-FineWeb", split=split, streaming=True, trust_remote_code=True)
    stream = stream.shuffle(seed=req.seed).take(20000)
    return _Loaded(texts=_column(stream, "content"), streaming=True, total=20000)


def _load_new_title_chinese(req: _Request) -> _Loaded:
    data = _datasets().load_dataset("madao33/new-title-chinese", split="train").shuffle(seed=req.seed)
    return _Loaded(texts=data["content"], total=len(data))


def _load_mbpp(req: _Request) -> _Loaded:
    texts = []
    for split in req.source.split or ["train", "validation", "test"]:
        for row in _datasets().load_dataset("google-research-datasets/mbpp", split=split):
            texts.append(row["text"] + row["code"])
    random.Random(req.seed).shuffle(texts)
    return _Loaded(texts=texts, total=len(texts))


_AUDIOCAPS_URL = "https://raw.githubusercontent.com/cdjkim/audiocaps/master/dataset2.0/train.csv"


def _load_audiocaps(req: _Request) -> _Loaded:
    # the same cache file upstream uses, so a copy fetched by either is reused
    workspace = os.environ.get("AR_WORK_SPACE") or os.environ.get("AR_WORKSPACE")
    cache_dir = os.path.join(workspace or tempfile.gettempdir(), "audiocaps_cache")
    path = os.path.join(cache_dir, "train.csv")
    if not (os.path.exists(path) and os.path.getsize(path) > 0):
        os.makedirs(cache_dir, exist_ok=True)
        with urllib.request.urlopen(_AUDIOCAPS_URL, timeout=60) as response:
            body = response.read().decode("utf-8")
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
    with open(path, encoding="utf-8") as f:
        texts = [caption for row in csv.DictReader(f) if (caption := (row.get("caption") or "").strip())]
    if not texts:
        raise CalibrationError(f"dataset 'audiocaps': {path} holds no captions")
    random.Random(req.seed).shuffle(texts)
    return _Loaded(texts=texts, total=len(texts))


# upstream's registry, in its order: unknown names match the first key containing their last path component
_REGISTRY: dict[str, Callable[[_Request], _Loaded]] = {
    "NeelNanda/pile-10k": _load_pile,
    "pile-10k": _load_pile,
    "HuggingFaceFW/fineweb-edu": _load_fineweb_edu,
    "AI-ModelScope/fineweb-edu": _load_fineweb_edu,
    "fineweb-edu": _load_fineweb_edu,
    "BAAI/CCI3-HQ": _load_cci3,
    "CCI3-HQ": _load_cci3,
    "codeparrot/github-code-clean": _load_github_code,
    "github-code-clean": _load_github_code,
    "nvidia/OpenCodeInstruct": _load_opencode,
    "opencode-instruct": _load_opencode,
    "HuggingFaceH4/ultrachat_200k": _load_ultrachat,
    "ultrachat_200k": _load_ultrachat,
    "openbmb/Ultra-FineWeb": _load_ultra_fineweb,
    "madao33/new-title-chinese": _load_new_title_chinese,
    "new-title-chinese": _load_new_title_chinese,
    "google-research-datasets/mbpp": _load_mbpp,
    "mbpp": _load_mbpp,
    "audiocaps": _load_audiocaps,
    "AudioCaps": _load_audiocaps,
}


def resolve_source(name: str) -> str:
    """'local' for an existing local file, else the registry key the name stands for."""
    if _is_local_path(name):
        if not os.path.isfile(name) or not name.endswith((".json", ".jsonl")):
            raise CalibrationError(f"calibration file {name!r}: only .json and .jsonl files are supported")
        return "local"
    if name in _REGISTRY:
        return name
    tail = name.split("/")[-1]
    for key in _REGISTRY:
        if tail in key:
            return key
    if os.path.exists(name):
        raise CalibrationError(f"calibration data {name!r}: only .json and .jsonl files are supported")
    if name.endswith((".json", ".jsonl", ".txt")) or name.startswith((".", "/", "~")):
        raise CalibrationError(f"calibration file {name!r} does not exist")
    names = [key for key in _REGISTRY if "/" not in key]
    raise CalibrationError(
        f"calibration dataset {name!r} is not known; choose from {names}, or pass local data: "
        "a .json/.jsonl file path or a list of strings"
    )


def _truthy_env(key: str) -> bool:
    return os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")


def _offline_reason() -> str | None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy_env(key):
            return f"offline: {key} is set"
    # the libraries read those variables once, at import; honour their view too
    datasets = sys.modules.get("datasets")
    if datasets is not None and getattr(getattr(datasets, "config", None), "HF_HUB_OFFLINE", False):
        return "offline: datasets is in offline mode"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "offline: HF_HUB_OFFLINE is set"
    except ImportError:
        pass
    return None


_NETWORK_WORDS = ("connection", "http", "proxy", "ssl", "timeout", "urlerror", "offline", "localentrynotfound")
_NETWORK_MODULES = (
    "datasets", "huggingface_hub", "httpcore", "httpx", "requests", "urllib", "socket", "fsspec", "aiohttp"
)


def _network_error(error: BaseException) -> BaseException | None:
    """The network failure in an exception chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind, module = type(current).__name__.lower(), type(current).__module__.lower()
        if isinstance(current, (ConnectionError, TimeoutError, ssl.SSLError)):
            return current
        if any(w in kind for w in _NETWORK_WORDS) and any(m in module for m in _NETWORK_MODULES):
            return current
        current = current.__cause__ or current.__context__
    return None


def _from_hub_client(error: BaseException) -> bool:
    """Errors a hub lookup gives when the data is not there (not cached, offline): I/O or the clients' own."""
    module = type(error).__module__
    return isinstance(error, OSError) or module.startswith(("datasets", "huggingface_hub", "fsspec"))


def _unreachable(name: str, reason: str) -> CalibrationError:
    return CalibrationError(
        f"calibration dataset {name!r} could not be loaded from the Hugging Face hub ({reason}). "
        "Pass local data instead: dataset='path/to/texts.jsonl' (a .json or .jsonl file of texts) "
        "or dataset=['first text', 'second text', ...]"
    )


def _source_rows(source: SourceSpec, key: str, req: _Request, limit: int | None, stats: _Stats) -> list[Row]:
    """Tokenized, optionally packed, filtered rows of one source; at most `limit` of them."""
    tokenizer, seqlen = req.tokenizer, req.seqlen
    if key == "local":
        texts = _read_local(source.name, req.seed)
        loaded = _Loaded(texts=texts, total=len(texts))
    else:
        loaded = _REGISTRY[key](req)
    if loaded.rows is not None:
        rows: Iterable[Row] = loaded.rows
    else:
        assert loaded.texts is not None
        rows = _tokenize(loaded.texts, tokenizer, seqlen, source, loaded.total)
    if source.concat:
        rows = _concat(rows, seqlen, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return _keep(rows, seqlen, stats, limit)


def _mix(parts: list[tuple[str, list[Row]]], data_lens: dict[str, int], nsamples: int, seed: int) -> list[Row]:
    """Upstream's mixing of several sources, quirks included: sizes sorted ascending, `num` sources take their
    count, the others share what is left (each later one re-divides the remainder), then a seeded shuffle."""
    lens = [len(rows) for _, rows in parts]
    order = sorted(range(len(parts)), key=lambda i: lens[i])
    taken = sum(data_lens.values()) if data_lens else 0
    if taken > nsamples:
        taken = 0
    picked: list[Row] = []
    counts: dict[str, int] = {}
    for position, index in enumerate(order):
        name, rows = parts[index]
        if name in data_lens:
            target = data_lens[name]
        else:
            share = len(parts) - len(data_lens) if data_lens else len(parts) - position
            # upstream caps by the size at this position of the *unsorted* list
            target = min((nsamples - taken) // share, lens[position])
            taken += target
        picked.extend(rows[:target])  # where upstream would fail on a source smaller than target
        counts[name] = target
    logger.info("calibration samples per source: %s", counts)
    permutation = np.random.default_rng(seed).permutation(len(picked)) if picked else []
    return [picked[i] for i in permutation]


def _rows_from_spec(
    spec: str, tokenizer: Any, seqlen: int, nsamples: int, seed: int
) -> tuple[list[Row], dict[str, _Stats]]:
    if tokenizer is None:
        raise CalibrationError(f"dataset {spec!r}: text calibration data needs a tokenizer (tokenizer=None was given)")
    sources = parse_dataset_spec(spec)
    data_lens: dict[str, int] = {}
    parts: list[tuple[str, list[Row]]] = []
    stats: dict[str, _Stats] = {}
    for source in sources:
        if source.num is not None:
            data_lens[source.name] = source.num
        key = resolve_source(source.name)
        streaming = key != "local" and _REGISTRY[key] in _STREAMING
        # only the rows that can survive the later cuts are tokenized; a mix needs every source's full size
        if source.name in data_lens:
            limit: int | None = data_lens[source.name]
        elif streaming or len(sources) == 1:
            limit = nsamples
        else:
            limit = None
        req = _Request(tokenizer, seqlen, seed, source, max(10000, data_lens.get(source.name, nsamples)))
        source_stats = stats.setdefault(source.name, _Stats())
        if key == "local":
            rows = _source_rows(source, key, req, limit, source_stats)
        else:
            try:
                rows = _source_rows(source, key, req, limit, source_stats)
            except CalibrationError:
                raise
            except ModuleNotFoundError as e:
                if e.name != "datasets":
                    raise
                raise _unreachable(source.name, "the `datasets` package is not installed") from None
            except Exception as e:
                offline = _offline_reason() if _from_hub_client(e) else None
                network = _network_error(e)
                if offline is None and network is None:
                    raise
                first_line = str(network).splitlines()[0] if str(network) else ""
                reason = offline or f"no network: {type(network).__name__}: {first_line}"
                raise _unreachable(source.name, reason) from None
        parts.append((source.name, rows))
    rows = parts[0][1] if len(parts) == 1 else _mix(parts, data_lens, nsamples, seed)
    return rows[:nsamples], stats


_STREAMING = {_load_fineweb_edu, _load_cci3, _load_github_code, _load_ultrachat, _load_ultra_fineweb}


def _spec_batches(rows: list[Row], seqlen: int, batch_size: int) -> list[dict[str, Any]]:
    """upstream's DataLoader(batch_size, no shuffle) and its collate: cut to seqlen, drop padding-like rows."""
    batches = []
    for start in range(0, len(rows), batch_size):
        ids, masks = [], []
        for row_ids, row_mask in rows[start : start + batch_size]:
            head = row_ids[:seqlen]
            if head.count(head[-1]) > seqlen // 2:  # only bites for seqlen <= 2; longer ones were filtered
                continue
            ids.append(head)
            masks.append(row_mask[:seqlen])
        if ids:
            batches.append(
                {
                    "input_ids": torch.tensor(ids, dtype=torch.int64),  # [b, seqlen]
                    "attention_mask": torch.tensor(masks, dtype=torch.int64),  # [b, seqlen]
                }
            )
    return batches


# ----------------------------------------------------------------------------------------------------------
# non-string datasets: lists, tuples, DataLoaders


def _as_tensor(value: Any, what: str) -> Any:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        try:
            return torch.tensor(value, dtype=torch.int64)
        except (TypeError, ValueError):
            raise CalibrationError(f"{what}: token rows of a batch must be equally long lists of ints") from None
    return value


def _pad_mask(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """The mask upstream builds for pre-tokenized input without one."""
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is not None:
        mask = (input_ids != tokenizer.pad_token_id).to(torch.long)
    else:
        # trailing copies of the last token are taken for padding (the caller masks the last position)
        mask = torch.ones_like(input_ids, dtype=torch.long)
        for row in range(input_ids.shape[0]):
            j = input_ids.shape[1] - 2
            while j >= 0 and input_ids[row, j] == input_ids[row, -1]:
                mask[row, j] = 0
                j -= 1
    return mask


def _item_batch(data: Any, index: int, tokenizer: Any, seqlen: int) -> dict[str, Any] | None:
    """One item of a non-string dataset as the keyword arguments upstream passes to the model."""
    what = f"calibration item {index}"
    if type(data).__name__ == "BatchEncoding":
        data = data.data
    if isinstance(data, torch.Tensor):
        batch: dict[str, Any] = {"input_ids": data}
    elif isinstance(data, str):
        if tokenizer is None:
            raise CalibrationError(f"{what} is a string, which needs a tokenizer (tokenizer=None was given)")
        batch = dict(tokenizer(data, truncation=True, max_length=seqlen, return_tensors="pt").data)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(v, int) for v in data):
        batch = {"input_ids": torch.tensor(data, dtype=torch.int64)}
    elif isinstance(data, (list, tuple)):
        if len(data) != 1 or not isinstance(data[0], torch.Tensor):
            raise CalibrationError(
                f"{what}: a tuple/list item must hold one input_ids tensor (or be a list of token ids); "
                "pass a dict for more inputs"
            )
        batch = {"input_ids": data[0]}
    elif isinstance(data, Mapping):
        batch = dict(data)
        if "input_ids" not in batch:
            raise CalibrationError(f"{what}: a dict item needs 'input_ids' (keys: {sorted(batch)})")
    else:
        raise CalibrationError(
            f"{what}: unsupported type {type(data).__name__}; items may be strings, token tensors, "
            "lists of token ids or dicts with input_ids"
        )
    batch = {key: _as_tensor(value, what) for key, value in batch.items()}
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim not in (1, 2):
        kind = type(input_ids).__name__
        raise CalibrationError(f"{what}: input_ids must be a 1-D or 2-D tensor of token ids, got {kind}")
    if input_ids.ndim == 1:  # one sample: give it the batch dim the model expects
        input_ids = batch["input_ids"] = input_ids.unsqueeze(0)
        if isinstance(batch.get("attention_mask"), torch.Tensor) and batch["attention_mask"].ndim == 1:
            batch["attention_mask"] = batch["attention_mask"].unsqueeze(0)
    if input_ids.shape[-1] < seqlen:
        return None
    if "attention_mask" in batch:
        if batch["attention_mask"] is not None:
            batch["attention_mask"] = batch["attention_mask"].clone()
            batch["attention_mask"][:, -1] = 0
        # an explicit None stays None: upstream builds a mask but then passes the item's None
    else:
        mask = _pad_mask(input_ids, tokenizer)
        mask[:, -1] = 0  # upstream never passes an all-ones mask (some models would drop it)
        batch["attention_mask"] = mask
    return batch


def _item_batches(dataset: Any, tokenizer: Any, seqlen: int, nsamples: int) -> tuple[list[dict[str, Any]], int, int]:
    """Batches in item order until at least nsamples rows; also (items seen, items too short)."""
    from tqdm.auto import tqdm

    if isinstance(dataset, Mapping) or type(dataset).__name__ == "BatchEncoding":
        dataset = [dataset]  # one batch of keyword arguments
    try:
        total: int | None = len(dataset)
    except TypeError:
        total = None
    batches, rows, seen, short = [], 0, 0, 0
    for index, data in enumerate(tqdm(dataset, total=total, desc="Preparing calibration data", leave=False)):
        if data is None:
            continue
        seen += 1
        batch = _item_batch(data, index, tokenizer, seqlen)
        if batch is None:
            short += 1
            continue
        batches.append(batch)
        rows += batch["input_ids"].shape[0]
        if rows >= nsamples:
            break
    return batches, seen, short


# ----------------------------------------------------------------------------------------------------------
# the entry point


def _describe(dataset: Any) -> str:
    if isinstance(dataset, str):
        return repr(dataset)
    try:
        return f"{type(dataset).__name__} of {len(dataset)} items"
    except TypeError:
        return type(dataset).__name__


def get_calibration_batches(
    dataset: Any, tokenizer: Any, seqlen: int, nsamples: int, batch_size: int = 8, seed: int = 42
) -> tuple[list[dict[str, Any]], int]:
    """The batches upstream feeds the model while capturing block inputs, and the batch size it ends with.

    Each batch is the model's keyword arguments (call `model(**batch, use_cache=False)`): `input_ids`
    [b, L] and `attention_mask` [b, L] (None only when an item said so), plus any other keys the item had.
    L is seqlen for dataset strings; items of other datasets keep their length (>= seqlen). The list stops
    once >= nsamples rows were produced, as upstream's loop does; the returned batch size is
    min(batch_size, nsamples, rows).
    """
    for label, value in (("seqlen", seqlen), ("nsamples", nsamples), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CalibrationError(f"{label} must be a positive integer, got {value!r}")
    batch_size = min(batch_size, nsamples)  # upstream clamps it when the compressor is built
    if dataset is None:
        dataset = DEFAULT_DATASET
    if isinstance(dataset, str):
        rows, stats = _rows_from_spec(dataset, tokenizer, seqlen, nsamples, seed)
        batches = _spec_batches(rows, seqlen, batch_size)
        why = "; ".join(
            f"{name}: {s.texts} texts, {s.short} shorter than seqlen={seqlen} tokens, {s.padding} padding-like "
            f"(last token repeated more than {seqlen // 2} times)"
            for name, s in stats.items()
        )
    elif isinstance(dataset, (bytes, int, float, bool)) or not isinstance(dataset, Iterable):
        raise CalibrationError(
            "dataset must be a dataset string, a list of strings/token tensors/dicts or a DataLoader, "
            f"got {type(dataset).__name__}"
        )
    else:
        batches, seen, short = _item_batches(dataset, tokenizer, seqlen, nsamples)
        why = f"{seen} items, {short} shorter than seqlen={seqlen} tokens"
    rows_seen = sum(batch["input_ids"].shape[0] for batch in batches)
    if rows_seen == 0:
        raise CalibrationError(
            f"no calibration samples left from dataset {_describe(dataset)} ({why}); provide more or longer "
            "texts, or lower seqlen"
        )
    if rows_seen < nsamples:
        logger.warning(
            "only %d calibration samples of the %d asked for are usable (%s); fewer samples likely reduce accuracy",
            rows_seen,
            nsamples,
            why,
        )
    if rows_seen < batch_size:
        logger.warning("batch_size lowered from %d to the number of calibration samples, %d", batch_size, rows_seen)
        batch_size = rows_seen
    return batches, batch_size


def loss_input_ids(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """The token ids upstream keeps per batch for loss masking: pad tokens (or, without a pad token, trailing
    repeats of the last token) and the last position set to -100."""
    ids = input_ids.clone()  # [b, L]
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        ids[ids == tokenizer.pad_token_id] = -100
    else:
        for row in range(ids.shape[0]):
            last, j = ids[row, -1].clone(), ids.shape[1] - 2
            while j >= 0 and ids[row, j] == last:
                ids[row, j] = -100
                j -= 1
    ids[:, -1] = -100
    return ids


def clamp_seqlen(seqlen: int, model: Any, tokenizer: Any) -> int:
    """seqlen lowered to the model's max_position_embeddings and the tokenizer's model_max_length, with
    upstream's warnings."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and max_pos < seqlen:
        logger.warning("seqlen lowered to %d, the model's max_position_embeddings", max_pos)
        seqlen = max_pos
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max is not None and tok_max < seqlen:
        logger.warning("seqlen lowered to %d, the tokenizer's model_max_length", tok_max)
        seqlen = tok_max
    return seqlen
