"""Already-quantized and fused source formats: parity with upstream auto-round 0.16.1 model-free, accounting,
and the errors fastround raises instead of writing something wrong.

Sources (built by tests/source_checkpoints.py; the format rules are in ../shared/reference/model-free.md §7 and docs/compatibility.md):
  * FP8 block-scaled (DeepSeek style `weight_scale_inv`), incl. a scale that lives in another shard (upstream
    processes donor shards first, which renumbers the output shards), an FP8 router kept as is, an ignored FP8
    lm_head (dequantized to bf16), an `input_scale` companion, and the `scale_fmt: ue8m0` variant;
  * fused 3-D experts (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), split per expert;
  * MXFP4 / MXFP8 in compressed-tensors naming: same-format passthrough, dequantize + requantize, ignored.

Parity is byte for byte (oracle.compare_checkpoints) with the orderings upstream derives from its processing
order tolerated, as in test_model_free_parity.py. One upstream defect is tolerated, narrowly: a layer that only
exists as `.weight_packed` in the source (MXFP4) is never in upstream's snapshot of input layers, so when it is
written unquantized (bf16) upstream leaves it out of extra_config; fastround lists it as
{"bits": 16, ...}, as upstream does for every other kept layer (see _assert_parity's `extra_kept`).

Runs are cached per module (fastround and upstream), so the accounting tests reuse the parity runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import torch

import oracle
import source_checkpoints as sc

import fastround  # a broken build must fail here, not skip

_ORDER_OK = oracle.ORDER_ONLY_DIFFS
_EXTRA_CONFIG_DIFFS = ("config.json.quantization_config.extra_config", "quantization_config.json.extra_config")

L0 = "model.layers.0."

# ---------------------------------------------------------------------------------------------------
# sources, runs and comparison helpers

_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "fp8": lambda p: sc.build_fp8(p),  # k_proj's scale lives in shard C
    "fp8_local": lambda p: sc.build_fp8(p, cross_shard=False),
    "fp8_ue8m0": lambda p: sc.build_fp8(p, ue8m0=True, cross_shard=False),
    "fp8_noblock": lambda p: sc.build_fp8_variant(p, "noblock"),
    "fp8_elementwise": lambda p: sc.build_fp8_variant(p, "elementwise"),
    "fp8_nested": lambda p: sc.build_fp8_variant(p, "nested"),
    "fp8_e8m0": lambda p: sc.build_fp8_variant(p, "e8m0"),
    "moe": sc.build_moe_fused,
    "mxfp": lambda p: sc.build_mxfp(p),
    "mxfp_router": lambda p: sc.build_mxfp(p, router=True),
    "nvfp4_legacy": lambda p: sc.build_nvfp4(p, "legacy"),
    "nvfp4_ct": lambda p: sc.build_nvfp4(p, "ct"),
    "kimi_int4": sc.build_kimi_int4,
    "deepseek_v4": lambda p: sc.build_deepseek(p, "v4"),
    "deepseek_v32": lambda p: sc.build_deepseek(p, "v32"),
    "modelopt_bare": lambda p: sc.build_modelopt_bare(p),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def source(work: Path) -> Callable[[str], Path]:
    """source(kind) -> a checkpoint folder, built once per module; read-only."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = _BUILDERS[kind](work / "src" / kind)
        return built[kind]

    return get


def _key(src: Path, kwargs: dict[str, Any]) -> str:
    return json.dumps([str(src), kwargs], sort_keys=True)


@pytest.fixture(scope="module")
def fast(work: Path) -> Callable[..., Path]:
    """fast(src, **kwargs) -> fastround output folder (cached). INT runs pad partial groups like upstream."""
    cache: dict[str, Path] = {}

    def run(src: Path, **kwargs: Any) -> Path:
        key = _key(src, kwargs)
        if key not in cache:
            out = work / "fast" / f"run{len(cache)}"
            ar = fastround.AutoRound(
                model=str(src), model_free=True, show_progress=False, pad_partial_groups=True, **kwargs
            )
            assert ar.quantize_and_save(str(out)) == (None, str(out))
            cache[key] = out
        return cache[key]

    return run


@pytest.fixture(scope="module")
def upstream(work: Path) -> Callable[..., Path]:
    """upstream(src, **kwargs) -> upstream 0.16.1 output folder (AutoRound API, model_free=True, eager; cached)."""
    cache: dict[str, Path] = {}
    runs = itertools.count()  # a failed run leaves its folder behind and is not cached

    def run(src: Path, **kwargs: Any) -> Path:
        key = _key(src, kwargs)
        if key not in cache:
            cache[key] = oracle.run_upstream_api(src, work / "upstream" / f"run{next(runs)}", **kwargs)
        return cache[key]

    return run


