"""Tiny checkpoints in already-quantized or fused source formats, for tests/test_sources.py.

Every builder writes a HuggingFace-style folder (config.json, one or more safetensors shards, an index
when sharded) whose bytes depend only on the builder's arguments. The formats follow what upstream
auto-round 0.16.1's model-free mode understands (facts in ../shared/reference/model-free.md §7 and docs/compatibility.md):

  fp8        DeepSeek-style FP8 block-scaled source: float8_e4m3fn `.weight` with an fp32
             `.weight_scale_inv` [ceil(out/128), ceil(in/128)], config quantization_config
             {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}. Three shards:
               A (listed first): k_proj.weight whose scale lives in C, q_proj/o_proj with their
                 scales (o_proj's is over-provisioned and has an input_scale companion) and an FP8
                 router mlp.gate.weight with its scale;
               B: up/down_proj with scales, FP8 lm_head with its scale, a norm;
               C (donor): k_proj.weight_scale_inv, model.norm, bf16 embed_tokens.
             Upstream processes donors first, so the output numbering is B, C, A.
             ue8m0=True adds scale_fmt "ue8m0" (model_type deepseek_v3) with power-of-two scales;
             cross_shard=False keeps every scale next to its weight.
  fp8 variants  build_fp8_variant: scales without a block size, elementwise scales, a nested
             quantization_config, float8_e8m0fnu scales.
  moe_fused  Qwen3-MoE-style fused 3-D experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I], without
             (layer 0) and with (layer 1, meant to be ignored by the caller) the `.weight` suffix;
             parents ending in "moe" (`block_sparse_moe.w13`, `moe.down_proj`, fp16 `moe.gate_up_proj`);
             `shared_experts.gate_up_proj`. build_moe_single writes one shard with given tensors.
  mxfp       compressed-tensors MXFP4 (`weight_packed` u8 + `weight_scale` u8 E8M0) and MXFP8
             (`weight` float8_e4m3fn + `weight_scale` u8) layers, an MXFP4 lm_head, a bf16 norm.
  nvfp4      NVFP4 layers in ModelOpt legacy naming (`weight` u8, `weight_scale_2`, `input_scale`) or its
             compressed-tensors twin (`weight_packed`, `weight_global_scale` = fp32(1/weight_scale_2)).
  modelopt_bare  TensorRT-LLM bare names `X` u8 + `X.scale` + `X.scale2` (+ `X.input_amax`), optionally
             with the scales in a second shard.
  kimi_int4  model_type kimi_k25: int32-word and uint8 INT4 `weight_packed`, bf16 scales, zero points.
  diffusers  a diffusers pipeline: model_index.json, a sharded transformer/ and a transformer_2/ (diffusers
             file names), vae/, text_encoder/, tokenizer/, scheduler/, README.md and LICENSE at the root.
  deepseek   model_type deepseek_v4 (`.scale` E8M0 grids, FP8 and MXFP4 bytes) or deepseek_v32 (ue8m0 fp32
             `weight_scale_inv` read as MX scales).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def _gen(name: str, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ (salt * 0x9E3779B1)) & 0x7FFFFFFF)


def bf16(name: str, *shape: int, std: float = 0.05) -> torch.Tensor:
    return (std * torch.randn(*shape, generator=_gen(name))).to(torch.bfloat16)


def fp8(name: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(name)).clamp(-448, 448).to(torch.float8_e4m3fn)


def scale_inv(name: str, *shape: int, pow2: bool = False) -> torch.Tensor:
    g = _gen(name, 1)
    if pow2:  # ue8m0-representable: 2^-k, k in 6..10
        return torch.pow(2.0, -torch.randint(6, 11, shape, generator=g).float())
    return (0.001 + 0.01 * torch.rand(*shape, generator=g)).float()


def write_checkpoint(
    path: Path, config: dict[str, Any], shards: dict[str, Tensors], index: bool | None = None
) -> Path:
    """shards: {file name: {tensor: value}}; the index weight_map lists shards in the given order."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for fname, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / fname), metadata={"format": "pt"})
        for k in tensors:
            weight_map[k] = fname
    if index if index is not None else len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


