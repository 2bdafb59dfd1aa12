"""The `fastround` command line (console script and `python -m fastround`) with upstream's flags:
outputs reflect the flags and equal the Python API's output byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastround  # a broken build must fail here, not skip

KIND = "llama_aligned"  # every in_features a multiple of 32, so --group_size 32 quantizes every Linear
K_PROJ = "model.layers.0.self_attn.k_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj"
HIDDEN = 160
KV_OUT = 32


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(*args: str, script: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if script:
        exe = shutil.which("fastround", path=sysconfig.get_path("scripts")) or shutil.which("fastround")
        assert exe, "the `fastround` console script is not installed"
        cmd = [exe, *args]
    else:
        cmd = [sys.executable, "-m", "fastround", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=180)


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def qconfig(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def tensor_shapes(out: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def run_api(src: Path, out: Path, fmt: str = "auto_round", **kwargs) -> None:
    ar = fastround.AutoRound(str(src), model_free=True, show_progress=False, **kwargs)
    ar.quantize_and_save(str(out), format=fmt)


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"CLI failed (rc {r.returncode}):\n{r.stderr}"


def assert_clean_error(r: subprocess.CompletedProcess, needles: list[str] = ()) -> str:
    assert r.returncode != 0, f"CLI exited 0; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, f"CLI printed a traceback:\n{r.stderr}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("fastround: error")]
    assert len(errors) == 1, f"expected exactly one error line:\n{r.stderr}"
    for n in needles:
        assert n.lower() in errors[0].lower(), f"error does not mention {n!r}: {errors[0]}"
    return errors[0]


@pytest.fixture(scope="module")
def src(checkpoint) -> Path:
    return checkpoint(KIND)


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    counter = iter(range(1 << 20))

    def make(name: str) -> Path:
        return root / f"{name}-{next(counter)}"

    return make


@pytest.fixture(scope="module")
def baseline(src, outdir) -> Path:
    """`python -m fastround SRC --model_free --group_size 32`."""
    out = outdir("baseline")
    r = run_cli(str(src), "--model_free", "--group_size", "32", "--output_dir", str(out), "--no_progress")
    assert_ok(r)
    return out


# ----------------------------------------------------------------------------------------------
# entry points


def test_help_lists_upstream_flags():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for flag in (
        "--model",
        "--scheme",
        "--bits",
        "--group_size",
        "--asym",
        "--layer_config",
        "--ignore_layers",
        "--fp_layers",
        "--quant_lm_head",
        "--format",
        "--output_dir",
        "--iters",
        "--disable_opt_rtn",
        "--model_free",
        "--disable_model_free",
    ):
        assert flag in r.stdout, f"--help does not list {flag}"


def test_baseline_config(baseline):
    q = qconfig(baseline)
    assert q["bits"] == 4 and q["group_size"] == 32 and q["sym"] is True
    assert q["packing_format"] == "auto_round:auto_gptq"
    assert q["model_free"] is True and q["quant_method"] == "auto-round"
    shapes = tensor_shapes(baseline)
    assert shapes[f"{Q_PROJ}.qweight"] == (HIDDEN // 8, HIDDEN)
    assert shapes[f"{K_PROJ}.qweight"] == (HIDDEN // 8, KV_OUT)
    assert shapes[f"{K_PROJ}.scales"] == (HIDDEN // 32, KV_OUT)
    assert "lm_head.weight" in shapes and "lm_head.qweight" not in shapes


def test_console_script_with_model_flag_equals_module(src, baseline, outdir):
    out = outdir("script")
    r = run_cli("--model", str(src), "--model_free", "--group_size", "32", "--output_dir", str(out), "--no_progress",
                script=True)
    assert_ok(r)
    assert snapshot(out) == snapshot(baseline)


def test_baseline_equals_api(src, baseline, outdir):
    out = outdir("api")
    run_api(src, out, scheme="W4A16", group_size=32)
    assert snapshot(out) == snapshot(baseline)


def test_default_output_dir_is_tmp_autoround(src, baseline, tmp_path):
    r = run_cli(str(src), "--model_free", "--group_size", "32", "--no_progress", cwd=tmp_path)
    assert_ok(r)
    assert snapshot(tmp_path / "tmp_autoround") == snapshot(baseline)


# ----------------------------------------------------------------------------------------------
# flags -> quantization_config, and CLI == API byte for byte

CASES = {
    # id: (CLI flags, AutoRound kwargs, format)
    "asym": (["--asym"], dict(sym=False), "auto_round"),
    "layer_config_lenient": (["--layer_config", "{k_proj:{bits:8}}"], dict(layer_config={"k_proj": {"bits": 8}}),
                             "auto_round"),
    "scheme_and_bits": (["--scheme", "w2a16", "--bits", "8"], dict(scheme="W2A16", bits=8), "auto_round"),
    "ignore_layers": (["--ignore_layers", "k_proj,v_proj"], dict(ignore_layers="k_proj,v_proj"), "auto_round"),
    "quant_lm_head": (["--quant_lm_head"], dict(quant_lm_head=True), "auto_round"),
    "format_gptq": (["--format", "auto_round:auto_gptq", "--scheme", "W8A16"], dict(scheme="W8A16"),
                    "auto_round:auto_gptq"),
}


@pytest.fixture(scope="module")
def case_outputs(src, outdir):
    """Each case run once through the CLI (group_size 32 added) and once through the API."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in cache:
            flags, kwargs, fmt = CASES[case]
            cli_out, api_out = outdir(f"{case}-cli"), outdir(f"{case}-api")
            r = run_cli(str(src), "--model_free", "--group_size", "32", *flags, "--output_dir", str(cli_out),
                        "--no_progress")
            assert_ok(r)
            kwargs = {"scheme": "W4A16", "group_size": 32, **kwargs}
            run_api(src, api_out, fmt=fmt, **kwargs)
            cache[case] = (cli_out, api_out)
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_equals_api(case_outputs, case):
    cli_out, api_out = case_outputs(case)
    a, b = snapshot(cli_out), snapshot(api_out)
    assert sorted(a) == sorted(b), "different files"
    assert a == b, f"files differ: {[k for k in a if a[k] != b.get(k)]}"