def qconfig(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _assert_parity(
    fast_out: Path, up_out: Path, extra_kept: Iterable[str] = (), maybe_kept: Iterable[str] = ()
) -> None:
    """fastround (A) == upstream (B) byte for byte.

    extra_kept: layers fastround must list in extra_config as 16-bit while upstream (defect, see module doc)
    leaves them out; maybe_kept: the same, but fastround may also leave them out.
    """
    diff = oracle.compare_checkpoints(fast_out, up_out)
    tolerated = set(extra_kept) | set(maybe_kept)
    problems = [d for d in diff if not (tolerated and d.startswith(_EXTRA_CONFIG_DIFFS))]
    assert problems == [], "fastround (A) vs upstream (B):\n" + "\n".join(problems)
    if tolerated:
        fq, uq = qconfig(fast_out), qconfig(up_out)
        f_extra, u_extra = dict(fq.get("extra_config", {})), dict(uq.get("extra_config", {}))
        for layer in sorted(tolerated):
            entry = f_extra.pop(layer, None)
            if entry is None and layer in maybe_kept:
                continue
            assert entry is not None and entry.get("bits") == 16, f"fastround should list {layer} as kept: {entry}"
            assert layer not in u_extra, f"upstream now lists {layer}; drop it from extra_kept"
        assert f_extra == u_extra, f"extra_config beyond {sorted(tolerated)}:\n  A: {f_extra}\n  B: {u_extra}"
        assert {k: v for k, v in fq.items() if k != "extra_config"} == {
            k: v for k, v in uq.items() if k != "extra_config"
        }
    bad_order = [d for d in diff.order if not d.startswith(_ORDER_OK)]
    assert bad_order == [], "ordering differences:\n" + "\n".join(bad_order)


def _source_tensors(src: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, nbytes) over every shard of a source folder (headers only)."""
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for f in sorted(src.glob("*.safetensors")):
        header, _ = oracle.read_safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            assert name not in out
            out[name] = (info["dtype"], tuple(info["shape"]), end - begin)
    return out


def _read_all(src: Path) -> dict[str, oracle.TensorRecord]:
    """Every tensor of every shard of a folder (sources may hold a tensor name only once, so a plain merge)."""
    return {k: v for f in oracle.safetensors_files(src) for k, v in oracle.read_safetensors(src / f).items()}


def _where(out: Path) -> dict[str, str]:
    """tensor -> output shard file that holds it."""
    return {name: f for f in oracle.safetensors_files(out) for name in oracle.read_safetensors(out / f)}


def _snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _expect_error(
    src: Path, out: Path, needles: list[str], exc: type[BaseException] = ValueError, **kwargs: Any
) -> str:
    """fastround fails with `exc` naming every needle; the source is unchanged and no output is left."""
    before = _snapshot(src)
    with pytest.raises(exc) as info:
        fastround.AutoRound(model=str(src), model_free=True, show_progress=False, **kwargs).quantize_and_save(str(out))
    msg = str(info.value)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"error does not name {needle!r}: {msg}"
    assert _snapshot(src) == before, "the source folder changed"
    assert not out.exists(), f"output left behind: {sorted(p.name for p in out.rglob('*'))}"
    return msg


def _bf16_bits(rec: oracle.TensorRecord, row: int, col: int) -> int:
    dtype, shape, raw = rec
    assert dtype == "BF16"
    i = (row * shape[1] + col) * 2
    return int.from_bytes(raw[i : i + 2], "little")


# ---------------------------------------------------------------------------------------------------
# 1-3. parity

# (id, source kind, kwargs for both tools, layers only fastround lists as kept[, layers it may list])
_MX_BF16_LAYERS = ("lm_head",)
_ROUTER = (L0 + "mlp.gate",)
# upstream lists layers whose source is `weight_packed` nowhere in extra_config (its ignored-layer snapshot
# only sees `.weight` names); fastround lists them as kept
_NV_LAYERS = tuple(L0 + proj for proj, _, _ in sc.NV_LAYERS)
PARITY: list[tuple[Any, ...]] = [
    # FP8 with a cross-shard scale: upstream's donor-first order numbers the outputs B, C, A.
    ("fp8-xshard-W4A16", "fp8", {"scheme": "W4A16"}, ()),
    ("fp8-xshard-BF16", "fp8", {"scheme": "BF16"}, ()),
    ("fp8-xshard-MXFP4", "fp8", {"scheme": "MXFP4"}, ()),
    # the same FP8 checkpoint with every scale next to its weight
    ("fp8-local-W4A16", "fp8_local", {"scheme": "W4A16"}, ()),
    ("fp8-local-BF16", "fp8_local", {"scheme": "BF16"}, ()),
    ("fp8-local-MXFP4", "fp8_local", {"scheme": "MXFP4"}, ()),
    ("fp8-local-W4A16-qlm", "fp8_local", {"scheme": "W4A16", "quant_lm_head": True}, ()),
    # scale_fmt ue8m0 with power-of-two fp32 scales (model_type deepseek_v3: ordinary fp32 scale math upstream)
    ("fp8-ue8m0-BF16", "fp8_ue8m0", {"scheme": "BF16"}, ()),
    ("fp8-ue8m0-W4A16", "fp8_ue8m0", {"scheme": "W4A16"}, ()),
    ("fp8-ue8m0-e8m0-dtype-BF16", "fp8_e8m0", {"scheme": "BF16"}, ()),
    # other scale layouts: no weight_block_size (scalar / per-row / per-column / elementwise), nested config
    ("fp8-noblock-BF16", "fp8_noblock", {"scheme": "BF16"}, ()),
    ("fp8-noblock-W4A16", "fp8_noblock", {"scheme": "W4A16"}, ()),
    ("fp8-noblock-elementwise-BF16", "fp8_elementwise", {"scheme": "BF16"}, ()),
    ("fp8-nested-config-W4A16", "fp8_nested", {"scheme": "W4A16"}, ()),
    # fused experts, layer 1 ignored: split per expert, not quantized
    ("moe-W4A16-ign1", "moe", {"scheme": "W4A16", "ignore_layers": "layers.1."}, ()),
    ("moe-MXFP4-ign1", "moe", {"scheme": "MXFP4", "ignore_layers": "layers.1."}, ()),
    # MXFP sources: up/q_proj MXFP4, down/o_proj MXFP8, lm_head MXFP4 (ignored by default)
    ("mxfp-MXFP4", "mxfp", {"scheme": "MXFP4"}, _MX_BF16_LAYERS),
    ("mxfp-MXFP8", "mxfp", {"scheme": "MXFP8"}, _MX_BF16_LAYERS),
    ("mxfp-W4A16", "mxfp", {"scheme": "W4A16"}, _MX_BF16_LAYERS),
    (
        "mxfp-BF16",
        "mxfp",
        {"scheme": "BF16"},
        ("lm_head", L0 + "mlp.up_proj", L0 + "self_attn.q_proj"),
    ),
    ("mxfp-ign-q-W4A16", "mxfp", {"scheme": "W4A16", "ignore_layers": "q_proj"}, ("lm_head", L0 + "self_attn.q_proj")),
    # an MXFP4 router (skip list) is kept raw upstream, like the FP8 router
    ("mxfp-router-MXFP4", "mxfp_router", {"scheme": "MXFP4"}, _MX_BF16_LAYERS, _ROUTER),
    ("mxfp-router-W4A16", "mxfp_router", {"scheme": "W4A16"}, _MX_BF16_LAYERS, _ROUTER),
    # NVFP4 in ModelOpt naming (weight u8, weight_scale_2, input_scale): dequantized to bf16 for every target
    ("nvfp4-legacy-W4A16", "nvfp4_legacy", {"scheme": "W4A16"}, ()),
    ("nvfp4-legacy-MXFP4", "nvfp4_legacy", {"scheme": "MXFP4"}, ()),
    ("nvfp4-legacy-MXFP8", "nvfp4_legacy", {"scheme": "MXFP8"}, ()),
    ("nvfp4-legacy-BF16", "nvfp4_legacy", {"scheme": "BF16"}, ()),
    # kimi_k25 INT4: int32 words / uint8 bytes, no zero point (q - 8), per-group and packed zero points
    ("kimi-int4-W4A16", "kimi_int4", {"scheme": "W4A16"}, ()),
    ("kimi-int4-MXFP4", "kimi_int4", {"scheme": "MXFP4"}, ()),
    ("kimi-int4-BF16", "kimi_int4", {"scheme": "BF16"}, _NV_LAYERS),
    # DeepSeek V4 E8M0 `.scale` (coarse 128x128 grid, fp32 exponent-only, whole multiples; FP8 and MXFP4 bytes)
    ("deepseek-v4-W4A16", "deepseek_v4", {"scheme": "W4A16"}, ()),
    ("deepseek-v4-MXFP4", "deepseek_v4", {"scheme": "MXFP4"}, ()),
    ("deepseek-v4-MXFP8", "deepseek_v4", {"scheme": "MXFP8"}, ()),
    ("deepseek-v4-BF16", "deepseek_v4", {"scheme": "BF16"}, ()),
    # DeepSeek V3.2 with ue8m0 scales: weight_scale_inv read as MX scales (MXFP8 passes through)
    ("deepseek-v32-MXFP8", "deepseek_v32", {"scheme": "MXFP8"}, ()),
    ("deepseek-v32-W4A16", "deepseek_v32", {"scheme": "W4A16"}, ()),
    # ModelOpt / TensorRT-LLM bare names (X, X.scale, X.scale2): X dequantized to bf16, metadata dropped
    ("modelopt-bare-W4A16", "modelopt_bare", {"scheme": "W4A16"}, ()),
    ("modelopt-bare-MXFP8", "modelopt_bare", {"scheme": "MXFP8"}, ()),
]


@pytest.mark.parametrize(
    ("kind", "kwargs", "extra_kept", "maybe_kept"),
    [pytest.param(*(c[1:] + ((),) * (5 - len(c))), id=c[0]) for c in PARITY],
)
def test_parity(
    source, fast, upstream, kind: str, kwargs: dict[str, Any], extra_kept: tuple, maybe_kept: tuple
) -> None:
    src = source(kind)
    _assert_parity(fast(src, **kwargs), upstream(src, **kwargs), extra_kept, maybe_kept)


# ---------------------------------------------------------------------------------------------------
# 1. FP8 specifics (checked on fastround's own output, so they hold whatever upstream does)


def test_fp8_router_companions_and_lm_head(source, fast) -> None:
    src = source("fp8_local")
    out = fast(src, scheme="W4A16")
    t = oracle.read_checkpoint(out)
    s = _read_all(src)
    # the router and its scale: byte-identical FP8 / F32
    for name in (L0 + "mlp.gate.weight", L0 + "mlp.gate.weight_scale_inv"):
        assert t[name] == s[name], name
    assert t[L0 + "mlp.gate.weight"][0] == "F8_E4M3"
    # the activation-scale companion passes through
    assert t[L0 + "self_attn.o_proj.input_scale"] == s[L0 + "self_attn.o_proj.input_scale"]
    # every other scale was folded into its weight
    assert sorted(n for n in t if n.endswith("weight_scale_inv")) == [L0 + "mlp.gate.weight_scale_inv"]
    # ignored lm_head: dequantized to bf16 as bf16(bf16(w) * bf16(s)), vectors from the fact sheet
    assert t["lm_head.weight"][:2] == ("BF16", (sc.FP8_VOCAB, sc.FP8_H))
    assert _bf16_bits(t["lm_head.weight"], 0, 0) == 0x3BE4
    assert _bf16_bits(t["lm_head.weight"], 0, 130) == 0x3A7D
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        assert L0 + proj + ".qweight" in t, proj
    assert qconfig(out)["extra_config"].keys() >= {"lm_head", L0 + "mlp.gate"}


def test_fp8_cross_shard_scale_donor_first(source, fast) -> None:
    """Shard C donates k_proj's scale to shard A: processing order B, C, A numbers the outputs."""
    src = source("fp8")
    out = fast(src, scheme="BF16")
    files = dict(zip(sc.FP8_SHARDS, ("model-00003-of-00003.safetensors", "model-00001-of-00003.safetensors",
                                      "model-00002-of-00003.safetensors")))
    where = _where(out)
    # every scale_inv but the router's is folded into its weight (the donated one included)
    folded = {n for s in sc.fp8_shards().values() for n in s if n.endswith("weight_scale_inv") and ".gate." not in n}
    misplaced = [
        f"{name}: from {src_file}, written to {where.get(name)} (expected {files[src_file]})"
        for src_file, tensors in sc.fp8_shards().items()
        for name in tensors
        if name not in folded and where.get(name) != files[src_file]
    ]
    assert misplaced == [], "output numbering does not follow the donor-first order:\n" + "\n".join(misplaced)
    written = sorted(folded & where.keys())
    assert written == [], f"scales that should have been folded were written: {written}"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == where
    # the hydrated weight equals the one dequantized with its scale next to it
    local = oracle.read_checkpoint(fast(source("fp8_local"), scheme="BF16"))
    k = L0 + "self_attn.k_proj.weight"
    assert oracle.read_checkpoint(out)[k] == local[k]


def test_fp8_cross_shard_router_scale(work, fast, upstream) -> None:
    """A router whose scale_inv lives in another shard is still written with its scale (upstream hydrates it)."""
    src = work / "src" / "fp8_router_xshard"
    gate, up = L0 + "mlp.gate", L0 + "mlp.up_proj"
    sc.write_checkpoint(
        src,
        sc.fp8_config(),
        {
            "model-00001-of-00002.safetensors": {
                gate + ".weight": sc.fp8(gate, 8, sc.FP8_H),
                up + ".weight": sc.fp8(up, 64, sc.FP8_H),
                up + ".weight_scale_inv": sc.scale_inv(up, 1, 2),
            },
            "model-00002-of-00002.safetensors": {
                gate + ".weight_scale_inv": sc.scale_inv(gate, 1, 2),
                "model.norm.weight": torch.ones(sc.FP8_H, dtype=torch.bfloat16),
            },
        },
    )
    out = fast(src, scheme="BF16")
    where = _where(out)
    assert gate + ".weight_scale_inv" in where, f"the router's scale was not written: {sorted(where)}"
    assert where[gate + ".weight_scale_inv"] == where[gate + ".weight"], (
        f"router weight in {where[gate + '.weight']}, its scale in {where[gate + '.weight_scale_inv']}"
    )
    _assert_parity(out, upstream(src, scheme="BF16"))


def test_fp8_scale_only_donor_shard(work, fast, upstream) -> None:
    """Shard 2 holds nothing but shard 1's scale: processed first, it becomes an empty
    model-00001-of-00002 (as upstream writes it), and the one real shard is model.safetensors. Documented
    deviation: upstream also leaves the source index beside it, fastround writes no index."""
    up = L0 + "mlp.up_proj"
    src = sc.write_checkpoint(
        work / "src" / "fp8_scale_only_donor",
        sc.fp8_config(),
        {
            "model-00001-of-00002.safetensors": {
                up + ".weight": sc.fp8(up, 64, 256),
                "model.norm.weight": torch.ones(256, dtype=torch.bfloat16),
            },
            "model-00002-of-00002.safetensors": {up + ".weight_scale_inv": sc.scale_inv(up, 1, 2)},
        },
    )
    out, ref = fast(src, scheme="W4A16"), upstream(src, scheme="W4A16")
    empty = "model-00001-of-00002.safetensors"
    assert sorted(oracle.safetensors_files(ref)) == [empty, "model.safetensors"]
    assert (ref / "model.safetensors.index.json").exists()  # the stale source index upstream copies
    assert sorted(oracle.safetensors_files(out)) == [empty, "model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / empty).read_bytes() == (ref / empty).read_bytes()
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    for name in ("config.json", "quantization_config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------
# 2. fused experts


def test_moe_ignored_block_split_not_quantized(source, fast) -> None:
    src = source("moe")
    out = fast(src, scheme="W4A16", ignore_layers="layers.1.")
    t = oracle.read_checkpoint(out)
    s = _read_all(src)
    E, I, H = sc.MOE_E, sc.MOE_I, sc.MOE_H
    gu = s["model.layers.1.mlp.experts.gate_up_proj.weight"][2]
    dn = s["model.layers.1.mlp.experts.down_proj.weight"][2]
    for e in range(E):
        p = f"model.layers.1.mlp.experts.{e}."
        expert = gu[e * 2 * I * H * 2 : (e + 1) * 2 * I * H * 2]
        assert t[p + "gate_proj.weight"] == ("BF16", (I, H), expert[: I * H * 2])
        assert t[p + "up_proj.weight"] == ("BF16", (I, H), expert[I * H * 2 :])
        assert t[p + "down_proj.weight"] == ("BF16", (H, I), dn[e * H * I * 2 : (e + 1) * H * I * 2])
    assert not any(n.endswith(("gate_up_proj", "gate_up_proj.weight", "experts.down_proj", "w13")) for n in t)
    # the other fused blocks are quantized per expert, under upstream's names
    for p in ("model.layers.0.mlp.experts.2.gate_proj", "model.layers.0.mlp.experts.2.down_proj",
              "model.layers.2.block_sparse_moe.experts.1.w1", "model.layers.2.block_sparse_moe.experts.1.w3",
              "model.layers.2.moe.experts.2.down_proj", "model.layers.2.mlp.shared_experts.1.up_proj",
              "model.layers.3.moe.experts.1.gate_proj", "model.layers.3.moe.experts.1.down_proj"):
        assert p + ".qweight" in t, p
    extra = qconfig(out)["extra_config"]
    split = {f"model.layers.1.mlp.experts.{e}.{proj}" for e in range(E) for proj in ("gate_proj", "up_proj", "down_proj")}
    assert split <= extra.keys(), sorted(split - extra.keys())


def _moe_single(work: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    return sc.build_moe_single(work / "src" / name, tensors)


def test_moe_odd_gate_up_rows(work, fast, upstream) -> None:
    """gate_up_proj with 2I = 81 rows: upstream's chunk gives gate 41 rows and up 40."""
    src = _moe_single(work, "moe_odd", {
        "model.layers.0.mlp.experts.gate_up_proj": sc.bf16("odd_gu", 2, 81, sc.MOE_H),
        "model.layers.0.mlp.experts.down_proj": sc.bf16("odd_dn", 2, sc.MOE_H, 40),
    })
    out = fast(src, scheme="W4A16")
    t = oracle.read_checkpoint(out)
    shapes = {n: t[n][1] for n in t if n.endswith(".scales") and "experts.0." in n}
    assert shapes.get("model.layers.0.mlp.experts.0.gate_proj.scales") == (1, 41), shapes
    assert shapes.get("model.layers.0.mlp.experts.0.up_proj.scales") == (1, 40), shapes
    _assert_parity(out, upstream(src, scheme="W4A16"))


def test_moe_native_fused_names(work, fast, upstream) -> None:
    """vLLM FusedMoE names: experts.w13_weight -> experts.{i}.w1/w3.weight, experts.w2_weight -> experts.{i}.w2."""
    src = _moe_single(work, "moe_native", {
        "model.layers.0.mlp.experts.w13_weight": sc.bf16("nat_w13", 2, 80, sc.MOE_H),
        "model.layers.0.mlp.experts.w2_weight": sc.bf16("nat_w2", 2, sc.MOE_H, 40),
    })
    out = fast(src, scheme="W4A16")
    t = oracle.read_checkpoint(out)
    want = {f"model.layers.0.mlp.experts.{e}.{proj}.qweight" for e in range(2) for proj in ("w1", "w3", "w2")}
    assert want <= t.keys(), f"missing {sorted(want - t.keys())}; written {sorted(n for n in t if 'qweight' in n)}"
    _assert_parity(out, upstream(src, scheme="W4A16"))


# ---------------------------------------------------------------------------------------------------
# 3. MXFP specifics


def test_mxfp_passthrough_and_dequant(source, fast) -> None:
    src = source("mxfp")
    s = oracle.read_safetensors(src / "model.safetensors")
    t = oracle.read_checkpoint(fast(src, scheme="MXFP4"))
    for layer in (L0 + "mlp.up_proj", L0 + "self_attn.q_proj"):  # MXFP4 -> MXFP4: bytes as they are
        for part in (".weight_packed", ".weight_scale"):
            assert t[layer + part] == s[layer + part], layer + part
    for layer in (L0 + "mlp.down_proj", L0 + "self_attn.o_proj"):  # MXFP8 -> MXFP4: requantized
        assert t[layer + ".weight_packed"][:2] == ("U8", (128, 64))
        assert t[layer + ".weight_scale"][:2] == ("U8", (128, 4))
        assert layer + ".weight" not in t
    assert t["lm_head.weight"][:2] == ("BF16", (64, 128))  # ignored: dequantized
    assert "lm_head.weight_packed" not in t and "lm_head.weight_scale" not in t

    t8 = oracle.read_checkpoint(fast(src, scheme="MXFP8"))
    for layer in (L0 + "mlp.down_proj", L0 + "self_attn.o_proj"):  # MXFP8 -> MXFP8: bytes as they are
        for part in (".weight", ".weight_scale"):
            assert t8[layer + part] == s[layer + part], layer + part

    bf = oracle.read_checkpoint(fast(src, scheme="BF16"))
    up, down = bf[L0 + "mlp.up_proj.weight"], bf[L0 + "mlp.down_proj.weight"]
    assert up[:2] == ("BF16", (128, 128)) and down[:2] == ("BF16", (128, 128))
    assert (_bf16_bits(up, 0, 0), _bf16_bits(up, 0, 1)) == (0x3F40, 0xBF40)  # 0xF7 at 2^-3: +0.75, -0.75
    assert _bf16_bits(down, 0, 0) == 0x3C30  # 0x3B (1.375) at 2^-7
    assert not any(n.endswith(("weight_packed", "weight_scale")) for n in bf)

    w4 = oracle.read_checkpoint(fast(src, scheme="W4A16"))
    for layer in (L0 + "mlp.up_proj", L0 + "mlp.down_proj", L0 + "self_attn.q_proj", L0 + "self_attn.o_proj"):
        assert w4[layer + ".qweight"][:2] == ("I32", (16, 128)), layer
        assert not any(n.startswith(layer + ".weight") for n in w4), layer


# ---------------------------------------------------------------------------------------------------
# 3b. NVFP4 in compressed-tensors naming, and DeepSeek MX passthrough


@pytest.mark.parametrize("scheme", ["W4A16", "MXFP4", "BF16"])
def test_nvfp4_ct_naming_equals_upstream_on_legacy_naming(source, fast, upstream, scheme: str) -> None:
    """weight_global_scale is compressed-tensors' divisor, fp32(1 / weight_scale_2) of the legacy twin:
    fastround reads it as such, so its output equals upstream's on the legacy-named source. Upstream inverts
    an existing weight_global_scale a second time (docs/compatibility.md), so its own output on the CT
    naming is off by orders of magnitude."""
    _assert_parity(fast(source("nvfp4_ct"), scheme=scheme), upstream(source("nvfp4_legacy"), scheme=scheme))
    if scheme == "BF16":
        ours = oracle.read_checkpoint(fast(source("nvfp4_ct"), scheme=scheme))
        theirs = oracle.read_checkpoint(upstream(source("nvfp4_ct"), scheme=scheme))
        layer = L0 + "self_attn.q_proj.weight"
        assert ours[layer][2] != theirs[layer][2], "upstream no longer inverts weight_global_scale twice: revisit"


def test_nvfp4_ct_dequant_equals_compressed_tensors(source, fast) -> None:
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from safetensors.torch import load_file

    src = load_file(str(source("nvfp4_ct") / "model.safetensors"))
    ours = load_file(str(fast(source("nvfp4_ct"), scheme="BF16") / "model.safetensors"))
    comp = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    for proj, rows, cols in sc.NV_LAYERS:
        layer = L0 + proj
        t = {n: src[f"{layer}.{n}"] for n in comp.compression_param_names(scheme)}
        t["weight_shape"] = torch.tensor([rows, cols])
        dense = comp.decompress(t, scheme)["weight"].to(torch.bfloat16)
        assert torch.equal(ours[f"{layer}.weight"].view(torch.int16), dense.view(torch.int16)), layer


def test_deepseek_v4_mx_passthrough(source, fast) -> None:
    src = oracle.read_safetensors(source("deepseek_v4") / "model.safetensors")
    t = oracle.read_checkpoint(fast(source("deepseek_v4"), scheme="MXFP4"))
    up = L0 + "mlp.up_proj"  # int8 MXFP4 bytes: renamed weight_packed, viewed as uint8, scale as it is
    assert t[up + ".weight_packed"] == ("U8", src[up + ".weight"][1], src[up + ".weight"][2])
    assert t[up + ".weight_scale"] == ("U8", src[up + ".scale"][1], src[up + ".scale"][2])
    down = L0 + "mlp.down_proj"  # scale [7, 11] for [224, 11] groups: each row repeated 32 times
    scale = src[down + ".scale"][2]
    out = t[down + ".weight_scale"]
    assert out[:2] == ("U8", (sc.FP8_H, sc.FP8_I // 32))
    assert out[2] == b"".join(scale[(r // 32) * 11 : (r // 32) * 11 + 11] for r in range(sc.FP8_H))
    t8 = oracle.read_checkpoint(fast(source("deepseek_v4"), scheme="MXFP8"))
    q = L0 + "self_attn.q_proj"  # 2x2 grid of 128x128 blocks -> [224, 7]: rows / 128, columns / 4
    grid = src[q + ".scale"][2]
    assert t8[q + ".weight"] == src[q + ".weight"]
    assert t8[q + ".weight_scale"][2] == bytes(grid[(r // 128) * 2 + c // 4] for r in range(sc.FP8_H) for c in range(7))


# ---------------------------------------------------------------------------------------------------
# 4. accounting

ACCOUNTED = [
    ("fp8_local", {"scheme": "W4A16"}),
    ("fp8", {"scheme": "BF16"}),
    ("fp8_ue8m0", {"scheme": "BF16"}),
    ("moe", {"scheme": "W4A16", "ignore_layers": "layers.1."}),
    ("mxfp", {"scheme": "MXFP4"}),
    ("mxfp", {"scheme": "W4A16"}),
    ("nvfp4_legacy", {"scheme": "W4A16"}),
    ("nvfp4_ct", {"scheme": "BF16"}),
    ("kimi_int4", {"scheme": "MXFP4"}),
    ("deepseek_v4", {"scheme": "MXFP4"}),
    ("deepseek_v4", {"scheme": "W4A16"}),
    ("deepseek_v32", {"scheme": "MXFP8"}),
    ("modelopt_bare", {"scheme": "W4A16"}),
]


def _expected_dropped(kind: str, kwargs: dict[str, Any], src: Path) -> set[str]:
    """Source tensors that must be consumed: folded FP8 scales (not the router's) and MXFP scales of
    layers that are not passed through."""
    names = _source_tensors(src)
    if kind.startswith("fp8"):
        return {n for n in names if n.endswith(".weight_scale_inv") and ".mlp.gate." not in n}
    if kind == "mxfp":
        passthrough_bits = {"MXFP4": 4, "MXFP8": 8}.get(kwargs["scheme"])
        dropped = set()
        for n in names:
            if not n.endswith(".weight_scale"):
                continue
            layer = n[: -len(".weight_scale")]
            bits = 4 if layer + ".weight_packed" in names else 8
            if bits != passthrough_bits or layer == "lm_head":
                dropped.add(n)
        return dropped
    if kind.startswith("nvfp4"):  # block and global scales, input scales
        return {n for n in names if n.endswith(("_scale", "_scale_2"))}
    if kind == "modelopt_bare":
        return {n for n in names if n.endswith((".scale", ".scale2", ".input_amax"))}
    if kind == "kimi_int4":
        return {n for n in names if n.endswith(("weight_scale", "zero_point", "weight_shape"))}
    if kind.startswith("deepseek"):  # E8M0 scales: written (expanded) when their layer passes through, else folded
        passthrough_bits = {"MXFP4": 4, "MXFP8": 8}.get(kwargs["scheme"])
        dropped = set()
        for n in names:
            if n.endswith((".scale", ".weight_scale_inv")):
                bits = 8 if names[n[: n.rindex(".")] + ".weight"][0] == "F8_E4M3" else 4
                if bits != passthrough_bits:
                    dropped.add(n)
        return dropped
    return set()


@pytest.mark.parametrize(
    ("kind", "kwargs"), [pytest.param(k, kw, id=f"{k}-{'-'.join(map(str, kw.values()))}") for k, kw in ACCOUNTED]
)
def test_accounting(source, fast, kind: str, kwargs: dict[str, Any]) -> None:
    src = source(kind)
    out = fast(src, **kwargs)
    summary = json.loads((out / "fastround_summary.json").read_text())
    acc = summary["fastround_model_free"]
    names = _source_tensors(src)
    total_bytes = sum(nbytes for _, _, nbytes in names.values())

    cats = ("quantized", "kept", "dropped")
    assert sum(acc[c]["tensors"] for c in cats) == len(names), {c: acc[c] for c in cats}
    assert sum(acc[c]["bytes"] for c in cats) == total_bytes
    assert acc["source_bytes"] == total_bytes
    assert math.isclose(acc["quantized_bytes_fraction"], acc["quantized"]["bytes"] / total_bytes, rel_tol=1e-12)
    assert 0.0 <= acc["quantized_bytes_fraction"] <= 1.0
    assert (acc["quantized"]["tensors"] > 0) == (kwargs["scheme"] != "BF16")

    dropped = acc["dropped_tensors"]
    dropped_names = [d["tensor"] for d in dropped]
    assert len(dropped_names) == len(set(dropped_names)) == acc["dropped"]["tensors"]
    assert set(dropped_names) <= names.keys()
    assert all(isinstance(d["why"], str) and d["why"].strip() for d in dropped), dropped
    assert acc["dropped"]["bytes"] == sum(names[n][2] for n in dropped_names)
    assert set(dropped_names) == _expected_dropped(kind, kwargs, src)

    # no tensor written twice, the index names exactly what the shards hold, and no dropped tensor is written
    shards = oracle.safetensors_files(out)
    seen: dict[str, str] = {}
    for f in shards:
        for name in oracle.read_safetensors_header(out / f)[0]:
            if name == "__metadata__":
                continue
            assert name not in seen, f"{name} in both {seen[name]} and {f}"
            seen[name] = f
    if len(shards) > 1:
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert weight_map == seen
    else:
        assert shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    # a consumed scale_inv is never written (an MXFP `.weight_scale` may be, re-created by the target format)
    assert not {n for n in dropped_names if n.endswith("weight_scale_inv")} & seen.keys()
    assert acc["output_bytes"] == sum((out / f).stat().st_size for f in shards)
    assert summary["shards"] == len(shards)
    assert (summary["quantized_layers"] > 0) == (kwargs["scheme"] != "BF16")


# ---------------------------------------------------------------------------------------------------
# 5. errors


def test_3d_weight_outside_experts_raises(work) -> None:
    src = _moe_single(work, "branch_raise", {
        L0 + "mlp.branch.weight": sc.bf16("branch", 2, 8, 8),
        L0 + "mlp.up_proj.weight": sc.bf16("up", 8, 64),
    })
    _expect_error(src, work / "err" / "branch", [L0 + "mlp.branch.weight", "ignore_layers"], scheme="W4A16")


def test_3d_weight_outside_experts_ignored_is_kept(work, fast, upstream) -> None:
    src = _moe_single(work, "branch_ignored", {
        L0 + "mlp.branch.weight": sc.bf16("branch", 2, 8, 8),
        L0 + "mlp.up_proj.weight": sc.bf16("up", 8, 64),
    })
    out = fast(src, scheme="W4A16", ignore_layers="branch")
    t = oracle.read_checkpoint(out)
    assert t[L0 + "mlp.branch.weight"] == oracle.read_safetensors(src / "model.safetensors")[L0 + "mlp.branch.weight"]
    assert L0 + "mlp.up_proj.qweight" in t
    _assert_parity(out, upstream(src, scheme="W4A16", ignore_layers="branch"))


def test_fused_and_per_expert_in_one_shard_raises(work) -> None:
    src = _moe_single(work, "dup_one_shard", {
        "model.layers.0.mlp.experts.gate_up_proj": sc.bf16("dup_gu", 2, 80, sc.MOE_H),
        "model.layers.0.mlp.experts.0.gate_proj.weight": sc.bf16("dup_g0", 40, sc.MOE_H),
    })
    _expect_error(src, work / "err" / "dup1", ["model.layers.0.mlp.experts.0.gate_proj", "twice"], scheme="W4A16")


def test_fused_and_per_expert_across_shards_raises(work) -> None:
    src = sc.write_checkpoint(
        work / "src" / "dup_two_shards",
        sc.moe_config(1),
        {
            "model-00001-of-00002.safetensors": {
                "model.layers.0.mlp.experts.gate_up_proj": sc.bf16("dup_gu", 2, 80, sc.MOE_H)
            },
            "model-00002-of-00002.safetensors": {
                "model.layers.0.mlp.experts.1.up_proj.weight": sc.bf16("dup_u1", 40, sc.MOE_H)
            },
        },
    )
    _expect_error(src, work / "err" / "dup2", ["model.layers.0.mlp.experts.1.up_proj", "twice"], scheme="BF16")


def test_fp8_scale_not_covering_raises(work, upstream) -> None:
    """[300, 224] needs a [3, 2] block scale; [2, 2] does not cover it (upstream raises too)."""
    up = L0 + "mlp.up_proj"
    src = sc.write_checkpoint(
        work / "src" / "fp8_short_scale",
        sc.fp8_config(),
        {"model.safetensors": {up + ".weight": sc.fp8(up, 300, sc.FP8_H),
                               up + ".weight_scale_inv": sc.scale_inv(up, 2, 2)}},
    )
    msg = _expect_error(src, work / "err" / "short_scale", [up + ".weight"], scheme="W4A16")
    assert "cover" in msg
    with pytest.raises(ValueError, match="smaller than required"):
        upstream(src, scheme="W4A16")


def test_fp8_weight_without_scale_raises(work) -> None:
    """Documented deviation: upstream quantizes the raw FP8 values; fastround refuses, naming the tensor."""
    up = L0 + "mlp.up_proj"
    src = sc.write_checkpoint(
        work / "src" / "fp8_no_scale",
        sc.fp8_config(),
        {"model.safetensors": {up + ".weight": sc.fp8(up, 64, sc.FP8_H),
                               "model.norm.weight": torch.ones(sc.FP8_H, dtype=torch.bfloat16)}},
    )
    _expect_error(src, work / "err" / "no_scale", [up + ".weight"], scheme="W4A16")


def _single(work: Path, name: str, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    return sc.write_checkpoint(work / "src" / name, config, {"model.safetensors": tensors})


def _kimi_config() -> dict[str, Any]:
    cfg = sc.mxfp_config()
    cfg.update(model_type="kimi_k25", quantization_config={"group_size": 32})
    return cfg


def test_int4_scale_not_matching_groups_raises(work, upstream) -> None:
    """128 inputs with a [64, 3] scale: no group size fits, and the config's 32 needs 4 columns (upstream raises too)."""
    up = L0 + "mlp.up_proj"
    src = _single(work, "kimi_bad_scale", _kimi_config(), {
        up + ".weight_packed": sc._pack_nibbles(sc._int4_codes(up, 64, 128), 8),
        up + ".weight_scale": sc.bf16(up, 64, 3),
    })
    msg = _expect_error(src, work / "err" / "kimi_bad_scale", [up + ".weight_scale", "[64, 4]"], scheme="W4A16")
    assert "[64, 3]" in msg
    with pytest.raises(ValueError, match="Scale shape mismatch"):
        upstream(src, scheme="W4A16")


def test_int4_zero_point_shape_raises(work) -> None:
    up = L0 + "mlp.up_proj"
    src = _single(work, "kimi_bad_zp", _kimi_config(), {
        up + ".weight_packed": sc._pack_nibbles(sc._int4_codes(up, 64, 128), 2),
        up + ".weight_scale": sc.bf16(up, 64, 4),
        up + ".weight_zero_point": sc.e8m0(up, 64, 5),
    })
    _expect_error(src, work / "err" / "kimi_bad_zp", [up + ".weight_zero_point", "[64, 5]"], scheme="W4A16")


def test_nvfp4_block_scale_shape_raises(work, upstream) -> None:
    """Documented deviation: under an nv_fp target upstream passes the mismatched scale through (any other
    target fails there with a reshape error); fastround refuses the source for every target."""
    up = L0 + "mlp.up_proj"
    packed, block, s2, _ = sc._nvfp4_parts(up, 64, 128)
    src = _single(work, "nvfp4_bad_scale", sc.mxfp_config(), {
        up + ".weight_packed": packed, up + ".weight_scale": block[:, :4].contiguous(),
        up + ".weight_global_scale": (1.0 / s2).reshape(1),
    })
    needles = [up + ".weight_packed", "[64, 8]", "[64, 4]"]
    _expect_error(src, work / "err" / "nvfp4_bad_scale", needles, scheme="W4A16")
    nv = {"scheme": "W4A16", "layer_config": {"up_proj": "NVFP4"}}
    _expect_error(src, work / "err" / "nvfp4_bad_scale_nv", needles, **nv)
    theirs = oracle.read_checkpoint(upstream(src, **nv))
    assert theirs[up + ".weight_scale"][:2] == ("F8_E4M3", (64, 4)), "upstream no longer passes it through: revisit"


def test_deepseek_scale_shape_raises(work, upstream) -> None:
    """A [3, 3] E8M0 scale is neither a divisor of [224, 7] nor the 128x128 grid [2, 2] (upstream raises too)."""
    q = L0 + "self_attn.q_proj"
    cfg = sc.fp8_config(ue8m0=True)
    cfg["model_type"] = "deepseek_v4"
    src = _single(work, "deepseek_bad_scale", cfg, {q + ".weight": sc.fp8(q, sc.FP8_H, sc.FP8_H),
                                                    q + ".scale": sc.e8m0(q, 3, 3)})
    _expect_error(src, work / "err" / "deepseek_bad_scale", [q + ".weight", "[3, 3]"], scheme="MXFP4")
    with pytest.raises(ValueError, match="Cannot expand E8M0 block scale"):
        upstream(src, scheme="MXFP4")


def test_modelopt_scales_in_another_shard_raise(work) -> None:
    """Documented limit: upstream reads them from the sibling shard; fastround names the tensors and refuses."""
    src = sc.build_modelopt_bare(work / "src" / "modelopt_split", split_scales=True)
    w13 = "model.layers.0.mlp.w13_weight"  # the first bare weight in name order
    _expect_error(src, work / "err" / "modelopt_split", [w13, w13 + ".scale", "model-00002-of-00002.safetensors"],
                  scheme="W4A16")


def test_nvfp4_source_to_nvfp4_e5m3_is_requantized(source, fast, upstream) -> None:
    """Documented deviation: NVFP4_E5M3 stores UE5M3 byte scales and no global scale, so an NVFP4 source
    (E4M3 scales, global scales) is dequantized and requantized: the same bytes as quantizing our bf16
    dequantization. Upstream passes the NVFP4 tensors through unchanged under the E5M3 config."""
    src = source("nvfp4_legacy")
    direct = oracle.read_checkpoint(fast(src, scheme="NVFP4_E5M3"))
    via_bf16 = oracle.read_checkpoint(fast(fast(src, scheme="BF16"), scheme="NVFP4_E5M3"))
    for proj, _, _ in sc.NV_LAYERS:
        layer = L0 + proj
        for part in (".weight_packed", ".weight_scale"):
            assert direct[layer + part] == via_bf16[layer + part], layer + part
        assert direct[layer + ".weight_scale"][0] == "U8" and layer + ".weight_global_scale" not in direct
    theirs = oracle.read_checkpoint(upstream(src, scheme="NVFP4_E5M3"))
    assert theirs[L0 + "self_attn.q_proj.weight_scale"][0] == "F8_E4M3", "upstream now requantizes: revisit"


def test_nvfp4_layer_kept_at_16_bits_is_dequantized(source, fast, upstream) -> None:
    """Documented deviation: upstream leaves such a layer packed under a config that calls it unquantized."""
    src = source("nvfp4_legacy")
    q = L0 + "self_attn.q_proj"
    kwargs = {"scheme": "W4A16", "layer_config": {q: {"bits": 16}}}
    ours = oracle.read_checkpoint(fast(src, **kwargs))
    assert ours[q + ".weight"] == oracle.read_checkpoint(fast(src, scheme="BF16"))[q + ".weight"]
    assert not any(n.startswith(q + ".") and n != q + ".weight" for n in ours)
    assert ours[L0 + "mlp.up_proj.qweight"][0] == "I32"
    theirs = oracle.read_checkpoint(upstream(src, **kwargs))
    assert q + ".weight_packed" in theirs, "upstream now dequantizes 16-bit NVFP4 layers: revisit"


# nv_fp targets: upstream has no NVFP4 kernel in model-free; an NVFP4 source layer whose target is 4-bit nv_fp
# passes through in compressed-tensors naming (weight_packed u8, weight_scale, fp32 [1] divisors).
_NV_Q = L0 + "self_attn.q_proj"
NV_FP_TARGETS = [
    ("W4A16", {"q_proj": {"bits": 4, "group_size": 16, "data_type": "nv_fp"}}),
    ("W4A16", {"q_proj": "NVFP4"}),
    ("BF16", {"q_proj": {"bits": 4, "group_size": 16, "data_type": "nv_fp"}}),
]


@pytest.mark.parametrize(("scheme", "lc"), NV_FP_TARGETS, ids=["W4A16-dict", "W4A16-preset", "BF16-dict"])
def test_nvfp4_source_with_nv_fp_target_passes_through(source, fast, upstream, scheme: str, lc: dict) -> None:
    src = source("nvfp4_legacy")
    out = fast(src, scheme=scheme, layer_config=lc)
    _assert_parity(out, upstream(src, scheme=scheme, layer_config=lc))
    ours = oracle.read_checkpoint(out)
    raw = _read_all(src)
    assert ours[_NV_Q + ".weight_packed"] == ("U8", (128, 64), raw[_NV_Q + ".weight"][2])
    assert ours[_NV_Q + ".weight_scale"] == raw[_NV_Q + ".weight_scale"]
    s2 = torch.frombuffer(bytearray(raw[_NV_Q + ".weight_scale_2"][2]), dtype=torch.float32)
    assert ours[_NV_Q + ".weight_global_scale"] == ("F32", (1,), (1.0 / s2).numpy().tobytes())
    assert not any(n.startswith(_NV_Q) and n.endswith(("qweight", "qzeros", "scales")) for n in ours)
    qc = qconfig(out)
    assert (qc["extra_config"]["q_proj"] if scheme == "W4A16" else qc)["data_type"] == "nv_fp"
    # the passed-through layer is quantized in the summary, its scales included
    acc = json.loads((out / "fastround_summary.json").read_text())["fastround_model_free"]
    dropped = {d["tensor"] for d in acc["dropped_tensors"]}
    assert not any(n.startswith(_NV_Q + ".") for n in dropped)
    assert acc["dropped"]["tensors"] == 3 * 3  # the other three layers' block scale, weight_scale_2, input_scale


@pytest.mark.parametrize(("scheme", "lc"), NV_FP_TARGETS[:1])
def test_nvfp4_ct_source_with_nv_fp_target_keeps_its_divisors(source, fast, upstream, scheme: str, lc: dict) -> None:
    """Documented deviation: upstream inverts a compressed-tensors weight_global_scale / input_global_scale
    as if it were ModelOpt's multiplier, so its pass-through checkpoint is off by orders of magnitude.
    fastround keeps the divisors: the same bytes as upstream's output on the legacy-named twin."""
    _assert_parity(fast(source("nvfp4_ct"), scheme=scheme, layer_config=lc),
                   upstream(source("nvfp4_legacy"), scheme=scheme, layer_config=lc))
    raw = _read_all(source("nvfp4_ct"))
    theirs = oracle.read_checkpoint(upstream(source("nvfp4_ct"), scheme=scheme, layer_config=lc))
    for g in (".weight_global_scale", ".input_global_scale"):
        ours = oracle.read_checkpoint(fast(source("nvfp4_ct"), scheme=scheme, layer_config=lc))[_NV_Q + g]
        assert ours == raw[_NV_Q + g]
        inverted = (1.0 / torch.frombuffer(bytearray(raw[_NV_Q + g][2]), dtype=torch.float32)).numpy().tobytes()
        assert theirs[_NV_Q + g][2] == inverted, "upstream no longer inverts compressed-tensors divisors: revisit"


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        # a bf16 layer: upstream writes INT4 GPTQ tensors under an nv_fp config
        ({"scheme": "W4A16", "quant_lm_head": True,
          "layer_config": {"lm_head": {"bits": 4, "group_size": 16, "data_type": "nv_fp"}}},
         ["lm_head.weight", "layer_config['lm_head']", "nv_fp"]),
        ({"scheme": "W4A16", "layer_config": {"q_proj": {"bits": 8, "group_size": 16, "data_type": "nv_fp"}}},
         [_NV_Q + ".weight", "layer_config['q_proj']", "bits=8"]),
    ],
    ids=["bf16-layer", "8-bit"],
)
def test_nv_fp_target_without_nvfp4_source_raises(source, work, kwargs: dict, needles: list[str]) -> None:
    src = source("nvfp4_legacy")
    _expect_error(src, work / "err" / f"nv_fp-{needles[-1]}", needles, **kwargs)
