"""End-to-end inference of a packed W4 model on fastround's QuantLinear (torch.ops.fastround.woq_linear) against
the same model in bf16: batch-1 decode tokens/s and the time of one prefill, in one run (issue 11's targets).

A Llama-3-8B-shaped transformers model (random weights: speed does not depend on their values) is built once in
bf16; its quantized twin replaces every decoder Linear by a QuantLinear of random W4 GPTQ words (group 128), as a
loaded auto_round checkpoint has; embeddings, norms and lm_head stay bf16 in both, as upstream exports them.

    python3 benchmarks/inference.py --device cpu --threads 16 --layers 32 --json benchmarks/results/inference-cpu16.json
    python3 benchmarks/inference.py --device cuda:0 --layers 32 --json benchmarks/results/inference-h200.json
    python3 benchmarks/inference.py --device cuda:0 --layers 32 --hooks transform,quarot --json ...

`--hooks` also times the W4 model's decode with the online rotation hooks a rotated checkpoint loads with (issue
12's <= 10% target): `transform` is the per-linear backend (x <- x·M^T per 32-block before every decoder linear,
rotation.register_online_hooks), `quarot` QuaRot's default online part (R4: a 14336-wide fp32 Hadamard, K=28,
before every down_proj; R1 and R2 are fused into the weights), `quarot_r1` adds the online R1 (4096-wide, before
q/k/v/gate/up: one transform per shared input on the fused path, as a load does) of fuse_online_to_weight=False.
Each kind is timed on the path a load takes (`fused`: the rotation
inside QuantLinear's woq_linear_rotated call, quant_linear.attach_rotation) and, with `--hook_paths fused,hooks`, as
plain forward pre-hooks too (the path before the fusion, and that of non-QuantLinear layers); `two_ops` times the
`fused` path with FASTROUND_WOQ_FUSE_ROTATION=0, the op's two kernels (hadamard_transform, then woq_linear) where
on CUDA it otherwise runs the rotation inside the staged GEMV (power-of-two blocks at batch 1..4, as `transform`'s
32-blocks). The overhead is the
median over `--pairs` alternating with/without pairs (order flipped every pair) of the generate-time ratio, with its
spread (min, max over pairs): single runs vary by ~10% at decode.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import time
from typing import Any

import torch


def build_bf16(layers: int, vocab: int, device: str, hidden: int = 4096, intermediate: int = 14336,
               heads: int = 32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                      rope_theta=500000.0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    # torch's CPU normal_ draws ~60 M values/s, over 2 minutes for 32 layers: on the CPU the weights are slices of
    # one 16 M-value random pool at random offsets (decode speed does not depend on the values)
    pool = torch.empty(1 << 24, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen) if device == "cpu" else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif pool is not None:
                flat = p.view(-1)
                for start in range(0, flat.numel(), pool.numel() // 2):
                    n = min(pool.numel() // 2, flat.numel() - start)
                    off = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
                    flat[start:start + n].copy_(pool[off:off + n])
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for buf_name, buf in model.named_buffers():  # rotary inv_freq: recompute what to_empty left undefined
            if buf_name.endswith("inv_freq"):
                dim = buf.numel() * 2
                buf.copy_(1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim)))
    return model.eval()


def quantize_random(model: torch.nn.Module, group_size: int, device: str) -> torch.nn.Module:
    """Replaces each decoder Linear by a QuantLinear holding random 4-bit GPTQ words (zero point 8, scale 0.002)."""
    from fastround.quant_linear import QuantLinear

    gen = torch.Generator(device=device).manual_seed(1)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = QuantLinear(lin.in_features, lin.out_features, 4, group_size, True, "gptq", device=device)
                with torch.no_grad():
                    q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, q.qweight.shape, generator=gen, device=device,
                                                  dtype=torch.int64).to(torch.int32))
                    q.qzeros.fill_(0x77777777)  # stored zero - 1 = 7 in every nibble
                    q.scales.fill_(0.002)
                setattr(parent, attr, q)
                del lin
    return model


@functools.lru_cache(maxsize=None)
def _online_hook(position: str, size: int, k: int) -> Any:
    """One QuaRot hook per shape, shared by every layer and timing: its K matrix reaches the device once, not inside
    a timed generate."""
    from fastround import quarot

    return quarot.online_hook(position, size, k)


def add_hooks(model: torch.nn.Module, kind: str, fused: bool = True) -> list[Any]:
    """Registers the online rotations of `kind` on the decoder linears (fused: as a load does, folded into each
    QuantLinear's op call; else as forward pre-hooks); returns what remove_hooks needs to take them off."""
    from fastround import quarot, rotation
    from fastround.quant_linear import QuantLinear, attach_rotation

    def attach(module: torch.nn.Module, hook: Any) -> None:
        if fused:
            attach_rotation(module, hook)
        else:
            module.register_forward_pre_hook(hook, prepend=True)

    before = {id(m): dict(m._forward_pre_hooks) for m in model.modules()}
    if kind == "transform":
        names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "in_features")]
        if fused:
            rotation.register_online_hooks(model, {"block_size": 32, "hadamard_type": "hadamard"}, "mx_fp",
                                           names=names)
        else:
            rot = rotation.LinearRotation(rotation.RotationConfig(block_size=32, backend="transform"), "mx_fp")
            hook = rot._hook  # the pre-hook register_online_hooks gave every layer before the fusion
            for n in names:
                model.get_submodule(n).register_forward_pre_hook(hook, prepend=True)
    elif kind in ("quarot", "quarot_r1"):
        hidden, inter = model.config.hidden_size, model.config.intermediate_size  # 4096, 14336 = 28 x 512
        for layer in model.model.layers:
            attach(layer.mlp.down_proj, _online_hook("r4", inter, quarot.T.spinquant_divisor(inter)))
            if kind == "quarot_r1":
                r1 = _online_hook("r1", hidden, quarot.T.spinquant_divisor(hidden))
                attn, mlp = layer.self_attn, layer.mlp
                for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
                    # as a load does (quarot.register_online_hooks): one R1 per shared input; pre-hooks: one each
                    hook = quarot._hook(quarot.T.SharedInputRotation(r1.block_rotation, len(group))) if fused else r1
                    for m in group:
                        attach(m, hook)
    else:
        raise SystemExit(f"--hooks: unknown kind {kind!r} (transform, quarot, quarot_r1)")
    handles: list[Any] = []
    for m in model.modules():  # what was just added, so the next kind starts from the plain model
        for hid in set(m._forward_pre_hooks) - set(before.get(id(m), {})):
            handles.append((m, hid))
        if isinstance(m, QuantLinear) and m.input_rotation is not None:
            handles.append((m, None))
    return handles


