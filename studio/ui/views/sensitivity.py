"""Sensitivity: which layers can take fewer bits. A heatmap of layers x options (each width at
each group size, e.g. W4 g128, W3 g64) coloured by the damage on a log scale: the KL measured end
to end at the marked options (*), predicted from the layer-output proxy at the others. Clicking a
cell gives that layer that option (bits and group size) in the plan."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK
from studio.core.plan import GROUP_SIZES, Rule
from studio.core.quant import registry
from studio.core.sensitivity import (DEFAULT_BITS, DEFAULT_GROUPS, DEFAULT_KL_BITS,
                                     DEFAULT_KL_GROUP, DEFAULT_PROXY_WINDOWS,
                                     SensitivityResult, gguf_native_options, kl_columns,
                                     option_label, parse_group_sizes, parse_widths,
                                     same_grid, sensitivity_job, sweep_options)
from studio.core.text import BUILTIN, text_windows
from studio.ui import settings
from studio.ui.layout import FlowLayout, column, labelled
from studio.ui.widgets import NeedsRun, guarded, plot_widget

KEY = "sensitivity"
REDRAW_MS = 250
METRICS = {  # combo label -> (what is drawn, colour-bar label)
    "KL divergence (end to end)": ("kl", "log10 KL (nats/token)"),
    "Layer output error (proxy)": ("proxy", "log10 relative output error"),
    "Perplexity increase (measured * only)": ("ppl", "log10 ppl increase"),
}
LEGEND = ("* = measured end to end; the other columns' KL is predicted from the proxy "
          "(KL ≈ c × output error, c = the layer's KL per unit of error at the measured option). "
          "White: not measured.")


class SensitivityView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.result = None
        self.live: np.ndarray | None = None   # KL filled in while the sweep runs
        self.live_options: list = []          # the options of the sweep running
        self.live_kl: list[int] = []
        self.job = None
        self.text_path: str | None = None

        self.widths = QLineEdit(",".join(map(str, DEFAULT_BITS)))
        self.widths.setMaximumWidth(90)
        self.widths.setToolTip("bit-widths, each tried at every group size")
        self.groups = QLineEdit(",".join(map(str, DEFAULT_GROUPS)))
        self.groups.setMaximumWidth(80)
        self.groups.setToolTip("group sizes: 32, 64, 128, ch (per-channel)")
        self.kl_widths = QLineEdit(",".join(map(str, DEFAULT_KL_BITS)))
        self.kl_widths.setMaximumWidth(50)
        self.kl_widths.setToolTip("widths measured end to end (KL); the other options' KL is "
                                  "predicted from the proxy")
        self.kl_group = QComboBox()
        for size in sorted(GROUP_SIZES, key=lambda g: -(g if g > 0 else 10 ** 9)):
            self.kl_group.addItem("per-channel" if size == -1 else f"g{size}", size)
        self.kl_group.setCurrentIndex(self.kl_group.findData(DEFAULT_KL_GROUP))
        self.kl_group.setToolTip("group size of the end-to-end measurements")
        self.gguf_native = QCheckBox("GGUF-native")
        self.gguf_native.setToolTip("measure the GGUF types a studio grid is exactly (Q4_0, Q5_0, "
                                    "Q8_0: 4/5/8 bits, symmetric, group 32, fp16 scales) "
                                    "instead of the widths and groups: what the Plan tab's "
                                    "GGUF-native allocation chooses from")
        self.gguf_native.toggled.connect(self._native_toggled)
        self.kl_windows = QSpinBox(minimum=0, maximum=256, value=8)
        self.kl_windows.setToolTip("windows for the end-to-end KL sweep (0: proxy only)")
        self.seqlen = QSpinBox(minimum=8, maximum=4096, value=32)
        self.seqlen.setToolTip("tokens per window; 32 keeps the demo's KL sweep under 10 min")
        self.text_button = QPushButton("Text: built-in")
        self._use_text(settings.calibration_text())   # Preferences' default text
        self.text_button.clicked.connect(self._choose_text)
        self.run_button = QPushButton("Measure")
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel", enabled=False)
        self.cancel_button.clicked.connect(lambda: self.job and self.job.cancel())
        self.metric_box = QComboBox()
        self.metric_box.addItems(list(METRICS))
        self.metric_box.currentIndexChanged.connect(self._draw)
        self.show_plan = QCheckBox("mark the plan", checked=True)
        self.show_plan.toggled.connect(self._draw)
        save = QPushButton("Save…")
        save.clicked.connect(self._save)
        load = QPushButton("Load…")
        load.clicked.connect(self._load)
        self.status = QLabel("Measure to see how each layer reacts to each option.")
        self.status.setWordWrap(True)
        self.hover = QLabel(" ")
        self.legend = QLabel(LEGEND)
        self.legend.setWordWrap(True)

        self.plot = plot_widget()
        self.plot.setBackground("w")
        self.plot.setMouseEnabled(x=True, y=False)
        self.plot.setLabel("bottom", "layer (block)")
        self.plot.setLabel("left", "option")
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)
        self.plot.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        cmap = pg.colormap.get("inferno")
        self.image.setLookupTable(cmap.getLookupTable(nPts=256))
        self.plot.addItem(self.image)
        self.bar = pg.ColorBarItem(colorMap=cmap, interactive=False, width=14, label="")
        self.bar.setImageItem(self.image, insert_in=self.plot.getPlotItem())
        self.marks = pg.ScatterPlotItem(size=6, symbol="o", pen=pg.mkPen("#00e5ff", width=1.5),
                                        brush=None)
        self.plot.addItem(self.marks)
        # The current layer's column.
        self.current = pg.LinearRegionItem((0, 1), movable=False, brush=(0, 229, 255, 45),
                                           pen=pg.mkPen("#00b8d4", width=1.5))
        self.current.setZValue(10)
        self.current.setVisible(False)
        self.plot.addItem(self.current)
        self.plot.scene().sigMouseMoved.connect(self._hovered)
        self.plot.scene().sigMouseClicked.connect(self._clicked)
        self.ranking = QTextBrowser()
        self.ranking.setMinimumWidth(300)

        bar = FlowLayout()   # wraps on a narrow screen
        for widget in (labelled("Widths", self.widths), labelled("groups", self.groups),
                       self.gguf_native, labelled("KL at widths", self.kl_widths, self.kl_group),
                       labelled("windows", self.kl_windows), labelled("tokens", self.seqlen),
                       self.text_button, self.run_button, self.cancel_button, save, load):
            bar.addWidget(widget)
        show = QHBoxLayout()
        show.addWidget(QLabel("Colour by"))
        show.addWidget(self.metric_box)
        show.addWidget(self.show_plan)
        show.addWidget(self.hover, 1)
        left = column(show, (self.plot, 1), self.legend)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(self.ranking)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)
        self.redraw = QTimer(self, singleShot=True, interval=REDRAW_MS)
        self.redraw.timeout.connect(self._draw)
        self.needs = NeedsRun(state)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.status)
        layout.addWidget(self.needs)
        layout.addWidget(split, 1)

        state.add_action("sensitivity", "Run the sensitivity sweep", self.start, self)
        state.layerSelected.connect(lambda _name: self._show_current())
        state.modelChanged.connect(self._model_changed)
        state.resultsChanged.connect(self._results_changed)
        self._model_changed(state.handle)

    # --- running --------------------------------------------------------------------------
    def start(self):
        handle = self.state.handle
        if handle is None or self.job is not None:
            return None
        kl_windows = self.kl_windows.value()
        try:  # every bad field is refused here, before any work
            native = self.gguf_native.isChecked()
            bits = parse_widths(self.widths.text(), "Widths")
            groups = parse_group_sizes(self.groups.text(), "Group sizes")
            kl_bits = parse_widths(self.kl_widths.text(), "KL widths")
            kl_group = self.kl_group.currentData()
            options = gguf_native_options() if native else sweep_options(bits, groups)
            kl_cols = kl_columns(options, kl_bits, kl_group) if kl_windows > 0 else []
            count = max(kl_windows, DEFAULT_PROXY_WINDOWS)
            if self.text_path and not Path(self.text_path).is_file():
                raise StudioError(f"Text file {self.text_path} does not exist.")
        except StudioError as exc:
            self.status.setText(str(exc))
            return None
        self.result = None
        self.live = None
        self.live_options, self.live_kl = options, kl_cols
        measured = ", ".join(option_label(options[j]) for j in kl_cols) or "none (proxy only)"
        text_path, seqlen = self.text_path, self.seqlen.value()
        label = Path(text_path).name if text_path else BUILTIN
        self.status.setText(f"Measuring {len(handle.quantizable)} layers x {len(options)} options "
                            f"on {label}; end to end at {measured}…")

        def job():
            # Tokenized here, on the worker: a long text took ~0.5 s of the UI thread.
            windows, label = text_windows(handle.tokenizer, text_path, seqlen, count, seed=0)
            return (yield from sensitivity_job(
                handle, windows, bits=bits, group_sizes=groups, kl_bits=kl_bits,
                kl_group=kl_group, gguf_native=native, kl_windows=kl_windows, text_label=label))

        factory = guarded(job)
        self.job = self.state.submit("Sensitivity", factory, on_result=self._finished,
                                     on_progress=self._progress)
        self.job.done.connect(self._job_done)
        self.job.cancelled.connect(lambda: self.status.setText(
            "Sensitivity cancelled: nothing was kept."))
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        return self.job

    def _native_toggled(self, native: bool) -> None:
        """The GGUF-native menu fixes the widths and the group (32, also for the KL sweep)."""
        for field in (self.widths, self.groups, self.kl_group):
            field.setEnabled(not native)
        if native:
            self.kl_group.setCurrentIndex(self.kl_group.findData(BLOCK))

    def _progress(self, p) -> None:
        self.status.setText(f"{100 * p.fraction:.0f}%  {p.message}")
        if isinstance(p.detail, tuple) and len(p.detail) == 3 and self.state.handle is not None:
            row, col, value = p.detail
            if self.live is None:  # col is the option's column (kl_sweep's detail)
                self.live = np.full((len(self.state.handle.quantizable), len(self.live_options)),
                                    np.nan)
            self.live[row, col] = value
            # At most one redraw per REDRAW_MS: the heatmap and ranking are rebuilt each time.
            if not self.redraw.isActive():
                self.redraw.start()

    def _finished(self, result) -> None:
        self._job_done()
        if isinstance(result, str):  # a StudioError, returned by `guarded`
            self.status.setText(f"Sensitivity not measured: {result}")
            return
        if self.state.handle is not None:
            self.state.publish(KEY, result)
        seconds = f"proxy {result.proxy_seconds:.1f} s"
        if result.has_kl:
            measured = ", ".join(result.labels[j] for j in result.kl_options)
            seconds += (f", KL at {measured} on {result.kl_windows} x {result.seqlen} tokens "
                        f"{result.kl_seconds:.0f} s (baseline ppl {result.base_ppl:.2f})")
        self.status.setText(f"Measured {len(result.layers)} layers x {len(result.options)} "
                            f"options on {result.text_label}: {seconds}. Click a cell to give "
                            f"that layer that option in the plan.")

    def _job_done(self, *_) -> None:
        self.job = None
        self.live = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _choose_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Text for the sweep", "",
                                              "Text (*.txt);;All files (*)")
        self._use_text(path or None)

    def _use_text(self, path: str | None) -> None:
        self.text_path = path
        self.text_button.setText(f"Text: {Path(path).name}" if path else "Text: built-in")
        self.text_button.setToolTip(path or "The built-in text (Python help topics)")

    def use_preferences(self) -> None:
        """Preferences changed: their calibration text becomes the default."""
        self._use_text(settings.calibration_text())

    def _save(self) -> None:
        if self.result is None:
            self.status.setText("Nothing to save yet: measure first.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save sensitivity", "sensitivity.json",
                                              "JSON (*.json)")
        if path:
            self.result.save(path)
            self.status.setText(f"Saved to {path}.")

    def _load(self, path: str | None = None) -> None:
        if not path:
            path, _ = QFileDialog.getOpenFileName(self, "Load sensitivity", "", "JSON (*.json)")
        if not path or self.state.handle is None:
            return
        try:
            result = SensitivityResult.load(path)
            result.check_model(self.state.handle)
        except StudioError as exc:
            self.status.setText(str(exc))  # nothing in the session changes
            return
        self.state.publish(KEY, result)
        self.status.setText(f"Loaded {Path(path).name}.")

    # --- state ----------------------------------------------------------------------------
    def _model_changed(self, handle) -> None:
        self.set_result(self.state.session.results.get(KEY) if handle is not None else None)

    def _results_changed(self, key: str) -> None:
        if key == KEY:
            self.set_result(self.state.session.results.get(KEY))
        elif key == "plan":
            self._draw()

    def set_result(self, result) -> None:
        self.result = result
        has_kl = result is None or result.has_kl
        for index in (0, 2):  # KL and perplexity need the end-to-end sweep
            self.metric_box.model().item(index).setEnabled(has_kl)
        if result is not None and not has_kl and self.metric_box.currentIndex() != 1:
            self.metric_box.setCurrentIndex(1)
        self._draw()

    # --- drawing --------------------------------------------------------------------------
    def values(self) -> np.ndarray | None:
        """[layers, options] of the chosen metric (NaN where not measured)."""
        if self.result is None:
            return self.live
        kind, _ = METRICS[self.metric_box.currentText()]
        r = self.result
        if kind == "kl" and r.has_kl:
            return np.asarray(r.loss("kl"), dtype=float)
        if kind == "ppl" and r.has_kl:  # measured only: the proxy predicts KL, not perplexity
            data = np.full(np.shape(r.proxy_error), np.nan)
            data[:, r.kl_options] = np.maximum(np.asarray(r.ppl) - (r.base_ppl or 0.0), 0.0)
            return data
        return np.asarray(r.proxy_error, dtype=float)

    def _options(self) -> list:
        return self.result.options if self.result is not None else self.live_options

    def _measured(self) -> list[int]:
        return self.result.kl_options if self.result is not None else self.live_kl

    def _names(self) -> list[str]:
        if self.result is not None:
            return self.result.layers
        handle = self.state.handle
        return [i.name for i in handle.quantizable] if handle is not None else []

    def column_labels(self) -> list[str]:
        """"W4 g128 *" for the options measured end to end, "W3 g64" for predicted ones."""
        measured = set(self._measured())
        return [option_label(o) + (" *" if j in measured else "")
                for j, o in enumerate(self._options())]

    def _draw(self) -> None:
        values = self.values()
        if values is None:
            self.image.clear()
            self.marks.clear()
            self._show_current()
            self.ranking.setHtml("<p>No sensitivity measured yet.</p>")
            for axis in ("left", "bottom"):   # an empty frame, not a -500..500 grid
                self.plot.getAxis(axis).setTicks([[]])
            self.plot.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
            return
        options, names = self._options(), self._names()
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(np.clip(values, 1e-12, None)).astype(np.float32).T  # [options, layers]
        logs[~np.isfinite(values.T)] = np.nan  # drawn transparent: not measured (yet)
        finite = logs[np.isfinite(logs)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        self.image.setImage(logs, levels=(lo, hi))
        self.image.setRect(0, 0, len(names), len(options))
        self.bar.setLevels((lo, hi))
        self.bar.axis.setLabel(METRICS[self.metric_box.currentText()][1] if self.result is not None
                               else METRICS["KL divergence (end to end)"][1])
        self.plot.getAxis("left").setTicks([[(i + 0.5, label) for i, label
                                             in enumerate(self.column_labels())]])
        self.plot.getAxis("bottom").setTicks([_block_ticks(names)])
        self.plot.setXRange(0, len(names), padding=0)
        self.plot.setYRange(0, len(options), padding=0)
        self.legend.setVisible(bool(self._measured()))
        self._draw_plan(options, names)
        self._draw_ranking(values, options, names)
        self._show_current()

    def _show_current(self) -> None:
        """Outline the current layer's column; without a sweep, say how to get one."""
        name, names = self.state.selected_layer, self._names()
        have = self.values() is not None
        self.current.setVisible(have and name in names)
        if have and name in names:
            i = names.index(name)
            self.current.setRegion((i, i + 1))
        if self.state.handle is None or not name or have:
            self.needs.clear()
        elif name in names or self.state.handle.layer(name).quantizable:
            self.needs.ask(f"No sensitivity measured yet for {name}: the sweep quantizes each "
                           f"layer alone at several widths and measures the damage.",
                           "sensitivity")
        else:
            self.needs.ask(f"{name} is not quantized by default, so the sweep skips it.", None)

    def _draw_plan(self, options, names) -> None:
        self.marks.clear()
        if not self.show_plan.isChecked() or not names:
            return
        plan = self.state.session.plan
        xs, ys = [], []
        for i, name in enumerate(names):
            spec = plan.spec_for(name)
            col = None if spec is None else _column(options, spec)
            if col is not None:
                xs.append(i + 0.5)
                ys.append(col + 0.5)
        self.marks.setData(xs, ys)

    def _draw_ranking(self, values, options, names) -> None:
        # Rank at a measured option (the end-to-end truth), else at the option nearest W4 g128.
        measured = self._measured()
        col = measured[0] if measured else min(
            range(len(options)),
            key=lambda j: (abs(options[j].bits - 4), abs(options[j].group_size - 128)))
        order = [i for i in np.argsort(-np.nan_to_num(values[:, col], nan=-1.0))[:15]]
        metric = self.metric_box.currentText() if self.result is not None else "KL (so far)"
        rows = "".join(f"<tr><td>{n + 1}</td><td>{names[i]}</td><td align='right'>"
                       f"{values[i, col]:.3g}</td></tr>" for n, i in enumerate(order)
                       if math.isfinite(values[i, col]))
        self.ranking.setHtml(f"<h4>Most sensitive at {option_label(options[col])}</h4>"
                             f"<p>{metric}</p><table cellspacing='3'>{rows}</table><p>Cyan "
                             f"rings: the option the plan gives each layer.</p>")

    # --- mouse ----------------------------------------------------------------------------
    def cell_at(self, scene_pos) -> tuple[int, int] | None:
        """(layer index, option column) under a scene position, or None."""
        point = self.plot.getPlotItem().vb.mapSceneToView(scene_pos)
        names, options = self._names(), self._options()
        col, row = int(math.floor(point.x())), int(math.floor(point.y()))
        if 0 <= col < len(names) and 0 <= row < len(options):
            return col, row
        return None

    def _hovered(self, pos) -> None:
        cell = self.cell_at(pos)
        values = self.values()
        if cell is None or values is None:
            self.hover.setText(" ")
            return
        layer, col = cell
        how = ("measured" if col in self._measured() else "predicted") if (
            self.result is not None and self.result.has_kl
            and METRICS[self.metric_box.currentText()][0] == "kl") else ""
        self.hover.setText(f"{self._names()[layer]} at {self.column_labels()[col].rstrip(' *')}: "
                           f"{values[layer, col]:.4g} {how}".rstrip())

    def _clicked(self, event) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        cell = self.cell_at(event.scenePos())
        if cell is not None:
            self.state.select_layer(self._names()[cell[0]])
        if cell is not None and self.result is not None:
            self.assign(self._names()[cell[0]], cell[1])

    def assign(self, name: str, column: int) -> None:
        """Give layer `name` option `column` (its bits and group size) in the session plan,
        with the plan's method."""
        plan = self.state.session.plan
        method = plan.default.method if plan.default is not None else registry.REFERENCE
        spec = self.result.options[column].with_(method=method)
        self.state.session.plan = plan.with_rule(Rule(name, spec))
        self.state.publish("plan")
        self.status.setText(f"Plan: {name} -> {spec.label}.")


def _column(options, spec) -> int | None:
    """The option with `spec`'s grid (bits, group size, symmetric), whatever the method."""
    for j, option in enumerate(options):
        if same_grid(option, spec):
            return j
    return None


def _block_ticks(names: list[str]) -> list[tuple[float, str]]:
    """A tick at the first layer of every few blocks, labelled with the block number."""
    firsts: dict[int, int] = {}
    for i, name in enumerate(names):
        for part in name.split("."):
            if part.isdigit():
                firsts.setdefault(int(part), i)
                break
    step = max(1, len(firsts) // 15)
    return [(i, str(b)) for b, i in sorted(firsts.items()) if b % step == 0]
