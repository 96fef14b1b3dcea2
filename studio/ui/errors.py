"""One path for every error to reach the user: a message box with the details folded away.

Exceptions escaping anywhere (the UI thread via sys.excepthook, other threads via
threading.excepthook, workers via JobHandle.failed) end here; the app stays up.
"""
from __future__ import annotations

import logging
import sys
import threading
import traceback

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from studio.core.errors import StudioError

log = logging.getLogger(__name__)


class ErrorReporter(QObject):
    """Thread-safe: `report` may be called from any thread; the dialog opens on the UI thread."""
    reported = Signal(str, str, str)  # title, message, details

    def __init__(self) -> None:
        super().__init__()
        self.parent_widget: QWidget | None = None
        self.history: list[tuple[str, str, str]] = []
        self.show_dialogs = True
        self.reported.connect(self._show, Qt.ConnectionType.QueuedConnection)

    def report(self, title: str, message: str, details: str = "") -> None:
        log.error("%s: %s\n%s", title, message, details)
        self.reported.emit(title, message, details)

    def _show(self, title: str, message: str, details: str) -> None:
        self.history.append((title, message, details))
        if not self.show_dialogs:
            return
        box = QMessageBox(QMessageBox.Icon.Warning if not details else QMessageBox.Icon.Critical,
                          title, message, QMessageBox.StandardButton.Ok, self.parent_widget)
        if details:
            box.setInformativeText("Something went wrong inside the studio. Your model, plans "
                                   "and exports are unchanged. The details below help a bug report.")
            box.setDetailedText(details)
        box.open()  # non-blocking: the app keeps running

    def install_hooks(self) -> None:
        def excepthook(kind, value, tb):
            if issubclass(kind, KeyboardInterrupt):
                QApplication.quit()
                return
            if issubclass(kind, StudioError):  # the user's to fix (a full disk...): no traceback
                self.report("Could not do that", str(value))
                return
            self.report("Unexpected error", f"{kind.__name__}: {value}",
                        "".join(traceback.format_exception(kind, value, tb)))

        def thread_hook(args):
            self.report("Unexpected error in a background thread",
                        f"{args.exc_type.__name__}: {args.exc_value}",
                        "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                           args.exc_traceback)))

        sys.excepthook = excepthook
        threading.excepthook = thread_hook


_instance: ErrorReporter | None = None


def get_reporter() -> ErrorReporter:
    global _instance
    if _instance is None:
        _instance = ErrorReporter()
    return _instance


def show_error(title: str, message: str, details: str = "") -> None:
    get_reporter().report(title, message, details)
