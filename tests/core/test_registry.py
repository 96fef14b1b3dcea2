"""The quantizer registry: the one place methods are named; plug-ins through entry points;
refusals that list what is valid; codebook and vector codes saved, loaded and run exactly."""
import io
import json
import tokenize
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.core.errors import StudioError
from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quant import registry
from studio.core.quant.codebook import CodebookTensor
from studio.core.quant.vector import VectorTensor
from studio.core.quantize import quantize_job
from studio.core.variant import load_variant, save_variant
from tests.quantizer_plugin import installed_plugin

ROOT = Path(__file__).resolve().parents[2] / "studio"


def _declaring_module(name: str) -> Path | None:
    import importlib
    import inspect

    quantizer = registry.get(name)
    module = importlib.import_module(quantizer.quantize.__module__)
    return Path(inspect.getfile(module)).resolve()


def test_only_the_registry_and_each_method_module_name_a_method():
    """A method name as a string literal anywhere else in the core, the UI or the commands
    means a method is wired in by name again."""
    names = set(registry.names())
    allowed = {(ROOT / "core/quant/registry.py").resolve()}
    allowed |= {_declaring_module(n) for n in names}
    found = []
    for folder in ("core", "ui", "commands"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() in allowed:
                continue
            tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            for token in tokens:
                if token.type == tokenize.STRING and token.string.strip("\"'") in names:
                    found.append(f"{path.relative_to(ROOT)}:{token.start[0]} {token.string}")
    assert not found, "method names outside the registry:\n" + "\n".join(found)


def test_unknown_method_option_and_range_are_refused_with_the_valid_ones():
    with pytest.raises(StudioError, match="choose one of rtn, gptq, awq, smoothquant"):
        QuantSpec(method="nope")
    with pytest.raises(StudioError, match="gptq has no option speed; it knows damp, "
                                          "block_size, act_order"):
        QuantSpec(method="gptq", options={"speed": 2})
    with pytest.raises(StudioError, match="damp must be a number from 0.0 to 10.0, not 20"):
        QuantSpec(method="gptq", options={"damp": 20})
    with pytest.raises(StudioError, match="act_order must be true or false"):
        QuantSpec(method="gptq", options={"act_order": 1})
    assert QuantSpec(method="gptq").option("damp") == 0.01   # the declared default


def test_the_cli_refuses_an_unknown_method_or_option_listing_the_valid_ones(tiny_dirs,
                                                                           tmp_path, capsys):
    model, out = str(tiny_dirs["llama"]), str(tmp_path / "x")
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", model, "--method", "nope", "--out", out])
    assert exit_.value.code == 2
    assert "(choose from 'rtn', 'gptq', 'awq', 'smoothquant'" in capsys.readouterr().err
    assert main(["quantize", model, "--method", "rtn", "--opt", "clip=true", "--out", out]) == 2
    assert "rtn has no option clip; it knows mse_clip" in capsys.readouterr().err
    assert main(["quantize", model, "--method", "awq", "--opt", "grid=0", "--out", out]) == 2
    assert "grid must be a whole number from 1 to 1000, not 0" in capsys.readouterr().err
    assert not Path(out).exists()


def test_methods_lists_builtins_with_their_declarations(capsys):
    assert main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in data["methods"]}
    assert list(by_name)[:4] == ["rtn", "gptq", "awq", "smoothquant"]
    assert by_name["gptq"]["calibration"] == "hessian"
    assert by_name["awq"]["calibration"] == "block inputs"
    assert {o["name"] for o in by_name["smoothquant"]["options"]} == {"alpha", "act_bits"}
    assert all(m["code_format"] == "affine" and m["origin"] == "built-in"
               for m in by_name.values() if m["name"] in ("rtn", "gptq", "awq", "smoothquant"))


