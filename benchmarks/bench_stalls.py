"""Event-loop stalls of the real window while it works: open, weight statistics, activation
capture, GPTQ, sensitivity sweep, evaluation, benchmark.

    python benchmarks/bench_stalls.py [MODEL] [--full] [--steps N] [--no-autosave] [--why [MS]]

The heartbeat probe (`studio.ui.heartbeat`: a 10 ms QTimer measuring its own lateness) runs
through every job; one row per job: its wall time, and the probe's p50 / p99 / max lateness.
Targets: p99 <= 50 ms and max <= 200 ms. Without --full each job runs with small settings (few
windows, short texts) so the whole drive takes minutes; the stalls that matter (plots redrawn,
results published on the UI thread) happen at either size. Stalls on a busy machine include
the time the UI thread waits for a core: report them as measured under load. `--why` prints,
for every stall over MS ms (150), where the UI thread and the others were and which garbage
collections ran (`stall_watch.py`), and adds the collections per job to the table.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("COMPRESSION_STUDIO_CONFIG", tempfile.mkdtemp())


def main() -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from studio.ui import settings

    app = QApplication(sys.argv[:1])
    settings.put({"quick_eval": False})           # one job at a time, each measured alone
    from studio.ui.app import SWITCH_INTERVAL_S, configure_plots
    from studio.ui.collector import UiThreadCollector
    from studio.ui.heartbeat import Heartbeat
    from studio.ui.main_window import MainWindow

    # As `app.main()` sets up a user's window: garbage collected on the UI thread only, and
    # the plots' options (antialiasing costs paint time).
    collector = UiThreadCollector()   # lives as long as the event loop
    configure_plots()
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    args = [a for i, a in enumerate(sys.argv[1:], 1)
            if not a.startswith("--") and sys.argv[i - 1] not in ("--steps", "--why")]
    source, full = (args[0] if args else "demo"), "--full" in sys.argv
    # What `ui/app.py` preloads on a thread before the window is usable (the llama.cpp binding's
    # library among it): loaded here before the probe starts, as a user's window has it.
    from studio.core.backends import get_backend
    get_backend("llama.cpp").available()
    # ...and what it imports behind the usable window (`app.PRELOAD_BEHIND`), as a user's
    # window has them a few seconds after start.
    from studio.ui.app import preload_behind
    preload_behind().join()
    window = MainWindow()
    window.resize(1400, 900)
    window.show()
    collector.freeze()          # as the window does once its imports are done and it is built
    # --no-autosave: the session autosave after each job runs on the UI thread; this tells
    # its share of the stalls apart.
    window.sessions.autosave_enabled = "--no-autosave" not in sys.argv
    state, views = window.state, window.views
    beat = Heartbeat(window)
    rows: list[tuple[str, float, dict, str]] = []
    watch = None

    def small() -> None:
        if full:
            return
        views["Activations"].windows.setValue(4)
        views["Activations"].seqlen.setValue(128)
        views["Quantize"].windows.setValue(8)
        views["Quantize"].seqlen.setValue(128)
        sens = views["Sensitivity"]
        sens.widths.setText("3,4")
        sens.groups.setText("128")
        sens.kl_windows.setValue(1)
        views["Evaluate"].windows.setValue(4)
        views["Evaluate"].seqlen.setValue(128)
        bench = views["Benchmark"]
        bench.prompt_tokens.setValue(32)
        bench.new_tokens.setValue(8)
        bench.repeat.setValue(1)

    def weight_stats():
        window.tabs.setCurrentWidget(views["Weights"])
        return views["Weights"].job

    def gptq():
        window.tabs.setCurrentWidget(views["Quantize"])
        view = views["Quantize"]
        view.method.setCurrentIndex(view.method.findData("gptq"))
        view.run()
        return view.job

    def evaluate():
        window.tabs.setCurrentWidget(views["Evaluate"])
        views["Evaluate"].set_checked(["baseline", *state.session.variants])
        return views["Evaluate"].run_evaluation()

    def benchmark():
        window.tabs.setCurrentWidget(views["Benchmark"])
        views["Benchmark"].set_checked(["fp32", *(f"variant:{n}" for n in state.session.variants)])
        return views["Benchmark"].run_benchmark()

    def tab_then(name, action):
        def start():
            window.tabs.setCurrentWidget(views[name])
            return action()
        return start

    steps = [("open", lambda: window.open_model(source)),
             ("weight statistics", weight_stats),
             ("activation capture", tab_then("Activations", views["Activations"].start)),
             ("GPTQ", gptq),
             ("sensitivity sweep", tab_then("Sensitivity", views["Sensitivity"].start)),
             ("evaluation", evaluate),
             ("benchmark", benchmark)]

    if "--steps" in sys.argv:
        del steps[int(sys.argv[sys.argv.index("--steps") + 1]):]

    def run_next(index: int = 0) -> None:
        if index == len(steps):
            report(rows)
            app.quit()
            return
        title, start = steps[index]
        if index == 1:
            small()
        beat.reset()
        began = time.perf_counter()
        if watch is not None:
            watch.job = title
        start()

        def wait() -> None:
            if state.runner.active or (index == 0 and state.handle is None):
                QTimer.singleShot(100, wait)
                return
            collections = watch.gc_summary(began) if watch is not None else ""
            rows.append((title, time.perf_counter() - began, beat.summary(), collections))
            print(f"{title}: done", file=sys.stderr)
            QTimer.singleShot(300, lambda: run_next(index + 1))
        QTimer.singleShot(300, wait)

    beat.start()
    if "--why" in sys.argv:
        from stall_watch import StallWatch
        at = sys.argv.index("--why") + 1
        ms = float(sys.argv[at]) if at < len(sys.argv) and sys.argv[at].isdigit() else 150.0
        watch = StallWatch(app, ms / 1000.0)
    QTimer.singleShot(500, run_next)
    app.exec()


def report(rows) -> None:
    print(f"{'job':<20} {'seconds':>8} {'ticks':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}  "
          f"targets p99<=50 max<=200  collections (longest ms per generation)")
    for title, seconds, s, collections in rows:
        ok = "ok" if s["p99_ms"] <= 50 and s["max_ms"] <= 200 else "OVER"
        print(f"{title:<20} {seconds:>8.1f} {s['ticks']:>7} {s['p50_ms']:>7.1f} "
              f"{s['p99_ms']:>7.1f} {s['max_ms']:>7.1f}  {ok:<24}{collections}")


if __name__ == "__main__":
    main()
