"""Build a small Llama checkpoint deterministically, then quantize it model-free to W4A16.

    python examples/quantize_tiny_llama.py --output_dir tiny-llama-w4a16
"""

from __future__ import annotations

import argparse
import logging
import os

import torch


def build_tiny_llama(path: str) -> str:
    """A 2-layer Llama with real-model proportions, saved in 3 bf16 safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="600KB")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", default="examples/tiny-llama")
    parser.add_argument("--output_dir", default="examples/tiny-llama-w4a16")
    parser.add_argument("--scheme", default="W4A16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from fastround import AutoRound

    source = build_tiny_llama(args.source_dir)
    AutoRound(source, scheme=args.scheme, model_free=True).quantize_and_save(args.output_dir)
    print(f"quantized checkpoint written to {args.output_dir}")


if __name__ == "__main__":
    main()
