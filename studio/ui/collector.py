"""Python's cyclic garbage collected on the UI thread only, in small steps.

The interpreter collects on whichever thread's allocation crosses its threshold, and frees what
it finds there. With jobs allocating on worker threads, that is usually a worker: a widget, a
job handle or a plot item caught in a reference cycle is then destroyed off the UI thread, and
Qt crashes, at random, later (a CI run died so, in a main thread busy elsewhere). So while the
window lives, automatic collection is off, and a timer on the UI thread collects whenever the
interpreter's own thresholds are crossed (as calibre and pyqtgraph do). A job that wants a
collection now (`studio.core.garbage.collect`, between benchmark targets) asks the UI thread
and waits for it, a bounded time: a UI thread that is itself waiting for the job must not
deadlock it.

A collection holds the interpreter's lock for as long as it walks its objects, and the window
waits that long. Three things keep each one short:
- `freeze()` once the window's imports are done: torch, transformers and pyqtgraph make ~450 k
  tracked objects (modules, functions, classes) that live as long as the process; a full
  collection walked them all, 1.1-1.8 s under load. Frozen, it walks the model and the
  session's objects only (~20 k: ~0.1 s).
- A full collection only when the objects that reached the oldest generation since the last
  one are a quarter of those it then held: the interpreter's own rule, which an explicit
  `gc.collect(2)` skips (the timer ran a full collection every ~100 young ones).
- The timer looks often (100 ms), so the young generation it collects stays small: with
  automatic collection off, a model load on a worker filled it with 0.7 M objects between two
  looks, a 3.5 s collection.
"""
from __future__ import annotations

import gc
import threading

from PySide6.QtCore import QObject, QTimer, Signal

from studio.core import garbage

INTERVAL_MS = 100
WAIT_FOR_UI_S = 2.0
FULL_GROWTH = 0.25       # a full collection once the long-lived objects grew by this share


class UiThreadCollector(QObject):
    """Collects on the thread it was made on (the UI thread); `stop()` gives collection back
    to the interpreter."""
    _asked = Signal(object)      # a threading.Event, set once collected
    _freeze_asked = Signal()

    def __init__(self, interval_ms: int = INTERVAL_MS) -> None:
        super().__init__()
        self.threshold = gc.get_threshold()
        self.collections = 0
        self.full_collections = 0
        self.ui_thread = threading.get_ident()
        self._asked.connect(self._collect_for)     # queued from workers: runs on this thread
        self._freeze_asked.connect(self._freeze)
        self.long_lived = len(gc.get_objects(2))   # in the oldest generation after a full one
        self.pending = 0                           # moved there since
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.check)
        gc.disable()
        garbage.set_collector(self.collect)
        self.timer.start(interval_ms)

    def check(self) -> None:
        """Collect the generations whose counts crossed the interpreter's thresholds; the
        oldest only when it grew enough since its last collection."""
        counts = gc.get_count()
        generation = -1
        for level in range(3):
            if counts[level] <= self.threshold[level]:
                break
            generation = level
        if generation == 2 and self.pending <= self.long_lived * FULL_GROWTH:
            generation = 1
        if generation >= 0:
            self._collect(generation)

    def _collect(self, generation: int) -> None:
        if generation == 1:      # its survivors move to the oldest generation: count them
            young = len(gc.get_objects(0)) + len(gc.get_objects(1))
            self.pending += max(0, young - gc.collect(1))
        else:
            gc.collect(generation)
        if generation == 2:
            self.long_lived, self.pending = len(gc.get_objects(2)), 0
            self.full_collections += 1
        self.collections += 1

    def collect(self) -> None:
        """Collect every generation on the UI thread; from a worker, ask it and wait."""
        if threading.get_ident() == self.ui_thread:
            self._collect(2)
            return
        done = threading.Event()
        self._asked.emit(done)
        done.wait(WAIT_FOR_UI_S)

    def _collect_for(self, done: threading.Event) -> None:
        self._collect(2)
        done.set()

    def freeze(self) -> None:
        """Leave every object alive now out of all later collections (`gc.freeze`): called once
        the window's imports are done, whose objects live as long as the process. Garbage
        among them (an import's own cycles) is kept, not freed: a small, one-off cost. From
        any thread: the freeze is carried out on the UI thread."""
        if threading.get_ident() == self.ui_thread:
            self._freeze()
        else:
            self._freeze_asked.emit()

    def _freeze(self) -> None:
        gc.freeze()
        self.long_lived, self.pending = 0, 0

    def stop(self) -> None:
        self.timer.stop()
        garbage.set_collector(None)
        gc.enable()
