"""The Export dialog: format, options and destination; how each layer will be stored (checked
before any work); then the export as a cancellable job ending in its verification.

Everything it shows comes from `studio.core.export` (the formats' declarations, their
preflight, `export_job`), the same code `compression-studio export` runs."""
from __future__ import annotations

from html import escape
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from studio.core.export import all_formats, get_format
from studio.core.errors import StudioError
from studio.core.export.base import FLOAT_DTYPES, ExportOptions
from studio.core.export.shards import DEFAULT_SHARD_SIZE, describe_size, parse_size
from studio.core.files import safe_name
from studio.core.jobs import Progress

INEXACT_TITLES = {"refuse": "refuse the export", "nearest": "store the nearest type (error shown)"}
BAD = QColor(200, 40, 40)


class ExportDialog(QDialog):
    def __init__(self, state, variant, parent=None) -> None:
        super().__init__(parent)
        self.state, self.variant = state, variant
        self.job = None
        self.result = None
        self.preflight = None
        self.setWindowTitle(f"Export {variant.name}")
        self.resize(760, 620)

        self.format = QComboBox()
        for fmt in all_formats():
            self.format.addItem(fmt.title, fmt.name)
        self.description = QLabel(wordWrap=True)
        self.dtype = QComboBox()
        for dtype in FLOAT_DTYPES:
            self.dtype.addItem(dtype, dtype)
        self.inexact = QComboBox()
        for key, title in INEXACT_TITLES.items():
            self.inexact.addItem(title, key)
        self.asym4 = QComboBox()
        self.asym4.addItem("Q5_0 (exact, 5.5 bits/weight)", "q5_0")
        self.asym4.addItem("Q4_1 (5.0 bits/weight, offset rounded to fp16)", "q4_1")
        self.shard_size = QLineEdit(describe_size(DEFAULT_SHARD_SIZE))
        self.destination = QLineEdit()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self.choose_destination)
        where = QHBoxLayout()
        where.addWidget(self.destination, 1)
        where.addWidget(browse)

        form = QFormLayout()
        form.addRow("Variant", QLabel(self._variant_line()))
        form.addRow("Format", self.format)
        form.addRow("", self.description)
        form.addRow("Float tensors", self.dtype)
        form.addRow("Layers without an exact type", self.inexact)
        form.addRow("GGUF 4-bit asymmetric as", self.asym4)
        form.addRow("Largest file", self.shard_size)
        form.addRow("Destination folder", where)

        self.summary = QLabel(wordWrap=True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Layer", "Stored as", "Exact", "Weight error"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel(wordWrap=True)
        self.status.setTextFormat(Qt.TextFormat.RichText)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.export_button = QPushButton("Export")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.start_export)
        self.cancel_button = QPushButton("Cancel export")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        close = QPushButton("Close")
        close.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for button in (self.export_button, self.cancel_button, close):
            buttons.addWidget(button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)

        for combo in (self.format, self.dtype, self.inexact, self.asym4):
            combo.currentIndexChanged.connect(self.options_changed)
        self.shard_size.editingFinished.connect(self.options_changed)
        self.destination.setText(str(Path.home() / safe_name(variant.name)))
        self.options_changed()

    # --- options and the check before any work ---------------------------------------------
    def _variant_line(self) -> str:
        s = self.variant.to_summary()
        return (f"{self.variant.name} · {', '.join(s['methods'])} · {s['layers']} layers · "
                f"{s['bits_per_weight']:.3f} bits/weight (estimate)")

    def options(self) -> ExportOptions:
        """The options as set; a shard size that does not read raises StudioError."""
        return ExportOptions(dtype=self.dtype.currentData(), inexact=self.inexact.currentData(),
                             gguf_asym4=self.asym4.currentData(),
                             shard_size=parse_size(self.shard_size.text()))

    def options_changed(self) -> None:
        fmt = get_format(self.format.currentData())
        self.description.setText(f"{fmt.description} Verified by re-opening it with "
                                 f"{fmt.consumer}.")
        self.asym4.setEnabled(fmt.name == "gguf")
        self.shard_size.setEnabled(bool(fmt.splits_as))
        self.shard_size.setToolTip(f"At most this much of tensors per file (e.g. 2GB, 500MB, "
                                   f"4GiB): a larger export is split into {fmt.splits_as}."
                                   if fmt.splits_as else "This format is always one file.")
        self.export_button.setEnabled(False)
        try:
            options = self.options()
        except StudioError as exc:
            self.summary.setText(f"<span style='color:#c82828'>{escape(str(exc))}</span>")
            return
        self.summary.setText("Checking how each layer will be stored…")
        variant, handle = self.variant, self.state.handle
        self.state.submit(f"Check the {fmt.name} export", lambda: _preflight_job(
            fmt, variant, handle, options), on_result=self._checked)

    def _checked(self, preflight) -> None:
        self.preflight = preflight
        targets = preflight.targets
        self.table.setRowCount(len(targets))
        for row, target in enumerate(targets):
            error = "" if target.error is None else f"{target.error:.3g}"
            cells = (target.name, target.stored_as, "yes" if target.exact else "no", error)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if not target.exact:
                    item.setForeground(BAD)
                if target.note:
                    item.setToolTip(target.note)
                self.table.setItem(row, col, item)
        inexact = preflight.inexact
        lines = [f"{len(targets) - len(inexact)} of {len(targets)} quantized layers stored "
                 f"exactly." + (f" <b>{len(inexact)} not</b> (in red, with their measured "
                                f"weight error)." if inexact else "")]
        lines += [f"<span style='color:#c82828'>{escape(p)}</span>" for p in preflight.problems]
        lines += [escape(note) for note in preflight.notes]   # token names such as <mask>
        self.summary.setText("<br>".join(lines))
        self.export_button.setEnabled(not preflight.problems and self.job is None)

    def choose_destination(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into a folder")
        if folder:
            self.destination.setText(str(Path(folder) / safe_name(self.variant.name)))

    # --- the export ------------------------------------------------------------------------
    def start_export(self, force: bool | None = None) -> None:
        from studio.core.export.job import export_job

        out = Path(self.destination.text().strip()).expanduser()
        if not self.destination.text().strip():
            self.status.setText("Choose a destination folder first.")
            return
        try:
            options = self.options()
        except StudioError as exc:
            self.status.setText(f"<span style='color:#c82828'>{escape(str(exc))}</span>")
            return
        if force is None:
            force = False
            if out.exists():
                answer = QMessageBox.question(self, "Replace?", f"{out} exists. Replace it with "
                                              f"this export (only once it has verified)?")
                if answer != QMessageBox.StandardButton.Yes:
                    return
                force = True
        variant, handle = self.variant, self.state.handle
        fmt = self.format.currentData()
        known = _known_metrics(self.state.session.runs, variant.name)
        self.export_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"Exporting to {escape(str(out))}…")
        self.job = self.state.submit(
            f"Export {variant.name} ({fmt})",
            lambda: export_job(variant, handle, fmt, out, options, force=force,
                               metrics_known=known),
            on_result=self._exported, on_progress=self._progress)
        self.job.done.connect(self._job_done)
        self.job.failed.connect(lambda message, _details: self.status.setText(
            f"<span style='color:#c82828'>Not exported: {escape(message)}</span>"))

    def _progress(self, p: Progress) -> None:
        self.progress.setValue(int(1000 * p.fraction))
        if p.message:
            self.status.setText(escape(p.message))

    def _exported(self, result) -> None:
        self.result = result
        exports = self.state.session.results.setdefault("exports", [])
        exports.append({"variant": self.variant.name, **result.to_dict()})
        self.state.publish("exports")
        tokenizer = {True: "equal to the source's", False: "DIFFERENT", None: "not compared"}
        self.status.setText(
            f"<b>Exported and verified</b> with {get_format(result.format).consumer}: "
            f"{escape(result.file)}<br>{result.bytes / 2**20:.2f} MiB, "
            f"{result.bits_per_weight_on_disk:.3f} bits/weight on disk (estimate "
            f"{result.bits_per_weight_estimate:.3f}), {result.seconds:.1f} s<br>"
            f"max weight difference {result.max_weight_diff:.3g} (quantized layers; "
            f"{result.max_float_diff:.3g} other tensors), max logit difference "
            f"{result.max_logit_diff:.3g}"
            + (f" (logits from {result.logits_by})" if result.logits_by else "")
            + f", tokenizer {tokenizer[result.tokenizer_equal]}")

    def _job_done(self) -> None:
        cancelled = self.job is not None and self.job.token.cancelled
        self.job = None
        self.cancel_button.setEnabled(False)
        self.export_button.setEnabled(self.preflight is not None and not self.preflight.problems)
        if cancelled:
            self.progress.setValue(0)
            self.status.setText("Cancelled: nothing was written at the destination.")

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling…")

    def reject(self) -> None:
        """Closing while an export runs cancels it (its temporary files are removed)."""
        self.cancel()
        super().reject()


def _preflight_job(fmt, variant, handle, options):
    yield Progress(0, 1, f"Checking how {fmt.title} stores each layer")
    return fmt.preflight(variant, handle, options)


def _known_metrics(runs: list[dict], name: str) -> dict | None:
    """The latest evaluation figures of this variant in the session, with their protocol."""
    for run in reversed(runs):
        if run.get("variant") == name and run.get("ppl") is not None:
            keys = ("ppl", "kl", "top1", "tokens", "windows", "seqlen", "text")
            return {k: run[k] for k in keys if run.get(k) is not None}
    return None
