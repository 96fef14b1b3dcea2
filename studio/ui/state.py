"""The window's shared state: the session, the current layer, actions, and the job runner.

Views get the AppState in their constructor, read `state.session`, listen to its signals, and
start long work with `state.submit(...)`. A view never reaches into another view: the current
layer is `state.layer` (a `CurrentLayer`, re-announced as `layerSelected`), and work another
view offers ("run the activation capture") is a named action a view registers with
`state.add_action` and anyone starts with `state.run_action`.
"""
from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import QObject, Signal

from studio.core.jobs import Job, Progress
from studio.core.session import Session, Sessions
from studio.ui.current_layer import CurrentLayer
from studio.ui.workers import JobHandle, JobRunner


class AppState(QObject):
    modelChanged = Signal(object)     # ModelHandle or None
    layerSelected = Signal(str)       # a layer name
    resultsChanged = Signal(str)      # a session key: "weight_stats", "variants", "runs", "plan"...
    jobFailed = Signal(str, str, str)  # title, message, details
    previewChanged = Signal()         # the layer list of a model still opening came or went

    def __init__(self) -> None:
        super().__init__()
        self._session: Session | None = None
        # Layers of the model being opened, from its header (LayerInfo list); None otherwise.
        self.preview_layers: list | None = None
        self.sessions = Sessions()
        self.runner = JobRunner()
        # Per-layer details (before/after arrays...): short jobs on a second worker, so a
        # selection made while a long job runs is answered at once (`workers.LatestOnly`).
        self.details = JobRunner()
        self.layer = CurrentLayer()
        self.layer.changed.connect(self.layerSelected)
        self.actions: dict[str, tuple[str, Callable[[], object]]] = {}
        self._owners: dict[str, object] = {}

    @property
    def session(self) -> Session:
        # Made when first read: an empty session's default plan validates its method through
        # the quantizer registry, which imports torch, and the window shows before that.
        if self._session is None:
            self._session = Session()
        return self._session

    @session.setter
    def session(self, session: Session) -> None:
        self._session = session

    @property
    def selected_layer(self) -> str | None:
        return self.layer.name

    @property
    def handle(self):
        return self.session.handle

    def set_model(self, handle) -> None:
        """Show `handle`; a model opened before in this run comes back with its results."""
        self.session = Session() if handle is None else self.sessions.for_model(handle)
        self.preview_layers = None
        self.layer.clear()
        self.modelChanged.emit(handle)

    def set_session(self, session) -> None:
        """Show a restored session (its model opened): its results, plan, variants and runs
        replace whatever this run had for the same model."""
        self.sessions.adopt(session)
        self.session = session
        self.layer.clear()
        self.modelChanged.emit(session.handle)
        for key in (*session.results, "plan", "variants", "runs"):
            self.resultsChanged.emit(key)

    def preview(self, layers: list | None) -> None:
        """Show the layer list of a model still opening (None: no model is opening any more)."""
        if layers is None and self.preview_layers is None:
            return
        self.preview_layers = layers
        self.previewChanged.emit()

    def select_layer(self, name: str) -> None:
        self.layer.set(name)

    def add_action(self, key: str, text: str, run: Callable[[], object], owner=None) -> None:
        """Offer work by name ("activations": "Run the activation capture"), so a view that
        lacks data can start it with one click without knowing which view owns it. `owner`:
        the view that shows the result (the window brings it forward)."""
        self.actions[key] = (text, run)
        self._owners[key] = owner

    def action_owner(self, key: str):
        return self._owners.get(key)

    def run_action(self, key: str):
        text, run = self.actions[key]
        return run()

    def publish(self, key: str, value: Any = None) -> None:
        """Store a finished result in the session (unless value is None) and tell the views."""
        if value is not None:
            self.session.results[key] = value
        self.resultsChanged.emit(key)

    def add_runs(self, runs: list[dict]) -> None:
        """Evaluation / benchmark runs for the Compare table (`studio.core.runs`)."""
        self.session.runs.extend(runs)
        self.publish("runs")

    def submit(self, title: str, factory: Callable[[], Job],
               on_result: Callable[[Any], None] | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> JobHandle:
        """Run a core job on the worker thread; its errors reach the user through the window."""
        return self.runner.submit(title, factory, on_result, on_progress,
                                  on_failed=lambda msg, details:
                                  self.jobFailed.emit(title, msg, details))
