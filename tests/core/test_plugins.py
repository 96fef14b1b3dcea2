"""Plugins found through entry points add CLI commands and tabs; a broken one is skipped."""
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from studio.core import plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "plugins" / "studio-model-card"


@pytest.fixture
def example_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    points = [EntryPoint("model_card", "studio_model_card:plugin", plugins.GROUP),
              EntryPoint("broken", "no_such_module_here:plugin", plugins.GROUP)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: points if group == plugins.GROUP else [])
    yield
    for name in [m for m in sys.modules if m.startswith("studio_model_card")]:
        del sys.modules[name]


def test_discovery_reports_broken_plugins(example_plugin):
    found = plugins.discover()
    assert found.views == [("Model card", "studio_model_card.view:ModelCardView")]
    assert found.commands == ["studio_model_card.command"]
    assert len(found.errors) == 1 and "broken" in found.errors[0]


def test_plugin_command_runs(example_plugin, tiny_dirs, capsys):
    from studio.cli import main

    assert main(["card", str(tiny_dirs["gemma"])]) == 0
    out = capsys.readouterr().out
    assert "GemmaForCausalLM" in out and "num_key_value_heads" in out
