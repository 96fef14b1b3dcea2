"""Preferences: threads, cache folder, default calibration text and windows, the quick
evaluation, theme, and the heartbeat probe. Values are checked in the dialog: OK with an
invalid one says what is wrong and keeps the dialog open; nothing is stored until all are
valid (`studio.ui.settings` holds the defaults table)."""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.ui import settings
from studio.ui.theme import THEMES


class PreferencesDialog(QDialog):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Preferences")
        self.threads = _spin(0, os.cpu_count() or 1, "Torch threads for jobs; 0 = every core")
        self.cache = QLineEdit(placeholderText="default (~/.cache/compression-studio)")
        self.cache.setToolTip("Where converted GGUF models, baselines and autosaves are kept")
        self.calibration = QLineEdit(placeholderText="built-in text (Python help topics)")
        self.calibration.setToolTip("Text file used for calibration and activation capture "
                                    "unless a view chooses another")
        self.calibration_windows = _spin(1, 4096, "Calibration windows by default")
        self.quick = QCheckBox("Evaluate every new variant briefly (it appears in Compare)")
        self.quick_windows = _spin(1, 1000, "Windows of the quick evaluation")
        self.quick_seqlen = _spin(16, 8192, "Tokens per window of the quick evaluation")
        self.theme = QComboBox()
        self.theme.addItems(THEMES)
        self.heartbeat = QCheckBox("Show event-loop stalls in the status bar (heartbeat probe)")
        self.error = QLabel()
        self.error.setStyleSheet("color: #b00020")
        self.error.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Threads", self.threads)
        form.addRow("Cache folder", _with_browse(self.cache, self._browse_cache))
        form.addRow("Calibration text", _with_browse(self.calibration, self._browse_text))
        form.addRow("Calibration windows", self.calibration_windows)
        form.addRow("", self.quick)
        form.addRow("Quick evaluation windows", self.quick_windows)
        form.addRow("Quick evaluation tokens", self.quick_seqlen)
        form.addRow("Theme", self.theme)
        form.addRow("Debug", self.heartbeat)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel
                                   | QDialogButtonBox.StandardButton.RestoreDefaults)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults).clicked.connect(
            lambda: self.show_values(settings.DEFAULTS))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(buttons)
        self.show_values({key: settings.get(key) for key in settings.DEFAULTS})

    def show_values(self, values: dict) -> None:
        self.threads.setValue(values["threads"])
        self.cache.setText(values["cache_folder"])
        self.calibration.setText(values["calibration_text"])
        self.calibration_windows.setValue(values["calibration_windows"])
        self.quick.setChecked(values["quick_eval"])
        self.quick_windows.setValue(values["quick_eval_windows"])
        self.quick_seqlen.setValue(values["quick_eval_seqlen"])
        self.theme.setCurrentText(values["theme"])
        self.heartbeat.setChecked(values["heartbeat"])

    def values(self) -> dict:
        return {"threads": self.threads.value(), "cache_folder": self.cache.text().strip(),
                "calibration_text": self.calibration.text().strip(),
                "calibration_windows": self.calibration_windows.value(),
                "quick_eval": self.quick.isChecked(),
                "quick_eval_windows": self.quick_windows.value(),
                "quick_eval_seqlen": self.quick_seqlen.value(),
                "theme": self.theme.currentText(), "heartbeat": self.heartbeat.isChecked()}

    def problems(self, values: dict) -> list[str]:
        """Why these values cannot be stored (empty: they can)."""
        found = []
        cache = values["cache_folder"]
        if cache:
            folder = Path(cache).expanduser()
            parent = folder if folder.exists() else folder.parent
            if folder.exists() and not folder.is_dir():
                found.append(f"The cache folder {cache} is a file, not a folder.")
            elif not parent.is_dir() or not os.access(parent, os.W_OK):
                found.append(f"The cache folder {cache} cannot be created or written here.")
        text = values["calibration_text"]
        if text and not Path(text).expanduser().is_file():
            found.append(f"The calibration text {text} is not a file.")
        return found

    def accept(self) -> None:
        values = self.values()
        problems = self.problems(values)
        if problems:
            self.error.setText(" ".join(problems) + " Nothing was saved.")
            return
        settings.put(values)
        super().accept()

    def _browse_cache(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cache folder")
        if folder:
            self.cache.setText(folder)

    def _browse_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Calibration text", "", "Text (*.txt);;All (*)")
        if path:
            self.calibration.setText(path)


def _spin(low: int, high: int, tip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setToolTip(tip)
    return box


def _with_browse(edit: QLineEdit, slot) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(edit, 1)
    button = QPushButton("Browse...")
    button.clicked.connect(slot)
    layout.addWidget(button)
    return row
