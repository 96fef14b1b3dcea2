"""`compression-studio quantize` per the CLI contract: one JSON object, exit 2 on bad input."""
import json

from studio.cli import main
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.variant import load_variant


def test_quantize_writes_a_variant_and_prints_json(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "variant"
    code = main(["quantize", str(tiny_dirs["llama"]), "--method", "gptq", "--bits", "3",
                 "--group-size", "32", "--option", "damp=0.02", "--windows", "8",
                 "--seqlen", "64", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("seconds", "bits_per_weight", "size_mb", "calibration", "layers"):
        assert key in result
    assert result["calibration"] == {"source": "built-in (Python help topics)", "windows": 8,
                                     "seqlen": 64, "seed": 0}
    # the 14 block linears and, by default (--lm-head w8), the tied lm_head / embedding:
    # one matrix, quantized once
    assert result["layers"] == 16 and result["shared"] == {"model.embed_tokens": "lm_head"}
    assert result["name"] == "GPTQ W3 g32, lm_head W8 ch sym"
    variant = load_variant(out)   # re-opens the base model from the recorded source
    assert variant.specs["model.layers.0.mlp.up_proj"].option("damp") == 0.02


def test_quantize_from_a_recipe(tiny_dirs, tmp_path, capsys):
    recipe = tmp_path / "plan.json"
    Plan(QuantSpec(4, 32, True, "rtn"), rules=(Rule(r".*down_proj", None, True),)).save(recipe)
    assert main(["quantize", str(tiny_dirs["llama"]), "--recipe", str(recipe),
                 "--out", str(tmp_path / "v"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 12


def test_bad_input_exits_2_with_one_line(tiny_dirs, tmp_path, capsys):
    model = str(tiny_dirs["llama"])
    recipe = tmp_path / "other.json"
    Plan(QuantSpec(4, 128), architecture="OPTForCausalLM").save(recipe)
    cases = [
        ["--method", "rtn", "--bits", "12"],
        ["--method", "gptq", "--option", "nonsense=1"],
        ["--recipe", str(recipe)],
        ["--method", "awq", "--windows", "1", "--seqlen", "64"],
    ]
    for extra in cases:
        assert main(["quantize", model, *extra, "--out", str(tmp_path / "x")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("compression-studio quantize: ")
    assert not (tmp_path / "x").exists()


def test_gguf_native_and_fp16_scales(tiny_dirs, tmp_path, capsys):
    import torch

    model, out = str(tiny_dirs["llama"]), tmp_path / "q4_0"
    assert main(["quantize", model, "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--symmetric", "--gguf-native", "--windows", "8", "--seqlen", "64",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the body at Q4_0, the (tied) lm_head at Q8_0: every layer a GGUF type holds exactly
    assert result["name"] == "GPTQ W4 g32 sym f16s, lm_head W8 g32 sym f16s"
    assert result["bits_per_weight"] == 4.5
    variant = load_variant(out)
    assert all(s.scale_dtype == "fp16" for s in variant.specs.values())
    assert all(torch.equal(qt.scale, qt.scale.half().float()) for qt in variant.qtensors.values())
    assert main(["quantize", model, "--method", "rtn", "--scale-dtype", "fp16",
                 "--out", str(tmp_path / "g128"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "RTN W4 g128 f16s, lm_head W8 ch sym f16s"
    recipe = tmp_path / "plan.json"
    Plan(QuantSpec(4, 32, True)).save(recipe)
    for extra, message in ((["--method", "rtn", "--bits", "3", "--group-size", "32",
                             "--symmetric", "--gguf-native"], "not W3 g32 sym f16s"),
                           (["--recipe", str(recipe), "--gguf-native"], "go with --method")):
        assert main(["quantize", model, *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
