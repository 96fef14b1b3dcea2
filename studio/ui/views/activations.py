"""Activations view: outlier channels, the SmoothQuant migration preview, massive activations.

The user picks the calibration text (built-in or a file), windows, window length and seed, and
runs the capture as a job ("activations" in the session). Outliers are recomputed from the
stored per-channel abs-max whenever k changes; the inspector and the alpha slider only redraw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from studio.core.activations import (
    DEFAULT_SEQLEN,
    DEFAULT_WINDOWS,
    activation_capture_job,
)
from studio.core.errors import StudioError
from studio.core.outliers import (
    DEFAULT_K,
    DEFAULT_MASSIVE_FACTOR,
    check_k,
    massive_job,
    outliers_job,
    smoothing_preview,
)
from studio.ui.layout import FlowLayout, column, labelled
from studio.ui.widgets import NeedsRun, fit_columns, fmt, in_turns, plot, rows_table, wide
from studio.ui.workers import LatestOnly

KEY = "activations"
OUTLIER_COLUMNS = ("#", "Input (layers reading it)", "Width", "Median", "Peak", "Peak/median",
                   "Outliers", "Outlier channels (largest first)")
MASSIVE_COLUMNS = ("Token", "Window", "Position", "Channel", "Peak |h|", "x median", "Peak at",
                   "Massive in")
BAR = pg.mkBrush("#1f77b4")
HOT = pg.mkBrush("#d62728")


class ActivationsView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.capture = None
        self.groups = []
        self.massive = []
        self.group = None                 # the OutlierGroup in the inspector
        self.weight_cols: np.ndarray | None = None
        self.details = LatestOnly(state.details)
        # Outliers and massive activations are found on the details worker too (seconds of
        # NumPy for a large capture), each drawn when it comes unless the capture changed.
        self.outlier_finder = LatestOnly(state.details)
        self.massive_finder = LatestOnly(state.details)

        self._build_settings()
        self._build_outliers()
        self._build_massive()
        tabs = QTabWidget()
        tabs.addTab(self.outlier_page, "Outlier channels")
        tabs.addTab(self.massive_page, "Massive activations")
        self.needs = NeedsRun(state)
        layout = QVBoxLayout(self)
        layout.addLayout(self.settings)
        layout.addWidget(self.status)
        layout.addWidget(self.needs)
        layout.addWidget(tabs)
        state.add_action("activations", "Run the activation capture", self.start, self)

        state.modelChanged.connect(self.set_model)
        state.layerSelected.connect(self._layer_selected)
        state.resultsChanged.connect(self._results_changed)
        self.set_model(state.handle)

    # --- construction ---------------------------------------------------------------------
    def _build_settings(self) -> None:
        self.source = QLabel("built-in text (Python help topics)")
        self.pick = QPushButton("Text file…")
        self.pick.clicked.connect(self._pick_file)
        self.builtin = QPushButton("Built-in")
        self.builtin.clicked.connect(lambda: self._set_path(None))
        from studio.ui import settings
        self.windows = _spin(1, 4096, settings.get("calibration_windows") or DEFAULT_WINDOWS,
                             "windows of text fed to the model")
        self.seqlen = _spin(8, 8192, DEFAULT_SEQLEN, "tokens per window")
        self.seed = _spin(0, 2**31 - 1, 0, "seed of the random window offsets")
        self.path = settings.calibration_text()   # Preferences' default text
        self._set_path(self.path)
        self.run_button = QPushButton("Run capture")
        self.run_button.clicked.connect(self.start)
        self.settings = FlowLayout()   # wraps on a narrow screen
        self.settings.addWidget(labelled("Calibration:", self.source))
        self.settings.addWidget(self.builtin)
        self.settings.addWidget(self.pick)
        for label, widget in (("windows", self.windows), ("tokens", self.seqlen),
                              ("seed", self.seed)):
            self.settings.addWidget(labelled(label, widget))
        self.settings.addWidget(self.run_button)
        self.status = QLabel("No capture yet: choose a text and press Run capture.")
        self.status.setWordWrap(True)

    def _build_outliers(self) -> None:
        self.k = QDoubleSpinBox(decimals=1, minimum=0.0, maximum=10000.0, singleStep=1.0,
                                value=DEFAULT_K)
        self.k.setToolTip("a channel is an outlier when its abs-max exceeds k x the median channel")
        self.k.valueChanged.connect(self._refresh_outliers)
        self.k_note = QLabel()
        self.table, self.table_model, self.proxy = rows_table(OUTLIER_COLUMNS)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.selectionModel().currentRowChanged.connect(self._outlier_row_changed)

        self.act_plot = plot("Activation abs-max per input channel", "input channel", "max |x|")
        self.w_plot = plot("Weight column abs-max (same channels)", "input channel", "max |w|")
        # Bars as a filled step curve (one item, fast for thousands of channels); outlier
        # channels get their own wider red bars on top so none vanishes below a pixel.
        self.act_bars, self.act_hot = _bars(self.act_plot)
        self.act_plot.addLegend(offset=(-10, 10))
        self.act_mean = self.act_plot.plot(pen=pg.mkPen("#ff7f0e", width=1), name="mean |x|")
        self.act_hot.setZValue(10)  # outliers drawn over the mean curve
        self.act_hist = plot("Sampled activation values", "x", "log10(1 + count)")
        self.act_hist_curve = self.act_hist.plot([0, 1], [0], stepMode="center", fillLevel=0,
                                                 brush=(31, 119, 180, 90), pen=pg.mkPen("#1f77b4"))
        self.act_hist.setMaximumHeight(260)
        self.w_bars, self.w_hot = _bars(self.w_plot)
        self.w_plot.setXLink(self.act_plot)
        self.alpha = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100, value=50)
        self.alpha.valueChanged.connect(self._draw_preview)
        self.alpha_label = QLabel()
        self.smooth_plot = plot("After SmoothQuant migration", "input channel", "abs-max")
        self.smooth_plot.addLegend(offset=(-10, 10))
        # Weight under activation, wider: at alpha 0.5 the two are equal channel by channel.
        self.smooth_w = self.smooth_plot.plot(**wide("#1f77b4", 3), name="weight x s")
        self.smooth_act = self.smooth_plot.plot(pen=pg.mkPen("#d62728", width=1),
                                                name="activation / s")
        self.smooth_plot.setXLink(self.act_plot)
        self.ranges = QLabel()
        self.ranges.setWordWrap(True)

        controls = QHBoxLayout()
        controls.addWidget(QLabel("k ="))
        controls.addWidget(self.k)
        controls.addWidget(self.k_note, 1)
        left = column(controls, self.table, self.act_hist)
        slider = QHBoxLayout()
        slider.addWidget(QLabel("SmoothQuant alpha"))
        slider.addWidget(self.alpha, 1)
        slider.addWidget(self.alpha_label)
        right = column(self.act_plot, self.w_plot, slider, self.smooth_plot, self.ranges)
        self.outlier_page = QSplitter(Qt.Orientation.Horizontal)
        self.outlier_page.addWidget(left)
        self.outlier_page.addWidget(right)
        self.outlier_page.setSizes([640, 760])

    def _build_massive(self) -> None:
        self.profile = plot("Token norms along the residual stream",
                            "stream position (emb = embeddings, n = output of block n)",
                            "log10 ||h||")
        self.profile.addLegend(offset=(10, 10))
        self.profile_max = self.profile.plot(pen=pg.mkPen("#d62728"), symbol="o", symbolSize=5,
                                             symbolBrush="#d62728", name="largest token")
        self.profile_med = self.profile.plot(pen=pg.mkPen("#1f77b4"), symbol="o", symbolSize=5,
                                             symbolBrush="#1f77b4", name="median token")
        self.tokens_plot = plot("Per-token norms of one window", "token position", "||h||")
        self.tokens_curve = self.tokens_plot.plot(pen=pg.mkPen("#555"))
        self.tokens_hot = pg.ScatterPlotItem(size=9, brush=HOT, pen=None)
        self.tokens_plot.addItem(self.tokens_hot)
        self.massive_note = QLabel()
        self.massive_note.setWordWrap(True)
        self.massive_table, self.massive_model, self.massive_proxy = rows_table(MASSIVE_COLUMNS)
        self.massive_table.selectionModel().currentRowChanged.connect(self._massive_row_changed)
        plots = column(self.profile, self.tokens_plot)
        right = column(self.massive_note, self.massive_table)
        self.massive_page = QSplitter(Qt.Orientation.Horizontal)
        self.massive_page.addWidget(plots)
        self.massive_page.addWidget(right)
        self.massive_page.setSizes([760, 640])

    # --- running --------------------------------------------------------------------------
    def set_model(self, handle) -> None:
        self.set_capture(None)
        ready = handle is not None and handle.text_ready
        self.run_button.setEnabled(ready)
        if handle is None:
            self.status.setText("No model open.")
        elif not handle.text_ready:
            self.status.setText("This model has no tokenizer, so no text can be fed to it: "
                                "activation capture is off.")
        else:
            self.status.setText("No capture yet: choose a text and press Run capture.")
            # A model opened before in this run brings its capture back from its session.
            self.set_capture(self.state.session.results.get(KEY))

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Calibration text", "",
                                              "Text files (*.txt *.md *.rst);;All files (*)")
        if path:
            self._set_path(path)

    def use_preferences(self) -> None:
        """Preferences changed: their calibration text and window count become the defaults."""
        from studio.ui import settings

        self._set_path(settings.calibration_text())
        self.windows.setValue(settings.get("calibration_windows"))

    def _set_path(self, path: str | None) -> None:
        self.path = path
        self.source.setText(Path(path).name if path else "built-in text (Python help topics)")
        self.source.setToolTip(path or "")

    def start(self) -> None:
        handle = self.state.handle
        if handle is None:
            return
        path, windows, seqlen, seed = (self.path, self.windows.value(), self.seqlen.value(),
                                       self.seed.value())
        self.run_button.setEnabled(False)
        self.status.setText(f"Capturing activations over {windows} x {seqlen} tokens…")

        def done(capture) -> None:
            if self.state.handle is handle:
                self.state.publish(KEY, capture)
        job = self.state.submit("Activation capture", lambda: activation_capture_job(
            handle, path, windows=windows, seqlen=seqlen, seed=seed), done)
        job.done.connect(lambda: self.run_button.setEnabled(self.state.handle is not None))
        job.cancelled.connect(lambda: self.status.setText(
            "Capture cancelled: nothing was kept." + self._kept_note()))
        job.failed.connect(lambda msg, _: self.status.setText(
            f"Capture failed: {msg}" + self._kept_note()))
        self.job = job

    def _kept_note(self) -> str:
        return " The previous capture is still shown." if self.capture is not None else ""

    def _results_changed(self, key: str) -> None:
        if key == KEY:
            self.set_capture(self.state.session.results.get(KEY))

    # --- outliers -------------------------------------------------------------------------
    def set_capture(self, capture) -> None:
        self.capture = capture
        self.group = None
        if capture is not None:
            self.status.setText(f"Captured {capture.windows} windows x {capture.seqlen} tokens "
                                f"of {capture.source} (seed {capture.seed}) through "
                                f"{len(capture.inputs)} layer inputs of {capture.model}.")
        self._refresh_outliers()
        self._refresh_massive()

    def _refresh_outliers(self) -> None:
        self.table_model.set_rows([])
        self.groups = []
        capture = self.capture
        if capture is None:
            self.outlier_finder.forget()
            self._clear_inspector()
            self._say_what_is_missing(self.state.selected_layer, False)
            return
        try:
            k = check_k(self.k.value())
        except StudioError as exc:
            self.outlier_finder.forget()
            self.k_note.setText(f"<span style='color:#c00'>{exc}</span>")
            self._clear_inspector()
            return
        self.k_note.setText("Finding outlier channels...")
        self.outlier_finder.request((id(capture), k), "Outlier channels",
                                    lambda: outliers_job(capture, k),
                                    lambda groups: self._show_outliers(capture, groups))

    def _show_outliers(self, capture, groups) -> None:
        if capture is not self.capture:
            return
        self.groups = groups
        count = sum(1 for g in self.groups if len(g.channels))
        self.k_note.setText(f"{count} of {len(self.groups)} inputs have outlier channels")
        rows = []
        for order, g in enumerate(self.groups):
            channels = ", ".join(str(c) for c in g.channels[:12])
            if len(g.channels) > 12:
                channels += f", … (+{len(g.channels) - 12})"
            rows.append([(str(order), order), (g.label, None), (str(g.width), g.width),
                         (fmt(g.median), g.median), (fmt(g.peak), g.peak),
                         (fmt(g.ratio), min(g.ratio, 1e300)),
                         (str(len(g.channels)), len(g.channels)), (channels, None)])
        self.table_model.set_rows(rows)   # one reset, not a signal per row
        fit_columns(self.table, self.table_model)
        # The current input's plots in the next turn, apart from the table (`in_turns`).
        in_turns(self, lambda: self._show_current_group(capture))

    def _show_current_group(self, capture) -> None:
        if capture is not self.capture:
            return
        wanted = self.group.layers[0] if self.group else self.state.selected_layer
        if not self._select_group_of(wanted) and self.groups:
            self.show_group(self.groups[0])
        name = self.state.selected_layer
        self._say_what_is_missing(name, any(name in g.layers for g in self.groups))

    def _select_group_of(self, layer: str | None) -> bool:
        for order, g in enumerate(self.groups):
            if layer in g.layers:
                index = self.proxy.mapFromSource(self.table_model.find(str(order), 0))
                if self.table.currentIndex().row() != index.row():
                    self.table.setCurrentIndex(index)
                    self.table.scrollTo(index)
                self.show_group(g)
                return True
        return False

    def _layer_selected(self, name: str) -> None:
        if self.group is None or name not in self.group.layers:
            found = self._select_group_of(name)
        else:
            found = True
        self._say_what_is_missing(name, found)

    def _say_what_is_missing(self, name: str | None, found: bool) -> None:
        handle = self.state.handle
        if handle is None or not name or not handle.text_ready:
            self.needs.clear()
        elif self.capture is None:
            self.needs.ask(f"No activations captured yet for {name}: the capture feeds "
                           f"calibration text through the model and records every layer's "
                           f"input channels.", "activations")
        elif not found:
            self.needs.ask(f"{name} is not among the captured layer inputs (the capture "
                           f"covers the quantizable linear layers).", None)
        else:
            self.needs.clear()

    def _outlier_row_changed(self, current, _previous) -> None:
        if current.isValid():
            g = self.groups[int(self.proxy.index(current.row(), 0).data())]
            self.show_group(g)
            if self.state.selected_layer not in g.layers:
                self.state.select_layer(g.layers[0])

    def show_group(self, g) -> None:
        """The inspector for one input: activation and weight channel ranges, then SmoothQuant."""
        if self.group is g:
            return
        self.group = g
        stats = self.capture.input_of(g.layers[0])
        edges = np.arange(g.width + 1, dtype=np.float32) - 0.5
        width = max(1.0, g.width / 250)
        self.act_bars.setData(edges, stats.absmax)
        self.act_hot.setOpts(x=g.channels, height=stats.absmax[g.channels], width=width)
        self.act_mean.setData(stats.mean_abs)
        self.act_hist_curve.setData(stats.hist_edges, np.log10(1.0 + stats.hist_counts))
        self.act_hist.setTitle(f"{g.label}: {int(stats.hist_counts.sum()):,} sampled values of "
                               f"{stats.tokens:,} tokens", color="k", size="10pt")
        self.act_hist.enableAutoRange()
        self.act_plot.setTitle(f"{g.label}: activation abs-max per input channel "
                               f"({len(g.channels)} above k x median, in red)", color="k",
                               size="10pt")
        self.act_plot.enableAutoRange()
        known = self._known_weight_columns(g.layers)
        if known is not None:
            self._show_weight_columns(g, known)
            return
        # Without weight statistics the columns are read from the weights: on the details
        # worker, drawn when they come unless another input was chosen meanwhile.
        from studio.core.layer_details import weight_columns_job

        handle = self.state.handle
        self.weight_cols = None
        self.w_plot.setTitle("Reading the weight columns...", color="k", size="10pt")
        self.details.request(g, f"Weight columns of {g.label}",
                             lambda: weight_columns_job(handle, g.layers),
                             lambda cols: self._show_weight_columns(g, cols))

    def _show_weight_columns(self, g, cols: np.ndarray) -> None:
        if self.group is not g:
            return
        self.weight_cols = cols
        edges = np.arange(g.width + 1, dtype=np.float32) - 0.5
        self.w_bars.setData(edges, cols)
        self.w_hot.setOpts(x=g.channels, height=cols[g.channels], width=max(1.0, g.width / 250))
        self.w_plot.setTitle(f"Weight column abs-max over {', '.join(_leaf(n) for n in g.layers)}",
                             color="k", size="10pt")
        self.w_plot.enableAutoRange()
        self._draw_preview()

    def _known_weight_columns(self, layers: list[str]) -> np.ndarray | None:
        stats = self.state.session.results.get("weight_stats")
        if stats is not None and all(name in stats.layers for name in layers):
            return np.max([stats.layers[name].col_absmax for name in layers], axis=0)
        return None

    def _draw_preview(self) -> None:
        alpha = self.alpha.value() / 100
        self.alpha_label.setText(f"{alpha:.2f}")
        if self.group is None or self.weight_cols is None:
            return
        stats = self.capture.input_of(self.group.layers[0])
        preview = smoothing_preview(stats.absmax, self.weight_cols, alpha)
        self.smooth_act.setData(preview.act_after)
        self.smooth_w.setData(preview.weight_after)
        self.smooth_plot.enableAutoRange()
        r = preview.ranges()
        self.smooth_plot.setTitle(f"After migration with alpha {alpha:.2f}: "
                                  f"s = max|X|^{alpha:.2f} / max|W|^{1 - alpha:.2f}",
                                  color="k", size="10pt")
        self.ranges.setText(
            f"Spread (max / median channel): activations {r['act_before']:.1f} → "
            f"<b>{r['act_after']:.1f}</b>, weight columns {r['weight_before']:.1f} → "
            f"<b>{r['weight_after']:.1f}</b>. Peak: activations {preview.act_before.max():.3g} → "
            f"{preview.act_after.max():.3g}, weights {preview.weight_before.max():.3g} → "
            f"{preview.weight_after.max():.3g}.")

    def _clear_inspector(self) -> None:
        self.group = None
        for bars, hot in ((self.act_bars, self.act_hot), (self.w_bars, self.w_hot)):
            bars.setData([0, 1], [0])
            hot.setOpts(x=[], height=[])
        self.smooth_act.setData([])
        self.smooth_w.setData([])
        self.act_mean.setData([])
        self.act_hist_curve.setData([0, 1], [0])
        for each in (self.act_plot, self.w_plot, self.act_hist, self.smooth_plot):
            # An empty 0..1 frame: auto-range around the flat zero bars read "±400 (x0.001)".
            each.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
        self.ranges.setText("")

    # --- massive activations --------------------------------------------------------------
    def _refresh_massive(self) -> None:
        self.massive_model.set_rows([])
        self.massive = []
        self.profile_max.setData([])
        self.profile_med.setData([])
        self.tokens_curve.setData([])
        self.tokens_hot.clear()
        capture = self.capture
        if capture is None:
            self.massive_finder.forget()
            self.massive_note.setText("")
            return
        self.massive_note.setText("Finding massive activations...")
        self.massive_finder.request(id(capture), "Massive activations",
                                    lambda: massive_job(capture, DEFAULT_MASSIVE_FACTOR),
                                    lambda found: self._show_massive(capture, found))

    def _show_massive(self, capture, found) -> None:
        if capture is not self.capture:
            return
        profile = found.profile
        self.profile_max.setData(np.log10(np.maximum(profile["max"], 1e-6)))
        self.profile_med.setData(np.log10(np.maximum(profile["median"], 1e-6)))
        names = self.capture.stream_names
        step = max(1, len(names) // 12)
        self.profile.getAxis("bottom").setTicks(
            [[(i, "emb" if i == 0 else str(i - 1)) for i in range(0, len(names), step)]])
        self.massive = found.massive
        rows = []
        for m in self.massive:
            first, last = names[m.rows[0]], names[m.rows[-1]]
            rows.append([(repr(m.token), None), (str(m.window), m.window),
                         (str(m.position), m.position), (str(m.channel), m.channel),
                         (fmt(m.value), m.value), (f"{m.ratio:.0f}", m.ratio),
                         (_short_stream(m.stream), m.row),
                         (f"{len(m.rows)} streams ({_short_stream(first)} … "
                          f"{_short_stream(last)})", len(m.rows))])
        self.massive_model.set_rows(rows)   # one reset, not a QStandardItem per cell
        fit_columns(self.massive_table, self.massive_model)
        self.massive_table.sortByColumn(5, Qt.SortOrder.DescendingOrder)
        channels = sorted({m.channel for m in self.massive})
        positions = sorted({m.position for m in self.massive})
        self.massive_note.setText(
            f"{len(self.massive)} tokens have an entry above {DEFAULT_MASSIVE_FACTOR:g} x the "
            f"median token's largest |h| in some block; channels {channels[:10]}, positions "
            f"{positions[:10]} in their windows. Select a token to see its window's norms."
            if self.massive else
            f"No token's largest |h| exceeds {DEFAULT_MASSIVE_FACTOR:g} x its block's median.")
        if self.massive:
            self.massive_table.selectRow(0)
        else:
            self._show_tokens(len(names) - 1, 0)

    def _massive_row_changed(self, current, _previous) -> None:
        if current.isValid():
            source = self.massive_proxy.mapToSource(current)
            m = self.massive[source.row()]
            self._show_tokens(m.row, m.window)

    def _show_tokens(self, row: int, window: int) -> None:
        norms = self.capture.stream_norm[row, window]
        self.tokens_curve.setData(norms)
        hot = [m.position for m in self.massive if row in m.rows and m.window == window]
        self.tokens_hot.setData(x=hot, y=norms[hot] if hot else [])
        self.tokens_plot.setTitle(f"Per-token norms, window {window}, at "
                                  f"{_short_stream(self.capture.stream_names[row])} "
                                  f"(massive tokens in red)", color="k", size="10pt")
        self.tokens_plot.enableAutoRange()


def _bars(widget) -> tuple[pg.PlotDataItem, pg.BarGraphItem]:
    bars = widget.plot([0, 1], [0], stepMode="center", fillLevel=0, brush=BAR,
                       pen=pg.mkPen("#1f77b4"))
    hot = pg.BarGraphItem(x=[], height=[], width=1.0, brush=HOT, pen=pg.mkPen("#d62728"))
    widget.addItem(hot)
    return bars, hot


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    spin = QSpinBox(minimum=low, maximum=high, value=value)
    spin.setToolTip(tip)
    return spin


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _short_stream(name: str) -> str:
    return name if name == "embeddings" else f"block {name.rsplit('.', 1)[-1]}"
