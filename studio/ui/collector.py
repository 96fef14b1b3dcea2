"""Python's cyclic garbage collected on the UI thread only.

The interpreter collects on whichever thread's allocation crosses its threshold, and frees what
it finds there. With jobs allocating on worker threads, that is usually a worker: a widget, a
job handle or a plot item caught in a reference cycle is then destroyed off the UI thread, and
Qt crashes, at random, later (a CI run died so, in a main thread busy elsewhere). So while the
window lives, automatic collection is off, and a timer on the UI thread collects whenever the
interpreter's own thresholds are crossed (as calibre and pyqtgraph do). A job that wants a
collection now (`studio.core.garbage.collect`, between benchmark targets) asks the UI thread
and waits for it, a bounded time: a UI thread that is itself waiting for the job must not
deadlock it.
"""
from __future__ import annotations

import gc
import threading

from PySide6.QtCore import QObject, QTimer, Signal

from studio.core import garbage

INTERVAL_MS = 500
WAIT_FOR_UI_S = 2.0


class UiThreadCollector(QObject):
    """Collects on the thread it was made on (the UI thread); `stop()` gives collection back
    to the interpreter."""
    _asked = Signal(object)      # a threading.Event, set once collected

    def __init__(self, interval_ms: int = INTERVAL_MS) -> None:
        super().__init__()
        self.threshold = gc.get_threshold()
        self.collections = 0
        self.ui_thread = threading.get_ident()
        self._asked.connect(self._collect_for)     # queued from workers: runs on this thread
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.check)
        gc.disable()
        garbage.set_collector(self.collect)
        self.timer.start(interval_ms)

    def check(self) -> None:
        """Collect the generations whose counts crossed the interpreter's thresholds."""
        counts = gc.get_count()
        generation = -1
        for level in range(3):
            if counts[level] <= self.threshold[level]:
                break
            generation = level
        if generation >= 0:
            gc.collect(generation)
            self.collections += 1

    def collect(self) -> None:
        """Collect every generation on the UI thread; from a worker, ask it and wait."""
        if threading.get_ident() == self.ui_thread:
            gc.collect()
            self.collections += 1
            return
        done = threading.Event()
        self._asked.emit(done)
        done.wait(WAIT_FOR_UI_S)

    def _collect_for(self, done: threading.Event) -> None:
        gc.collect()
        self.collections += 1
        done.set()

    def stop(self) -> None:
        self.timer.stop()
        garbage.set_collector(None)
        gc.enable()
