"""File > Save / Open session in the window, autosave after a job, the restore offer after a
crash, and a session whose model moved."""
import shutil

import pytest
from PySide6.QtWidgets import QMessageBox

from studio.core import session_file
from studio.ui.errors import get_reporter
from studio.ui.main_window import MainWindow


@pytest.fixture
def make_window(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    reporter = get_reporter()
    reporter.show_dialogs = False
    reporter.history.clear()
    windows = []

    def make():
        win = MainWindow()
        qtbot.addWidget(win)
        win.show()
        windows.append(win)
        return win

    yield make
    for win in windows:
        win.state.runner.cancel_all()
        assert win.state.runner.wait(20000), "a job thread was left running"


def open_and_wait(qtbot, window, source):
    job = window.open_model(str(source))
    qtbot.waitUntil(lambda: job.is_done and window.state.handle is not None, timeout=60000)


def compute_weight_stats(qtbot, window):
    assert hasattr(window.views["Weights"], "start"), window.views["Weights"].toPlainText()
    with qtbot.waitSignal(window.state.resultsChanged, timeout=60000,
                          check_params_cb=lambda key: key == "weight_stats"):
        window.views["Weights"].start()
    qtbot.waitUntil(lambda: not window.state.runner.active, timeout=60000)


def test_save_and_open_a_session_restores_the_window(qtbot, make_window, tiny_dirs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    first = make_window()
    open_and_wait(qtbot, first, model)
    compute_weight_stats(qtbot, first)
    first.tabs.setCurrentIndex(first.tabs.indexOf(first.views["Weights"]))
    first.state.select_layer("model.layers.1.mlp.down_proj")
    saved = first.sessions.save(str(tmp_path / "work"))
    assert saved.path.name == "work.session" and (saved.path / "session.json").is_file()
    stats = first.state.session.results["weight_stats"]

    second = make_window()
    job = second.sessions.open(saved.path)
    qtbot.waitUntil(lambda: job.is_done and second.state.handle is not None, timeout=60000)
    qtbot.wait(50)
    restored = second.state.session.results["weight_stats"]
    assert list(restored.layers) == list(stats.layers)
    assert second.tabs.tabText(second.tabs.currentIndex()) == "Weights"
    assert second.state.selected_layer == "model.layers.1.mlp.down_proj"
    assert second.views["Weights"].table_model.rowCount() == len(stats.layers)
    assert not second.state.runner.active  # shown without recomputing
    assert not get_reporter().history

    # The model moved: the window asks where it is, then restores.
    moved = tmp_path / "moved"
    model.rename(moved)
    third = make_window()
    asked = []
    third.sessions.locate_model = lambda source: asked.append(source) or str(moved)
    job = third.sessions.open(saved.path)
    qtbot.waitUntil(lambda: job.is_done and third.state.handle is not None, timeout=60000)
    assert asked == [str(model)]
    assert "weight_stats" in third.state.session.results


def test_autosave_after_a_job_and_restore_after_a_crash(qtbot, make_window, tiny_dirs,
                                                        monkeypatch):
    assert session_file.start_run() is None
    window = make_window()
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    compute_weight_stats(qtbot, window)
    qtbot.waitUntil(lambda: window.sessions.last_autosave is not None, timeout=10000)
    assert window.sessions.last_autosave == session_file.autosave_path()
    # The process is killed: its marker is left behind with a pid that is gone.
    session_file.autosave_path().with_name("running.pid").write_text("999999999")

    crashed = session_file.start_run()   # the next start
    assert crashed == session_file.autosave_path()
    after = make_window()
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *args, **kwargs: QMessageBox.StandardButton.Yes)
    assert after.sessions.offer_restore(crashed)
    qtbot.waitUntil(lambda: after.state.handle is not None and not after.state.runner.active,
                    timeout=60000)
    assert "weight_stats" in after.state.session.results
    after.close()                        # a clean exit: no offer next time
    assert session_file.start_run() is None
    session_file.end_run()


def test_a_bad_session_is_reported(qtbot, make_window, tmp_path):
    window = make_window()
    (tmp_path / "bad.session").mkdir()
    (tmp_path / "bad.session" / "session.json").write_text('{"format": "x"}')
    assert window.sessions.open(tmp_path / "bad.session") is None
    qtbot.waitUntil(lambda: bool(get_reporter().history), timeout=5000)
    assert "not a Compression Studio session" in get_reporter().history[-1][1]
    assert window.isVisible()


def test_autosave_writes_in_the_background(qtbot, make_window, tiny_dirs, monkeypatch):
    import threading

    window = make_window()
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    release, calls = threading.Event(), []
    real = session_file.autosave

    def slow(session, window_state, *rest):
        calls.append(threading.current_thread())
        assert release.wait(20), "the window never let the save go on"
        return real(session, window_state, *rest)

    monkeypatch.setattr(session_file, "autosave", slow)
    window.sessions.last_autosave = None
    window.sessions.autosave()        # returns while the save waits: the UI thread is free
    window.sessions.autosave()        # asked again meanwhile: one more save after this one
    release.set()
    qtbot.waitUntil(lambda: len(calls) == 2 and window.sessions._saving is None, timeout=20000)
    assert [t.name for t in calls] == ["studio-autosave"] * 2
    assert calls[0] is calls[1]       # one writer thread, fed by a queue (no start per save)
    assert window.sessions.last_autosave == session_file.autosave_path()


def test_autosave_waits_while_a_job_runs(qtbot, make_window, tiny_dirs):
    """A save's encoding beside a job competes for the GIL with the job and the window: the
    writer waits between its steps until the job is done."""
    window = make_window()
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    qtbot.waitUntil(lambda: window.sessions._saving is None, timeout=20000)
    saved = session_file.autosave_path() / "session.json"
    before = saved.stat().st_mtime_ns if saved.exists() else None
    _job, release = autosave_during_a_job(qtbot, window)
    qtbot.wait(600)
    assert window.sessions._saving is not None                     # still waiting
    assert (saved.stat().st_mtime_ns if saved.exists() else None) == before
    release.set()
    qtbot.waitUntil(lambda: window.sessions._saving is None, timeout=20000)
    assert saved.stat().st_mtime_ns != before
    assert "k" in session_file.read_session(session_file.autosave_path())[0]["results"]


def test_a_paused_autosave_waits_for_the_views_to_draw_after_the_job(qtbot, make_window,
                                                                      tiny_dirs, monkeypatch):
    """A save paused by a job used to go on the moment the job ended, its encoding beside the
    views' redraw of what the job published (a 2 s stall under load): it waits AFTER_JOB_MS
    after the job's end too."""
    import time

    import studio.ui.session_actions as actions

    monkeypatch.setattr(actions, "AFTER_JOB_MS", 4000)
    window = make_window()
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    qtbot.waitUntil(lambda: window.sessions._saving is None, timeout=20000)
    job, release = autosave_during_a_job(qtbot, window)
    qtbot.wait(300)
    release.set()
    qtbot.waitUntil(lambda: job.is_done, timeout=20000)
    ended = time.monotonic()
    qtbot.waitUntil(lambda: window.sessions._saving is None, timeout=30000)
    assert time.monotonic() - ended >= 3.5


def autosave_during_a_job(qtbot, window):
    """A job holding the worker until released, a result published and an autosave asked
    while it runs: (the job, its release)."""
    import threading

    from studio.core.jobs import Progress

    release = threading.Event()

    def blocking_job():
        yield Progress(0, 1, "holding the worker")
        assert release.wait(20)
        return None

    job = window.state.submit("a long job", blocking_job)
    qtbot.waitUntil(lambda: job.running, timeout=5000)
    window.state.publish("k", (1, 2))
    window.sessions.autosave()
    return job, release
