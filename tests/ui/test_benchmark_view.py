"""The Benchmark tab's llama.cpp backend: GGUF files listed beside the torch configurations,
measured with the same settings, or shown unavailable with the install command."""
import pytest
from PySide6.QtCore import Qt

from studio.core import q4_native
from studio.core.export import llama_cpp
from tests.core.test_llama_backend import write_tiny_gguf


def view_for(qtbot, state, handle):
    from studio.ui.views.benchmark import BenchmarkView

    state.set_model(handle)
    view = BenchmarkView(state)
    qtbot.addWidget(view)
    return view


def measure(qtbot, view, prompt_tokens, rows):
    """Run the ticked targets at tiny lengths, one thread, and wait for their `rows`."""
    view.prompt_tokens.setValue(prompt_tokens)
    view.new_tokens.setValue(3)
    view.repeat.setValue(1)
    view.threads.setValue(1)
    with qtbot.waitSignal(view.run_benchmark().done, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: view.table.rowCount() == rows)


def test_without_the_binding_gguf_entries_are_disabled_with_the_install_command(
        qtbot, state, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    view = view_for(qtbot, state, tiny_llama)
    view.add_gguf(tmp_path / "some.gguf")
    item = view.targets.item(view.targets.count() - 1)
    assert item.data(Qt.ItemDataRole.UserRole).startswith("gguf:")
    assert not item.flags() & Qt.ItemFlag.ItemIsEnabled
    assert "compression-studio[llama-cpp]" in view.llama_note.text()


@pytest.mark.skipif(not llama_cpp.available(), reason="cyllama is not installed")
def test_a_gguf_is_measured_beside_the_torch_path(qtbot, state, tiny_llama, tmp_path):
    gguf = write_tiny_gguf(tiny_llama, tmp_path)
    view = view_for(qtbot, state, tiny_llama)
    view.add_gguf(gguf)
    view.set_checked(["fp32", f"gguf:{gguf}"])
    measure(qtbot, view, prompt_tokens=8, rows=2)
    assert view.table.item(1, 8).text().startswith("llama.cpp (cyllama")
    assert "llama.cpp Q4_0" in view.table.item(1, 7).text()
    assert view.table.item(0, 8).text().startswith("torch (")
    assert not state.failures


def test_a_streamed_model_is_refused_before_work_with_the_gguf_route(
        qtbot, state, tiny_dirs, monkeypatch):
    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from studio.ui.views import benchmark

    streamed = run(open_model_job(tiny_dirs["llama"], "stream"))
    monkeypatch.setattr(benchmark, "bench_job", lambda *a, **k: pytest.fail("work started"))
    view = view_for(qtbot, state, streamed)
    view.set_checked(["fp32"])
    assert view.run_benchmark() is None
    text = view.summary.text()
    assert "streamed" in text and "GGUF" in text and "--weights memory" in text
    assert not state.failures


@pytest.mark.skipif(bool(q4_native.unavailable()), reason="no native kernel here")
def test_both_kernel_sets_side_by_side(qtbot, state, tiny_llama):
    """"Both": the int4 configuration on the studio's kernels (its native decode step) and on
    torch's, each a row of its own, in Compare too."""
    view = view_for(qtbot, state, tiny_llama)
    view.set_checked(["int4"])
    view.kernel_set.setCurrentIndex(view.kernel_set.findData("native,torch"))
    measure(qtbot, view, prompt_tokens=6, rows=2)
    native, torch_row = (view.table.item(r, 7).text() for r in range(2))
    assert native.startswith("q4native g32") and torch_row.startswith("int4pack g32")
    assert "decode step native" in view.table.item(0, 8).text()
    assert view.table.item(1, 0).text().endswith("(torch kernels)")
    names = {run["variant"] for run in state.session.runs if run.get("kind") == "bench"}
    assert len(names) == 2 and not state.failures
