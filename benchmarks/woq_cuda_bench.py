"""Speed of torch.ops.fastround.woq_linear on CUDA against the bf16 linear (torch.nn.functional.linear, cuBLAS) at
Llama-3-8B layer shapes, batch 1 (the GEMV) and 512 (dequantize + matmul). JSON on stdout.

Each layer is held in enough copies that one pass over them exceeds the L2 cache (50 MB on an H100/H200), as a
decode step walks through distinct layers; otherwise a 4096 x 4096 W4 weight (8.4 MB) would be read from L2.
Two timings per case, each the median of 10 runs after warm-ups:
  graph_us  one pass over the copies captured in a CUDA graph and replayed: the GPU time of the kernels alone
            (no launch overhead), what a decode loop run under CUDA graphs sees; the speed target is on this.
  eager_us  the same pass launched from Python between two CUDA events: includes the dispatcher and launch
            overhead wherever the GPU outruns the CPU.
packed_gbps counts the bytes the op must read at the least (qweight + qzeros + scales) per graph_us.

    python3 benchmarks/woq_cuda_bench.py [--layouts gptq:4,awq:4,gptq_v2:8] [--m 1,512] [--group 128]
    python3 benchmarks/woq_cuda_bench.py --sweep [--layouts ...]
    python3 benchmarks/woq_cuda_bench.py --staged [--budget_s 95]
    python3 benchmarks/woq_cuda_bench.py --half2
    python3 benchmarks/woq_cuda_bench.py --mma [--budget_s 150]

--sweep times the batch-1 GEMV under every FASTROUND_WOQ_CUDA_VARIANT "U,S" (U loads in flight per thread, S the
cluster split, 0 the built-in choice) on each shape and layout and reports the best per case and the variant with
the best geometric-mean speedup over all of a layout's shapes: the one to make the default.

--staged times the staged GEMV (woq_cuda.cu gemv_gptq_staged_kernel) at batch 1 under every
"staged:U,S,T" (rows per chunk, cluster split, lanes per row worker) against the rows kernel's defaults ("rows"),
the built-in choice ("") and the bf16 linear, on the Llama-3-8B shapes including k/v (4096 x 1024), and the
built-in choice against "rows" at batch 4; stops adding variants after --budget_s seconds (the report says so).
Each variant's output is compared with the rows kernel's (max_abs_diff_vs_rows).

--half2 times the built-in choice (the staged kernel's launch planner), the rows kernel and the staged kernel's half2
variant (FASTROUND_WOQ_CUDA_VARIANT=half2) at batch 1 against the bf16 linear on the same shapes, GPTQ 4 bits with
bf16 and fp16 activations and GPTQ v2 8 bits with bf16, in about a minute.

--mma times the bf16 linear, the built-in choice and the tensor-core GEMV (FASTROUND_WOQ_CUDA_VARIANT=mma) on the
same shapes, GPTQ 4 bits, at batch 1 (bf16 and fp16 x) and 4 (bf16), then every forced "mma:U,S" at batch 1 while
within --budget_s.

Needs a CUDA device and a fastround built with CUDA (benchmarks/gpu_build.sh builds one into /tmp).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import capture_graph, cuda_median_ms  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out): q/o, gate/up, down of Llama-3-8B
L2_BYTES = 50 * 2**20
TARGET_SPEEDUP = 2.5  # W4G128 at batch 1 vs bf16 (issue 11)


def _random_layer(in_f: int, out_f: int, bits: int, group: int, layout: str, dev: torch.device):
    """Random packed tensors of the layout's shapes; random words are valid codes in every layout."""
    pf = 32 // bits
    groups = in_f // group
    info = torch.iinfo(torch.int32)
    if layout == "awq":
        qweight = torch.randint(info.min, info.max, (in_f, out_f // 8), dtype=torch.int32, device=dev)
        qzeros = torch.randint(info.min, info.max, (groups, out_f // 8), dtype=torch.int32, device=dev)
    else:
        qweight = torch.randint(info.min, info.max, (in_f // pf, out_f), dtype=torch.int32, device=dev)
        qzeros = torch.randint(info.min, info.max, (groups, (out_f + pf - 1) // pf), dtype=torch.int32, device=dev)
    scales = (torch.rand(groups, out_f, device=dev) * 1e-3 + 1e-4).to(torch.float16)
    return qweight, qzeros, scales


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _dense_weights(in_f: int, out_f: int, dev: torch.device) -> list[torch.Tensor]:
    """Random bf16 [out, in] weights, enough copies to fill twice the L2, so the bf16 linear reads them from HBM as
    the quantized layers' copies are."""
    w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02
    return [w] + [torch.randn_like(w) * 0.02 for _ in range(max(2, -(-2 * L2_BYTES // _nbytes(w))) - 1)]


def _time_pass(calls) -> tuple[float, float]:
    """(graph ms, eager ms) of running every call in `calls` once."""

    def run_all():
        for c in calls:
            c()

    eager = cuda_median_ms(run_all, runs=10)
    graph = capture_graph(calls)
    ms = cuda_median_ms(graph.replay, runs=10)
    del graph
    return ms, eager


def bench(in_f: int, out_f: int, m: int, layout: str, bits: int, group: int, dev: torch.device) -> dict:
    x = torch.randn(m, in_f, device=dev, dtype=torch.bfloat16)
    layer = _random_layer(in_f, out_f, bits, group, layout, dev)
    copies = max(2, -(-2 * L2_BYTES // _nbytes(*layer)))
    layers = [layer] + [_random_layer(in_f, out_f, bits, group, layout, dev) for _ in range(copies - 1)]
    op = torch.ops.fastround.woq_linear
    woq_ms, woq_eager = _time_pass([lambda t=t: op(x, *t, None, bits, group, layout) for t in layers])

    ws = _dense_weights(in_f, out_f, dev)
    dense_copies = len(ws)
    dense_ms, dense_eager = _time_pass([lambda t=t: torch.nn.functional.linear(x, t) for t in ws])
    del ws, layers
    torch.cuda.empty_cache()

    woq_us = woq_ms * 1e3 / copies
    dense_us = dense_ms * 1e3 / dense_copies
    return {
        "in": in_f,
        "out": out_f,
        "m": m,
        "layout": layout,
        "bits": bits,
        "group_size": group,
        "woq_graph_us": round(woq_us, 2),
        "bf16_graph_us": round(dense_us, 2),
        "speedup_graph": round(dense_us / woq_us, 3),
        "woq_eager_us": round(woq_eager * 1e3 / copies, 2),
        "bf16_eager_us": round(dense_eager * 1e3 / dense_copies, 2),
        "speedup_eager": round((dense_eager / dense_copies) / (woq_eager / copies), 3),
        "packed_gbps": round(_nbytes(*layer) / (woq_us * 1e-6) / 1e9, 1),
        "bf16_gbps": round((2 * in_f * out_f) / (dense_us * 1e-6) / 1e9, 1),
    }


SWEEP_VARIANTS = [""] + [f"{u},{s}" for u in (2, 4, 8, 16) for s in (0, 1, 2, 4, 8)]


def sweep(layouts: list[tuple[str, int]], group: int, dev: torch.device) -> dict:
    """Graph time of woq_linear at m=1 per variant, shape and layout, against the bf16 linear."""
    x = torch.randn(1, max(i for i, _ in SHAPES), device=dev, dtype=torch.bfloat16)
    op = torch.ops.fastround.woq_linear
    rows = []
    for in_f, out_f in SHAPES:
        xs = x[:, :in_f].contiguous()
        ws = _dense_weights(in_f, out_f, dev)
        dense_copies = len(ws)
        dense_us = _time_pass([lambda t=t: torch.nn.functional.linear(xs, t) for t in ws])[0] * 1e3 / dense_copies
        del ws
        for layout, bits in layouts:
            layer = _random_layer(in_f, out_f, bits, group, layout, dev)
            copies = max(2, -(-2 * L2_BYTES // _nbytes(*layer)))
            layers = [layer] + [_random_layer(in_f, out_f, bits, group, layout, dev) for _ in range(copies - 1)]
            ref = op(xs, *layer, None, bits, group, layout)
            for v in SWEEP_VARIANTS:
                os.environ["FASTROUND_WOQ_CUDA_VARIANT"] = v
                # A variant must give the default's sums up to the order of fp32 additions.
                err = (op(xs, *layer, None, bits, group, layout).float() - ref.float()).abs().max().item()
                us = _time_pass([lambda t=t: op(xs, *t, None, bits, group, layout) for t in layers])[0] * 1e3 / copies
                rows.append({"in": in_f, "out": out_f, "layout": layout, "bits": bits, "variant": v or "default",
                             "woq_graph_us": round(us, 2), "bf16_graph_us": round(dense_us, 2),
                             "speedup_graph": round(dense_us / us, 3),
                             "packed_gbps": round(_nbytes(*layer) / (us * 1e-6) / 1e9, 1),
                             "max_abs_diff_vs_default": err})
                print(json.dumps(rows[-1]), file=sys.stderr)
            os.environ.pop("FASTROUND_WOQ_CUDA_VARIANT", None)
            del layers, layer
            torch.cuda.empty_cache()
    best_per_case = {}
    for r in rows:
        key = f"{r['layout']}:{r['bits']} {r['in']}x{r['out']}"
        if key not in best_per_case or r["woq_graph_us"] < best_per_case[key]["woq_graph_us"]:
            best_per_case[key] = r
    best_per_layout = {}
    for layout, bits in layouts:
        scores = {}
        for v in SWEEP_VARIANTS:
            sel = [r["speedup_graph"] for r in rows
                   if r["layout"] == layout and r["bits"] == bits and r["variant"] == (v or "default")]
            scores[v or "default"] = math.exp(sum(math.log(s) for s in sel) / len(sel))
        win = max(scores, key=scores.get)
        best_per_layout[f"{layout}:{bits}"] = {"variant": win, "geomean_speedup": round(scores[win], 3),
                                                "default_geomean_speedup": round(scores["default"], 3)}
    return {"best_per_case": best_per_case, "best_per_layout": best_per_layout, "rows": rows}


STAGED_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # q/o, k/v, gate/up, down
STAGED_LAYOUTS = [("gptq", 4), ("gptq_v2", 4), ("gptq_v2", 8)]


def staged_variants(bits: int) -> list[str]:
    """The staged kernel's batch-1 settings instantiated for `bits` (woq_cuda.cu staged_kernel): U rows per chunk,
    split S, T lanes per row worker, prefetch off (1) or on (2)."""
    us, txs = ((4, 8, 16), (32, 16, 8)) if bits == 4 else ((4, 8), (32, 16))
    plain = [f"staged:{u},{s},{t},1" for u in us for t in txs for s in (1, 2, 4, 8)]
    prefetch = [f"staged:{u},{s},{t},2" for u in (4, 8) for t in (32, 16) for s in (1, 2, 4, 8)] if bits == 4 else []
    return plain + prefetch


def _graph_us(calls, runs: int = 7) -> float:
    """Median GPU microseconds of one replay of `calls` captured in a CUDA graph."""
    graph = capture_graph(calls)
    us = cuda_median_ms(graph.replay, runs=runs, warmup=2) * 1e3
    del graph
    return us


def staged_sweep(group: int, budget_s: float, dev: torch.device) -> dict:
    """Batch-1 graph time of every staged setting, the rows kernel and the built-in choice vs bf16, per shape."""
    t0 = time.monotonic()
    op = torch.ops.fastround.woq_linear
    rows, summary, truncated = [], {}, False
    env = "FASTROUND_WOQ_CUDA_VARIANT"
    try:
        for in_f, out_f in STAGED_SHAPES:
            x = torch.randn(4, in_f, device=dev, dtype=torch.bfloat16)
            x1 = x[:1]
            ws = _dense_weights(in_f, out_f, dev)
            dense_copies = len(ws)
            dense_us = _graph_us([lambda t=t: torch.nn.functional.linear(x1, t) for t in ws]) / dense_copies
            del ws
            for layout, bits in STAGED_LAYOUTS:
                layer = _random_layer(in_f, out_f, bits, group, layout, dev)
                copies = max(2, -(-2 * L2_BYTES // _nbytes(*layer)))
                layers = [layer] + [_random_layer(in_f, out_f, bits, group, layout, dev) for _ in range(copies - 1)]
                case = f"{layout}:{bits} {in_f}x{out_f}"
                os.environ[env] = "rows"
                ref = op(x1, *layer, None, bits, group, layout).float()
                ref4 = op(x, *layer, None, bits, group, layout).float()
                variants = ["rows", ""] + (staged_variants(bits) if layout != "gptq_v2" or bits != 4 else [])
                for v in variants:
                    if time.monotonic() - t0 > budget_s:
                        truncated = True
                        break
                    os.environ[env] = v
                    err = (op(x1, *layer, None, bits, group, layout).float() - ref).abs().max().item()
                    us = _graph_us([lambda t=t: op(x1, *t, None, bits, group, layout) for t in layers]) / copies
                    rows.append({"case": case, "m": 1, "variant": v or "default", "woq_graph_us": round(us, 2),
                                 "bf16_graph_us": round(dense_us, 2), "speedup_graph": round(dense_us / us, 3),
                                 "packed_gbps": round(_nbytes(*layer) / (us * 1e-6) / 1e9, 1),
                                 "max_abs_diff_vs_rows": err})
                    print(json.dumps(rows[-1]), file=sys.stderr)
                if bits == 4 and not truncated:  # batch 4: the built-in choice against the rows kernel
                    for v in ("rows", ""):
                        os.environ[env] = v
                        err = (op(x, *layer, None, bits, group, layout).float() - ref4).abs().max().item()
                        us = _graph_us([lambda t=t: op(x, *t, None, bits, group, layout) for t in layers]) / copies
                        rows.append({"case": case, "m": 4, "variant": v or "default", "woq_graph_us": round(us, 2),
                                     "max_abs_diff_vs_rows": err})
                        print(json.dumps(rows[-1]), file=sys.stderr)
                sel = [r for r in rows if r["case"] == case and r["m"] == 1]
                if sel:
                    best = min(sel, key=lambda r: r["woq_graph_us"])
                    by = {r["variant"]: r for r in sel}
                    summary[case] = {
                        "bf16_us": round(dense_us, 2),
                        "rows_us": by.get("rows", {}).get("woq_graph_us"),
                        "default_us": by.get("default", {}).get("woq_graph_us"),
                        "default_speedup": by.get("default", {}).get("speedup_graph"),
                        "best_variant": best["variant"], "best_us": best["woq_graph_us"],
                        "best_speedup": best["speedup_graph"], "best_packed_gbps": best["packed_gbps"],
                        "m4": {r["variant"]: r["woq_graph_us"] for r in rows if r["case"] == case and r["m"] == 4},
                        "worst_abs_diff_vs_rows": max(r["max_abs_diff_vs_rows"] for r in sel),
                    }
                os.environ.pop(env, None)
                del layers, layer
                torch.cuda.empty_cache()
                if truncated:
                    break
            if truncated:
                break
    finally:
        os.environ.pop(env, None)
    # The staged setting with the best geometric-mean speedup over the shapes measured, per layout.
    best_fixed = {}
    for layout, bits in STAGED_LAYOUTS:
        key = f"{layout}:{bits}"
        scores = {}
        for v in staged_variants(bits) + ["default", "rows"]:
            sel = [r["speedup_graph"] for r in rows
                   if r["m"] == 1 and r["variant"] == v and r["case"].startswith(key + " ")]
            if len(sel) == len(STAGED_SHAPES):
                scores[v] = math.exp(sum(math.log(x) for x in sel) / len(sel))
        if scores:
            win = max(scores, key=scores.get)
            best_fixed[key] = {"variant": win, "geomean_speedup": round(scores[win], 3),
                               "default_geomean_speedup": round(scores.get("default", float("nan")), 3),
                               "rows_geomean_speedup": round(scores.get("rows", float("nan")), 3)}
    return {"target": f"gptq:4 m=1 >= {TARGET_SPEEDUP}x bf16", "truncated": truncated,
            "seconds": round(time.monotonic() - t0, 1), "summary": summary, "best_fixed": best_fixed, "rows": rows}


HALF2_LAYOUTS = [("gptq", 4), ("gptq_v2", 8)]


def half2_compare(group: int, dev: torch.device) -> dict:
    """Batch-1 graph time of the built-in choice, the rows kernel and (4 bits) the staged kernel's half2 variant
    against the bf16 linear on STAGED_SHAPES, with bf16 activations and (4 bits) fp16 ones; each variant's largest
    difference from the rows kernel relative to the largest output (rel_diff_vs_rows). About a minute on an H200."""
    t0 = time.monotonic()
    op = torch.ops.fastround.woq_linear
    env = "FASTROUND_WOQ_CUDA_VARIANT"
    rows, summary = [], {}
    try:
        for in_f, out_f in STAGED_SHAPES:
            ws = _dense_weights(in_f, out_f, dev)
            dense_copies = len(ws)
            xb = torch.randn(1, in_f, device=dev, dtype=torch.bfloat16)
            dense_us = _graph_us([lambda t=t: torch.nn.functional.linear(xb, t) for t in ws]) / dense_copies
            del ws
            for layout, bits in HALF2_LAYOUTS:
                layer = _random_layer(in_f, out_f, bits, group, layout, dev)
                copies = max(2, -(-2 * L2_BYTES // _nbytes(*layer)))
                layers = [layer] + [_random_layer(in_f, out_f, bits, group, layout, dev) for _ in range(copies - 1)]
                case = f"{layout}:{bits} {in_f}x{out_f}"
                by = {}
                for x_dtype in (torch.bfloat16, torch.float16) if bits == 4 else (torch.bfloat16,):
                    x = xb.to(x_dtype)
                    os.environ[env] = "rows"
                    ref = op(x, *layer, None, bits, group, layout).float()
                    for v in ["rows", ""] + (["half2"] if bits == 4 else []):
                        us, rel = _time_variant(v, x, layers, ref, bits, group, layout)
                        name = f"{v or 'default'}/{str(x_dtype).split('.')[-1]}"
                        rows.append({"case": case, "variant": name, "woq_graph_us": round(us, 2),
                                     "speedup_vs_bf16": round(dense_us / us, 3), "rel_diff_vs_rows": rel})
                        by[name] = rows[-1]
                        print(json.dumps(rows[-1]), file=sys.stderr)
                summary[case] = {"bf16_us": round(dense_us, 2),
                                 **{k: [r["woq_graph_us"], r["speedup_vs_bf16"]] for k, r in by.items()}}
                os.environ.pop(env, None)
                del layers, layer
                torch.cuda.empty_cache()
    finally:
        os.environ.pop(env, None)
    return {"target": f"gptq:4 m=1 >= {TARGET_SPEEDUP}x bf16", "seconds": round(time.monotonic() - t0, 1),
            "summary ([us, speedup vs bf16] per variant/x dtype)": summary, "rows": rows}


def _time_variant(variant: str, x: torch.Tensor, layers: list, ref: torch.Tensor, bits: int, group: int,
                  layout: str) -> tuple[float, float]:
    """(graph us per call over the `layers` copies, largest difference of layers[0]'s output from `ref` relative to
    ref's largest) with FASTROUND_WOQ_CUDA_VARIANT=variant (left set: the caller restores it)."""
    op = torch.ops.fastround.woq_linear
    os.environ["FASTROUND_WOQ_CUDA_VARIANT"] = variant
    y = op(x, *layers[0], None, bits, group, layout).float()
    rel = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    us = _graph_us([lambda t=t: op(x, *t, None, bits, group, layout) for t in layers]) / len(layers)
    return us, rel


MMA_SETTINGS = [f"mma:{u},{s}" for u in (4, 8) for s in (1, 2, 4, 8)]


def mma_compare(group: int, budget_s: float, dev: torch.device) -> dict:
    """Graph time of the bf16 linear, the built-in choice and the tensor-core GEMV (FASTROUND_WOQ_CUDA_VARIANT=mma,
    its planner's choice) on STAGED_SHAPES, GPTQ 4 bits: batch 1 with bf16 and fp16 x and batch 4 with bf16, then
    at batch 1 (bf16) every forced "mma:U,S" setting (steps in flight per warp, cluster split) while within
    budget_s, so that the planner can be fitted. rel_diff_vs_default: the largest difference from the built-in
    choice's output relative to the largest output."""
    t0 = time.monotonic()
    op = torch.ops.fastround.woq_linear
    env = "FASTROUND_WOQ_CUDA_VARIANT"
    layout, bits = "gptq", 4
    rows, summary, truncated = [], {}, False
    try:
        for in_f, out_f in STAGED_SHAPES:
            ws = _dense_weights(in_f, out_f, dev)
            dense_copies = len(ws)
            layer = _random_layer(in_f, out_f, bits, group, layout, dev)
            copies = max(2, -(-2 * L2_BYTES // _nbytes(*layer)))
            layers = [layer] + [_random_layer(in_f, out_f, bits, group, layout, dev) for _ in range(copies - 1)]
            case = f"{layout}:{bits} {in_f}x{out_f}"
            by = {}
            for m in (1, 4):
                xb = torch.randn(m, in_f, device=dev, dtype=torch.bfloat16)
                dense_us = _graph_us([lambda t=t: torch.nn.functional.linear(xb, t) for t in ws]) / dense_copies
                by[f"bf16/m{m}"] = [round(dense_us, 2), 1.0]
                for x_dtype in (torch.bfloat16, torch.float16) if m == 1 else (torch.bfloat16,):
                    x = xb.to(x_dtype)
                    os.environ[env] = ""
                    ref = op(x, *layer, None, bits, group, layout).float()
                    variants = ["", "mma"]
                    if m == 1 and x_dtype == torch.bfloat16:
                        variants += MMA_SETTINGS
                    for v in variants:
                        if v.startswith("mma:") and time.monotonic() - t0 > budget_s:
                            truncated = True
                            continue
                        us, rel = _time_variant(v, x, layers, ref, bits, group, layout)
                        name = f"{v or 'default'}/{str(x_dtype).split('.')[-1]}/m{m}"
                        rows.append({"case": case, "variant": name, "woq_graph_us": round(us, 2),
                                     "speedup_vs_bf16": round(dense_us / us, 3), "rel_diff_vs_default": rel})
                        by[name] = [rows[-1]["woq_graph_us"], rows[-1]["speedup_vs_bf16"]]
                        print(json.dumps(rows[-1]), file=sys.stderr)
            summary[case] = by
            os.environ.pop(env, None)
            del layers, layer, ws
            torch.cuda.empty_cache()
    finally:
        os.environ.pop(env, None)
    return {"target": f"gptq:4 m=1 >= {TARGET_SPEEDUP}x bf16", "truncated": truncated,
            "seconds": round(time.monotonic() - t0, 1),
            "summary ([us, speedup vs bf16] per variant/x dtype/batch)": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default="gptq:4,awq:4,gptq_v2:8", help="layout:bits,...")
    ap.add_argument("--m", default="1,512", help="batch sizes")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="time every GEMV variant at m=1 and report the best")
    ap.add_argument("--staged", action="store_true", help="time every staged GEMV setting at m=1 (see above)")
    ap.add_argument("--budget_s", type=float, default=95.0, help="--staged, --mma: stop adding variants after this")
    ap.add_argument("--half2", action="store_true",
                    help="the built-in choice, the rows kernel and the half2 variant vs bf16 at m=1 (see above)")
    ap.add_argument("--mma", action="store_true",
                    help="bf16, the built-in choice and the tensor-core GEMV at m=1 and 4, then mma:U,S (see above)")
    args = ap.parse_args(argv)
    from fastround import _torch

    assert torch.cuda.is_available() and _torch.with_cuda(), "needs a CUDA device and fastround built with CUDA"
    dev = torch.device("cuda")
    if args.mma:
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  **mma_compare(args.group, args.budget_s, dev)}
        print(json.dumps(report, indent=1))
        return 0
    if args.half2:
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **half2_compare(args.group, dev)}
        print(json.dumps(report, indent=1))
        return 0
    if args.staged:
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  **staged_sweep(args.group, args.budget_s, dev)}
        print(json.dumps(report, indent=1))
        return 0
    if args.sweep:
        layouts = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.layouts.split(",")]
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **sweep(layouts, args.group, dev)}
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
        return 0
    results = []
    for spec in args.layouts.split(","):
        layout, bits = spec.split(":")
        for m in (int(v) for v in args.m.split(",")):
            for in_f, out_f in SHAPES:
                results.append(bench(in_f, out_f, m, layout, int(bits), args.group, dev))
                print(json.dumps(results[-1]), file=sys.stderr)
    w4 = [r for r in results if r["m"] == 1 and r["bits"] == 4 and r["group_size"] == 128 and r["layout"] == "gptq"]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "target": f"W4G128 gptq at m=1 >= {TARGET_SPEEDUP}x the bf16 linear (graph timing)",
        "target_met": bool(w4) and all(r["speedup_graph"] >= TARGET_SPEEDUP for r in w4),
        "results": results,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
