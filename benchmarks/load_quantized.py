"""Peak memory while loading a packed checkpoint with `fastround.load_quantized` (issue 11: "loading streams shard by
shard; peak RSS while loading stays near the quantized size").

A Llama-3-8B-shaped bf16 checkpoint of N layers (random weights) is quantized model-free to W4A16 (C++, no model
loaded), then a fresh process loads the result on the CPU; its peak RSS (sampled every 20 ms) is set against the
packed checkpoint's size and against the same process importing torch and transformers alone.

    python3 benchmarks/load_quantized.py --layers 4 --json benchmarks/results/load_quantized-dev.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import add_checkpoint_args, build_checkpoint, checkpoint_bytes, machine, run_measured, write_json
from regular_flow import write_tokenizer

_LOAD = """
import sys, torch, transformers, fastround
if sys.argv[1] == "load":
    model = fastround.load_quantized(sys.argv[2], device="cpu")
    n = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear")
    assert n > 0, "no QuantLinear: the checkpoint did not load packed"
    print("quant_linears", n)
    if len(sys.argv) > 3:  # then one forward pass, which touches every weight
        with torch.no_grad():
            model(torch.randint(3, 1000, (1, 16)))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap, "--shape", layers=4, shard_gb=2.0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from fastround import AutoRound

    work = Path(args.work or tempfile.mkdtemp(prefix="fr-load-"))
    src = build_checkpoint(work, args.shape, args.layers, args.vocab, args.shard_gb)
    write_tokenizer(src)
    out = work / "w4a16"
    if not (out / "config.json").exists():
        AutoRound(str(src), scheme="W4A16", model_free=True).quantize_and_save(str(out))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    base = run_measured([sys.executable, "-c", _LOAD, "import"], env, timeout=600)
    load = run_measured([sys.executable, "-c", _LOAD, "load", str(out)], env, timeout=1800, capture_stdout=True)
    fwd = run_measured([sys.executable, "-c", _LOAD, "load", str(out), "forward"], env, timeout=1800)
    for m in (load, fwd):
        if m.returncode != 0:
            raise SystemExit(f"load failed: {m.stderr_tail}")
    packed_gb = checkpoint_bytes(out) / 1e9
    res = {"machine": machine(), "shape": args.shape, "layers": args.layers, "vocab": args.vocab,
           "source_gb": checkpoint_bytes(src) / 1e9, "packed_gb": packed_gb,
           "baseline_rss_gb": base.peak_rss_gb, "load_peak_rss_gb": load.peak_rss_gb, "load_s": load.seconds,
           "load_over_baseline_gb": load.peak_rss_gb - base.peak_rss_gb,
           "ratio_to_packed": (load.peak_rss_gb - base.peak_rss_gb) / packed_gb,
           "load_and_forward_peak_rss_gb": fwd.peak_rss_gb}
    print(f"source {res['source_gb']:.2f} GB bf16, packed {packed_gb:.2f} GB; import alone {base.peak_rss_gb:.2f} GB; "
          f"load peak {load.peak_rss_gb:.2f} GB ({res['load_over_baseline_gb']:.2f} GB over the imports, "
          f"{res['ratio_to_packed']:.2f}x the packed size) in {load.seconds:.1f} s; load + one forward peak "
          f"{fwd.peak_rss_gb:.2f} GB")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
