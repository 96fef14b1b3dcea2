"""`compression-studio export` per the CLI contract: one JSON object, exit 2 on bad input; an
export folder is then a MODEL `eval` reads back through its consumer library."""
import json

import pytest

from studio.cli import main

JSON_KEYS = {"path", "format", "bytes", "bits_per_weight_on_disk", "seconds", "verified",
             "max_weight_diff", "max_logit_diff"}


@pytest.fixture(scope="module")
def variant_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "variant"
    assert main(["quantize", str(tiny_dirs["qwen2"]), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "--symmetric", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fmt", ["gguf", "compressed-tensors", "hf"])
def test_export_prints_one_json_object(variant_dir, tmp_path, capsys, fmt):
    out = tmp_path / "export"
    capsys.readouterr()
    assert main(["export", str(variant_dir), "--format", fmt, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(result)
    assert result["verified"] is True and result["format"] == fmt
    assert result["bytes"] > 0 and result["bits_per_weight_on_disk"] > 4
    assert (out / "report.json").is_file() and (out / "recipe.json").is_file()


def test_an_export_is_a_model_eval_reads_back(variant_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(variant_dir), "--format", "hf", "--out", str(out),
                 "--dtype", "f32", "--shard-size", "20KB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2   # read back through its index
    capsys.readouterr()
    assert main(["eval", str(out), "--windows", "2", "--seqlen", "64", "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["eval", str(variant_dir), "--windows", "2", "--seqlen", "64", "--json"]) == 0
    from_variant = json.loads(capsys.readouterr().out)
    assert from_export["ppl"] == pytest.approx(from_variant["ppl"], rel=1e-4)
    assert from_export["kl"] == pytest.approx(from_variant["kl"], rel=1e-2, abs=1e-6)


def test_bad_input_exits_2_with_one_line(variant_dir, tiny_dirs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        [str(variant_dir), "--format", "hf", "--out", str(taken)],          # exists
        [str(tiny_dirs["llama"]), "--format", "hf", "--out", str(tmp_path / "x")],  # no variant
        [str(variant_dir), "--format", "onnx", "--out", str(tmp_path / "x")],
        [str(variant_dir), "--format", "hf", "--out", str(tmp_path / "x"), "--shard-size", "5XB"],
    ]
    for args in cases:
        capsys.readouterr()
        try:
            code = main(["export", *args])
        except SystemExit as exc:   # argparse's own refusal (an unknown format)
            code = exc.code
        assert code == 2, args
        err = capsys.readouterr().err.strip()
        assert err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_shard_size_splits_a_gguf_too(variant_dir, tmp_path, capsys):
    out = tmp_path / "export"
    capsys.readouterr()
    assert main(["export", str(variant_dir), "--format", "gguf", "--out", str(out),
                 "--shard-size", "40KB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    files = sorted(out.glob("*.gguf"))
    assert result["verified"] and len(files) > 2 and result["file"] == str(files[0])
    assert files[0].name.endswith(f"-00001-of-{len(files):05d}.gguf")
    assert result["bytes"] == sum(f.stat().st_size for f in files)
