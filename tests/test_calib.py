"""fastround.calib against upstream auto-round 0.16.1: the batches its LLMCalibrator.calib feeds the model
(recorded by a stand-in model), for every kind of `dataset=`, plus the error cases."""

from __future__ import annotations

import json
import logging
import random
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from fastround import calib

WORDS = "the quick brown fox jumps over lazy dog a cat sat on mat and ran far away into woods".split()


def _sentences(count: int, seed: int, lo: int = 2, hi: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(count)]


def make_tokenizer(*, pad: bool = True, eos: bool = False, chat: bool = False) -> Any:
    """A tiny BPE tokenizer that adds BOS (and EOS if asked) like real LLM tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # byte-level, so whitespace and newlines are tokens too (as in GPT-style tokenizers)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_sentences(200, 0), trainer)
    single = "<s> $A </s>" if eos else "<s> $A"
    specials = [("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    kwargs: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if chat:
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
    return tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _upstream_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # upstream preprocesses in a forked subprocess by default; keep it in-process so monkeypatches apply
    monkeypatch.setenv("AR_DISABLE_DATASET_SUBPROCESS", "1")


class _RecordingModel:
    """Stands in for the model: records the arguments of every forward upstream makes."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        assert kwargs.pop("use_cache") is False
        assert len(args) <= 1
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        self.calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def upstream(dataset: Any, tokenizer: Any, seqlen: int, nsamples: int, batch_size: int, seed: int = 42):
    """(batches, final batch_size, loss ids) as upstream's LLMCalibrator.calib produces them."""
    from auto_round.calibration.llm import LLMCalibrator

    state = types.SimpleNamespace(
        dataset=dataset,
        tokenizer=tokenizer,
        seqlen=seqlen,
        seed=seed,
        model=_RecordingModel(),
        inputs={},
        batch_size=min(batch_size, nsamples),  # as the compressor's __init__ clamps it
    )
    LLMCalibrator.calib(state, nsamples, state.batch_size)
    return state.model.calls, state.batch_size, state.inputs.get("input_ids", [])


