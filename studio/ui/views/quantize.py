"""The Quantize panel: settings and calibration on the left, a live per-layer error plot on the
right (each layer's output error as it is quantized, next to plain RTN's error on the same
inputs), and the list of finished variants below it (switch, delete, save, open)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.files import safe_name
from studio.core.jobs import Progress
from studio.core.plan import GROUP_SIZES, Plan, QuantSpec, end_spec, with_ends
from studio.core.quant.grid import native_gguf_type
from studio.core.quant import registry
from studio.ui import settings as preferences
from studio.ui.before_after import BeforeAfter
from studio.ui.widgets import grid, method_tooltips, plot_widget, wide

METHOD_COLOR, RTN_COLOR = (31, 119, 180), (214, 39, 40)

REDRAW_MS = 400

class QuantizeView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.job = None
        self.names: list[str] = []
        self.blocks: list[int | None] = []
        self.errors: list[float] = []
        self.rtn_errors: list[float] = []

        settings = QGroupBox("Quantization")
        form = QFormLayout(settings)
        self.method = QComboBox()
        for quantizer in registry.all_quantizers():  # plug-ins' methods included
            self.method.addItem(quantizer.title, quantizer.name)
        method_tooltips(self.method, lambda q: f"({q.origin}; calibration: {q.calibration}; "
                                               f"codes: {q.code_format})")
        self.method.currentIndexChanged.connect(self._method_changed)
        self.bits = QSpinBox(minimum=2, maximum=8, value=4)
        self.group = QComboBox()
        for size in GROUP_SIZES:
            self.group.addItem("per-channel" if size == -1 else str(size), size)
        self.group.setCurrentIndex(self.group.findData(128))
        self.symmetric = QCheckBox("symmetric grid")
        self.fp16_scales = QCheckBox("fp16 scales (GGUF-native)")
        self.fp16_scales.setToolTip(
            "Compute every code against an fp16 scale, so a format storing fp16 scales holds "
            "the variant exactly. At 4, 5 or 8 bits, group 32, symmetric the grid is a GGUF "
            "type (Q4_0, Q5_0, Q8_0): the variant exports to GGUF with no rounding.")
        self.scales_note = QLabel()
        self.scales_note.setWordWrap(True)
        self.use_plan = QCheckBox("apply the session plan's per-layer rules")
        # The output head (and a tied embedding: one matrix), as `quantize --lm-head` does it
        self.lm_head = QComboBox()
        for label, word in (("8 bits per channel (int8 kernel)", "w8"),
                            ("4 bits, groups of 32 (int4 kernel)", "w4g32"),
                            ("kept as stored (16-bit)", "keep")):
            self.lm_head.addItem(label, word)
        self.lm_head.setToolTip(
            "The output head, and the embedding when the model ties them (one matrix). "
            "llama.cpp keeps it above the body's width too: its error reaches every logit, and "
            "on a large vocabulary it is the biggest matrix a decode step reads.")
        self.method_note = QLabel()
        self.method_note.setWordWrap(True)
        form.addRow("Method", self.method)
        form.addRow("", self.method_note)
        form.addRow("Bits", self.bits)
        form.addRow("Group size", self.group)
        form.addRow("", self.symmetric)
        form.addRow("", self.fp16_scales)
        form.addRow("", self.scales_note)
        form.addRow("lm_head", self.lm_head)
        form.addRow("", self.use_plan)
        for signal in (self.bits.valueChanged, self.group.currentIndexChanged,
                       self.symmetric.toggled, self.fp16_scales.toggled):
            signal.connect(self._scales_changed)
        self._scales_changed()
        self.options_box = QGroupBox("Method options")
        self.options_form = QFormLayout(self.options_box)
        self.option_widgets: dict[str, QWidget] = {}

        calib = QGroupBox("Calibration")
        cform = QFormLayout(calib)
        self.source = QComboBox()
        self.source.addItem("Built-in text (Python help topics)", None)
        self.source.addItem("Text file…", "file")
        self.source.activated.connect(self._source_chosen)
        self.windows = QSpinBox(minimum=1, maximum=4096, value=preferences.get("calibration_windows"))
        self.seqlen = QSpinBox(minimum=16, maximum=8192, value=512, singleStep=64)
        self.seed = QSpinBox(minimum=0, maximum=2 ** 31 - 1, value=0)
        cform.addRow("Source", self.source)
        cform.addRow("Windows", self.windows)
        cform.addRow("Tokens per window", self.seqlen)
        cform.addRow("Seed", self.seed)

        self.name = QLineEdit(placeholderText="variant name (default: from the settings)")
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.status = QLabel("Open a model to quantize it.")
        self.status.setWordWrap(True)

        left = QWidget()
        lv = QVBoxLayout(left)
        for widget in (settings, self.options_box, calib, self.name):
            lv.addWidget(widget)
        lv.addLayout(buttons)
        lv.addWidget(self.status)
        lv.addStretch(1)
        left.setMaximumWidth(380)

        self.plot = plot_widget()
        self.plot.setBackground("w")
        grid(self.plot)
        self.plot.setLogMode(y=True)
        self.plot.setLabel("left", "relative output error  ‖XŴ−XW‖² / ‖XW‖²")
        self.plot.setLabel("bottom", "layers in quantization order (ticks: first layer of block bN)")
        self.plot.getAxis("left").enableAutoSIPrefix(False)
        self.curve = self.plot.plot([], [], **wide(METHOD_COLOR, 2), symbol="o",
                                    symbolSize=5, symbolBrush=METHOD_COLOR)
        self.rtn_curve = self.plot.plot([], [], pen=pg.mkPen(RTN_COLOR, width=1,
                                                             style=Qt.PenStyle.DashLine))
        # Layers arrive every few tens of ms; redrawing for each one took the UI thread's share
        # of the two cores (and the GIL) from the job: GPTQ ran 35% slower in the window than
        # from the CLI. At most one redraw per REDRAW_MS, and one at the end.
        self.redraw = QTimer(self, singleShot=True, interval=REDRAW_MS)
        self.redraw.timeout.connect(self._draw)
        self.plot_title = QLabel()
        self.plot_title.setWordWrap(True)
        # The key sits above the plot, not in it: a legend inside covered the last layers'
        # points (the lm_head's, the one a user looks for, in the bottom right corner).
        self.plot_key = QLabel(f"{_key(METHOD_COLOR, '●━━')} this method &nbsp;&nbsp; "
                               f"{_key(RTN_COLOR, '‐ ‐ ‐')} RTN, same layer and inputs")

        self.variant_list = QListWidget()
        self.variant_list.currentItemChanged.connect(self._variant_selected)
        self.save_button = QPushButton("Save to folder…")
        self.save_button.clicked.connect(self.save_selected)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_selected)
        self.open_button = QPushButton("Open variant folder…")
        self.open_button.clicked.connect(self.open_folder)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("GGUF, compressed-tensors or a plain checkpoint, "
                                      "verified by re-opening it")
        self.export_button.clicked.connect(self.export_selected)
        vbuttons = QHBoxLayout()
        for b in (self.export_button, self.save_button, self.delete_button, self.open_button):
            vbuttons.addWidget(b)
        vbuttons.addStretch(1)
        self.variant_info = QLabel()
        self.variant_info.setWordWrap(True)
        bottom = QWidget()
        bv = QVBoxLayout(bottom)
        bv.setContentsMargins(0, 0, 0, 0)
        bv.addWidget(QLabel("Variants"))
        bv.addWidget(self.variant_list)
        bv.addLayout(vbuttons)
        bv.addWidget(self.variant_info)

        right = QSplitter(Qt.Orientation.Vertical)
        top = QWidget()
        tv = QVBoxLayout(top)
        tv.setContentsMargins(0, 0, 0, 0)
        tv.addWidget(self.plot_title)
        tv.addWidget(self.plot_key)
        tv.addWidget(self.plot)
        right.addWidget(top)
        right.addWidget(bottom)
        # The current layer before / after (layer selection: see studio.ui.before_after).
        self.layer_view = BeforeAfter(state)
        right.addWidget(self.layer_view)
        right.setSizes([420, 150, 300])
        self.curve.sigPointsClicked.connect(self._point_clicked)
        self.layer_marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("#444", style=Qt.PenStyle.DashLine))
        self.layer_marker.setVisible(False)
        self.plot.addItem(self.layer_marker)
        state.layerSelected.connect(lambda _name: self._move_layer_marker())
        state.add_action("quantize", "Quantize with the Quantize tab's settings", self.run, self)

        layout = QHBoxLayout(self)
        layout.addWidget(left)
        layout.addWidget(right, 1)

        self.calib_path: str | None = None
        self.set_calibration_file(preferences.calibration_text())   # Preferences' default text
        self._method_changed()
        state.modelChanged.connect(self._model_changed)
        state.resultsChanged.connect(lambda key: key == "variants" and self._fill_variants())
        self._model_changed(state.handle)

    # --- settings ------------------------------------------------------------------------
    def _method_changed(self) -> None:
        """The options form from the method's declaration; its suggested grid and widths."""
        quantizer = registry.get(self.method.currentData())
        while self.options_form.rowCount():
            self.options_form.removeRow(0)
        self.option_widgets = {info.name: option_widget(info) for info in quantizer.option_infos}
        for info in quantizer.option_infos:
            self.options_form.addRow(info.title[:1].upper() + info.title[1:],
                                     self.option_widgets[info.name])
        if not quantizer.option_infos:
            self.options_form.addRow(QLabel("This method has no options."))
        self.options_box.setToolTip(quantizer.summary)
        self.method_note.setText(method_note(quantizer))
        affine = quantizer.code_format == "affine"   # a grid's zero point and scale type
        self.symmetric.setEnabled(affine)
        self.fp16_scales.setEnabled(affine)
        if not affine:
            self.symmetric.setChecked(False)
            self.fp16_scales.setChecked(False)
        self.bits.setRange(min(quantizer.bits), max(quantizer.bits))
        suggested = quantizer.suggested
        if "bits" in suggested:
            self.bits.setValue(suggested["bits"])
        if "group_size" in suggested:
            self.group.setCurrentIndex(self.group.findData(suggested["group_size"]))
        if "symmetric" in suggested:
            self.symmetric.setChecked(suggested["symmetric"])
        # A symmetric grid and fp16 grid scales mean nothing to tables (codebook, vector).
        grid = quantizer.code_format == "affine"
        for box in (self.symmetric, self.fp16_scales):
            box.setEnabled(grid)
            if not grid:
                box.setChecked(False)

    def _scales_changed(self, *_) -> None:
        """Say what fp16 scales make of the chosen grid: a GGUF type, or fp16 scales only."""
        if not self.fp16_scales.isChecked():
            self.scales_note.setText("")
            self.scales_note.setVisible(False)
            return
        native = native_gguf_type(QuantSpec(self.bits.value(), self.group.currentData(),
                                            self.symmetric.isChecked(), scale_dtype="fp16"))
        self.scales_note.setText(
            f"This grid is GGUF {native.name} ({native.bits_per_weight:g} bits/weight): it "
            f"exports to GGUF with no rounding." if native is not None else
            "fp16 scales on this grid; it is a GGUF type (Q4_0, Q5_0, Q8_0) at 4, 5 or 8 bits, "
            "group 32, symmetric.")
        self.scales_note.setVisible(True)

    def _source_chosen(self) -> None:
        if self.source.currentData() != "file":
            self.calib_path = None
            return
        path, _ = QFileDialog.getOpenFileName(self, "Calibration text", "",
                                              "Text (*.txt *.md *.raw);;All files (*)")
        if not path:
            self.source.setCurrentIndex(0)
            self.calib_path = None
            return
        self.calib_path = path
        label = f"File: {Path(path).name}"
        if self.source.count() > 2:
            self.source.removeItem(2)
        self.source.addItem(label, path)
        self.source.setCurrentIndex(2)

    def use_preferences(self) -> None:
        """Preferences changed: their calibration text and window count become the defaults."""
        self.set_calibration_file(preferences.calibration_text())
        self.windows.setValue(preferences.get("calibration_windows"))

    def set_calibration_file(self, path: str | None) -> None:
        """Use `path` as calibration text (None: the built-in text); for scripts and tests."""
        self.calib_path = path
        if self.source.count() > 2:
            self.source.removeItem(2)
        if path is None:
            self.source.setCurrentIndex(0)
        else:
            self.source.addItem(f"File: {Path(path).name}", path)
            self.source.setCurrentIndex(2)

    def spec(self) -> QuantSpec:
        options = {key: option_value(widget) for key, widget in self.option_widgets.items()}
        return QuantSpec(self.bits.value(), self.group.currentData(), self.symmetric.isChecked(),
                         self.method.currentData(), options,
                         scale_dtype="fp16" if self.fp16_scales.isChecked() else "fp32")

    def plan(self) -> Plan:
        session_plan = self.state.session.plan
        rules = session_plan.rules if self.use_plan.isChecked() else ()
        plan = Plan(self.spec(), rules, self.state.handle.architecture)
        native = native_gguf_type(self.spec()) is not None   # a GGUF-native body: Q8_0 head
        head = end_spec(self.lm_head.currentData(), native, self.spec().scale_dtype)
        return with_ends(plan, self.state.handle.layers, head, None)

    # --- running -------------------------------------------------------------------------
    def _model_changed(self, handle) -> None:
        self.run_button.setEnabled(handle is not None and self.job is None)
        self.status.setText("Ready." if handle is not None else "Open a model to quantize it.")
        self._clear_plot("")
        self._fill_variants()

    def run(self) -> None:
        from studio.core.allocate import plan_title
        from studio.core.quantize import quantize_text_job

        handle = self.state.handle
        if handle is None or self.job is not None:
            return
        plan = self.plan()  # a bad setting raises here, before any job starts
        name = self._unique(self.name.text().strip() or plan_title(handle, plan))
        source = self.calib_path or "built-in text"
        calib = (f"calibration: {Path(source).name}, {self.windows.value()} x "
                 f"{self.seqlen.value()} tokens, seed {self.seed.value()}")
        quantizer = plan.default.quantizer
        if quantizer.windows_used is not None:  # it subsamples (AWQ): say how much
            read = min(self.windows.value(), quantizer.windows_used(self.seqlen.value()))
            calib += f" ({quantizer.title} reads the first {read} of these windows)"
        if not quantizer.needs_text:
            calib = (f"{quantizer.title} needs no calibration; errors measured on a few "
                     f"windows of it")
        self._clear_plot(f"<b>{name}</b> on {handle.name} — {calib}")
        args = (handle, plan, self.calib_path, self.windows.value(), self.seqlen.value(),
                self.seed.value(), name)
        self.job = self.state.submit(f"Quantize {name}", lambda: quantize_text_job(*args),
                                     on_result=self._finished, on_progress=self._progress)
        self.job.done.connect(self._job_done)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("Starting…")

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling at the next layer…")

    def _progress(self, p: Progress) -> None:
        self.status.setText(f"{100 * p.fraction:.0f}%  {p.message}")
        detail = p.detail
        if isinstance(detail, dict) and detail.get("error") is not None:
            self.names.append(detail["layer"])
            self.blocks.append(detail.get("block"))
            self.errors.append(detail["error"])
            self.rtn_errors.append(detail["rtn_error"])
            if not self.redraw.isActive():
                self.redraw.start()

    def _finished(self, variant) -> None:
        self.redraw.stop()
        self._draw()
        self.state.session.variants[variant.name] = variant
        self.state.publish("variants")
        summary = variant.to_summary()
        self.status.setText(f"Done: {variant.name}, {summary['layers']} layers in "
                            f"{summary['seconds']:.1f} s, {summary['bits_per_weight']:.2f} "
                            f"bits/weight.")
        self._select(variant.name)

    def _job_done(self) -> None:
        if self.redraw.isActive():   # cancelled or failed: show the layers that were done
            self.redraw.stop()
            self._draw()
        if self.job is not None and self.job.token.cancelled:
            self.status.setText("Cancelled: the model and the existing variants are unchanged.")
        self.job = None
        self.run_button.setEnabled(self.state.handle is not None)
        self.cancel_button.setEnabled(False)

    def _unique(self, name: str) -> str:
        taken = self.state.session.variants
        candidate, n = name, 2
        while candidate in taken:
            candidate, n = f"{name} ({n})", n + 1
        return candidate

    # --- the plot --------------------------------------------------------------------------
    def _clear_plot(self, title: str) -> None:
        self.names, self.blocks, self.errors, self.rtn_errors = [], [], [], []
        self.plot_title.setText(title)
        self._draw()

    def _draw(self) -> None:
        x = np.arange(len(self.errors), dtype=np.float32)
        self.curve.setData(x, _positive(self.errors))
        self.rtn_curve.setData(x, _positive(self.rtn_errors))
        # One tick per block, at its first layer; at most ~16 labels so they stay readable.
        starts = [(i, b) for i, b in enumerate(self.blocks)
                  if b is not None and (i == 0 or self.blocks[i - 1] != b)]
        step = max(1, -(-len(starts) // 16))
        self.plot.getAxis("bottom").setTicks([[(float(i), f"b{b}") for i, b in starts[::step]],
                                              [(float(i), "") for i, _ in starts]])
        self._move_layer_marker()

    def _point_clicked(self, _curve, points, *_) -> None:
        if len(points):
            index = int(round(points[0].pos().x()))
            if 0 <= index < len(self.names):
                self.state.select_layer(self.names[index])

    def _move_layer_marker(self) -> None:
        name = self.state.selected_layer
        self.layer_marker.setVisible(name in self.names)
        if name in self.names:
            self.layer_marker.setPos(self.names.index(name))

    def _show_variant(self, variant) -> None:
        entries = [e for e in variant.layer_errors if e.get("error") is not None]
        self.names = [e["layer"] for e in entries]
        self.blocks = [e.get("block") for e in entries]
        self.errors = [e["error"] for e in entries]
        self.rtn_errors = [e["rtn_error"] for e in entries]
        calib = variant.calibration or "no calibration"
        self.plot_title.setText(f"<b>{variant.name}</b> — {calib}" +
                                ("" if entries else " (no per-layer errors recorded)"))
        self._draw()

    # --- variants --------------------------------------------------------------------------
    def _fill_variants(self) -> None:
        current = self.variant_list.currentItem()
        keep = current.text() if current else None
        self.variant_list.blockSignals(True)
        self.variant_list.clear()
        for name in self.state.session.variants:
            self.variant_list.addItem(QListWidgetItem(name))
        self.variant_list.blockSignals(False)
        if keep in self.state.session.variants:
            self._select(keep)
        has = self.variant_list.count() > 0
        self.save_button.setEnabled(has)
        self.export_button.setEnabled(has)
        self.delete_button.setEnabled(has)
        self.open_button.setEnabled(self.state.handle is not None)

    def _select(self, name: str) -> None:
        for row in range(self.variant_list.count()):
            if self.variant_list.item(row).text() == name:
                self.variant_list.setCurrentRow(row)
                return

    def _selected(self):
        item = self.variant_list.currentItem()
        return self.state.session.variants.get(item.text()) if item else None

    def _variant_selected(self, *_) -> None:
        variant = self._selected()
        if variant is None:
            self.variant_info.setText("")
            return
        s = variant.to_summary()
        self.variant_info.setText(
            f"{', '.join(sorted({spec.label for spec in variant.specs.values()}))} · "
            f"{s['layers']} layers · {s['bits_per_weight']:.3f} bits/weight · "
            f"{s['size_mb']:.1f} MiB · calibration: {s['calibration'] or 'none'} · "
            f"{s['seconds']:.1f} s")
        if self.job is None:
            self._show_variant(variant)
        self.state.publish("current_variant", variant.name)

    def delete_selected(self) -> None:
        variant = self._selected()
        if variant is not None:
            del self.state.session.variants[variant.name]
            self.state.publish("variants")

    def export_selected(self):
        """The Export dialog for the selected variant."""
        from studio.ui.export_dialog import ExportDialog

        variant = self._selected()
        if variant is None:
            return None
        dialog = ExportDialog(self.state, variant, self)
        dialog.show()
        return dialog

    def save_selected(self, folder: str | None = None) -> None:
        from studio.core.variant import save_variant

        variant = self._selected()
        if variant is None:
            return
        if not folder:
            folder = QFileDialog.getExistingDirectory(self, "Save the variant inside a folder")
            if not folder:
                return
            folder = str(Path(folder) / safe_name(variant.name))
        self.state.submit(f"Save {variant.name}", lambda: _one_step(
            f"Writing {folder}", save_variant, variant, folder),
            on_result=lambda path: self.status.setText(f"Saved {variant.name} to {path}."))

    def open_folder(self, folder: str | None = None) -> None:
        from studio.core.variant import load_variant

        handle = self.state.handle
        if handle is None:
            return
        if not folder:
            folder = QFileDialog.getExistingDirectory(self, "Open a variant folder")
            if not folder:
                return
        self.state.submit(f"Open {Path(folder).name}", lambda: _one_step(
            f"Rebuilding {Path(folder).name}", load_variant, folder, handle),
            on_result=self._opened)

    def _opened(self, variant) -> None:
        variant.name = self._unique(variant.name)
        self._finished(variant)


def _positive(values: list[float]) -> np.ndarray:
    """Log axes cannot show 0: clamp to a floor far below any real error."""
    return np.array([max(v, 1e-12) if v is not None and math.isfinite(v) else np.nan
                     for v in values], dtype=np.float32)


def _one_step(message: str, function, *args):
    """A job of one step (for quick file work that should still not block the window)."""
    yield Progress(0, 1, message)
    return function(*args)


def method_note(quantizer: registry.Quantizer) -> str:
    """One line under the method: what it does, what it needs, where its codes can go."""
    from studio.core.quant import formats

    fmt = formats.get(quantizer.code_format)
    needs = {"none": "no calibration", "activations": "calibration text (input statistics)",
             "hessian": "calibration text (Hessians, layer by layer)",
             "block inputs": "calibration text (whole blocks)"}[quantizer.calibration]
    if quantizer.smoothing:
        needs = "calibration text (activation ranges)"
    where = "" if fmt.kernels else (f" {fmt.title.capitalize()} codes: no low-bit kernel (runs "
                                    f"de-quantized); exports to {', '.join(fmt.exports)} only.")
    origin = "" if quantizer.origin == "built-in" else f" From {quantizer.origin}."
    return f"<small>{quantizer.summary}; needs {needs}.{where}{origin}</small>"


def option_widget(info: registry.OptionInfo) -> QWidget:
    """An editor for one declared option: its type, range, choices and help."""
    if info.kind is bool:
        widget = QCheckBox()
        widget.setChecked(info.default)
    elif info.choices is not None:
        widget = QComboBox()
        for choice in info.choices:
            widget.addItem(str(choice), choice)
        widget.setCurrentIndex(widget.findData(info.default))
    elif info.kind is int:
        widget = QSpinBox(minimum=int(info.low if info.low is not None else -2 ** 31),
                          maximum=int(info.high if info.high is not None else 2 ** 31 - 1),
                          value=info.default)
    elif info.kind is float:
        low = info.low if info.low is not None else -1e9
        high = info.high if info.high is not None else 1e9
        widget = QDoubleSpinBox(decimals=4, minimum=low, maximum=high,
                                singleStep=(high - low) / 100 if high - low <= 100 else 0.1,
                                value=info.default)
    else:
        widget = QLineEdit(str(info.default))
    widget.setToolTip(f"{info.help} ({info.describe()})" if info.help else info.describe())
    return widget


def option_value(widget: QWidget):
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QLineEdit):
        return widget.text()
    return widget.value()


def _key(color: tuple[int, int, int], mark: str) -> str:
    """A legend mark in a curve's colour, as rich text."""
    return f"<span style='color: rgb{color}; font-weight: bold'>{mark}</span>"