def test_asym_flag(case_outputs):
    out, _ = case_outputs("asym")
    q = qconfig(out)
    assert q["sym"] is False
    assert q["packing_format"] == "auto_round"
    assert q["bits"] == 4 and q["group_size"] == 32


def test_layer_config_flag(case_outputs):
    out, _ = case_outputs("layer_config_lenient")
    q = qconfig(out)
    assert q["bits"] == 4
    assert q.get("extra_config", {}).get("k_proj") == {"bits": 8}
    others = {k: v for k, v in q.get("extra_config", {}).items() if k != "k_proj"}
    assert all(v.get("bits") != 8 for v in others.values()), others
    shapes = tensor_shapes(out)
    for layer in ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"):
        assert shapes[f"{layer}.qweight"] == (HIDDEN // 4, KV_OUT), "k_proj is not 8-bit packed"
        assert shapes[f"{layer}.qzeros"] == (HIDDEN // 32, KV_OUT // 4)
    assert shapes[f"{Q_PROJ}.qweight"] == (HIDDEN // 8, HIDDEN), "q_proj should stay 4-bit"
    assert shapes["model.layers.0.self_attn.v_proj.qweight"] == (HIDDEN // 8, KV_OUT)


def test_layer_config_json_equals_lenient(case_outputs, src, outdir):
    lenient, _ = case_outputs("layer_config_lenient")
    out = outdir("layer_config_json")
    r = run_cli(str(src), "--model_free", "--group_size", "32", "--layer_config", '{"k_proj": {"bits": 8}}',
                "--output_dir", str(out), "--no_progress")
    assert_ok(r)
    assert snapshot(out) == snapshot(lenient)


def test_scheme_and_bits_flags(case_outputs):
    out, _ = case_outputs("scheme_and_bits")
    q = qconfig(out)
    assert q["bits"] == 8 and q["group_size"] == 32 and q["sym"] is True
    assert tensor_shapes(out)[f"{Q_PROJ}.qweight"] == (HIDDEN // 4, HIDDEN)


def test_ignore_layers_flag(case_outputs):
    out, _ = case_outputs("ignore_layers")
    shapes = tensor_shapes(out)
    for layer in ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj"):
        assert f"{layer}.weight" in shapes and f"{layer}.qweight" not in shapes
    assert f"{Q_PROJ}.qweight" in shapes
    extra = qconfig(out).get("extra_config", {})
    assert extra.get(K_PROJ, {}).get("bits") == 16


def test_fp_layers_alias_equals_ignore_layers(case_outputs, src, outdir):
    ignore_out, _ = case_outputs("ignore_layers")
    out = outdir("fp_layers")
    r = run_cli(str(src), "--model_free", "--group_size", "32", "--fp_layers", "k_proj,v_proj", "--output_dir",
                str(out), "--no_progress")
    assert_ok(r)
    assert snapshot(out) == snapshot(ignore_out)


def test_quant_lm_head_flag(case_outputs, baseline):
    out, _ = case_outputs("quant_lm_head")
    shapes = tensor_shapes(out)
    assert "lm_head.qweight" in shapes and "lm_head.weight" not in shapes
    assert "lm_head.weight" in tensor_shapes(baseline)
    assert "lm_head" in qconfig(out).get("extra_config", {})


def test_format_flag(case_outputs):
    out, _ = case_outputs("format_gptq")
    q = qconfig(out)
    assert q["bits"] == 8 and q["packing_format"] == "auto_round:auto_gptq"


# ----------------------------------------------------------------------------------------------
# routing


def test_auto_routing(src, baseline, outdir):
    out = outdir("routed")
    r = run_cli(str(src), "--iters", "0", "--disable_opt_rtn", "--group_size", "32", "--output_dir", str(out),
                "--no_progress")
    assert_ok(r)
    assert "Auto-routing to model-free" in r.stderr + r.stdout
    assert snapshot(out) == snapshot(baseline)
    assert qconfig(out)["model_free"] is True


def test_auto_routing_asym(src, case_outputs, outdir):
    asym_out, _ = case_outputs("asym")
    out = outdir("routed-asym")
    r = run_cli("--model", str(src), "--iters", "0", "--disable_opt_rtn", "--asym", "--group_size", "32",
                "--output_dir", str(out), "--no_progress")
    assert_ok(r)
    assert "Auto-routing to model-free" in r.stderr + r.stdout
    assert snapshot(out) == snapshot(asym_out)


def test_regular_rtn_equals_python_api(src, outdir):
    """--disable_model_free runs the regular flow; its folder (<out>/<model>-w4g32) equals the API's."""
    out = outdir("regular")
    r = run_cli(str(src), "--iters", "0", "--disable_opt_rtn", "--disable_model_free", "--group_size", "32",
                "--format", "auto_round,auto_gptq", "--output_dir", str(out), "--no_progress", "--device", "cpu")
    assert_ok(r)
    assert "Auto-routing" not in r.stderr
    from fastround import AutoRound

    api = outdir("regular-api")
    AutoRound(str(src), iters=0, disable_opt_rtn=True, disable_model_free=True, group_size=32,
              device_map="cpu").quantize_and_save(str(api), format="auto_round,auto_gptq")
    name = f"{src.name}-w4g32"
    assert sorted(p.name for p in (out / name).iterdir()) == ["auto-gptq", "auto-round-auto-gptq"]
    # transformers records HF_HUB_OFFLINE (set for the CLI run only) as local_files_only in tokenizer_config.json.
    tok = "tokenizer_config.json"
    cli, ref = snapshot(out / name), snapshot(api / name)
    assert {k: v for k, v in cli.items() if not k.endswith(tok)} == {k: v for k, v in ref.items() if not k.endswith(tok)}
    for sub in ("auto-gptq", "auto-round-auto-gptq"):
        a, b = (json.loads((d / name / sub / tok).read_text()) for d in (out, api))
        a.pop("local_files_only"), b.pop("local_files_only")
        assert a == b


def test_default_recipe_tunes_and_needs_its_dataset(src, outdir):
    """The default recipe is SignRound on NeelNanda/pile-10k: offline that is one clear error naming the dataset,
    and nothing is written."""
    out = outdir("no-data")
    r = run_cli(str(src), "--output_dir", str(out), "--no_progress", "--device", "cpu")
    assert_clean_error(r, ["NeelNanda/pile-10k"])
    assert not out.exists()


def test_list_format_prints_formats_and_schemes():
    r = run_cli("list", "format")
    assert_ok(r)
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert "W4A16" in lines["auto_awq"] and "W2A16" not in lines["auto_awq"]
    assert "MXFP4" in lines["auto_round"] and "MXFP4" not in lines["auto_gptq"]


def test_rtn_recipe_entry_point(src, outdir):
    """fastround-rtn: iters 0, plain RTN, one sample; the same bytes as the flags spelled out."""
    exe = shutil.which("fastround-rtn", path=sysconfig.get_path("scripts")) or shutil.which("fastround-rtn")
    assert exe, "the fastround-rtn console script is not installed"
    out = outdir("recipe")
    cmd = [exe, str(src), "--disable_model_free", "--output_dir", str(out), "--no_progress", "--device", "cpu",
           "--group_size", "32"]
    # the recipe's process runs while the spelled-out one does (independent outputs)
    recipe = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    flags = outdir("recipe-flags")
    r2 = run_cli(str(src), "--iters", "0", "--disable_opt_rtn", "--disable_model_free", "--nsamples", "1",
                 "--group_size", "32", "--output_dir", str(flags), "--no_progress", "--device", "cpu")
    stdout, stderr = recipe.communicate(timeout=180)
    assert_ok(subprocess.CompletedProcess(cmd, recipe.returncode, stdout, stderr))
    assert_ok(r2)
    assert snapshot(out) == snapshot(flags)


def test_eval_perplexity_command(src, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(400)))
    r = run_cli("eval", str(src), "--ppl", str(text), "--seqlen", "32")
    assert_ok(r)
    from fastround.eval import perplexity

    expected = perplexity(str(src), text.read_text(), seqlen=32)
    assert f"perplexity {expected:.4f}" in r.stdout


def test_missing_model_argument():
    r = run_cli("--model_free")
    assert r.returncode != 0
    assert "model" in r.stderr.lower()
    assert "Traceback" not in r.stderr


def test_unparsable_layer_config(src, outdir):
    out = outdir("bad-lc")
    r = run_cli(str(src), "--model_free", "--layer_config", "{k_proj:{bits:8}", "--output_dir", str(out),
                "--no_progress")
    assert_clean_error(r, ["layer_config"])
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# the --layer_config parser (in process)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("{k_proj:{bits:8},v_proj:{bits:8}}", {"k_proj": {"bits": 8}, "v_proj": {"bits": 8}}),
        ('{"k_proj": {"bits": 8}}', {"k_proj": {"bits": 8}}),
        ("{ k_proj : { bits : 8 , sym : false } }", {"k_proj": {"bits": 8, "sym": False}}),
        (
            "{a:{x:1.5,y:true,z:False,w:null,v:none,g:-1,s:W4A16}}",
            {"a": {"x": 1.5, "y": True, "z": False, "w": None, "v": None, "g": -1, "s": "W4A16"}},
        ),
        ("{'mlp.down_proj':{bits:2}}", {"mlp.down_proj": {"bits": 2}}),
        ("{k_proj:W8A16}", {"k_proj": "W8A16"}),
        ('{"mlp\\.down_proj": {"bits": 8}}', {"mlp\\.down_proj": {"bits": 8}}),
        ("{}", {}),
    ],
    ids=["lenient", "json", "spaces", "scalars", "quoted-key", "scheme-string", "json-stray-backslash", "empty"],
)
def test_parse_layer_config(text, expected):
    from fastround.cli import parse_layer_config

    assert parse_layer_config(text) == expected


@pytest.mark.parametrize("text", ["{k_proj:{bits:8}", "[1, 2]", "{k_proj {bits:8}}"])
def test_parse_layer_config_rejects(text):
    from fastround.cli import parse_layer_config

    with pytest.raises(ValueError, match="layer_config"):
        parse_layer_config(text)