# ---------------------------------------------------------------------------------------------------
# FP8 (DeepSeek style)

FP8_H, FP8_I, FP8_VOCAB = 224, 352, 96  # in_features multiples of 32 (MXFP) but not of 128 (partial blocks)
FP8_SHARDS = tuple(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def _fp8_pair(name: str, rows: int, cols: int, pow2: bool, scale_shape: tuple[int, int] | None = None) -> Tensors:
    s = scale_shape or (-(-rows // 128), -(-cols // 128))
    return {f"{name}.weight": fp8(name, rows, cols), f"{name}.weight_scale_inv": scale_inv(name, *s, pow2=pow2)}


def fp8_config(ue8m0: bool = False) -> dict[str, Any]:
    qc: dict[str, Any] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    if ue8m0:
        qc["scale_fmt"] = "ue8m0"
    return {
        "architectures": ["DeepseekV3ForCausalLM" if ue8m0 else "LlamaForCausalLM"],
        "model_type": "deepseek_v3" if ue8m0 else "llama",
        "hidden_size": FP8_H,
        "intermediate_size": FP8_I,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 56,
        "vocab_size": FP8_VOCAB,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "dtype": "bfloat16",
        "quantization_config": qc,
    }


def fp8_shards(ue8m0: bool = False, cross_shard: bool = True) -> dict[str, Tensors]:
    H, I, V = FP8_H, FP8_I, FP8_VOCAB
    p = "model.layers.0."
    k = _fp8_pair(p + "self_attn.k_proj", 64, H, ue8m0)
    a: Tensors = {
        **(k if not cross_shard else {p + "self_attn.k_proj.weight": k[p + "self_attn.k_proj.weight"]}),
        **_fp8_pair(p + "self_attn.q_proj", 200, H, ue8m0),
        **_fp8_pair(p + "self_attn.o_proj", H, H, ue8m0, scale_shape=(3, 3)),  # over-provisioned [3,3] for [2,2]
        p + "self_attn.o_proj.input_scale": torch.tensor([0.25], dtype=torch.float32),
        **_fp8_pair(p + "mlp.gate", 8, H, ue8m0),  # router: kept FP8 with its scale
    }
    lm = _fp8_pair("lm_head", V, H, ue8m0)
    if not ue8m0:  # byte vectors from the fact sheet: 0x3B * 0.005078125 -> 0x3BE4, 0x3B * 0.0007 -> 0x3A7D
        lm["lm_head.weight"].view(torch.uint8)[0, 0] = 0x3B
        lm["lm_head.weight"].view(torch.uint8)[0, 130] = 0x3B
        lm["lm_head.weight_scale_inv"][0, 0] = 0.005078125
        lm["lm_head.weight_scale_inv"][0, 1] = 0.0007
    b: Tensors = {
        p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        **_fp8_pair(p + "mlp.up_proj", I, H, ue8m0),
        **_fp8_pair(p + "mlp.down_proj", H, I, ue8m0),
        **lm,
    }
    c: Tensors = {
        # the donated scale (cross_shard) lives here
        **({n: v for n, v in k.items() if n.endswith("weight_scale_inv")} if cross_shard else {}),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "model.embed_tokens.weight": bf16("model.embed_tokens", V, H, std=0.02),
    }
    return dict(zip(FP8_SHARDS, (a, b, c)))


def build_fp8(path: Path, ue8m0: bool = False, cross_shard: bool = True) -> Path:
    """cross_shard=False keeps k_proj's scale next to its weight (no donor; source shard order kept)."""
    return write_checkpoint(path, fp8_config(ue8m0), fp8_shards(ue8m0, cross_shard))


def build_fp8_variant(path: Path, variant: str) -> Path:
    """Single-shard FP8 sources for the other scale layouts upstream accepts.

    noblock      no weight_block_size: scale_inv 0-D, [1], [rows], [rows, 1] and [cols] (broadcast)
    elementwise  no weight_block_size: scale_inv of the weight's own shape
    nested       block scales, but quantization_config lives under text_config (upstream searches depth-first)
    e8m0         scale_fmt ue8m0 with float8_e8m0fnu scale_inv tensors
    """
    H, p = FP8_H, "model.layers.0."
    config = fp8_config(ue8m0=variant == "e8m0")
    if variant in ("noblock", "elementwise"):
        del config["quantization_config"]["weight_block_size"]
    t: Tensors = {"model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    if variant == "noblock":
        for proj, shape in (("q_proj", ()), ("k_proj", (1,)), ("v_proj", (64,)), ("o_proj", (64, 1))):
            name = p + "self_attn." + proj
            t[name + ".weight"] = fp8(name, 64, H)
            t[name + ".weight_scale_inv"] = scale_inv(name, *shape) if shape else torch.tensor(0.0123)
        t[p + "mlp.up_proj.weight"] = fp8(p + "mlp.up_proj", 64, H)
        t[p + "mlp.up_proj.weight_scale_inv"] = scale_inv(p + "mlp.up_proj", H)  # per column
    elif variant == "elementwise":
        t.update(_fp8_pair(p + "mlp.up_proj", 64, H, False, scale_shape=(64, H)))
    elif variant == "nested":
        config["text_config"] = {"model_type": "llama", "quantization_config": config.pop("quantization_config")}
        t.update(_fp8_pair(p + "mlp.up_proj", 200, H, False))
    elif variant == "e8m0":
        t.update(_fp8_pair(p + "mlp.up_proj", 200, H, True))
        e = torch.tensor([[120, 121], [119, 125]], dtype=torch.uint8)
        t[p + "mlp.up_proj.weight_scale_inv"] = e.view(torch.float8_e8m0fnu)
    else:
        raise ValueError(variant)
    return write_checkpoint(path, config, {"model.safetensors": t})


# ---------------------------------------------------------------------------------------------------
# Fused 3-D experts

MOE_E, MOE_I, MOE_H = 3, 40, 64


def moe_config(num_layers: int = 4) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": MOE_H,
        "intermediate_size": 96,
        "moe_intermediate_size": MOE_I,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "num_experts": MOE_E,
        "num_experts_per_tok": 2,
        "vocab_size": 32,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def build_moe_fused(path: Path) -> Path:
    E, I, H = MOE_E, MOE_I, MOE_H
    s1: Tensors = {
        "model.embed_tokens.weight": bf16("embed", 32, H),
        "model.layers.0.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": bf16("q0", 64, H),
        "model.layers.0.mlp.gate.weight": bf16("router0", E, H),
        "model.layers.0.mlp.experts.gate_up_proj": bf16("gu0", E, 2 * I, H),  # no .weight suffix
        "model.layers.0.mlp.experts.down_proj": bf16("dn0", E, H, I),
    }
    s2: Tensors = {
        # with the .weight suffix; the caller ignores layer 1: split but not quantized
        "model.layers.1.mlp.experts.gate_up_proj.weight": bf16("gu1", E, 2 * I, H),
        "model.layers.1.mlp.experts.down_proj.weight": bf16("dn1", E, H, I),
        # parents ending in "moe": target <parent>.experts.{i}
        "model.layers.2.block_sparse_moe.w13": bf16("w13", E, 2 * I, H),
        "model.layers.2.moe.down_proj": bf16("dn2", E, H, I),
        "model.layers.2.mlp.shared_experts.gate_up_proj": bf16("sgu2", 2, 2 * I, H),
        # a parent named "moe", fp16
        "model.layers.3.moe.gate_up_proj": bf16("gu3", 2, 2 * I, H).to(torch.float16),
        "model.layers.3.moe.down_proj.weight": bf16("dn3", 2, H, I).to(torch.float16),
        "lm_head.weight": bf16("lm_head", 32, H),
    }
    return write_checkpoint(
        path, moe_config(), {"model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2}
    )


def build_moe_single(path: Path, tensors: Tensors, num_layers: int = 1) -> Path:
    """One-shard MoE checkpoint holding exactly `tensors` (plus a norm)."""
    t = {"model.norm.weight": torch.ones(MOE_H, dtype=torch.bfloat16), **tensors}
    return write_checkpoint(path, moe_config(num_layers), {"model.safetensors": t})


# ---------------------------------------------------------------------------------------------------
# MXFP4 / MXFP8 (compressed-tensors naming)


def mxfp4(name: str, rows: int, cols: int) -> Tensors:
    """MXFP4 layer with `cols` logical inputs: weight_packed [rows, cols/2] u8, weight_scale [rows, cols/32] u8."""
    g = _gen(name, 2)
    packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(118, 130, (rows, cols // 32), generator=g, dtype=torch.uint8)
    return {f"{name}.weight_packed": packed, f"{name}.weight_scale": scale}


def mxfp8(name: str, rows: int, cols: int) -> Tensors:
    g = _gen(name, 3)
    w = torch.randn(rows, cols, generator=g).to(torch.float8_e4m3fn)
    scale = torch.randint(118, 130, (rows, cols // 32), generator=g, dtype=torch.uint8)
    return {f"{name}.weight": w, f"{name}.weight_scale": scale}


def mxfp_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 64,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "quantization_config": {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized"},
    }


def mxfp_tensors(router: bool = False) -> Tensors:
    p = "model.layers.0."
    up = mxfp4(p + "mlp.up_proj", 128, 128)
    up[p + "mlp.up_proj.weight_packed"][0, 0] = 0xF7  # low nibble +6.0, high nibble -6.0
    up[p + "mlp.up_proj.weight_scale"][0, 0] = 124  # 2^-3 -> bf16 0x3F40, 0xBF40
    down = mxfp8(p + "mlp.down_proj", 128, 128)
    down[p + "mlp.down_proj.weight"].view(torch.uint8)[0, 0] = 0x3B
    down[p + "mlp.down_proj.weight_scale"][0, 0] = 120  # 1.375 * 2^-7 -> bf16 0x3C30
    t: Tensors = {
        **up,
        **down,
        **mxfp4(p + "self_attn.q_proj", 128, 128),
        **mxfp8(p + "self_attn.o_proj", 128, 128),
        **mxfp4("lm_head", 64, 128),
        p + "input_layernorm.weight": torch.ones(128, dtype=torch.bfloat16),
        "model.embed_tokens.weight": bf16("embed", 64, 128),
    }
    if router:
        t.update(mxfp4(p + "mlp.gate", 8, 128))
    return t


def build_mxfp(path: Path, router: bool = False) -> Path:
    return write_checkpoint(path, mxfp_config(), {"model.safetensors": mxfp_tensors(router)})


# ---------------------------------------------------------------------------------------------------
# NVFP4 (ModelOpt legacy naming and compressed-tensors naming), kimi_k25 INT4, DeepSeek V4 / V3.2 E8M0

NV_LAYERS = (("self_attn.q_proj", 128, 128), ("self_attn.o_proj", 128, 128), ("mlp.up_proj", 96, 128),
             ("mlp.down_proj", 128, 96))


def _nvfp4_parts(name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random E2M1 codes [rows, cols/2] u8, E4M3 block scales [rows, cols/16], weight_scale_2 and input_scale."""
    g = _gen(name, 4)
    packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
    block = (0.25 + 4 * torch.rand(rows, cols // 16, generator=g)).to(torch.float8_e4m3fn)
    block[0, 0] = 0.0  # a zero block scale
    s2 = (1e-3 + 1e-2 * torch.rand(1, generator=g)).float().reshape(())
    inp = (0.01 + torch.rand(1, generator=g)).float().reshape(())
    return packed, block, s2, inp


def nvfp4_tensors(naming: str) -> Tensors:
    """naming "legacy": ModelOpt (`weight` u8, `weight_scale_2`, `input_scale`); "ct": compressed-tensors
    (`weight_packed`, `weight_global_scale` = fp32(1 / weight_scale_2), `input_global_scale` likewise)."""
    p = "model.layers.0."
    t: Tensors = {}
    for proj, rows, cols in NV_LAYERS:
        packed, block, s2, inp = _nvfp4_parts(p + proj, rows, cols)
        layer = p + proj
        if naming == "legacy":
            t.update({f"{layer}.weight": packed, f"{layer}.weight_scale": block, f"{layer}.weight_scale_2": s2,
                      f"{layer}.input_scale": inp})
        else:
            t.update({f"{layer}.weight_packed": packed, f"{layer}.weight_scale": block,
                      f"{layer}.weight_global_scale": (1.0 / s2).reshape(1),
                      f"{layer}.input_global_scale": (1.0 / inp).reshape(1)})
    t[p + "input_layernorm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    t["model.embed_tokens.weight"] = bf16("embed", 64, 128)
    t["lm_head.weight"] = bf16("lm_head", 64, 128)
    return t


def build_nvfp4(path: Path, naming: str) -> Path:
    cfg = mxfp_config()
    cfg["quantization_config"] = (
        {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
        if naming == "legacy"
        else {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}
    )
    return write_checkpoint(path, cfg, {"model.safetensors": nvfp4_tensors(naming)})


def _int4_codes(name: str, rows: int, cols: int) -> torch.Tensor:
    return torch.randint(0, 16, (rows, cols), generator=_gen(name, 5), dtype=torch.int32)


def _pack_nibbles(q: torch.Tensor, per: int) -> torch.Tensor:
    """[rows, cols] nibbles -> int32 words of 8 (per=8) or uint8 bytes of 2 (per=2), first element lowest."""
    rows, cols = q.shape
    q = q.reshape(rows, cols // per, per).to(torch.int64)
    word = sum(q[..., i] << (4 * i) for i in range(per))
    if per == 8:
        return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.to(torch.uint8)


def kimi_int4_tensors() -> Tensors:
    """kimi_k25 INT4: int32 words with bf16 group-32 scales and weight_shape (no zero point, q - 8); a uint8
    layer with a per-group zero point; a uint8 layer whose zero point is packed like the weight."""
    p = "model.layers.0."
    t: Tensors = {}
    for proj, rows, cols, mode in (("self_attn.q_proj", 128, 128, "i32"), ("self_attn.o_proj", 128, 128, "i32"),
                                   ("mlp.up_proj", 96, 128, "zp_group"), ("mlp.down_proj", 128, 96, "zp_packed")):
        layer = p + proj
        q = _int4_codes(layer, rows, cols)
        g = _gen(layer, 6)
        t[f"{layer}.weight_scale"] = (0.001 + 0.01 * torch.rand(rows, cols // 32, generator=g)).to(torch.bfloat16)
        if mode == "i32":
            t[f"{layer}.weight_packed"] = _pack_nibbles(q, 8)
            t[f"{layer}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        else:
            t[f"{layer}.weight_packed"] = _pack_nibbles(q, 2)
            if mode == "zp_group":
                t[f"{layer}.weight_zero_point"] = torch.randint(0, 16, (rows, cols // 32), generator=g, dtype=torch.uint8)
            else:
                t[f"{layer}.weight_zero_point"] = _pack_nibbles(_int4_codes(layer + ".zp", rows, cols), 2)
    t[p + "input_layernorm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    t["model.embed_tokens.weight"] = bf16("embed", 64, 128)
    t["lm_head.weight"] = bf16("lm_head", 64, 128)
    return t


def build_kimi_int4(path: Path) -> Path:
    cfg = mxfp_config()
    cfg["model_type"] = "kimi_k25"
    cfg["architectures"] = ["KimiK25ForConditionalGeneration"]
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "group_size": 32, "sym": True}
    return write_checkpoint(path, cfg, {"model.safetensors": kimi_int4_tensors()})


def e8m0(name: str, *shape: int) -> torch.Tensor:
    return torch.randint(118, 132, shape, generator=_gen(name, 7), dtype=torch.uint8)


def deepseek_tensors(version: str) -> Tensors:
    """v4: FP8 `weight` + `scale` on a coarse 128x128 grid (u8, fp32 exponent-only, and an exact-multiple
    grid), int8 MXFP4 bytes + u8 `scale` [rows, cols/32]. v32: FP8 weights + fp32 ue8m0 `weight_scale_inv`."""
    p = "model.layers.0."
    H, I = FP8_H, FP8_I
    t: Tensors = {}
    if version == "v4":
        t[p + "self_attn.q_proj.weight"] = fp8(p + "q", H, H)
        t[p + "self_attn.q_proj.scale"] = e8m0(p + "q", -(-H // 128), -(-H // 128))  # coarse grid, cropped
        t[p + "self_attn.o_proj.weight"] = fp8(p + "o", H, H)
        t[p + "self_attn.o_proj.scale"] = torch.pow(2.0, (e8m0(p + "o", 2, 7).float() - 127)).float()  # fp32
        t[p + "mlp.up_proj.weight"] = torch.randint(-128, 128, (I, H // 2), generator=_gen(p + "up"), dtype=torch.int8)
        t[p + "mlp.up_proj.scale"] = e8m0(p + "up", I, H // 32)
        t[p + "mlp.down_proj.weight"] = torch.randint(0, 256, (H, I // 2), generator=_gen(p + "down"), dtype=torch.uint8)
        t[p + "mlp.down_proj.scale"] = e8m0(p + "down", H // 32, I // 32)  # whole multiple along rows
    else:
        for proj, rows, cols in (("self_attn.q_proj", H, H), ("self_attn.o_proj", H, H), ("mlp.up_proj", I, H),
                                 ("mlp.down_proj", H, I)):
            t.update(_fp8_pair(p + proj, rows, cols, pow2=True))
    t[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["model.embed_tokens.weight"] = bf16("embed", FP8_VOCAB, H)
    t["lm_head.weight"] = bf16("lm_head", FP8_VOCAB, H)
    return t


def build_deepseek(path: Path, version: str) -> Path:
    cfg = fp8_config(ue8m0=True)
    cfg["model_type"] = "deepseek_" + version
    cfg["architectures"] = ["DeepseekV4ForCausalLM" if version == "v4" else "DeepseekV32ForCausalLM"]
    return write_checkpoint(path, cfg, {"model.safetensors": deepseek_tensors(version)})


def modelopt_bare_tensors() -> Tensors:
    """TensorRT-LLM / ModelOpt NVFP4 under bare names: uint8 `X` with `X.scale` (E4M3 per 16), `X.scale2`
    (global multiplier), `X.input_amax`; next to an ordinary bf16 layer."""
    p = "model.layers.0.mlp."
    t: Tensors = {}
    for name, rows, cols in (("w2_weight", 128, 96), ("w13_weight", 192, 128)):
        packed, block, s2, inp = _nvfp4_parts(p + name, rows, cols)
        t.update({p + name: packed, f"{p}{name}.scale": block, f"{p}{name}.scale2": s2.reshape(1),
                  f"{p}{name}.input_amax": inp.reshape(1)})
    t["model.layers.0.self_attn.q_proj.weight"] = bf16("q", 128, 128)
    t["model.embed_tokens.weight"] = bf16("embed", 64, 128)
    return t


def build_modelopt_bare(path: Path, split_scales: bool = False) -> Path:
    """split_scales: the `.scale` tensors live in a second shard (fastround refuses; see docs/compatibility.md)."""
    cfg = mxfp_config()
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    t = modelopt_bare_tensors()
    if not split_scales:
        return write_checkpoint(path, cfg, {"model.safetensors": t})
    second = {k: v for k, v in t.items() if k.endswith(".scale")}
    first = {k: v for k, v in t.items() if k not in second}
    return write_checkpoint(path, cfg, {"model-00001-of-00002.safetensors": first,
                                        "model-00002-of-00002.safetensors": second})


# ---------------------------------------------------------------------------------------------------
# A diffusers pipeline folder: model_index.json, no root config.json, a transformer/ (sharded, diffusers
# file names) and a transformer_2/ to quantize, and other components to copy as they are.

DIFFUSERS_COMPONENTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")


def _dit_tensors(prefix: str, blocks: int) -> Tensors:
    t: Tensors = {}
    for b in range(blocks):
        p = f"transformer_blocks.{b}."
        for proj, rows, cols in (("attn.to_q", 64, 64), ("attn.to_k", 64, 64), ("attn.to_out.0", 64, 64),
                                 ("ff.net.0.proj", 128, 64), ("ff.net.2", 64, 128)):
            t[f"{p}{proj}.weight"] = bf16(prefix + p + proj, rows, cols)
            t[f"{p}{proj}.bias"] = bf16(prefix + p + proj + ".b", rows)
        t[f"{p}norm1.linear.weight"] = bf16(prefix + p + "norm1", 192, 64)
    t["x_embedder.weight"] = bf16(prefix + "x_embedder", 64, 32)
    t["proj_out.weight"] = bf16(prefix + "proj_out", 32, 64)
    return t


def build_diffusers(path: Path, sharded: bool = True) -> Path:
    """Weights are bf16 with in_features multiples of 64, so every INT group size up to 64 divides them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "ToyPipeline", "_diffusers_version": "0.36.0", "scheduler": ["diffusers", "Toy"],
             "text_encoder": ["transformers", "ToyText"], "tokenizer": ["transformers", "ToyTokenizer"],
             "transformer": ["diffusers", "ToyTransformer"], "transformer_2": ["diffusers", "ToyTransformer"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    (path / "README.md").write_text("# toy pipeline\n")
    (path / "LICENSE").write_text("toy license\n")
    for name, blocks in (("transformer", 2), ("transformer_2", 1)):
        cfg = {"_class_name": "ToyTransformer", "_diffusers_version": "0.36.0", "num_layers": blocks}
        t = _dit_tensors(name, blocks)
        comp = path / name
        comp.mkdir()
        if sharded and name == "transformer":
            keys = sorted(t)
            half = len(keys) // 2
            shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": {k: t[k] for k in keys[:half]},
                      "diffusion_pytorch_model-00002-of-00002.safetensors": {k: t[k] for k in keys[half:]}}
            for fname, part in shards.items():
                save_file(part, str(comp / fname), metadata={"format": "pt"})
            weight_map = {k: f for f, part in shards.items() for k in part}
            (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
        else:
            save_file(t, str(comp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        (comp / "config.json").write_text(json.dumps(cfg, indent=2))
    vae = path / "vae"
    vae.mkdir()
    save_file({"encoder.conv_in.weight": bf16("vae.conv", 8, 3, 3, 3), "decoder.mid.attn.to_q.weight": bf16("vae.q", 32, 32)},
              str(vae / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    te = path / "text_encoder"
    te.mkdir()
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": bf16("te.q", 32, 32)},
              str(te / "model.safetensors"), metadata={"format": "pt"})
    (te / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "hidden_size": 32}))
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "Toy", "steps": 4}))
    return path
