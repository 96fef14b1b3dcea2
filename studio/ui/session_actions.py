"""File > Save Session / Open Session, autosave after every finished job (and every few
minutes), and the offer to restore the autosave after a crash. The session format itself is
`studio.core.session_file`."""
from __future__ import annotations

import copy
import queue
import threading
import time
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QFileDialog, QMessageBox

from studio.core import session_file
from studio.core.errors import StudioError
from studio.core.session import Session
from studio.ui.errors import get_reporter
from studio.ui.workers import tell

AUTOSAVE_MINUTES = 5
# An autosave waits between its steps while a job runs, at most this long, then goes on beside it.
WAIT_FOR_JOB_SECONDS = 120
AFTER_JOB_MS = 1500            # the autosave after a job starts this long after it


class SessionActions(QObject):
    """Owned by the main window; reads and restores its state through `window_state` /
    `apply_window_state`."""

    _autosaved = Signal(object, object)      # (SavedSession | None, error | None), from a thread

    def __init__(self, window) -> None:
        super().__init__(window)
        self.window, self.state = window, window.state
        self.autosave_enabled = True
        self.last_autosave: Path | None = None
        self._dirty = False
        self._saving: Session | None = None   # the snapshot being written, if any
        self._again = False
        self._job_ended = float("-inf")       # time.monotonic() when the last job ended
        # One long-lived writer thread, fed through a queue, started now, before the window is
        # used: starting a thread makes the UI thread wait (Thread.start) while the new one
        # takes the GIL, 0.3 s under load.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._encoded = session_file.EncodeCache()   # the writer's own: results encoded once
        self._writer = threading.Thread(target=self._write_forever, name="studio-autosave",
                                        daemon=True)
        self._writer.start()
        self._autosaved.connect(self._autosave_done)
        self.state.runner.jobDone.connect(self._job_done)
        self.state.resultsChanged.connect(self._changed)
        self.timer = QTimer(self)
        self.timer.timeout.connect(lambda: self._dirty and self.autosave())
        self.timer.start(AUTOSAVE_MINUTES * 60_000)

    def add_menu_items(self, menu) -> None:
        self.window._action(menu, "&Save session...", self.choose_save, QKeySequence("Ctrl+Shift+S"))
        self.window._action(menu, "Open s&ession...", self.choose_open)

    # --- window state ----------------------------------------------------------------------
    def window_state(self) -> dict:
        tabs = self.window.tabs
        return {"tab": tabs.tabText(tabs.currentIndex()), "layer": self.state.selected_layer}

    def apply_window_state(self, window: dict) -> None:
        tabs = self.window.tabs
        for i in range(tabs.count()):
            if tabs.tabText(i) == window.get("tab"):
                tabs.setCurrentIndex(i)
        layer = window.get("layer")
        if isinstance(layer, str) and self.state.handle is not None:
            if any(info.name == layer for info in self.state.handle.layers):
                self.state.select_layer(layer)

    # --- save ------------------------------------------------------------------------------
    def choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.window, "Save session",
                                              f"studio{session_file.SUFFIX}",
                                              f"Session (*{session_file.SUFFIX})")
        if path:
            self.save(path)

    def save(self, path: str | Path) -> session_file.SavedSession | None:
        """Save now (on the UI thread: a session's files are small beside a model's)."""
        path = Path(path)
        if path.suffix != session_file.SUFFIX:
            path = path.with_name(path.name + session_file.SUFFIX)
        try:
            saved = session_file.save_session(self.state.session, path, self.window_state())
        except StudioError as exc:
            get_reporter().report("Session not saved", str(exc))
            return None
        note = f" (not saved: {', '.join(saved.skipped)})" if saved.skipped else ""
        self.window.statusBar().showMessage(f"Session saved to {saved.path}{note}", 8000)
        return saved

    # --- open ------------------------------------------------------------------------------
    def choose_open(self) -> None:
        path = QFileDialog.getExistingDirectory(self.window, "Open session (a .session folder)")
        if path:
            self.open(path)

    def locate_model(self, source: str) -> str | None:
        """Ask where the session's model is now (a folder, or a .gguf file)."""
        QMessageBox.information(self.window, "Locate the model",
                                f"The session's model is no longer at {source}. Choose where "
                                f"it is now (the same weights).")
        if source.endswith(".gguf"):
            path, _ = QFileDialog.getOpenFileName(self.window, "Locate the model", "",
                                                  "GGUF (*.gguf)")
        else:
            path = QFileDialog.getExistingDirectory(self.window, "Locate the model folder")
        return path or None

    def open(self, path: str | Path, model: str | None = None):
        """Re-open a session in the background; a model that moved is asked for first."""
        self.window.build()
        try:
            doc, _ = session_file.read_session(path)
        except StudioError as exc:
            get_reporter().report("Session not opened", str(exc))
            return None
        source = doc["model"]["source"]
        if model is None and source != "demo" and not Path(source).exists():
            model = self.locate_model(source)
            if model is None:
                self.window.statusBar().showMessage("Session not opened: its model was not "
                                                    "located.", 8000)
                return None
        return self.state.submit(f"Opening session {Path(path).name}",
                                 lambda: session_file.open_session_job(path, model),
                                 on_result=self._restored)

    def _restored(self, restored) -> None:
        self.state.set_session(restored.session)
        self.apply_window_state(restored.window)
        self._dirty = False
        message = " ".join(["Session restored.", *restored.notes])
        self.window.statusBar().showMessage(message, 8000)

    # --- autosave and crash recovery -------------------------------------------------------
    def _changed(self, _key: str) -> None:
        self._dirty = True

    def _job_done(self, handle) -> None:
        self._job_ended = time.monotonic()
        if not handle.token.cancelled and self._dirty:
            # A moment after the job: the views first redraw what it published (the save's
            # Python beside their redraw lengthened the UI thread's waits for the GIL), and a
            # job started meanwhile is waited for (`_wait_for_jobs`).
            QTimer.singleShot(AFTER_JOB_MS, self, lambda: self._dirty and self.autosave())

    def autosave(self) -> None:
        """Autosave in a background thread: writing a new variant's files takes seconds (0.6-2.6 s
        measured on the demo with one variant, under load), and the window must not wait. The
        thread writes a snapshot: the result maps as they are now (results are never changed
        once published) and a copy of the plan."""
        if not self.autosave_enabled or self.state.handle is None:
            return
        if self._saving is not None:
            self._again = True           # one more once this one is written
            return
        session = self.state.session
        snapshot = Session(handle=session.handle, plan=copy.deepcopy(session.plan),
                           results=dict(session.results), variants=dict(session.variants),
                           runs=list(session.runs))
        window, self._dirty = self.window_state(), False
        self._saving = snapshot
        self._requests.put((snapshot, window))

    def _write_forever(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:          # the window closed
                return
            snapshot, window = request
            try:
                saved = session_file.autosave(snapshot, window, self._encoded,
                                              self._wait_for_jobs(time.monotonic()))
            except Exception as exc:  # an autosave must never take the window down
                tell(self._autosaved, None, exc)
            else:
                tell(self._autosaved, saved, None)

    def stop(self) -> None:
        """The window closes: the writer ends after the save it is writing, if any."""
        self._requests.put(None)

    def _wait_for_jobs(self, since: float):
        """Between the save's steps, on the writer thread: wait while a job runs and for
        AFTER_JOB_MS after one ended, while the views draw what it published (up to
        WAIT_FOR_JOB_SECONDS after the save began). Every busy Python thread lengthens the UI
        thread's waits for the GIL: the save's encoding beside a job stalled the window 0.3-1.5 s
        under load, and a paused save that went on the moment a job ended, beside the views'
        redraw, 2 s. Sleeping holds no GIL."""
        def busy() -> bool:
            return bool(self.state.runner.active
                        or time.monotonic() - self._job_ended < AFTER_JOB_MS / 1000)

        def wait(_progress) -> None:
            while busy() and time.monotonic() - since < WAIT_FOR_JOB_SECONDS:
                time.sleep(0.05)
        return wait

    def _autosave_done(self, saved, error) -> None:
        self._saving = None
        if error is not None:
            self.autosave_enabled, self._dirty = False, True
            get_reporter().report("Autosave stopped", f"The session could not be autosaved "
                                  f"({error}); autosave is off until the next start. Save the "
                                  f"session yourself (File > Save session).")
            return
        if saved is not None:
            self.last_autosave = saved.path
        if self._again:
            self._again = False
            self.autosave()

    def offer_restore(self, crashed: Path | None) -> bool:
        """After a crash: offer the autosave back. True when the user accepted."""
        if crashed is None:
            return False
        answer = QMessageBox.question(
            self.window, "Restore the last session?",
            "The studio did not close normally last time. Restore the session it autosaved "
            "(model, plan, variants and results)?")
        if answer != QMessageBox.StandardButton.Yes:
            return False
        self.open(crashed)
        return True
