"""The window's shared state: the session, the selected layer, and the job runner.

Views get the AppState in their constructor, read `state.session`, listen to its signals, and
start long work with `state.submit(...)`. A view never reaches into another view.
"""
from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import QObject, Signal

from studio.core.jobs import Job, Progress
from studio.core.session import Session, Sessions
from studio.ui.workers import JobHandle, JobRunner


class AppState(QObject):
    modelChanged = Signal(object)     # ModelHandle or None
    layerSelected = Signal(str)       # a layer name
    resultsChanged = Signal(str)      # a session key: "weight_stats", "variants", "runs", "plan"...
    jobFailed = Signal(str, str, str)  # title, message, details

    def __init__(self) -> None:
        super().__init__()
        self.session = Session()
        self.sessions = Sessions()
        self.runner = JobRunner()
        self.selected_layer: str | None = None

    @property
    def handle(self):
        return self.session.handle

    def set_model(self, handle) -> None:
        """Show `handle`; a model opened before in this run comes back with its results."""
        self.session = Session() if handle is None else self.sessions.for_model(handle)
        self.selected_layer = None
        self.modelChanged.emit(handle)

    def set_session(self, session) -> None:
        """Show a restored session (its model opened): its results, plan, variants and runs
        replace whatever this run had for the same model."""
        self.sessions.adopt(session)
        self.session = session
        self.selected_layer = None
        self.modelChanged.emit(session.handle)
        for key in (*session.results, "plan", "variants", "runs"):
            self.resultsChanged.emit(key)

    def select_layer(self, name: str) -> None:
        if name != self.selected_layer:
            self.selected_layer = name
            self.layerSelected.emit(name)

    def publish(self, key: str, value: Any = None) -> None:
        """Store a finished result in the session (unless value is None) and tell the views."""
        if value is not None:
            self.session.results[key] = value
        self.resultsChanged.emit(key)

    def submit(self, title: str, factory: Callable[[], Job],
               on_result: Callable[[Any], None] | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> JobHandle:
        """Run a core job on the worker thread; its errors reach the user through the window."""
        return self.runner.submit(title, factory, on_result, on_progress,
                                  on_failed=lambda msg, details:
                                  self.jobFailed.emit(title, msg, details))