def assert_same_batches(ours: tuple[list[dict[str, Any]], int], theirs: tuple[list[dict[str, Any]], int, Any]) -> None:
    batches, batch_size = ours
    calls, their_batch_size, _ = theirs
    assert batch_size == their_batch_size
    assert len(batches) == len(calls)
    assert len(batches) > 0
    for index, (mine, reference) in enumerate(zip(batches, calls)):
        assert mine.keys() == reference.keys(), index
        for key, value in mine.items():
            other = reference[key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype, (index, key)
                assert torch.equal(value, other), (index, key, value, other)
            else:
                assert value == other, (index, key)


def compare(make_dataset, tokenizer, seqlen, nsamples, batch_size, seed=42):
    """Runs both sides on fresh copies of the dataset (upstream edits masks in place) and compares."""
    ours = calib.get_calibration_batches(make_dataset(), tokenizer, seqlen, nsamples, batch_size, seed)
    theirs = upstream(make_dataset(), tokenizer, seqlen, nsamples, batch_size, seed)
    assert_same_batches(ours, theirs)
    return ours


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    """Local calibration files in the shapes upstream accepts, with short and padding-like texts mixed in."""
    texts = _sentences(40, 1)
    texts[3] = "the dog" + "<pad>" * 20  # padding-like: the last token repeated over seqlen/2 times
    texts[7] = texts[7] + " mat mat mat mat mat mat mat"
    paths = {
        "a": tmp_path / "a.json",
        "b": tmp_path / "b.jsonl",
        "c": tmp_path / "c.json",
        "d": tmp_path / "d.json",
    }
    paths["a"].write_text(json.dumps(texts))
    entries = [{"text": t + "  \n", "meta": i} if i % 3 == 0 else {"body": t} for i, t in enumerate(_sentences(25, 2))]
    entries[4] = {"input_ids": _sentences(1, 9)[0] + " fox fox", "id": 4}
    paths["b"].write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    paths["c"].write_text(json.dumps({f"k{i}": t for i, t in enumerate(_sentences(12, 3))}))
    paths["d"].write_text(json.dumps(_sentences(6, 4, lo=12)))
    return {key: str(path) for key, path in paths.items()}


# ----------------------------------------------------------------------------------------------------------
# dataset strings over local files


@pytest.mark.parametrize(("seed", "seqlen"), [(42, 8), (7, 8), (42, 24)])
@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_local_file_matches_upstream(files, tok, which, seed, seqlen):
    batches, _ = compare(lambda: files[which], tok, seqlen, 10, 4, seed)
    assert all(batch["input_ids"].shape[1] == seqlen for batch in batches)


def test_filters_drop_short_and_padding_like(files, tok):
    # nsamples larger than what survives: every text is looked at, and the counts match upstream
    batches, batch_size = compare(lambda: files["a"], tok, 10, 200, 8)
    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape[0] < 40
    for row in rows.tolist():
        assert row.count(row[-1]) <= 5


@pytest.mark.parametrize(
    "spec",
    [
        "{a}:num=3,{b}",
        "{a},{b}",
        "{c}:num=2,{a},{b}",  # the shares of the sources without num are re-divided one after another
        "{a},{b},{c}:num=2",
        "{a},{d}:num=3",  # upstream caps by the unsorted sizes
        "{d},{a},{c}",
        " {a} : num=4 , {b} : split=train+test ",  # spaces are stripped; local files ignore split
        "{a}:num=2,{a}",  # a name repeated shares its num
    ],
)
def test_mixing_matches_upstream(files, tok, spec):
    compare(lambda: spec.format(**files), tok, 8, 12, 4, 5)


def test_split_is_ignored_for_local_files(files, tok):
    plain = calib.get_calibration_batches(files["a"], tok, 8, 10, 4)[0]
    split = calib.get_calibration_batches(files["a"] + ":split=validation", tok, 8, 10, 4)[0]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(plain, split))


def test_chat_template_and_system_prompt(files):
    chat = make_tokenizer(chat=True)
    plain = compare(lambda: files["a"], chat, 8, 10, 4)[0]
    templated = compare(lambda: files["a"] + ":apply_chat_template", chat, 8, 10, 4)[0]
    assert not torch.equal(plain[0]["input_ids"], templated[0]["input_ids"])
    compare(lambda: files["a"] + ":apply_chat_template=False", chat, 8, 10, 4)
    prompted = compare(lambda: files["b"] + ":system_prompt=the lazy fox", chat, 12, 10, 4)[0]
    # spaces are stripped from the whole string, the prompt's own included
    joined = calib.get_calibration_batches(files["b"] + ":system_prompt=thelazyfox", chat, 12, 10, 4)[0]
    other = calib.get_calibration_batches(files["b"] + ":system_prompt=a dog", chat, 12, 10, 4)[0]
    assert torch.equal(prompted[0]["input_ids"], joined[0]["input_ids"])
    assert not torch.equal(prompted[0]["input_ids"], other[0]["input_ids"])


def test_chat_template_without_system_role(files):
    chat = make_tokenizer(chat=True)
    chat.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    compare(lambda: files["a"] + ":apply_chat_template", chat, 8, 10, 4)


def test_tiny_seqlen_collate_rule(tmp_path, tok):
    # seqlen <= 2: upstream's length filter lets repeated tokens through, its collate then drops them
    path = tmp_path / "t.json"
    path.write_text(json.dumps(["dog", "cat", "<s> cat", "a", "fox", "mat mat", "<s>", "the", "dog dog"]))
    compare(lambda: str(path), tok, 2, 10, 3)


