"""Loading NVFP4 (scheme "NVFP4": data_type nv_fp, E2M1 codes, E4M3 scales per 16 inputs, fp32 weight_global_scale
and input_global_scale) auto_round checkpoints on fastround's FPQuantLinear, written by fastround and by
auto-round 0.16.1 (SignRound, 2 iterations) from a tiny Llama.

Both load with fastround.load_quantized and with `import fastround; AutoModelForCausalLM.from_pretrained` in a
subprocess where auto_round cannot be imported. Their logits must equal a reference built here from the safetensors
alone: each quantized Linear's weight is E2M1 value x E4M3 scale / weight_global_scale (torch ops, not fastround's),
and its input goes through upstream's own NVFP4 activation qdq under input_global_scale, which upstream's
NVFP4QuantLinear applies in every forward (the checkpoints are W4A4). One layer is also compared with upstream's
NVFP4QuantLinear directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from test_hf_load import _BLOCK, _run_child
from test_signround import _run

IDS = [[1, 5, 9, 17, 30, 4, 22, 8, 3, 40, 12, 7, 2, 19, 33, 6]]
N_LINEAR = 14  # 2 blocks x 7 Linear; lm_head stays

_CHILD = """
import json, sys
import torch
import fastround
from fastround.quant_linear import FPQuantLinear
from transformers import AutoModelForCausalLM

spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["ids"])
out = {"cases": {}}
for name, folder in spec["folders"].items():
    for how in ("load_quantized", "from_pretrained"):
        if how == "load_quantized":
            model = fastround.load_quantized(folder, device="cpu", dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        layers = [m for m in model.modules() if isinstance(m, FPQuantLinear)]
        with torch.inference_mode():
            logits = model(ids).logits
            gen = model.generate(ids[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
        path = f"{spec['out']}/{name}-{how}.pt"
        torch.save(logits, path)
        out["cases"][f"{name}/{how}"] = {
            "logits": path, "gen": gen.tolist(), "n": len(layers), "act": sum(m.act_nvfp4 for m in layers),
            "encodings": sorted({m.encoding for m in layers}),
            "gs_dtypes": sorted({str(m.weight_global_scale.dtype) for m in layers})}
out["blocked_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "auto_round")
print("RESULT " + json.dumps(out))
"""

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """E2M1 value x E4M3 scale / weight_global_scale, [out, in] fp32."""
    packed = tensors[f"{name}.weight_packed"]
    codes = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.long)
    codes[:, 0::2] = (packed & 0xF).long()  # element 2k in the low nibble
    codes[:, 1::2] = (packed >> 4).long()
    values = _E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = tensors[f"{name}.weight_scale"]
    assert scale.dtype == torch.float8_e4m3fn and scale.shape[1] * 16 == codes.shape[1]
    gs = tensors[f"{name}.weight_global_scale"]
    assert gs.dtype == torch.float32 and gs.numel() == 1
    return values * scale.float().repeat_interleave(16, dim=1) / gs.item()


def _reference(src: Path, folder: Path) -> torch.nn.Module:
    """The source model with the checkpoint's tensors, each quantized Linear's weight dequantized as above and its
    input quantize-dequantized by upstream's NVFP4 activation op under the layer's input_global_scale."""
    from auto_round.experimental.qmodules.nvfp4 import _nv_fp4_with_static_gs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = _tensors(folder)
    state = model.state_dict()
    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    assert len(names) == N_LINEAR
    with torch.no_grad():
        for key, t in tensors.items():
            if key in state:
                state[key].copy_(t.float())
        for name in names:
            linear = model.get_submodule(name)
            linear.weight.copy_(_dequantized(tensors, name))
            gs = tensors[f"{name}.input_global_scale"].float()

            def qdq(module: Any, args: tuple[torch.Tensor, ...], gs: torch.Tensor = gs) -> tuple[torch.Tensor]:
                return (_nv_fp4_with_static_gs(args[0].float(), gs)[0].to(args[0].dtype),)

            linear.register_forward_pre_hook(qdq)
    return model


@pytest.fixture(scope="module")
def nvfp4(checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    src = checkpoint("llama_aligned")
    root = tmp_path_factory.mktemp("load_nvfp4")
    kwargs = {"scheme": "NVFP4", "iters": 2, "lr": 0.02}
    folders = {who: _run(who, src, root / who, "auto_round", **kwargs) for who in ("fastround", "upstream")}
    (root / "logits").mkdir()
    result = _run_child(_BLOCK + _CHILD, {"folders": {k: str(v) for k, v in folders.items()}, "ids": IDS,
                                          "out": str(root / "logits")})
    result["folders"], result["src"] = folders, src
    return result


def test_loads_without_auto_round(nvfp4: dict[str, Any]) -> None:
    assert nvfp4["blocked_loaded"] == []
    assert len(nvfp4["cases"]) == 4
    for case, r in nvfp4["cases"].items():
        assert (r["n"], r["act"], r["encodings"], r["gs_dtypes"]) == (N_LINEAR, N_LINEAR, ["nvfp4"],
                                                                       ["torch.float32"]), case


@pytest.mark.parametrize("producer", ["fastround", "upstream"])
def test_logits_equal_dequantized_reference(nvfp4: dict[str, Any], producer: str) -> None:
    ref = _reference(nvfp4["src"], nvfp4["folders"][producer])
    ids = torch.tensor(IDS)
    with torch.inference_mode():
        want = ref(ids).logits
        gen_want = ref.generate(ids[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    for how in ("load_quantized", "from_pretrained"):
        r = nvfp4["cases"][f"{producer}/{how}"]
        got = torch.load(r["logits"])
        diff = (got - want).abs().max().item()
        assert diff <= 2e-5 * max(1.0, want.abs().max().item()), (how, diff)
        assert r["gen"] == gen_want.tolist(), how


def test_activation_qdq_matters(nvfp4: dict[str, Any]) -> None:
    """The reference without the activation qdq differs: the comparison above covers the W4A4 path."""
    ref = _reference(nvfp4["src"], nvfp4["folders"]["upstream"])
    for module in ref.modules():
        module._forward_pre_hooks.clear()
    with torch.inference_mode():
        weight_only = ref(torch.tensor(IDS)).logits
    got = torch.load(nvfp4["cases"]["upstream/from_pretrained"]["logits"])
    assert (got - weight_only).abs().max().item() > 1e-3


def test_layer_equals_upstream_nvfp4_quant_linear(nvfp4: dict[str, Any]) -> None:
    from auto_round.experimental.qmodules.nvfp4 import NVFP4QuantLinear
    from auto_round.schemes import PRESET_SCHEMES

    from fastround.quant_linear import FPQuantLinear

    tensors = _tensors(nvfp4["folders"]["upstream"])
    name = "model.layers.1.mlp.down_proj"
    state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    out_f, in_f = state["weight_packed"].shape[0], state["weight_packed"].shape[1] * 2
    theirs = NVFP4QuantLinear(in_f, out_f, PRESET_SCHEMES["NVFP4"], dtype=torch.float32)
    theirs.load_state_dict(state)
    ours = FPQuantLinear(in_f, out_f, "nvfp4", act_nvfp4=True, input_global_scale=True)
    ours.load_state_dict(state)
    torch.testing.assert_close(ours.dequantize(), theirs.dequant_weight_online(), rtol=0, atol=0)
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(ours.quantize_input(x), theirs.qdq_input(x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # the input scale is read from its buffer once, and again after the buffer is written (a later load)
    before = ours.quantize_input(x)
    halved = {**state, "input_global_scale": state["input_global_scale"] * 0.5}
    theirs.load_state_dict(halved)
    ours.load_state_dict(halved)
    after = ours.quantize_input(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, theirs.qdq_input(x), rtol=0, atol=0)
    with torch.inference_mode():  # a layer built and loaded there: buffers without a version counter
        inf = FPQuantLinear(in_f, out_f, "nvfp4", act_nvfp4=True, input_global_scale=True)
        inf.load_state_dict(halved)
        torch.testing.assert_close(inf.quantize_input(x), after, rtol=0, atol=0)
    ours.to(torch.bfloat16)  # the global scales stay fp32 as upstream forces them
    assert ours.weight_global_scale.dtype == ours.input_global_scale.dtype == torch.float32
    assert ours.weight_scale.dtype == torch.float8_e4m3fn


def test_planner_refuses_unloadable_nvfp4() -> None:
    from fastround.hf_quantizer import plan_layers

    f8, f32, u8 = torch.float8_e4m3fn, torch.float32, torch.uint8
    headers = {"l.weight_packed": (u8, (32, 32)), "l.weight_scale": (f8, (32, 4)),
               "l.weight_global_scale": (f32, (1,)), "l.input_global_scale": (f32, (1,))}
    config = {"quant_method": "auto-round", "bits": 4, "group_size": 16, "data_type": "nv_fp", "act_bits": 4,
              "act_data_type": "nv_fp4_with_static_gs"}
    plan = plan_layers(config, headers, {"l": (32, 64)})["l"]
    assert (plan.encoding, plan.act_nvfp4) == ("nvfp4", True)
    assert not plan_layers({**config, "act_bits": 16}, headers, {"l": (32, 64)})["l"].act_nvfp4
    with pytest.raises(ValueError, match="l declares NVFP4 activations but has no input_global_scale"):
        plan_layers(config, {k: v for k, v in headers.items() if "input" not in k}, {"l": (32, 64)})
    with pytest.raises(ValueError, match="act_bits 8"):
        plan_layers({**config, "act_bits": 8}, headers, {"l": (32, 64)})
    with pytest.raises(ValueError, match="NVFP4 weight_scale must be float8_e4m3fn"):
        plan_layers(config, {**headers, "l.weight_scale": (u8, (32, 4))}, {"l": (32, 64)})
