#!/usr/bin/env python3
"""Held-out perplexity of RTN, OPT-RTN and SignRound on fastround-llama-tiny, with fastround or upstream auto-round.

For each scheme and method the tool quantizes the model in memory (iters=0; RTN with disable_opt_rtn=True,
OPT-RTN with disable_opt_rtn=False; disable_model_free=True so that both stay in the regular flow), calibrating
on the committed models/fastround-llama-tiny/calibration.jsonl (128 pieces of the training text, never the
held-out one). The held-out text is then scored with fastround.eval.perplexity twice: on the model quantize()
returns (qdq weights in memory) and on the folder save_quantized() writes. Only the "fake" format (qdq weights
as a plain checkpoint) loads back without a packed-kernel backend, so with --format auto_round the folder is
checked for its quantization config instead; with "fake" the two perplexities must agree.

--rotations adds a rotation dimension: each row also runs with rotation_config "hadamard", "random_hadamard" or
"quarot" ("none": no rotation_config). A rotated model's online hooks live only in memory and its checkpoint
needs a format that carries rotation_config, so rotated rows are scored in memory and their folder is written in
the auto_round format and only checked. Upstream patches its wrappers once per process with the first run's
transform, so every rotated upstream row runs in a subprocess of its own. A configuration a tool refuses
(NotImplementedError / ValueError at construction, e.g. fastround's SignRound with the per-linear rotation, or
the QuaRot-style inplace backend an int scheme resolves to) becomes a row with its error instead of a number.
Schemes with quantized activations (MXFP4 is W4A4 upstream) are scored as each tool's in-memory model computes:
every row probes whether its first quantized linear is still linear in its input (`act_quantized`); where it is
not, the saved fake checkpoint (weights only) is not expected to agree and the in-memory score is the row's.

    python scripts/accuracy_table.py run --tool fastround
    python scripts/accuracy_table.py run --tool upstream --schemes W4A16
    python scripts/accuracy_table.py run --tool fastround --methods light,default,best --device cuda:0
    python scripts/accuracy_table.py run --tool upstream --schemes W4A16,MXFP4 --rotations none,hadamard,quarot
    # rebuild the calibration file from the training text (scripts/prepare_corpus.py --out /tmp/corpus)
    python scripts/accuracy_table.py calibration --corpus /tmp/corpus
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "fastround-llama-tiny"
SCHEMES = ("W4A16", "W2A16G64", "W8A16")
# rotation label -> the rotation_config both tools receive (None: the argument is not passed)
ROTATIONS: dict[str, str | None] = {"none": None, "hadamard": "hadamard", "random_hadamard": "random_hadamard",
                                    "quarot": "quarot"}
# The linear whose input-linearity tells whether a quantized model quantizes activations in memory.
PROBE_LAYER = "model.layers.0.self_attn.q_proj"
# 4-bit activation qdq moves f(a+b) - f(a) - f(b) by ~10% of |f(a+b)|; bf16 rounding alone by well under 1%.
ACT_NONLINEAR_REL = 0.02
# label -> AutoRound arguments: RTN / OPT-RTN (iters=0) and SignRound with upstream's CLI recipes (light: 50 iters,
# lr 5e-3; default: 200; best: 1000). nsamples / seqlen / batch_size come from the command line for every row.
METHODS: dict[str, dict[str, Any]] = {
    "RTN": {"iters": 0, "disable_opt_rtn": True},
    "OPT-RTN": {"iters": 0, "disable_opt_rtn": False},
    "light": {"iters": 50, "lr": 5e-3},
    "default": {"iters": 200},
    "best": {"iters": 1000},
}
# The in-memory model and its fake checkpoint hold the same bf16 weights; only summation order may differ.
AGREE_REL = 1e-4

logger = logging.getLogger("fastround.accuracy")


def calibration_texts(train_text: str, count: int, chars: int, seed: int) -> list[str]:
    """`count` slices of `chars` characters, each starting at a paragraph, at seeded positions."""
    starts = [0] + [m.end() for m in re.finditer("\n\n", train_text)]
    starts = [s for s in starts if s + chars <= len(train_text)]
    picks = sorted(random.Random(seed).sample(starts, count))
    return [train_text[s : s + chars] for s in picks]


def write_calibration(args: argparse.Namespace) -> None:
    train = (args.corpus / "train.txt").read_text(encoding="utf-8")
    # ~3.7 characters per token on this corpus: 6 characters a token leaves every piece over seqlen.
    texts = calibration_texts(train, args.nsamples, 6 * args.seqlen, args.seed)
    held_out = (args.model / "validation.txt").read_text(encoding="utf-8")
    leaked = [i for i, t in enumerate(texts) if t[:200] in held_out]
    if leaked:
        raise RuntimeError(f"{args.corpus / 'train.txt'}: calibration pieces {leaked} also occur in validation.txt")
    with open(args.out, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    logger.info("%s: %d pieces, %d bytes", args.out, len(texts), args.out.stat().st_size)


def _perplexity_fn() -> Any:
    """fastround.eval.perplexity loaded by file path: it needs only torch, so upstream runs need no build."""
    spec = importlib.util.spec_from_file_location("fastround_eval", REPO / "python" / "fastround" / "eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.perplexity


def _autoround_class(tool: str) -> Any:
    if tool == "upstream":
        from auto_round import AutoRound
    else:
        from fastround import AutoRound
    return AutoRound


def _check_packed(folder: Path, fmt: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in config:
        raise RuntimeError(f"{folder / 'config.json'}: format {fmt} wrote no quantization_config")
    if not list(folder.glob("*.safetensors")):
        raise RuntimeError(f"{folder}: format {fmt} wrote no safetensors")


def _shown(path: Path) -> str:
    """A path as results record it: relative to the repo when inside it (results are committed)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _act_quantized(model: Any) -> bool:
    """Whether the in-memory model quantizes PROBE_LAYER's input: a weight-only layer (with or without a rotation
    hook, which is linear) gives f(a + b) = f(a) + f(b) up to bf16 rounding; an activation qdq does not."""
    import torch

    layer = model.get_submodule(PROBE_LAYER)
    weight = next(p for p in layer.parameters() if p.dim() == 2)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4, weight.shape[-1], generator=gen).to(weight.device, weight.dtype) for _ in range(2))
    with torch.no_grad():
        both, sep = layer(a + b).float(), layer(a).float() + layer(b).float()
    return bool((both - sep).norm() > ACT_NONLINEAR_REL * both.norm())


