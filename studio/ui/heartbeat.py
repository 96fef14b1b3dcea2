"""The heartbeat probe: how long the event loop stalls, measured from inside it.

A QTimer asks to fire every 10 ms; each time it fires it records how late it is. A late tick
is a stall the user felt (a frozen window, a click not answered). `stalls()` are the
lateness values in ms; `summary()` their p50 / p99 / max. Debug setting in Preferences; the
benchmark `benchmarks/bench_stalls.py` drives the real window through the main jobs with it.
"""
from __future__ import annotations

import time

import numpy as np
from PySide6.QtCore import QObject, Qt, QTimer, Signal

PERIOD_MS = 10


class Heartbeat(QObject):
    report = Signal(str)      # a one-line summary, about once a second

    def __init__(self, parent=None, period_ms: int = PERIOD_MS) -> None:
        super().__init__(parent)
        self.period = period_ms / 1000.0
        self.timer = QTimer(self)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(period_ms)
        self.timer.timeout.connect(self._tick)
        self.lateness: list[float] = []
        self._last = 0.0
        self._reported = 0.0

    def start(self) -> None:
        self.lateness.clear()
        self._last = self._reported = time.perf_counter()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def reset(self) -> None:
        """Start a new measurement window (a new job)."""
        self.lateness.clear()
        self._last = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.lateness.append(max(0.0, now - self._last - self.period) * 1000.0)
        self._last = now
        if now - self._reported >= 1.0:
            self._reported = now
            s = self.summary()
            self.report.emit(f"stalls p99 {s['p99_ms']:.0f} ms · max {s['max_ms']:.0f} ms")

    def stalls(self) -> np.ndarray:
        return np.asarray(self.lateness, dtype=np.float64)

    def summary(self) -> dict:
        values = self.stalls()
        if not len(values):
            return {"ticks": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        return {"ticks": int(len(values)), "p50_ms": float(np.percentile(values, 50)),
                "p99_ms": float(np.percentile(values, 99)), "max_ms": float(values.max())}
