"""The Evaluate tab's llama.cpp backend: a GGUF file evaluated on the same windows as the torch
models, against the same baseline, in one job; unavailable with the install command when the
binding is missing."""
import math

import pytest
from PySide6.QtCore import Qt

from studio.core.backends import gguf_label
from studio.core.export import llama_cpp
from studio.core.runs import BASELINE
from tests.core.test_llama_backend import write_tiny_gguf


def view_for(qtbot, state, handle):
    from studio.ui.views.evaluate import EvaluateView

    state.set_model(handle)
    view = EvaluateView(state)
    qtbot.addWidget(view)
    return view


def test_without_the_binding_a_gguf_entry_is_disabled_with_the_install_command(
        qtbot, state, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    view = view_for(qtbot, state, tiny_llama)
    view.add_gguf(tmp_path / "some.gguf")
    item = view.targets.item(view.targets.count() - 1)
    assert item.data(Qt.ItemDataRole.UserRole) == f"gguf:{tmp_path / 'some.gguf'}"
    assert not item.flags() & Qt.ItemFlag.ItemIsEnabled
    assert "compression-studio[llama-cpp]" in view.llama_note.text()


@pytest.mark.skipif(not llama_cpp.available(), reason="cyllama is not installed")
def test_a_gguf_is_evaluated_beside_the_baseline_on_the_same_windows(qtbot, state, tiny_llama,
                                                                     tmp_path):
    gguf = write_tiny_gguf(tiny_llama, tmp_path)
    view = view_for(qtbot, state, tiny_llama)
    view.add_gguf(gguf)
    view.set_checked([BASELINE, f"gguf:{gguf}"])
    view.seqlen.setValue(32)
    view.windows.setValue(2)
    with qtbot.waitSignal(view.run_evaluation().done, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: gguf_label(gguf) in view.results, timeout=10_000)
    base, ours = view.results[BASELINE], view.results[gguf_label(gguf)]
    assert ours.backend == "llama.cpp" and ours.protocol == base.protocol
    assert ours.tokens == base.tokens and math.isfinite(ours.ppl) and ours.kl >= 0
    assert gguf_label(gguf) in view.summary.text()
    row = [r for r in state.session.runs if r.get("variant") == gguf_label(gguf)]
    assert row and row[0]["plan"] == "llama.cpp GGUF" and row[0]["size_mb"] > 0
    assert not state.failures
