"""The window opens a tiny model in the background and shows its layers; errors reach the user."""

from studio.ui.errors import get_reporter


def open_and_wait(qtbot, window, source):
    job = window.open_model(str(source))
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.wait(50)  # let the queued result reach the window


def test_opens_a_model_and_lists_its_layers(qtbot, window, tiny_dirs, monkeypatch):
    import threading

    from studio.core import layer_details
    read_on = []
    real = layer_details.weight_summary_job

    def spy(*args):
        read_on.append(threading.current_thread())
        return (yield from real(*args))
    monkeypatch.setattr(layer_details, "weight_summary_job", spy)
    open_and_wait(qtbot, window, tiny_dirs["qwen2"])
    handle = window.state.handle
    assert handle is not None and handle.architecture == "Qwen2ForCausalLM"
    view = window.views["Layers"]
    assert view.proxy.rowCount() == len(handle.layers)
    assert "Qwen2ForCausalLM" in window.model_label.text()
    assert "Qwen2ForCausalLM" in window.windowTitle() or "qwen2" in window.windowTitle()

    view.search.setText("mlp")
    assert 0 < view.proxy.rowCount() < len(handle.layers)
    for row in range(view.proxy.rowCount()):
        assert "mlp" in view.proxy.index(row, 1).data()
    view.search.setText("")

    view.select("model.layers.1.mlp.down_proj")
    assert window.state.selected_layer == "model.layers.1.mlp.down_proj"
    assert "model.layers.1.mlp.down_proj" in view.details.toPlainText()
    # The weight range is read on the details worker and shown when it arrives.
    qtbot.waitUntil(lambda: "…" not in view.details.toPlainText(), timeout=20000)
    w = handle.weight("model.layers.1.mlp.down_proj").float()
    assert f"{w.std().item():.4g}" in view.details.toPlainText()
    assert read_on and threading.main_thread() not in read_on


def test_sorting_by_parameters(qtbot, window, tiny_dirs):
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    view = window.views["Layers"]
    from PySide6.QtCore import Qt

    view.table.sortByColumn(6, Qt.SortOrder.DescendingOrder)
    column = [int(view.proxy.index(r, 6).data().replace(",", ""))
              for r in range(view.proxy.rowCount())]
    assert column == sorted(column, reverse=True) and column[0] > column[-1]


def test_bad_path_reports_and_keeps_the_app(qtbot, window, tmp_path):
    open_and_wait(qtbot, window, tmp_path / "nothing-here")
    qtbot.waitUntil(lambda: len(get_reporter().history) > 0, timeout=5000)
    title, message, details = get_reporter().history[-1]
    assert "does not exist" in message and details == ""
    assert window.state.handle is None and window.isVisible()


def test_cancel_leaves_the_current_model(qtbot, window, tiny_dirs):
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    before = window.state.handle
    job = window.open_model(str(tiny_dirs["gpt2"]))
    job.cancel()
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.wait(50)
    assert window.state.handle is before


def test_recent_models_are_remembered(qtbot, window, tiny_dirs):
    from studio.ui import settings

    open_and_wait(qtbot, window, tiny_dirs["opt"])
    assert settings.recent_models()[0].endswith("opt")


def test_reopening_a_model_brings_back_its_results(qtbot, window, tiny_dirs):
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    window.state.publish("marker", {"computed": True})
    open_and_wait(qtbot, window, tiny_dirs["gemma"])
    assert "marker" not in window.state.session.results
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    assert window.state.session.results["marker"] == {"computed": True}