def test_batch_size_shrinks_and_warns(files, tok, caplog):
    with caplog.at_level(logging.WARNING, logger="fastround"):
        batches, batch_size = compare(lambda: files["d"], tok, 12, 64, 16)
    assert batch_size == sum(b["input_ids"].shape[0] for b in batches) < 16
    assert any("batch_size lowered" in r.message for r in caplog.records)
    assert any("calibration samples of the 64" in r.message for r in caplog.records)


def test_concat_packs_the_token_stream(files):
    """upstream 0.16.1 fails on `concat` for every source (its packer gets lists, not tensors), so the packing
    is checked against its definition: the sample order upstream's local loader gives, BOS/EOS stripped,
    joined, cut into chunks of seqlen with one BOS/EOS put back."""
    from auto_round.calib_dataset import get_local_dataset

    for tokenizer in (make_tokenizer(), make_tokenizer(eos=True)):
        seqlen = 24  # most texts are shorter: without concat they would be dropped
        rows = [row["input_ids"] for row in get_local_dataset(tokenizer, seqlen, files["a"], seed=42)]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        has_eos = rows[0][-1] == eos
        stream = [t for row in rows for t in row[1 : len(row) - has_eos]]
        room = seqlen - 1 - has_eos
        chunks = [
            [bos] + stream[i : i + room] + ([eos] if has_eos else []) for i in range(0, len(stream) - room + 1, room)
        ]
        chunks = [c for c in chunks if c.count(c[-1]) <= seqlen // 2]
        batches, _ = calib.get_calibration_batches(files["a"] + ":concat", tokenizer, seqlen, 1000, 5)
        got = torch.cat([b["input_ids"] for b in batches]).tolist()
        assert got == chunks
        assert all(b["attention_mask"].all() for b in batches)
        off = calib.get_calibration_batches(files["a"] + ":concat=false", tokenizer, seqlen, 1000, 5)[0]
        assert torch.cat([b["input_ids"] for b in off]).tolist() != got


# ----------------------------------------------------------------------------------------------------------
# non-string datasets


def test_list_of_strings(tok):
    texts = _sentences(30, 5)
    compare(lambda: list(texts), tok, 6, 12, 4)
    compare(lambda: tuple(texts), tok, 6, 100, 8)  # fewer usable than nsamples: all, then shrink


def _token_rows(tok, count: int, seed: int, pad_tail: bool) -> list[torch.Tensor]:
    rng = random.Random(seed)
    rows = []
    for text in _sentences(count, seed):
        ids = tok(text)["input_ids"]
        if pad_tail and rng.random() < 0.5:
            ids = ids + [tok.pad_token_id if tok.pad_token_id is not None else ids[-1]] * rng.randint(1, 4)
        rows.append(torch.tensor([ids]))
    return rows


@pytest.mark.parametrize("pad", [True, False])
def test_token_tensors(pad):
    tok = make_tokenizer(pad=pad)
    rows = _token_rows(tok, 25, 6, pad_tail=True)
    batches, _ = compare(lambda: [r.clone() for r in rows], tok, 8, 9, 4)
    # longer pre-tokenized samples are not cut, and the last position is masked
    assert any(b["input_ids"].shape[1] > 8 for b in batches)
    assert all(not b["attention_mask"][:, -1].any() for b in batches)


def test_dicts_with_and_without_masks(tok):
    rows = _token_rows(tok, 20, 7, pad_tail=True)

    def make() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for i, r in enumerate(rows):
            if i % 3 == 0:
                items.append({"input_ids": r.clone(), "attention_mask": torch.ones_like(r)})
            elif i % 3 == 1:
                items.append({"input_ids": r.clone(), "labels": r.clone()})
            else:
                items.append({"input_ids": r.clone(), "attention_mask": None})
        return items

    compare(make, tok, 8, 50, 4)


def test_dataloader_and_tuples(tok):
    rows = [r[:, :10] for r in _token_rows(tok, 40, 8, pad_tail=False) if r.shape[1] >= 10]

    def loader() -> torch.utils.data.DataLoader:
        samples = [{"input_ids": r[0].clone(), "attention_mask": torch.ones(10, dtype=torch.long)} for r in rows]
        return torch.utils.data.DataLoader(samples, batch_size=3, shuffle=False)

    batches, _ = compare(loader, tok, 10, 7, 8)
    assert sum(b["input_ids"].shape[0] for b in batches) == 9  # stops once >= nsamples rows were seen
    compare(lambda: [(r.clone(),) for r in rows], tok, 10, 5, 2)


def test_one_dimensional_rows_get_a_batch_dim(tok):
    """Beyond upstream (which fails on them): 1-D tensors and lists of ids are single samples."""
    rows = _token_rows(tok, 15, 11, pad_tail=True)
    reference, size = calib.get_calibration_batches([r.clone() for r in rows], tok, 8, 6, 4)
    variants = (
        [r[0].clone() for r in rows],
        [r[0].tolist() for r in rows],
        [{"input_ids": r[0].tolist()} for r in rows],
    )
    for items in variants:
        batches, batch_size = calib.get_calibration_batches(items, tok, 8, 6, 4)
        assert batch_size == size and len(batches) == len(reference)
        for mine, theirs in zip(batches, reference):
            assert torch.equal(mine["input_ids"], theirs["input_ids"])
            assert torch.equal(mine["attention_mask"], theirs["attention_mask"])
    single, _ = calib.get_calibration_batches({"input_ids": torch.cat(rows[:3], 1)}, tok, 8, 6, 4)
    assert len(single) == 1 and single[0]["input_ids"].shape == (1, sum(r.shape[1] for r in rows[:3]))


def test_batch_encoding(tok):
    texts = _sentences(6, 9, lo=8)
    compare(lambda: tok(texts, padding=True, return_tensors="pt"), tok, 8, 6, 2)


def test_loss_input_ids_match_upstream():
    for pad in (True, False):
        tok = make_tokenizer(pad=pad)
        rows = _token_rows(tok, 20, 10, pad_tail=True)
        batches, _ = calib.get_calibration_batches([r.clone() for r in rows], tok, 8, 50, 4)
        _, _, their_ids = upstream([r.clone() for r in rows], tok, 8, 50, 4)
        ours = [row for b in batches for row in torch.split(calib.loss_input_ids(b["input_ids"], tok), 1)]
        assert len(ours) == len(their_ids)
        assert all(torch.equal(a, b) for a, b in zip(ours, their_ids))
        assert any((row == -100).sum() > 1 for row in ours)


def test_clamp_seqlen_matches_upstream(tok):
    from auto_round.calibration.state import CalibrationContext

    for max_pos, tok_max, seqlen in [(16, 1000, 32), (64, 24, 32), (None, 10**30, 2048), (8, 4, 6)]:
        config = types.SimpleNamespace() if max_pos is None else types.SimpleNamespace(max_position_embeddings=max_pos)
        model = types.SimpleNamespace(config=config)
        tokenizer = types.SimpleNamespace(model_max_length=tok_max)
        context = CalibrationContext(seqlen=seqlen)
        context.clamp_seqlen(types.SimpleNamespace(model=model, tokenizer=tokenizer))
        assert calib.clamp_seqlen(seqlen, model, tokenizer) == context.seqlen


# ----------------------------------------------------------------------------------------------------------
# hub datasets, served by a stand-in for datasets.load_dataset


def _hub_rows(path: str, split: str) -> list[dict[str, Any]]:
    seed = sum(map(ord, path + split))
    texts = _sentences(60, seed, lo=4, hi=40)
    if path == "google-research-datasets/mbpp":
        return [{"text": t[: len(t) // 2], "code": t[len(t) // 2 :]} for t in texts]
    if path == "HuggingFaceH4/ultrachat_200k":
        return [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[:9]}]} for t in texts]
    if path == "nvidia/OpenCodeInstruct":
        return [{"input": t[:20], "output": t[20:]} for t in texts]
    if path == "madao33/new-title-chinese":
        return [{"content": t, "title": t[:5]} for t in texts]
    return [{"text": t, "id": i} for i, t in enumerate(texts)]


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    import datasets

    import auto_round.calib_dataset as upstream_module

    requests: list[tuple[str, Any]] = []

    def load_dataset(path: str, name: Any = None, split: Any = None, streaming: bool = False, **_: Any) -> Any:
        requests.append((path, split))
        data = datasets.Dataset.from_list(_hub_rows(path, split))
        return data.to_iterable_dataset() if streaming else data

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(upstream_module, "load_dataset", load_dataset)
    return requests


@pytest.mark.parametrize(
    "spec",
    [
        "NeelNanda/pile-10k",
        "pile-10k:num=5,mbpp:split=train+test",
        "CCI3-HQ",
        "BAAI/CCI3-HQ:num=4,pile-10k",
        "CCI3-HQ,pile-10k:num=3",
        "CCI3-HQ,mbpp:split=train",  # a stream without num is cut at nsamples before mixing
        "fineweb-edu,CCI3-HQ",
        "ultrachat_200k",
        "new-title-chinese:apply_chat_template",
        "opencode-instruct",  # always packed by upstream, with its growing special-token count
        "opencode-instruct:apply_chat_template",
        "fineweb-edu",
    ],
)
def test_hub_sources_match_upstream(fake_hub, spec):
    tok = make_tokenizer(eos=True, chat=True)
    compare(lambda: spec, tok, 10, 12, 4, 3)
    assert fake_hub


def test_source_names_resolve_like_upstream(monkeypatch):
    import auto_round.calib_dataset as upstream_module

    class Hit(Exception):
        pass

    def loader(key: str):
        def load(**_: Any) -> None:
            raise Hit(key)

        return load

    registry = {key: loader(key) for key in upstream_module.CALIB_DATASETS}
    monkeypatch.setattr(upstream_module, "CALIB_DATASETS", registry)
    assert list(calib._REGISTRY) == [key for key in registry if key != "local"]
    names = ["pile", "NeelNanda/pile-10k", "someone/pile-10k", "fineweb", "ultrachat", "Ultra-FineWeb", "mbpp",
             "google-research-datasets/mbpp", "AudioCaps", "x/CCI3-HQ", "code", "chinese", "OpenCodeInstruct"]
    for name in names:
        with pytest.raises(Hit) as hit:
            upstream_module._get_dataset_impl(None, 8, name, 42, 4)
        assert calib.resolve_source(name) == str(hit.value), name
    with pytest.raises(ValueError):
        upstream_module._get_dataset_impl(None, 8, "no-such-set", 42, 4)
    with pytest.raises(calib.CalibrationError, match="no-such-set"):
        calib.resolve_source("no-such-set")


# ----------------------------------------------------------------------------------------------------------
# errors


def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def load_dataset(path: str, *args: Any, **kwargs: Any) -> Any:
        # what datasets raises in offline mode for a dataset that is not cached
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_hub_name_gives_one_clear_error(monkeypatch, tok, flag, files):
    _offline_hub(monkeypatch)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(flag, "1")
    for spec in ("NeelNanda/pile-10k", "pile-10k", files["a"] + ",mbpp:num=3"):
        with pytest.raises(calib.CalibrationError) as error:
            calib.get_calibration_batches(spec, tok, 8, 4, 2)
        message = str(error.value)
        assert f"offline: {flag} is set" in message
        assert ("'mbpp'" if "mbpp" in spec else "pile-10k'") in message
        assert ".jsonl" in message and "dataset=['" in message
        assert error.value.__cause__ is None and error.value.__suppress_context__


def test_offline_does_not_disguise_other_failures(monkeypatch, tok):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("text")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError):
        calib.get_calibration_batches("mbpp", tok, 8, 4, 2)