def remove_hooks(handles: list[Any]) -> None:
    for m, hid in handles:
        if hid is None:
            m.input_rotation = None
        else:
            m._forward_pre_hooks.pop(hid, None)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tokens_per_s(model: torch.nn.Module, device: str, prompt: int, new: int, vocab: int,
                        steps: dict[str, float] | None = None) -> float:
    """new tokens over generate()'s whole time, the prompt's forward included. With `steps`, also
    steps["tok_s"]: (new - 1) tokens over that time less a one-token generate's (the decode steps alone: on the CPU
    the prompt's 32-row forward costs a dozen batch-1 steps and would otherwise weigh on a short run)."""
    ids = torch.randint(3, vocab, (1, prompt), device=device)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    _sync(device)
    total = time.perf_counter() - t0
    if steps is not None:
        first = float("inf")
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
            _sync(device)
            first = min(first, time.perf_counter() - t0)
        steps["tok_s"] = (new - 1) / max(total - first, 1e-9)
    return new / total


# The hook timings' clock: wall time, or with --clock process this process's CPU time (a CPU-only run on a machine
# shared with other jobs: with --threads 1 it counts the host work alone, not the waits for a core)
_hook_clock = time.perf_counter


@torch.no_grad()
def generate_seconds(model: torch.nn.Module, ids: torch.Tensor, device: str, new: int) -> float:
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    _sync(device)
    t0 = _hook_clock()
    model.generate(ids, **kw)
    _sync(device)
    return _hook_clock() - t0


