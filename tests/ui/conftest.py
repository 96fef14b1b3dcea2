import pytest

from studio.ui.collector import UiThreadCollector
from studio.ui.errors import get_reporter
from studio.ui.main_window import MainWindow
from studio.ui.state import AppState


@pytest.fixture(scope="session", autouse=True)
def _garbage_on_the_ui_thread(qapp):
    """As in the app: cyclic garbage is collected on the UI thread only (a Qt object freed by
    a collection on a job's thread crashed a CI run)."""
    collector = UiThreadCollector()
    yield collector
    collector.stop()


@pytest.fixture
def state(qtbot):
    """A fresh AppState whose job failures are collected in `state.failures`; fails the test
    if a job thread is still running at the end."""
    state = AppState()
    failures = []
    state.jobFailed.connect(lambda title, msg, details: failures.append(msg))
    state.failures = failures
    yield state
    for runner in (state.runner, state.details):
        runner.cancel_all()
        assert runner.wait(20000), "a job thread was left running"


@pytest.fixture
def window(qtbot):
    """The main window, with error dialogs off (the reporter's history collects them); fails
    the test if a job thread is still running at the end."""
    reporter = get_reporter()
    reporter.show_dialogs = False
    reporter.history.clear()
    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    yield win
    for runner in (win.state.runner, win.state.details):
        runner.cancel_all()
        assert runner.wait(20000), "a job thread was left running"
