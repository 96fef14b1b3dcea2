import pytest

from studio.ui.state import AppState


@pytest.fixture
def state(qtbot):
    """A fresh AppState whose job failures are collected in `state.failures`; fails the test
    if a job thread is still running at the end."""
    state = AppState()
    failures = []
    state.jobFailed.connect(lambda title, msg, details: failures.append(msg))
    state.failures = failures
    yield state
    state.runner.cancel_all()
    assert state.runner.wait(20000), "a job thread was left running"