def hook_overhead(model: torch.nn.Module, device: str, kind: str, fused: bool, pairs: int, prompt: int, new: int,
                  vocab: int) -> dict[str, Any]:
    """Median and spread over `pairs` alternating (with, without) generate timings of the time ratio - 1; the order
    flips every pair so that a drift (clocks, caches) weighs on both sides alike."""
    ids = torch.randint(3, vocab, (1, prompt), device=device)
    handles = add_hooks(model, kind, fused)
    count = len(handles)
    generate_seconds(model, ids, device, 4)  # warm-up of the hooked path (kernels, caches)
    remove_hooks(handles)
    generate_seconds(model, ids, device, 4)
    on_s: list[float] = []
    off_s: list[float] = []
    for i in range(pairs):
        for hooked in ((True, False) if i % 2 == 0 else (False, True)):
            if hooked:
                handles = add_hooks(model, kind, fused)
                on_s.append(generate_seconds(model, ids, device, new))
                remove_hooks(handles)
            else:
                off_s.append(generate_seconds(model, ids, device, new))
    ratios = [a / b - 1.0 for a, b in zip(on_s, off_s)]
    res = {"rotations": count, "overhead_median": statistics.median(ratios), "overhead_min": min(ratios),
           "overhead_max": max(ratios), "hooked_tok_s_median": new / statistics.median(on_s),
           "plain_tok_s_median": new / statistics.median(off_s), "pairs": pairs,
           # interference (other processes, clocks) only adds time: the fastest run of each side is its own cost
           "overhead_best": min(on_s) / min(off_s) - 1.0, "hooked_s": on_s, "plain_s": off_s}
    if device.startswith("cuda"):
        # the GPU's kernel time per generate: what a step pays once the host is out of the way (CUDA graphs, a
        # serving engine), unlike the eager wall time above, which a host-bound decode step makes noisy
        handles = add_hooks(model, kind, fused)
        on_k = kernel_seconds(model, ids, device, new)
        remove_hooks(handles)
        off_k = kernel_seconds(model, ids, device, new)
        res.update({"kernel_ms_per_token_hooked": 1e3 * on_k / new, "kernel_ms_per_token_plain": 1e3 * off_k / new,
                    "kernel_overhead": on_k / off_k - 1.0})
    return res


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """`name` set to `value` (None: left as it is) inside the block, restored after."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@torch.no_grad()
def kernel_seconds(model: torch.nn.Module, ids: torch.Tensor, device: str, new: int) -> float:
    """Sum of the device kernels' times over one generate (torch.profiler; each kernel counted once, as its
    launching op's self device time)."""
    from torch.profiler import ProfilerActivity, profile

    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        _sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) * 1e-6


