"""Pieces the benchmark scripts share: synthetic checkpoints with real layer shapes, the process-tree peak-RSS
sampler, the page-cache warmer and the machine description."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

SHAPES = {
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, experts=0, moe_inter=0,
                      model_type="llama", arch="LlamaForCausalLM", vocab=128256, layers=32),
    "qwen3-30b-a3b": dict(hidden=2048, inter=6144, heads=32, kv=4, head_dim=128, experts=128, moe_inter=768,
                          model_type="qwen3_moe", arch="Qwen3MoeForCausalLM", vocab=151936, layers=48),
    # Llama-shaped but small enough that a run takes seconds on two cores (smoke tests)
    "tiny": dict(hidden=512, inter=1536, heads=8, kv=2, head_dim=64, experts=0, moe_inter=0,
                 model_type="llama", arch="LlamaForCausalLM", vocab=1024, layers=1),
}


# ---- synthetic checkpoints --------------------------------------------------------------------------------


def layer_tensors(s: dict, i: int) -> list[tuple[str, list[int]]]:
    h, p = s["hidden"], f"model.layers.{i}."
    q, kv = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    out = [
        (p + "input_layernorm.weight", [h]),
        (p + "post_attention_layernorm.weight", [h]),
        (p + "self_attn.q_proj.weight", [q, h]),
        (p + "self_attn.k_proj.weight", [kv, h]),
        (p + "self_attn.v_proj.weight", [kv, h]),
        (p + "self_attn.o_proj.weight", [h, q]),
    ]
    if s["experts"]:
        out += [(p + "self_attn.q_norm.weight", [s["head_dim"]]), (p + "self_attn.k_norm.weight", [s["head_dim"]])]
        out.append((p + "mlp.gate.weight", [s["experts"], h]))
        for e in range(s["experts"]):
            for proj, shape in (("gate_proj", [s["moe_inter"], h]), ("up_proj", [s["moe_inter"], h]),
                                ("down_proj", [h, s["moe_inter"]])):
                out.append((f"{p}mlp.experts.{e}.{proj}.weight", shape))
    else:
        i_ = s["inter"]
        out += [(p + "mlp.gate_proj.weight", [i_, h]), (p + "mlp.up_proj.weight", [i_, h]),
                (p + "mlp.down_proj.weight", [h, i_])]
    return out


def block_params(model: str) -> int:
    """Parameters of one decoder layer of `model`."""
    return sum(int(math.prod(shape)) for _, shape in layer_tensors(SHAPES[model], 0))


def build_checkpoint(root: Path, model: str, layers: int, vocab: int, shard_gb: float) -> Path:
    """bf16 weights ~ N(0, 0.02), norms 1; shards cut at shard_gb like save_pretrained. Reused if present."""
    import torch
    from safetensors.torch import save_file

    s = dict(SHAPES[model], layers=layers, vocab=vocab)
    d = root / f"{model}-L{layers}-V{vocab}"
    if (d / "config.json").exists():
        return d
    tmp = d.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [("model.embed_tokens.weight", [vocab, s["hidden"]])]
    for i in range(layers):
        names += layer_tensors(s, i)
    names += [("model.norm.weight", [s["hidden"]]), ("lm_head.weight", [vocab, s["hidden"]])]
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    limit = int(shard_gb * 1e9)
    for name, shape in names:
        n = 2 * int(torch.Size(shape).numel())
        if size and size + n > limit:
            shards.append({})
            size = 0
        t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else (
            torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shards[-1][name] = t
        size += n
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        tensors.clear()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    cfg = {
        "architectures": [s["arch"]], "model_type": s["model_type"], "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_hidden_layers": layers, "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"], "head_dim": s["head_dim"], "vocab_size": vocab, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }
    if s["experts"]:
        cfg.update(num_experts=s["experts"], num_experts_per_tok=8, moe_intermediate_size=s["moe_inter"],
                   decoder_sparse_step=1, norm_topk_prob=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(d)
    return d


def add_checkpoint_args(ap: argparse.ArgumentParser, shape_flag: str, layers: int, shard_gb: float) -> None:
    """The options that pick the synthetic checkpoint: its shape (under `shape_flag`), layers, vocabulary, shards."""
    ap.add_argument(shape_flag, choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=layers, help="decoder layers (the real models have 32 / 48)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary rows of embed_tokens and lm_head")
    ap.add_argument("--shard_gb", type=float, default=shard_gb)


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def checkpoint_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in shard_files(d))


READ_SCRIPT = """
import sys
buf = bytearray(1 << 24)
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
"""


def warm_page_cache(d: Path) -> None:
    subprocess.run([sys.executable, "-c", READ_SCRIPT, *map(str, shard_files(d))], check=True)


# ---- measurement --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    seconds: float
    peak_rss_gb: float  # the largest sum of RSS over the process tree, sampled every 20 ms
    returncode: int
    stdout: str  # all of it when asked for, else ""
    stderr_tail: str


def run_measured(cmd: list[str], env: dict[str, str], timeout: float, capture_stdout: bool = False,
                 cwd: Path | None = None) -> Measured:
    peak = [0]
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            peak[0] = max(peak[0], total)
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err = (err or "") + "\ntimeout"
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    return Measured(secs, peak[0] / 1e9, proc.returncode, out or "", (err or "")[-2000:])


def last_line(text: str, limit: int = 160) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:limit] if lines else ""


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.platform()}"


def portable_paths(value: Any) -> Any:
    """`value` with every occurrence of the $OUT folder in its strings written as "$OUT", so recorded results name
    no machine-specific path for what the device run hands back."""
    out = os.environ.get("OUT", "").rstrip("/")
    if not out:
        return value
    if isinstance(value, str):
        return value.replace(out, "$OUT")
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v) for v in value]
    return value


def write_json(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(portable_paths(payload), indent=2))
