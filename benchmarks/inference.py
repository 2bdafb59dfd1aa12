"""End-to-end inference of a packed W4 model on fastround's QuantLinear (torch.ops.fastround.woq_linear) against
the same model in bf16: batch-1 decode tokens/s and the time of one prefill, in one run (issue 11's targets).

A Llama-3-8B-shaped transformers model (random weights: speed does not depend on their values) is built once in
bf16; its quantized twin replaces every decoder Linear by a QuantLinear of random W4 GPTQ words (group 128), as a
loaded auto_round checkpoint has; embeddings, norms and lm_head stay bf16 in both, as upstream exports them.

    python3 benchmarks/inference.py --device cpu --threads 16 --layers 32 --json benchmarks/results/inference-cpu16.json
    python3 benchmarks/inference.py --device cuda:0 --layers 32 --json benchmarks/results/inference-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch


def build_bf16(layers: int, vocab: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                      rope_theta=500000.0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tokens_per_s(model: torch.nn.Module, device: str, prompt: int, new: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (1, prompt), device=device)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    _sync(device)
    return new / (time.perf_counter() - t0)


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
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import fastround.quant_linear as ql

    if not ql.HAS_WOQ_LINEAR:
        raise SystemExit("torch.ops.fastround.woq_linear is not built: this benchmark measures it")
    model = build_bf16(args.layers, args.vocab, args.device)
    res: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads(), "layers": args.layers,
                           "vocab": args.vocab, "group_size": args.group_size, "torch": torch.__version__,
                           "machine": platform.platform(),
                           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    res["bf16_decode_tok_s"] = decode_tokens_per_s(model, args.device, args.prompt, args.new_tokens, args.vocab)
    res["bf16_prefill_s"] = prefill_seconds(model, args.device, args.prefill, args.vocab, args.repeat)
    print(f"bf16: decode {res['bf16_decode_tok_s']:.2f} tok/s, prefill {args.prefill} in {res['bf16_prefill_s']:.3f} s",
          flush=True)
    model = quantize_random(model, args.group_size, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    res["w4_decode_tok_s"] = decode_tokens_per_s(model, args.device, args.prompt, args.new_tokens, args.vocab)
    res["w4_prefill_s"] = prefill_seconds(model, args.device, args.prefill, args.vocab, args.repeat)
    fallbacks = sum(1 for m in model.modules() if isinstance(m, ql.QuantLinear) and not m._woq_ok)
    res["layers_on_reference_path"] = fallbacks
    res["decode_speedup"] = res["w4_decode_tok_s"] / res["bf16_decode_tok_s"]
    res["prefill_ratio"] = res["w4_prefill_s"] / res["bf16_prefill_s"]
    print(f"w4g{args.group_size}: decode {res['w4_decode_tok_s']:.2f} tok/s ({res['decode_speedup']:.2f}x bf16), "
          f"prefill {res['w4_prefill_s']:.3f} s ({res['prefill_ratio']:.2f}x bf16's time), "
          f"{fallbacks} layers on the reference path", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