@torch.no_grad()
def prefill_seconds(model: torch.nn.Module, device: str, tokens: int, vocab: int, repeat: int) -> float:
    ids = torch.randint(3, vocab, (1, tokens), device=device)
    model(ids, use_cache=False, logits_to_keep=1)
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size (a smaller model times host costs)")
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512, help="prefill tokens to time (0: skip the prefill)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hooks", default="", help="comma list of online rotation hooks to time on the W4 model: "
                    "transform, quarot, quarot_r1")
    ap.add_argument("--hook_paths", default="fused", help="comma list: fused (QuantLinear's one-op rotation, as a "
                    "load attaches it), two_ops (the same with FASTROUND_WOQ_FUSE_ROTATION=0: the rotation's own "
                    "kernel before the GEMV), hooks (forward pre-hooks)")
    ap.add_argument("--pairs", type=int, default=7, help="alternating with/without pairs per hook kind and path")
    ap.add_argument("--clock", default="wall", choices=("wall", "process"), help="clock of the hook timings")
    ap.add_argument("--skip_bf16", action="store_true", help="time only the W4 model (and its hooks)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":
        global _hook_clock
        _hook_clock = time.process_time
    import fastround.quant_linear as ql

    if not ql.HAS_WOQ_LINEAR:
        raise SystemExit("torch.ops.fastround.woq_linear is not built: this benchmark measures it")
    model = build_bf16(args.layers, args.vocab, args.device, args.hidden, args.intermediate, args.heads)
    res: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads(), "layers": args.layers,
                           "vocab": args.vocab, "group_size": args.group_size, "torch": torch.__version__,
                           "machine": platform.platform(),
                           "fuse_rotation_env": os.environ.get("FASTROUND_WOQ_FUSE_ROTATION"),
                           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    if not args.skip_bf16:
        bsteps: dict[str, float] = {}
        res["bf16_decode_tok_s"] = decode_tokens_per_s(model, args.device, args.prompt, args.new_tokens, args.vocab,
                                                       bsteps)
        res["bf16_step_tok_s"] = bsteps["tok_s"]
        res["bf16_prefill_s"] = (prefill_seconds(model, args.device, args.prefill, args.vocab, args.repeat)
                                 if args.prefill else float("nan"))
        print(f"bf16: decode {res['bf16_decode_tok_s']:.2f} tok/s (steps alone {res['bf16_step_tok_s']:.2f}), "
              f"prefill {args.prefill} in "
              f"{res['bf16_prefill_s']:.3f} s", flush=True)
    model = quantize_random(model, args.group_size, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    wsteps: dict[str, float] = {}
    res["w4_decode_tok_s"] = decode_tokens_per_s(model, args.device, args.prompt, args.new_tokens, args.vocab, wsteps)
    res["w4_step_tok_s"] = wsteps["tok_s"]
    res["w4_prefill_s"] = (prefill_seconds(model, args.device, args.prefill, args.vocab, args.repeat)
                           if args.prefill else float("nan"))
    fallbacks = sum(1 for m in model.modules() if isinstance(m, ql.QuantLinear) and not m._woq_ok)
    res["layers_on_reference_path"] = fallbacks
    if not args.skip_bf16:
        res["decode_speedup"] = res["w4_decode_tok_s"] / res["bf16_decode_tok_s"]
        res["decode_step_speedup"] = res["w4_step_tok_s"] / res["bf16_step_tok_s"]
        res["prefill_ratio"] = res["w4_prefill_s"] / res["bf16_prefill_s"]
        print(f"w4g{args.group_size}: decode {res['w4_decode_tok_s']:.2f} tok/s ({res['decode_speedup']:.2f}x "
              f"bf16; steps alone {res['w4_step_tok_s']:.2f}, {res['decode_step_speedup']:.2f}x), prefill {res['w4_prefill_s']:.3f} s ({res['prefill_ratio']:.2f}x bf16's time), "
              f"{fallbacks} layers on the reference path", flush=True)
    else:
        print(f"w4g{args.group_size}: decode {res['w4_decode_tok_s']:.2f} tok/s", flush=True)
    for kind in filter(None, args.hooks.split(",")):
        for path in filter(None, args.hook_paths.split(",")):
            if path not in ("fused", "two_ops", "hooks"):
                raise SystemExit(f"--hook_paths: unknown path {path!r} (fused, two_ops, hooks)")
            with torch.no_grad(), _env("FASTROUND_WOQ_FUSE_ROTATION", "0" if path == "two_ops" else None):
                r = hook_overhead(model, args.device, kind, path != "hooks", max(1, args.pairs), args.prompt,
                                  args.new_tokens, args.vocab)
            tag = {"fused": kind, "two_ops": f"{kind}_two_ops", "hooks": f"{kind}_prehook"}[path]
            res[f"{tag}_hooks"] = r
            res[f"{tag}_hooks_step_overhead"] = r["overhead_median"]
            print(f"w4 + {kind} rotations ({r['rotations']}, {path}): decode {r['hooked_tok_s_median']:.2f} tok/s "
                  f"against {r['plain_tok_s_median']:.2f} without: +{100 * r['overhead_median']:.1f}% median of "
                  f"{r['pairs']} pairs (min {100 * r['overhead_min']:+.1f}%, max {100 * r['overhead_max']:+.1f}%), "
                  f"fastest against fastest {100 * r['overhead_best']:+.1f}%"
                  + (f"; GPU kernel time {r['kernel_ms_per_token_hooked']:.3f} against "
                     f"{r['kernel_ms_per_token_plain']:.3f} ms/token ({100 * r['kernel_overhead']:+.1f}%)"
                     if "kernel_overhead" in r else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