def _add_act_qdq(model: Any, layer_config: dict[str, Any]) -> bool:
    """fastround's activation qdq hook (tune_layers.quantize_inputs) on every layer whose config quantizes
    activations, after any rotation pre-hook (those are prepended); False when no layer does."""
    from fastround.tune_layers import fp_act_spec, quantize_inputs

    added = False
    for name, cfg in layer_config.items():
        if int(cfg.get("act_bits") or 16) <= 8 and fp_act_spec(cfg) is not None:
            quantize_inputs(model.get_submodule(name), cfg)
            added = True
    return added


class _Context:
    """What every row of one run shares: the held-out text, the tokenizer and the scorer."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        self.args = args
        self.perplexity = _perplexity_fn()
        self.held_out = (args.model / "validation.txt").read_text(encoding="utf-8")
        if args.heldout_chars:
            self.held_out = self.held_out[: args.heldout_chars]
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)

    def score(self, model_or_folder: Any) -> float:
        import torch

        tok = self.tokenizer if isinstance(model_or_folder, torch.nn.Module) else None
        return self.perplexity(model_or_folder, self.held_out, seqlen=self.args.ppl_seqlen, tokenizer=tok,
                               device=self.args.score_device)


def run_row(ctx: _Context, scheme: str, label: str, rotation: str) -> dict[str, Any]:
    """Quantize one (scheme, method, rotation) in this process and score it."""
    from transformers import AutoModelForCausalLM

    args = ctx.args
    AutoRound = _autoround_class(args.tool)
    row: dict[str, Any] = {"scheme": scheme, "method": label, "rotation": rotation}
    extra: dict[str, Any] = {"enable_torch_compile": False} if args.tool == "upstream" else {}
    if ROTATIONS[rotation] is not None:
        extra["rotation_config"] = ROTATIONS[rotation]
    method = dict(METHODS[label])
    if args.tool == "upstream" and rotation == "quarot" and method.get("iters"):
        # with a SpinQuant rotation_config upstream drops a direct iters / lr (both are SpinQuantConfig fields too,
        # so its router finds two owners) and tunes 200 iterations: SignRound gets them through its config object
        from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

        extra["alg_configs"] = [SignRoundConfig(**{k: method.pop(k) for k in ("iters", "lr") if k in method})]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    start = time.perf_counter()
    try:
        ar = AutoRound(
            model, tokenizer=ctx.tokenizer, scheme=scheme, disable_model_free=True, dataset=str(args.calibration),
            nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device_map=args.device,
            **method, **extra,
        )
    except (NotImplementedError, ValueError) as e:  # a configuration this tool does not run: say so in the row
        logger.warning("%s %s %s %s: refused: %s", args.tool, scheme, label, rotation, e)
        return {**row, "ppl": None, "refused": f"{type(e).__name__}: {e}"}
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - start
    qmodel.to(args.score_device)
    act_quantized = _act_quantized(qmodel)
    in_memory = ctx.score(qmodel)
    with_act_qdq = None
    if args.tool == "fastround" and not act_quantized and _add_act_qdq(qmodel, ar.layer_config):
        # fastround's RTN model keeps bf16 activations in memory where upstream's quantizes them (W4A4): the same
        # weights scored again with fastround's dynamic activation qdq (the one SignRound tunes through) added
        with_act_qdq = ctx.score(qmodel)
    # a rotated model needs its rotation_config at load time: only the auto_round format carries it
    fmt = args.format if ROTATIONS[rotation] is None else "auto_round"
    saved: float | None = None
    saved_act: bool | None = None
    if args.check_saved:
        with tempfile.TemporaryDirectory(prefix=f"acc-{args.tool}-{scheme}-{label}-{rotation}-", dir=args.tmp) as tmp:
            ar.save_quantized(tmp, format=fmt)
            if fmt == "fake":
                # auto-round's loader may quantize activations of a reloaded W4A4 checkpoint: probe it as well,
                # and require agreement only where both models treat activations alike
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto")
                saved_act = _act_quantized(reloaded)
                saved = ctx.score(reloaded)
                if saved_act == act_quantized and abs(saved - in_memory) > AGREE_REL * in_memory:
                    raise RuntimeError(
                        f"{args.tool} {scheme} {label} {rotation}: the saved fake checkpoint scores {saved:.6f}, "
                        f"the quantized model in memory {in_memory:.6f}"
                    )
            else:
                _check_packed(Path(tmp), fmt)
    return {**row, "ppl": in_memory, "act_quantized": act_quantized, "ppl_act_qdq": with_act_qdq, "ppl_saved": saved,
            "saved_format": fmt if args.check_saved else None, "saved_act_quantized": saved_act,
            "quantize_s": round(seconds, 2)}


def _row_in_subprocess(args: argparse.Namespace, scheme: str, label: str, rotation: str) -> dict[str, Any]:
    """One row in a fresh interpreter (upstream's once-per-process rotation patching)."""
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    spec.update(scheme=scheme, method=label, rotation=rotation)
    proc = subprocess.run([sys.executable, __file__, "row", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args.tool} {scheme} {label} {rotation}: the row's subprocess failed:\n"
                           f"{proc.stderr[-4000:]}")
    sys.stderr.write(proc.stderr[-2000:])
    return json.loads(proc.stdout.split("ROW=")[-1])


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    ctx = _Context(args)
    results: dict[str, Any] = {"tool": args.tool, "format": args.format, "calibration": _shown(args.calibration),
                               "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                               "ppl_seqlen": args.ppl_seqlen, "heldout_chars": args.heldout_chars or None,
                               "bf16": ctx.score(args.model), "rows": []}
    logger.info("bf16: held-out perplexity %.4f", results["bf16"])
    rotations = [r for r in args.rotations.split(",") if r]
    for rotation in rotations:
        if rotation not in ROTATIONS:
            raise SystemExit(f"unknown rotation {rotation!r}; choose from {', '.join(ROTATIONS)}")
    for scheme in [s for s in args.schemes.split(",") if s]:
        for label in [m for m in args.methods.split(",") if m]:
            if label not in METHODS:
                raise SystemExit(f"unknown method {label!r}; choose from {', '.join(METHODS)}")
            for rotation in rotations:
                if args.tool == "upstream" and ROTATIONS[rotation] is not None:
                    row = _row_in_subprocess(args, scheme, label, rotation)
                else:
                    row = run_row(ctx, scheme, label, rotation)
                results["rows"].append(row)
                if args.json is not None:  # rows so far, so that a run cut short keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
                if row["ppl"] is None:
                    continue
                logger.info("%s %s %s %s: held-out perplexity %.4f in memory (activations %s; saved %s), "
                            "quantize %.1f s", args.tool, scheme, label, rotation, row["ppl"],
                            "quantized" if row["act_quantized"] else "bf16", row["ppl_saved"], row["quantize_s"])
    return results


def _cell(row: dict[str, Any] | None, key: str = "ppl") -> str:
    if row is None:
        return "not run"
    if row.get("refused"):
        return "refused" if key == "ppl" else "–"
    value = row.get(key)
    return "–" if value is None else f"{value:.3f}" + (" (A4)" if key == "ppl" and row.get("act_quantized") else "")


def print_table(paths: list[Path]) -> None:
    """The markdown comparison of fastround and upstream results files (rows keyed by scheme, method, rotation):
    each tool's in-memory score ("(A4)" where its model quantizes activations), fastround's with its activation qdq
    added where its model kept bf16 activations, and the ratio of like for like."""
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            rows.setdefault((row["scheme"], row["method"], row.get("rotation", "none")), {})[data["tool"]] = row
    print("| weights | method | rotation | fastround | fastround + act qdq | upstream auto-round 0.16.1 | "
          "fastround / upstream |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    schemes = list(dict.fromkeys(k[0] for k in rows))
    order = {k: (list(METHODS).index(k[1]) if k[1] in METHODS else len(METHODS), schemes.index(k[0]),
                 list(ROTATIONS).index(k[2]) if k[2] in ROTATIONS else len(ROTATIONS)) for k in rows}
    for (scheme, method, rotation), tools in sorted(rows.items(), key=lambda kv: order[kv[0]]):
        ours, theirs = tools.get("fastround"), tools.get("upstream")
        ratio = "–"
        if ours and theirs and ours.get("ppl") is not None and theirs.get("ppl") is not None:
            # like for like: fastround's act-qdq score where upstream's model quantizes activations and ours does not
            mine = ours["ppl_act_qdq"] if theirs.get("act_quantized") and ours.get("ppl_act_qdq") else ours["ppl"]
            ratio = f"{mine / theirs['ppl']:.4f}"
        print(f"| {scheme} | {method} | {rotation} | {_cell(ours)} | {_cell(ours, 'ppl_act_qdq')} | "
              f"{_cell(theirs)} | {ratio} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration sample length in tokens")
    sub = p.add_subparsers(dest="command", required=True)

    cal = sub.add_parser("calibration", help="write the calibration .jsonl from the training text")
    cal.add_argument("--corpus", type=Path, required=True, help="folder with train.txt (scripts/prepare_corpus.py)")
    cal.add_argument("--out", type=Path, default=MODEL / "calibration.jsonl")
    cal.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="quantize every scheme with RTN and OPT-RTN and score the held-out text")
    run.add_argument("--tool", choices=("fastround", "upstream"), required=True)
    run.add_argument("--calibration", type=Path, default=MODEL / "calibration.jsonl")
    run.add_argument("--schemes", default=",".join(SCHEMES))
    run.add_argument("--methods", default="RTN,OPT-RTN")
    run.add_argument("--rotations", default="none", help=f"comma list of {', '.join(ROTATIONS)}")
    run.add_argument("--device", default="cpu", help="device_map for quantizing")
    run.add_argument("--score_device", default="cpu", help="device the perplexity is computed on")
    run.add_argument("--format", choices=("fake", "auto_round"), default="fake")
    run.add_argument("--batch_size", type=int, default=8)
    run.add_argument("--ppl_seqlen", type=int, default=512)
    run.add_argument("--heldout_chars", type=int, default=0,
                     help="score only the first N characters of validation.txt (0: all of it)")
    run.add_argument("--check_saved", action=argparse.BooleanOptionalAction, default=True,
                     help="also save each row (fake: reload and score it; auto_round: check the folder)")
    run.add_argument("--tmp", type=Path, default=None, help="parent of the temporary output folders")
    run.add_argument("--json", type=Path, default=None, help="also write the results here")
    table = sub.add_parser("table", help="print the markdown comparison of results files written by run --json")
    table.add_argument("json_files", type=Path, nargs="+")

    # internal: one row, its arguments as JSON, in a fresh process (see _row_in_subprocess)
    row = sub.add_parser("row")
    row.add_argument("spec")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "calibration":
        write_calibration(args)
        return
    if args.command == "table":
        print_table(args.json_files)
        return
    if args.command == "row":
        spec = json.loads(args.spec)
        row_args = argparse.Namespace(**{k: (Path(v) if k in ("model", "calibration", "tmp") and v is not None
                                             else v) for k, v in spec.items()})
        result = run_row(_Context(row_args), spec["scheme"], spec["method"], spec["rotation"])
        print("ROW=" + json.dumps(result))
        return
    if not args.calibration.is_file():
        raise FileNotFoundError(f"calibration file {args.calibration} does not exist (see the `calibration` command)")
    results = run_table(args)
    text = json.dumps(results, indent=1)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    for row in results["rows"]:
        value = "refused" if row["ppl"] is None else f"{row['ppl']:.3f}"
        print(f"| {row['scheme']} | {args.tool} {row['method']} | {row['rotation']} | {value} |")


if __name__ == "__main__":
    sys.exit(main())