def test_hub_name_without_the_datasets_package(monkeypatch, tok):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(calib.CalibrationError, match=r"'pile-10k'.*`datasets` package is not installed.*\.jsonl"):
        calib.get_calibration_batches("pile-10k", tok, 8, 4, 2)


def test_offline_with_the_real_datasets_library(monkeypatch, tok, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(calib.CalibrationError, match=r"'NeelNanda/pile-10k' could not be loaded .*\.json"):
        calib.get_calibration_batches(None, tok, 8, 4, 2)


def test_network_failure_without_offline_flag(monkeypatch, tok):
    import datasets
    import huggingface_hub

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("loading failed") from TimeoutError("timed out")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(calib.CalibrationError, match=r"'mbpp' .*no network: TimeoutError"):
        calib.get_calibration_batches("mbpp", tok, 8, 4, 2)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("text")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError):  # not a network problem: not disguised as one
        calib.get_calibration_batches("mbpp", tok, 8, 4, 2)


def test_no_usable_samples(tmp_path, tok):
    path = tmp_path / "short.json"
    path.write_text(json.dumps(["a cat", "the dog ran", "the fox " + "<pad>" * 60]))
    with pytest.raises(calib.CalibrationError, match=r"short\.json.*2 shorter than seqlen=40.*1 padding-like"):
        calib.get_calibration_batches(str(path), tok, 40, 4, 2)
    with pytest.raises(SystemExit):  # upstream gives up too
        upstream(str(path), tok, 40, 4, 2)
    with pytest.raises(calib.CalibrationError, match=r"list of 2 items.*2 shorter than seqlen=40"):
        calib.get_calibration_batches(["a cat", "the dog"], tok, 40, 4, 2)
    with pytest.raises(SystemExit):
        upstream(["a cat", "the dog"], tok, 40, 4, 2)


