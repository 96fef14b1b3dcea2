"""QApplication set-up, error hooks, and `main()` for the window."""
from __future__ import annotations

import logging
import sys
import time

_START = time.perf_counter()


def main(source: str | None = None, screenshot: str | None = None, tab: str | None = None,
         session: str | None = None) -> int:
    """Show the window (opening `source` if given) and run the event loop.

    With `screenshot`, the window is saved to that PNG once the model has opened (or at once
    without a model) and the app quits: for documentation, smoke tests and timing.
    """
    import pyqtgraph as pg
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from studio.ui.errors import get_reporter
    from studio.ui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Compression Studio")
    app.setOrganizationName("compression-studio")
    from pathlib import Path

    from PySide6.QtGui import QIcon
    icon = Path(__file__).resolve().parents[2] / "resources" / "icon.svg"  # source checkout
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    pg.setConfigOptions(antialias=True, background="w", foreground="k")
    reporter = get_reporter()
    reporter.install_hooks()
    from studio.core.session_file import start_run

    crashed = start_run()
    window = MainWindow()
    reporter.parent_widget = window
    window.show()
    if session:
        window.sessions.open(session)
    elif not source and not screenshot:
        QTimer.singleShot(0, lambda: window.sessions.offer_restore(crashed))
    shown = time.perf_counter() - _START
    since_process = time.time() - _process_start()
    logging.getLogger(__name__).info("window shown %.2f s after start (%.2f s after the "
                                     "process started)", shown, since_process)

    if screenshot:
        def grab() -> None:
            if tab:
                for i in range(window.tabs.count()):
                    if window.tabs.tabText(i).lower() == tab.lower():
                        window.tabs.setCurrentIndex(i)
            QTimer.singleShot(500, lambda: (window.grab().save(screenshot), app.quit()))
            print(f"window shown after {shown:.2f} s ({since_process:.2f} s after the process "
                  f"started); model ready after {time.perf_counter() - _START:.2f} s",
                  file=sys.stderr)

        if source:
            job = window.open_model(source)
            job.done.connect(grab)
        else:
            QTimer.singleShot(0, grab)
    elif source:
        window.open_model(source)
    return app.exec()


def _process_start() -> float:
    """When this process started (wall clock): the interpreter's own start-up counts too."""
    import psutil

    return psutil.Process().create_time()
