"""Why the window stalled (`bench_stalls.py --why`): a sampling watchdog and a garbage
collection log.

A QTimer on the UI thread stamps the time every 10 ms; a daemon thread looks at the stamp every
20 ms and, while it is older than the threshold, samples the UI thread's stack and the other
threads' innermost frames. When the stall ends it prints how long it was and the stacks seen
most often in it: a stall is either the UI thread's own work (its stack says what) or the UI
thread waiting for the interpreter's lock held by another thread in one long C call (its stack
sits in the event loop, the other thread's frame says what holds the lock). Every garbage
collection is timed (`gc.callbacks`) with its generation and thread, so a stall that is a
collection shows as one.
"""
from __future__ import annotations

import collections
import gc
import sys
import threading
import time
import traceback


class StallWatch:
    def __init__(self, app, threshold_s: float = 0.15) -> None:
        from PySide6.QtCore import QTimer

        self.threshold = threshold_s
        self.job = ""
        self.collections: list[tuple[float, float, int, bool]] = []   # start, ms, gen, on UI
        self._stamp = time.perf_counter()
        self._gc_began: dict[int, float] = {}
        self._ui = threading.main_thread().ident
        self._timer = QTimer(app, interval=10)
        self._timer.timeout.connect(self._beat)
        self._timer.start()
        gc.callbacks.append(self._gc)
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()

    def _beat(self) -> None:
        self._stamp = time.perf_counter()

    def _gc(self, phase: str, info: dict) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._gc_began[thread] = time.perf_counter()
            return
        began = self._gc_began.pop(thread, None)
        if began is not None:
            self.collections.append((began, (time.perf_counter() - began) * 1000.0,
                                     info["generation"], thread == self._ui))

    def gc_summary(self, since: float) -> str:
        """Collections since `since`: count, and the longest per generation (ms)."""
        done = [c for c in self.collections if c[0] >= since]
        longest = {}
        for _, ms, gen, _ in done:
            longest[gen] = max(longest.get(gen, 0.0), ms)
        worst = " ".join(f"g{gen}:{ms:.0f}" for gen, ms in sorted(longest.items()))
        return f"{len(done)} ({worst})" if done else "0"

    def _watch(self) -> None:
        ui_seen: collections.Counter = collections.Counter()
        others_seen: collections.Counter = collections.Counter()
        stalled_from = None
        while True:
            time.sleep(0.02)
            stamp = self._stamp
            late = time.perf_counter() - stamp
            if late > self.threshold:
                frames = sys._current_frames()
                ui = frames.get(self._ui)
                if ui is None:            # the UI thread has ended: the drive is over
                    return
                stalled_from = stamp
                ui_seen[_where(ui, 5)] += 1
                names = {t.ident: t.name for t in threading.enumerate()}
                for ident, frame in frames.items():
                    if ident not in (self._ui, threading.get_ident()):
                        others_seen[f"[{names.get(ident, ident)}] {_where(frame, 2)}"] += 1
            elif stalled_from is not None and stamp != stalled_from:
                self._report(stamp - stalled_from, ui_seen, others_seen, stalled_from)
                ui_seen.clear()
                others_seen.clear()
                stalled_from = None

    def _report(self, seconds: float, ui_seen, others_seen, began: float) -> None:
        gcs = [f"g{gen} {ms:.0f} ms{'' if on_ui else ' (worker)'}"
               for start, ms, gen, on_ui in self.collections
               if began - 0.05 <= start <= began + seconds and ms >= 10]
        print(f"[{self.job}] stall {seconds * 1000:.0f} ms"
              + (f"; collections: {', '.join(gcs)}" if gcs else ""), file=sys.stderr)
        for where, n in ui_seen.most_common(3):
            print(f"   UI x{n}: {where}", file=sys.stderr)
        for where, n in others_seen.most_common(4):
            print(f"   {where} x{n}", file=sys.stderr)


def _where(frame, depth: int) -> str:
    """The innermost `depth` frames, innermost first, as short file:line function."""
    tail = traceback.extract_stack(frame)[-depth:]
    return " <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(tail))


def _short(filename: str) -> str:
    for marker in ("/studio/", "/site-packages/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker)[-1]
    return filename.rsplit("/", 1)[-1]
