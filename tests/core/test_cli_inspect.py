import json
import subprocess
import sys

from studio.cli import main


def test_inspect_json(tiny_dirs, capsys):
    assert main(["inspect", str(tiny_dirs["gpt2"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "GPT2LMHeadModel"
    names = [layer["name"] for layer in data["layers"]]
    assert "transformer.h.1.mlp.c_fc" in names
    for layer in data["layers"]:
        assert {"name", "role", "shape", "params"} <= set(layer)


def test_inspect_table(tiny_dirs, capsys):
    assert main(["inspect", str(tiny_dirs["opt"])]) == 0
    out = capsys.readouterr().out
    assert "model.decoder.layers.0.fc1" in out and "OPTForCausalLM" in out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_core_and_cli_load_no_qt():
    code = ("import sys, importlib, pkgutil, studio.core, studio.cli, studio.commands\n"
            "for m in pkgutil.walk_packages(studio.core.__path__, 'studio.core.'):\n"
            "    importlib.import_module(m.name)\n"
            "for m in pkgutil.walk_packages(studio.commands.__path__, 'studio.commands.'):\n"
            "    importlib.import_module(m.name)\n"
            "studio.cli.build_parser()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'superqt')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