def test_a_plugin_method_runs_from_the_cli_and_its_codebook_variant_reloads_exactly(
        tiny_dirs, tmp_path, capsys):
    with installed_plugin(tmp_path / "site"):
        assert main(["methods", "--json"]) == 0
        listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
        assert listed["levels"]["origin"] == "plug-in studio-test-quantizers"
        assert listed["levels"]["exports"] == ["hf"] and listed["levels"]["kernels"] == []
        out = tmp_path / "variant"
        assert main(["quantize", str(tiny_dirs["llama"]), "--method", "levels", "--bits", "3",
                     "--opt", "margin=0.1", "--lm-head", "keep", "--out", str(out), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        # 3-bit indices plus a 16-bit table of 8 levels per row, over 64- and 160-wide rows.
        assert result["layers"] == 14 and 3 + 128 / 160 <= result["bits_per_weight"] <= 3 + 2
        variant = load_variant(out)
        layer = "model.layers.0.mlp.down_proj"
        qt = variant.qtensors[layer]
        assert isinstance(qt, CodebookTensor) and qt.table.shape == (64, 1, 8)
        assert variant.specs[layer].option("margin") == 0.1
        # The size the variant reports is every bit its tensors store.
        stored = sum(q.storage_bits() for q in variant.qtensors.values())
        counted = sum(variant.specs[n].quantizer.storage_bits(variant.specs[n], q.shape[1])
                      * q.numel() for n, q in variant.qtensors.items())
        assert stored == pytest.approx(counted)


def test_codebook_and_vector_variants_save_load_and_evaluate_bit_identically(
        tiny_llama, tmp_path):
    from studio.core.text import text_windows

    with installed_plugin(tmp_path / "site"):
        windows, label = text_windows(tiny_llama.tokenizer, None, 64, 8, seed=0)
        plan = Plan(QuantSpec(3, -1, method="levels"),
                    rules=_rules(r".*mlp\..*", QuantSpec(2, -1, method="pairs")))
        variant = run(quantize_job(tiny_llama, plan, windows, label, "mixed"))
        kinds = {type(q) for q in variant.qtensors.values()}
        assert kinds == {CodebookTensor, VectorTensor}
        save_variant(variant, tmp_path / "v")
        again = load_variant(tmp_path / "v", tiny_llama)
        for name, qt in variant.qtensors.items():
            assert torch.equal(qt.dequantize(), again.qtensors[name].dequantize()), name
        ids = windows[:2]
        with torch.no_grad():
            assert torch.equal(variant.model(input_ids=ids).logits,
                               again.model(input_ids=ids).logits)
        assert again.bits_per_weight == variant.bits_per_weight
        # Each layer's recorded error came from the method's own codes.
        assert all(e["error"] is not None and e["error"] < 1 for e in variant.layer_errors)


def _rules(pattern, spec):
    from studio.core.plan import Rule
    return (Rule(pattern, spec, regex=True),)


def test_a_plugin_that_fails_to_import_is_listed_and_the_studio_carries_on(tmp_path, capsys):
    with installed_plugin(tmp_path / "site", target="tests.no_such_module:QUANTIZERS",
                          name="studio-broken-quantizers"):
        assert main(["methods", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert [m["name"] for m in data["methods"]][:4] == ["rtn", "gptq", "awq", "smoothquant"]
        mine = [e for e in data["plugin_errors"] if "studio-broken-quantizers" in e]
        assert len(mine) == 1 and "No module named 'tests.no_such_module'" in mine[0]
        from studio.core.plugins import discover
        assert any("studio-broken-quantizers" in e for e in discover().errors)
        assert QuantSpec(method="gptq").method == "gptq"


def test_a_plugin_raising_inside_a_job_is_a_clear_error_and_changes_nothing(
        tiny_dirs, tmp_path, capsys):
    out = tmp_path / "x"
    with installed_plugin(tmp_path / "site"):
        code = main(["quantize", str(tiny_dirs["llama"]), "--method", "explodes",
                     "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert ("Explodes (test plug-in) (plug-in studio-test-quantizers) failed on "
            "model.layers.0.self_attn.q_proj: RuntimeError: the plug-in's arithmetic went "
            "wrong") in err
    assert not out.exists()


def test_a_plugin_returning_the_wrong_thing_is_refused(tiny_llama, tmp_path):
    from dataclasses import replace

    from studio.core.quant.grid import quantize_rtn

    with installed_plugin(tmp_path / "site"):
        levels = registry.get("levels")
        liar = replace(levels, name="liar", quantize=lambda w, spec, calib: quantize_rtn(w, spec))
        registry.register(liar)
        plan = Plan(QuantSpec(4, 32, method="liar"))
        before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
        with pytest.raises(registry.QuantizerFailed, match="returned a QTensor, not the "
                                                           "codebook format's CodebookTensor"):
            run(quantize_job(tiny_llama, plan, None, None, "x"))
        assert all(torch.equal(v, tiny_llama.model.state_dict()[k]) for k, v in before.items())


def test_codebook_layers_fall_back_from_kernels_and_refuse_integer_exports(tiny_llama, tmp_path):
    from studio.core.export import ExportOptions, get_format
    from studio.core.kernels import kernel_for

    with installed_plugin(tmp_path / "site"):
        variant = run(quantize_job(tiny_llama, Plan(QuantSpec(4, -1, method="levels")), None,
                                   None, "levels"))
        name, qt = next(iter(variant.qtensors.items()))
        kernel, choice = kernel_for(name, None, qt)
        assert kernel is None and choice.kernel == "fp32 dense"
        assert "no CPU kernel takes lookup table" in choice.note
        for export in ("gguf", "compressed-tensors"):
            pre = get_format(export).preflight(variant, tiny_llama, ExportOptions())
            assert len(pre.problems) == 1, export
            assert "hold lookup table (non-uniform levels) codes" in pre.problems[0]
            assert f"which {export} cannot store" in pre.problems[0]
            assert "Export to hf instead" in pre.problems[0]
        hf = get_format("hf").preflight(variant, tiny_llama, ExportOptions(dtype="f32"))
        assert not hf.problems and all(t.exact for t in hf.targets)


def test_vector_tensor_round_trip_and_bits():
    torch.manual_seed(0)
    tables = torch.randn(3, 2, 16, 2).half().float()   # 3 row blocks x 2 column blocks
    indices = torch.randint(0, 16, (5, 6))             # 5 rows, 12 columns in pairs
    vt = VectorTensor(indices, tables, None, bits=2, dim=2, rows=2, columns=8)
    w = vt.dequantize()
    assert torch.equal(w[4, 8:10], tables[2, 1, indices[4, 4]])
    assert torch.equal(w[1, 2:4], tables[0, 0, indices[1, 1]])
    state, info = vt.to_state()
    again = VectorTensor.from_state(state, info, (5, 12))
    assert torch.equal(again.dequantize(), w)
    assert vt.storage_bits() == 4 * 30 + 16 * tables.numel()
    with pytest.raises(StudioError, match="points past its table"):
        VectorTensor(indices + 16, tables, None, 2, 2, 2, 8)
