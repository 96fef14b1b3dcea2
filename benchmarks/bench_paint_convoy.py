"""How long the window takes to paint a tab beside a thread that runs Python, per switch interval
(`sys.setswitchinterval`, `app.SWITCH_INTERVAL_S`), and how fast that thread goes meanwhile.

    QT_QPA_PLATFORM=offscreen python benchmarks/bench_paint_convoy.py [--tab Weights] [--repeat 9]

The demo is opened in the real window and its weight statistics computed, so the tab's plots
hold real data. Each row: the median time of a full paint of the tab (every axis redrawn, as
after a new result), alone and beside a thread looping in Python, and that thread's loops per
second while the window painted, against its rate alone; and how many times one paint called
into Python (each such call waits for the lock). Torch's own operations release the
interpreter's lock and barely slow a paint; Python code between them (a job's loop, building a
result, parsing) is what the UI thread waits behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("COMPRESSION_STUDIO_CONFIG", tempfile.mkdtemp())

INTERVALS = (0.005, 0.001, 0.0005, 0.0002, 0.0001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tab", default="Weights")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()

    from PySide6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    from studio.ui import settings
    settings.put({"quick_eval": False})
    from studio.ui.app import configure_plots
    from studio.ui.main_window import MainWindow

    configure_plots()
    window = MainWindow()
    window.resize(1400, 900)
    window.show()

    def settle() -> None:
        while window.state.runner.active or window.state.handle is None:
            app.processEvents()
            time.sleep(0.01)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.01)

    window.open_model("demo")
    settle()
    window.tabs.setCurrentWidget(window.views["Weights"])   # starts the weight statistics
    settle()
    window.tabs.setCurrentWidget(window.views[args.tab])
    settle()

    import pyqtgraph as pg

    def redraw_axes() -> None:
        for plot in window.findChildren(pg.PlotWidget):
            for side in ("left", "bottom"):
                axis = plot.getPlotItem().getAxis(side)
                axis.picture = None
                axis.update()

    def paint_ms() -> float:
        times = []
        for _ in range(args.repeat):
            redraw_axes()
            start = time.perf_counter()
            window.grab()
            times.append(1e3 * (time.perf_counter() - start))
        return sorted(times)[len(times) // 2]

    def python_entries() -> Counter:
        """Qt's calls into Python during one paint, by function: beside a busy thread each
        one waits for the interpreter's lock."""
        entries, here = Counter(), sys._getframe()

        def count(frame, event, _arg) -> None:
            if event == "call" and frame.f_back is here:
                entries[frame.f_code.co_name] += 1
        redraw_axes()
        sys.setprofile(count)
        try:
            window.grab()
        finally:
            sys.setprofile(None)
        return entries

    loops, stop = [0], threading.Event()

    def python_loop() -> None:
        while not stop.is_set():
            sum(i * i for i in range(1000))
            loops[0] += 1

    def beside_loop(action) -> tuple[object, float]:
        """`action()` while a thread loops in Python; its result, and the loops per second."""
        stop.clear()
        thread = threading.Thread(target=python_loop)
        thread.start()
        time.sleep(0.3)
        first, start = loops[0], time.perf_counter()
        result = action()
        rate = (loops[0] - first) / (time.perf_counter() - start)
        stop.set()
        thread.join()
        return result, rate

    _, alone_rate = beside_loop(lambda: time.sleep(1.0))
    print(f"{args.tab} tab painted alone: {paint_ms():.1f} ms (median of {args.repeat}); "
          f"the Python thread alone: {alone_rate:.0f} loops/s")
    entries = python_entries()
    print(f"Qt called into Python {sum(entries.values())} times in one paint; most: "
          + ", ".join(f"{name} {n}" for name, n in entries.most_common(4)))
    print(f"{'switch interval':>16} {'paint ms':>9} {'thread loops/s':>15} {'of alone':>9}")
    for interval in INTERVALS:
        sys.setswitchinterval(interval)
        ms, rate = beside_loop(paint_ms)
        print(f"{interval * 1e3:>13.2f} ms {ms:>9.1f} {rate:>15.0f} {rate / alone_rate:>8.0%}")
    os._exit(0)   # the window's threads (autosave) need not be waited for


if __name__ == "__main__":
    main()
