"""`widgets.in_turns`: work cut into steps lets the window's timers (and paints, input) run
between them, and stops when its owner is gone."""
import time

from PySide6.QtCore import QObject, QTimer

from studio.ui.widgets import in_turns


def busy(seen, name, ms=30):
    seen.append(name)
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def test_a_timer_fires_between_every_two_steps(qtbot):
    owner, seen = QObject(), []
    ticker = QTimer(interval=5)
    ticker.timeout.connect(lambda: seen.append("tick"))
    ticker.start()
    in_turns(owner, *(lambda n=n: busy(seen, n) for n in "abcd"))
    qtbot.waitUntil(lambda: "d" in seen, timeout=5000)
    ticker.stop()
    steps = [seen.index(n) for n in "abcd"]
    assert all(b - a > 1 for a, b in zip(steps, steps[1:])), seen   # a tick between each pair


def test_steps_stop_with_their_owner(qtbot):
    import shiboken6

    owner, seen = QObject(), []
    in_turns(owner, lambda: seen.append("a"), lambda: seen.append("b"))
    shiboken6.delete(owner)      # e.g. the view closed before its plots were drawn
    qtbot.wait(50)
    assert seen == []
