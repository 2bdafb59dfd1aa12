"""QuaRot rotations (fastround.quarot) on tiny unquantized Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k norms)
models: the rotated model's logits equal the original's at fp32 tolerance for online and offline R1 (with norm
fusion and untying), R2 (v bias rotated) and R4 (K·2^m intermediate sizes through SpinQuant's K rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastround import quarot as Q
from fastround import transform_ops as T


def _tiny(kind: str, inter: int = 96, tied: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**common)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    for name, p in model.named_parameters():  # norms and biases away from 1 / 0 so that fusion and R2 matter
        if p.dim() == 1:
            p.data = p.data + torch.randn_like(p) * 0.2
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


CASES = [
    # config, intermediate size (96 = 12·8, 160 = 40·4 for R4's K rule)
    (dict(), 96),
    (dict(online_r1_rotation=False), 96),
    (dict(online_r1_rotation=False, r4=True), 96),
    (dict(r4=True), 160),
    (dict(rotation_size=32, r4=True), 96),
    (dict(rotation_size=16, online_r1_rotation=False, r4=True), 160),
]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("fields,inter", CASES)
def test_logits_unchanged(kind, fields, inter) -> None:
    model = _tiny(kind, inter)
    before = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    Q.apply_quarot(model, Q.QuaRotConfig(**fields))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert any("v_proj" in n for n in changed) and any("o_proj" in n for n in changed)
    if fields.get("r4"):
        assert any("down_proj" in n for n in changed)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=5e-5)


def test_offline_r1_unties_embeddings() -> None:
    model = _tiny("llama", tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _logits(model)
    Q.apply_quarot(model, Q.QuaRotConfig(online_r1_rotation=False))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=5e-5)


def test_v_bias_is_rotated() -> None:
    """Upstream's QUIRK: R2 leaves the v_proj bias unrotated, which changes a Qwen2 model's outputs."""
    model = _tiny("qwen2")
    bias = model.model.layers[0].self_attn.v_proj.bias.detach().clone()
    Q.apply_quarot(model, Q.QuaRotConfig(r1=False))
    got = model.model.layers[0].self_attn.v_proj.bias
    want = (bias.view(2, 16).double() @ (T.sylvester(16) / 4)).view(-1).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_sizes_that_do_not_fit_disable_their_rotation(caplog) -> None:
    model = _tiny("llama", inter=88)  # 88 = 11·8: no SpinQuant K
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    Q.apply_quarot(model, Q.QuaRotConfig(r4=True, r1=False, r2=False))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down)
    assert "R4 disabled" in caplog.text
    with pytest.raises(ValueError, match="rotation_size"):
        Q.QuaRotConfig(rotation_size=48)
    model = _tiny("qwen3")
    model.config.head_dim = 12  # R3 needs a power-of-two head_dim (the weights are not read on that path)
    Q.apply_quarot(model, Q.QuaRotConfig(r1=False, r2=False, r3=True))
    assert "R3 disabled" in caplog.text and "forward" not in vars(model.model.layers[0].self_attn)


def test_spinquant_k_rule_and_matrices_equal_upstream() -> None:
    from auto_round.algorithms.transforms.spinquant.known_hadamard import KNOWN_HADAMARD_MATRICES
    from auto_round.algorithms.transforms.spinquant.rotation_utils import get_hadamard_K

    for n in (96, 160, 448, 3072, 5120, 11008, 12288, 13824, 14336, 4096):
        assert T.spinquant_divisor(n) == get_hadamard_K(n)[1]
    assert T.spinquant_divisor(18944) == 0
    for k in T.SPINQUANT_K_ORDER:
        theirs = KNOWN_HADAMARD_MATRICES[k]().to(torch.int8)
        assert torch.equal(T.spinquant_matrix(k), theirs) == (k != 20), k


QUAROT_RTN = [("quarot", False), ({"algorithm": "spinquant", "online_r1_rotation": False, "rotation_size": 32}, True)]


@pytest.fixture(scope="module")
def upstream_quarot_rtn(checkpoint, tmp_path_factory) -> list[str]:
    """Upstream's checkpoint folder for each QUAROT_RTN rotation_config, both runs from one UpstreamRuns."""
    from test_rotation import COMMON, UpstreamRuns, _texts

    root = tmp_path_factory.mktemp("quarot_upstream")
    src = checkpoint("llama_aligned")
    runs = UpstreamRuns([(dict(COMMON, dataset=_texts(), src=str(src), scheme="W4A16", rotation_config=rc),
                          root / f"up{i}") for i, (rc, _) in enumerate(QUAROT_RTN)]).wait()
    return [str(folder) for folder, _ in runs]


@pytest.mark.parametrize("rotation_config,r1", QUAROT_RTN)
def test_quarot_rtn_matches_upstream(checkpoint, tmp_path, upstream_quarot_rtn, rotation_config, r1) -> None:
    """W4A16 RTN on the aligned Llama: "quarot" (hidden 160: R1 off as upstream decides, R2 on head_dim 32), and
    offline block R1 of 32 (untied, RMSNorm fused, embedding and lm_head rotated) with R2: every tensor
    (spinquant_R1 / spinquant_R2_head included) and config.json equal upstream's.
    quantization_config.json also carries spinquant_config here; upstream adds it there only when some layer got
    rotation buffers (docs/compatibility.md)."""
    import json

    import oracle
    from test_rotation import COMMON, _texts

    from fastround import AutoRound

    src = checkpoint("llama_aligned")
    theirs = upstream_quarot_rtn[[rc for rc, _ in QUAROT_RTN].index(rotation_config)]
    ar = AutoRound(str(src), dataset=_texts(), **COMMON, scheme="W4A16", rotation_config=rotation_config)
    _, ours = ar.quantize_and_save(str(tmp_path / "fr"), format="auto_round")
    # the tokenizer files: upstream saves its tokenizer as its calibration left it (fastround's RTN reads no data)
    ignore = (".cache", "fastround_summary.json", "tokenizer.json", "tokenizer_config.json")
    diff = oracle.compare_checkpoints(ours, theirs, ignore=ignore)
    assert [d for d in diff if not d.startswith("quantization_config.json.spinquant_config: only in A")] == []
    q = json.loads((tmp_path / "fr" / Path(ours).name / "config.json").read_text())["quantization_config"]
    assert q["spinquant_config"]["r1"] is r1 and q["spinquant_config"]["r2"] is True
