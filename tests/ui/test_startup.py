"""The window is on screen before torch is imported: a fresh process shows the shell without it,
then builds the views and opens a model as before."""
import os
import subprocess
import sys
import textwrap

SHOW_WITHOUT_TORCH = textwrap.dedent("""
    import sys
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication
    from studio.cli import build_parser, wants_window
    assert wants_window([]) and wants_window(["-v", "--weights", "stream", "open", "demo"])
    assert not wants_window(["inspect", "demo"]) and not wants_window(["--help"])
    build_parser(("open",), plugins=False).parse_args(["open", "demo"])
    app = QApplication([])
    from studio.ui.main_window import MainWindow
    window = MainWindow(deferred=True)
    window.show()
    assert QTest.qWaitForWindowExposed(window, 10000)
    heavy = sorted(m for m in ("torch", "transformers", "pyqtgraph", "numpy") if m in sys.modules)
    assert not heavy, heavy
    assert [window.tabs.tabText(i) for i in range(3)] == ["Layers", "Weights", "Activations"]
    window.build()
    assert "torch" in sys.modules and window.views["Weights"] is window.tabs.widget(1)
    print("ok")
""")


def test_the_window_shows_without_importing_torch(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "COMPRESSION_STUDIO_CONFIG": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SHOW_WITHOUT_TORCH], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_a_deferred_window_builds_when_a_model_is_opened(qtbot, tiny_dirs):
    from studio.ui.main_window import MainWindow

    window = MainWindow(deferred=True)
    qtbot.addWidget(window)
    assert not window.built and window.layer_dock is None
    job = window.open_model(str(tiny_dirs["llama"]))
    assert window.built and "Layers" in window.views
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.waitUntil(lambda: window.layer_dock.list.model.rowCount() > 0, timeout=5000)
    window.state.runner.wait(20000)


def test_the_dock_lists_the_layers_from_the_header_before_the_weights(qtbot, window, tiny_dirs,
                                                                     monkeypatch):
    from studio.ui import main_window

    monkeypatch.setattr(main_window, "PREVIEW_AFTER_MS", 0)   # as an open slower than it
    seen = []
    window.state.previewChanged.connect(lambda: seen.append(
        (window.state.preview_layers is not None, window.state.handle,
         window.layer_dock.list.model.rowCount(), window.layer_dock.list.count.text())))
    job = window.open_model(str(tiny_dirs["llama"]))
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.waitUntil(lambda: window.state.handle is not None, timeout=5000)
    listed, handle, rows, note = seen[0]
    assert listed and handle is None           # before the model had loaded
    assert rows == len(window.state.handle.layers) and "loading" in note
    assert window.state.preview_layers is None  # the loaded model's inventory took over
    dock = window.layer_dock.list
    qtbot.waitUntil(lambda: "loading" not in dock.count.text(), timeout=5000)
    assert dock.model.rowCount() == rows


def test_a_quick_open_fills_the_dock_once(qtbot, window, tiny_dirs, monkeypatch):
    from studio.ui import main_window

    monkeypatch.setattr(main_window, "PREVIEW_AFTER_MS", 60_000)
    seen = []
    window.state.previewChanged.connect(lambda: seen.append(window.state.preview_layers))
    job = window.open_model(str(tiny_dirs["llama"]))
    qtbot.waitUntil(lambda: job.is_done and window.state.handle is not None, timeout=60000)
    qtbot.wait(100)
    assert all(layers is None for layers in seen)   # never a header list, only its removal
    assert window.layer_dock.list.model.rowCount() == len(window.state.handle.layers)


def test_a_failed_open_drops_the_header_list_and_reports_once(qtbot, window, tmp_path):
    from studio.ui.errors import get_reporter

    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    job = window.open_model(str(bad))
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    # (the report crosses to the UI thread by a queued signal: it may land after is_done)
    qtbot.waitUntil(lambda: bool(get_reporter().history), timeout=10000)
    qtbot.wait(200)   # a second report, if one were coming, would be queued by now
    assert window.state.preview_layers is None and window.state.handle is None
    assert len(get_reporter().history) == 1


