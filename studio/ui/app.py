"""QApplication set-up, error hooks, and `main()` for the window."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time

_START = time.perf_counter()


# The core modules the views import (torch and transformers under them): imported on a
# thread while the window's shell is already on screen, so that building the views finds them
# loaded. A name missing here is simply imported when the views are built.
PRELOAD = ("numpy", "torch", "transformers", "studio.core.models", "studio.core.stats",
           "studio.core.activations", "studio.core.outliers", "studio.core.sensitivity",
           "studio.core.runs", "studio.core.evaluate", "studio.core.bench", "studio.core.plan",
           "studio.core.quant.registry", "studio.core.export")
# What opening a model imports (transformers' model loading pulls in torch._dynamo and
# torch.distributed.tensor: 1-3 s): imported on a thread once the window is usable, so that an
# open does not import them on the worker while the window waits for the interpreter's lock.
PRELOAD_BEHIND = ("transformers.modeling_utils", "transformers.masking_utils",
                  "transformers.models.auto.modeling_auto",
                  "transformers.tokenization_utils_tokenizers", "safetensors.torch")
# How long a thread keeps the interpreter's lock while another waits for it (CPython: 5 ms).
# The UI thread lets the lock go in most Qt calls and then waits to take it back: beside a
# busy Python thread (an autosave's encoding, a job's Python loop) each wait took up to the
# whole interval, and a paint makes hundreds. Beside a thread looping in Python the Weights tab
# painted in 1105 ms at 5 ms, 436 at 1 ms, 238 at 0.2 ms (106 alone), and that thread ran at 62%
# of its speed alone at 1 ms, 46% at 0.2 ms: while the window paints, it goes first
# (benchmarks/bench_paint_convoy.py). Torch's operations let the lock go and barely slow a paint.
SWITCH_INTERVAL_S = 0.0002


def main(source: str | None = None, screenshot: str | None = None, tab: str | None = None,
         session: str | None = None) -> int:
    """Show the window (opening `source` if given) and run the event loop.

    The window's shell is shown first (no torch import on the way); the views are built once
    the core modules have been imported on a background thread. With `screenshot`, the window
    is saved to that PNG once the model has opened (or once the views are built, without a
    model) and the app quits: for documentation, smoke tests and timing.
    """
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from studio.ui.errors import get_reporter
    from studio.ui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app.setApplicationName("Compression Studio")
    app.setOrganizationName("compression-studio")
    from pathlib import Path

    from PySide6.QtGui import QIcon
    icon = Path(__file__).resolve().parents[2] / "resources" / "icon.svg"  # source checkout
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    reporter = get_reporter()
    reporter.install_hooks()
    from studio.ui.collector import UiThreadCollector

    collector = UiThreadCollector()   # lives as long as the event loop
    from studio.core.session_file import start_run

    crashed = start_run()
    window = MainWindow(deferred=True)
    reporter.parent_widget = window
    window.statusBar().showMessage("Loading the engine (torch)...")
    # The engine is imported only once the window is on screen: loading torch's libraries
    # holds the interpreter's lock for seconds, which would hold back the first paint.
    on_exposed(window, lambda: (_shown(screenshot is not None),
                                QTimer.singleShot(50, lambda: preload(ready))))
    window.show()

    def ready() -> None:
        configure_plots()
        window.build()
        window.statusBar().clearMessage()
        # The imports' objects live as long as the process: out of every later collection.
        collector.freeze()
        preload_behind(then=collector.freeze)
        if session:
            window.sessions.open(session)
        elif not source and not screenshot:
            QTimer.singleShot(0, lambda: window.sessions.offer_restore(crashed))
        if screenshot:
            def grab() -> None:
                if tab:
                    for i in range(window.tabs.count()):
                        if window.tabs.tabText(i).lower() == tab.lower():
                            window.tabs.setCurrentIndex(i)
                QTimer.singleShot(500, lambda: (window.grab().save(screenshot), app.quit()))
                print(f"ready after {time.perf_counter() - _START:.2f} s", file=sys.stderr)

            if source:
                window.open_model(source).done.connect(grab)
            else:
                QTimer.singleShot(0, grab)
        elif source:
            window.open_model(source)

    return app.exec()


def configure_plots() -> None:
    import pyqtgraph as pg

    pg.setConfigOptions(antialias=True, background="w", foreground="k")


def preload_behind(names=PRELOAD_BEHIND, then=None) -> threading.Thread:
    """Import `names` on a thread, nothing waiting for them (an open started meanwhile finds
    them half-imported and waits on Python's import lock, as it would have imported them);
    then call `then()` on that thread."""
    def work() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:   # imported again, and reported, by whatever needs it
                logging.getLogger(__name__).warning("preloading %s failed", name, exc_info=True)
        if then is not None:
            then()

    thread = threading.Thread(target=work, name="preload-behind", daemon=True)
    thread.start()
    return thread


def preload(then) -> None:
    """Import PRELOAD on a thread; call `then` on the UI thread when it is done."""
    import importlib
    import threading

    from PySide6.QtCore import QTimer

    done = threading.Event()

    def work() -> None:
        try:
            for name in PRELOAD:
                importlib.import_module(name)
            # The llama.cpp binding loads its library on first use (~0.35 s): here, not when
            # the Evaluate and Benchmark views list their backends on the UI thread.
            from studio.core.backends import get_backend
            get_backend("llama.cpp").available()
        except Exception:   # whatever failed fails again, reported, when the views are built
            logging.getLogger(__name__).exception("preloading the core failed")
        finally:
            done.set()

    threading.Thread(target=work, name="preload", daemon=True).start()
    timer = QTimer()
    timer.setInterval(20)

    def check() -> None:
        if done.is_set():
            timer.stop()
            timer.deleteLater()
            then()

    timer.timeout.connect(check)
    timer.start()


def on_exposed(widget, then) -> None:
    """Call `then` once, when `widget`'s window is first exposed (on screen, painted)."""
    from PySide6.QtCore import QEvent, QObject

    class _Watch(QObject):
        def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt API)
            if event.type() == QEvent.Type.Expose and obj.isExposed():
                obj.removeEventFilter(self)
                self.deleteLater()
                then()
            return False

    widget.winId()   # creates the QWindow now, so its first expose is seen
    widget.windowHandle().installEventFilter(_Watch(widget))


def _shown(to_stderr: bool) -> None:
    shown = time.perf_counter() - _START
    since_process = time.time() - _process_start()
    message = (f"window shown {shown:.2f} s after start ({since_process:.2f} s after the "
               f"process started)")
    logging.getLogger(__name__).info(message)
    if to_stderr:
        print(message, file=sys.stderr)


def _process_start() -> float:
    """When this process started (wall clock): the interpreter's own start-up counts too.
    psutil's `create_time` adds the boot time in whole seconds (/proc/stat's btime), so on
    Linux it is up to 1 s early (0.68 s on the machine that found it: every "window shown"
    figure before then was that much too long); there the start is read in clock ticks since
    boot (/proc/self/stat) and placed against /proc/uptime, to within a tick (10 ms)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])   # field 22, starttime
            since_boot = float(uptime.read().split()[0])
        return time.time() - since_boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):   # not Linux
        import psutil

        return psutil.Process().create_time()
