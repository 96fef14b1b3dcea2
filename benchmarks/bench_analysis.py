"""Analysis figures on the demo model: weight statistics, activation capture, layer switching.

    python benchmarks/bench_analysis.py [--windows 32] [--seqlen 512] [--repeat 20]

Targets (issue 3): weight statistics of all layers <= 10 s; activation capture over 32 windows
x 512 tokens <= 60 s; switching the selected layer redraws in <= 100 ms. The load average is
printed too: on a shared 2-core machine other work changes every figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
_APP = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=20, help="layer switches to time")
    args = parser.parse_args()

    from studio.core.activations import activation_capture_job
    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from studio.core.outliers import find_outliers, massive_activations
    from studio.core.stats import weight_stats_job

    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)")
    handle = run(open_model_job("demo"))
    start = time.perf_counter()
    weights = run(weight_stats_job(handle))
    weight_seconds = time.perf_counter() - start
    print(f"weight statistics: {len(weights.layers)} layers "
          f"({len(weights.quantizable)} quantizable + embedding/lm_head) in {weight_seconds:.2f} s"
          f"  [target <= 10 s]")

    start = time.perf_counter()
    capture = run(activation_capture_job(handle, None, args.windows, args.seqlen))
    capture_seconds = time.perf_counter() - start
    print(f"activation capture: {args.windows} windows x {args.seqlen} tokens in "
          f"{capture_seconds:.1f} s ({args.windows * args.seqlen / capture_seconds:.0f} tokens/s)"
          f"  [target <= 60 s for 32 x 512]")
    groups = find_outliers(capture)
    massive = massive_activations(capture)
    print(f"  {sum(1 for g in groups if len(g.channels))} of {len(groups)} layer inputs have "
          f"outlier channels (k=20); {len(massive)} tokens carry massive activations"
          + (f", e.g. channel {massive[0].channel} = {massive[0].value:.0f} at position "
             f"{massive[0].position}" if massive else ""))

    update_ms, painted_ms = time_layer_switch(handle, weights, capture, args.repeat)
    print(f"layer switch, Weights + Activations views updated: median "
          f"{statistics.median(update_ms):.1f} ms, max {max(update_ms):.1f} ms over "
          f"{len(update_ms)} switches  [target <= 100 ms]")
    print(f"  ... updated and repainted (offscreen, 1400x900 each): median "
          f"{statistics.median(painted_ms):.1f} ms, max {max(painted_ms):.1f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def time_layer_switch(handle, weights, capture, repeat: int) -> tuple[list[float], list[float]]:
    """Milliseconds from `state.select_layer` to (a) both views updated (the Weights view sets
    its four plots, the Activations view its inspector) and (b) both also repainted on screen
    (offscreen raster here), cycling through layers of different shapes and blocks so every
    switch really redraws."""
    from PySide6.QtWidgets import QApplication

    from studio.ui.state import AppState
    from studio.ui.views.activations import ActivationsView
    from studio.ui.views.weights import WeightsView

    global _APP  # the QApplication must outlive every widget, so it is not a local
    _APP = app = QApplication.instance() or QApplication([])
    state = AppState()
    state.set_model(handle)  # before any view exists, so no job starts
    state.session.results["weight_stats"] = weights
    state.session.results["activations"] = capture
    views = [WeightsView(state), ActivationsView(state)]
    for view in views:
        view.resize(1400, 900)
        view.show()
    app.processEvents()
    names = [info.name for info in handle.quantizable]
    update, painted = [], []
    for i in range(repeat):
        start = time.perf_counter()
        state.select_layer(names[(i * 37 + 5) % len(names)])  # both views' slots run here
        update.append(1000 * (time.perf_counter() - start))
        for view in views:
            view.repaint()
        app.processEvents()
        painted.append(1000 * (time.perf_counter() - start))
    for view in views:
        view.close()
        view.deleteLater()
    app.processEvents()
    return update, painted


if __name__ == "__main__":
    main()