def test_only_the_newest_detail_request_is_answered(qtbot, state):
    import threading

    from studio.core.jobs import Progress
    from studio.ui.workers import LatestOnly

    release = threading.Event()
    answered = []

    def slow(value):
        yield Progress(0, 1, "waiting")
        release.wait(10)
        yield Progress(1, 1, "done")
        return value

    latest = LatestOnly(state.details)
    first = latest.request("a", "a", lambda: slow("a"), answered.append)
    qtbot.waitUntil(lambda: first.running, timeout=5000)
    second = latest.request("b", "b", lambda: slow("b"), answered.append)
    third = latest.request("c", "c", lambda: slow("c"), answered.append)
    release.set()
    qtbot.waitUntil(lambda: third.is_done, timeout=10000)
    assert first.token.cancelled and second.token.cancelled   # the user moved on
    assert answered == ["c"]


OPEN_AFTER_PRELOAD = textwrap.dedent("""
    import sys
    from studio.ui.app import preload_behind
    preload_behind().join()
    before = set(sys.modules)
    from studio.core.jobs import run
    from studio.core.models import open_model_job
    run(open_model_job(sys.argv[1]))
    heavy = ("torch._dynamo", "torch.distributed.tensor", "transformers.modeling_utils",
             "transformers.masking_utils", "transformers.core_model_loading")
    print(sorted(m for m in set(sys.modules) - before if m.startswith(heavy)))
""")


def test_what_an_open_imports_is_preloaded_behind_the_window(tmp_path, tiny_dirs):
    """transformers' model loading imports torch._dynamo and torch.distributed.tensor (1-3 s
    of imports holding the interpreter's lock in stretches): the window imports them once it
    is usable, so an open does not do it on the worker."""
    env = {**os.environ, "COMPRESSION_STUDIO_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", OPEN_AFTER_PRELOAD, str(tiny_dirs["llama"])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_app_hands_the_interpreter_on_within_a_millisecond(qtbot, monkeypatch):
    """The UI thread gives the interpreter's lock up in most Qt calls and waits to take it
    back: beside a busy Python thread each wait lasted up to the switch interval (5 ms by
    default), hundreds of times per paint. `app.main` sets it to SWITCH_INTERVAL_S before the
    event loop runs."""
    from PySide6.QtWidgets import QApplication

    import studio.core.session_file as session_file
    import studio.ui.app as app
    import studio.ui.collector as collector

    monkeypatch.setattr(sys, "setswitchinterval", lambda s: seen.append(s))
    monkeypatch.setattr(QApplication, "exec", lambda self: 0)      # no event loop
    monkeypatch.setattr(collector, "UiThreadCollector", lambda: None)   # the tests' one stays
    monkeypatch.setattr(session_file, "start_run", lambda: None)
    monkeypatch.setattr(app, "on_exposed", lambda widget, then: None)   # no engine, no open
    seen: list[float] = []
    assert app.main() == 0
    assert seen == [app.SWITCH_INTERVAL_S] and app.SWITCH_INTERVAL_S <= 0.001
    for widget in QApplication.topLevelWidgets():
        if type(widget).__name__ == "MainWindow" and widget.isVisible():
            widget.close()
            widget.deleteLater()


def test_the_process_start_is_read_to_within_a_tick():
    """'window shown ... after the process started' counts from the real start (psutil's
    create_time rounds the boot time down to a second: it was 0.68 s early on one machine)."""
    import time

    code = "import time; from studio.ui.app import _process_start; print(time.time(), _process_start())"
    for _ in range(3):
        launched = time.time()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=120).stdout.split()
        now, started = map(float, out)
        assert abs(started - launched) < 0.1, (started - launched, now - launched)