def test_strings_without_tokenizer(files):
    with pytest.raises(calib.CalibrationError, match="item 0 is a string, which needs a tokenizer"):
        calib.get_calibration_batches(["some text here"], None, 2, 4, 2)
    with pytest.raises(calib.CalibrationError, match="needs a tokenizer"):
        calib.get_calibration_batches(files["a"], None, 2, 4, 2)
    with pytest.raises(SystemExit):
        upstream(["some text here"], None, 2, 4, 2)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("{a}:num=x", "num='x' of .*a.json.* is not an integer"),
        ("{a}:num", "option 'num' of .*a.json.* needs a value"),
        ("{a},", "empty source name"),
        ("{missing}", "missing.json' does not exist"),
        ("{txt}", "txt.*only .json and .jsonl files are supported"),
        ("no-such-set", "'no-such-set' is not known.*json"),
        ("{bad}", r"bad.json', entry 1: expected a string"),
    ],
)
def test_bad_dataset_strings(files, tok, tmp_path, spec, pattern):
    (tmp_path / "notes.txt").write_text("some text\n")
    (tmp_path / "bad.json").write_text(json.dumps(["fine text", ["not", "text"]]))
    extra = {"missing": "missing.json", "txt": "notes.txt", "bad": "bad.json"}
    names = dict(files, **{key: str(tmp_path / name) for key, name in extra.items()})
    with pytest.raises(calib.CalibrationError, match=pattern):
        calib.get_calibration_batches(spec.format(**names), tok, 8, 4, 2)


def test_bad_items(tok):
    with pytest.raises(calib.CalibrationError, match="item 1: a dict item needs 'input_ids'"):
        calib.get_calibration_batches([{"input_ids": torch.ones(1, 9, dtype=torch.long)}, {"ids": 1}], tok, 8, 4, 1)
    with pytest.raises(calib.CalibrationError, match="item 0: unsupported type float"):
        calib.get_calibration_batches([1.5], tok, 8, 4, 1)
    with pytest.raises(calib.CalibrationError, match="seqlen must be a positive integer"):
        calib.get_calibration_batches(["text"], tok, 0, 4, 1)
    with pytest.raises(calib.CalibrationError, match="dataset must be"):
        calib.get_calibration_batches(3, tok, 8, 4, 1)
