"""Weights view: where the model's weights are hard to quantize.

Top: a model overview (one statistic per layer, against layer order, coloured by role) and a
table that sorts layers by any statistic. Bottom: the selected layer's histogram, the abs-max of
every output and input channel, and a block-max |W| heatmap. Statistics are computed once per
model as a job ("weight_stats" in the session); switching layers only redraws arrays.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.stats import SUMMARY_STATS, weight_stats_job
from studio.ui.widgets import (NeedsRun, fit_columns, fmt, in_turns, plot, role_color, rows_table,
                               short_name)
from studio.ui.widgets import sortable as _sortable

KEY = "weight_stats"
COLUMNS = ("#", "Layer", "Block", "Role", "Shape") + tuple(label for label, _ in
                                                      SUMMARY_STATS.values()) + ("Quantized",)


class WeightsView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.stats = None
        self.names: list[str] = []          # quantizable layers, overview order
        self.job = None
        self.pending = False                # a model is open but its statistics are not
        self._overview_stale = False        # statistics arrived while the tab was hidden
        self._legend_roles: list[str] = []

        self.status = QLabel("No model open.", wordWrap=True)   # a long status must not widen the window
        self.stat = QComboBox()
        for key, (label, why) in SUMMARY_STATS.items():
            self.stat.addItem(label, key)
            self.stat.setItemData(self.stat.count() - 1, why, Qt.ItemDataRole.ToolTipRole)
        self.stat.setCurrentIndex(list(SUMMARY_STATS).index("kurtosis"))
        self.stat.currentIndexChanged.connect(self._draw_overview)
        self.log_overview = QCheckBox("log scale")
        self.log_overview.toggled.connect(self._draw_overview)
        self.log_hist = QCheckBox("log counts")
        self.log_hist.setChecked(True)
        self.log_hist.toggled.connect(lambda: self.show_layer(self.state.selected_layer))
        self.compute = QPushButton("Recompute")
        self.compute.clicked.connect(self.start)

        self.overview = plot("Model overview", "layer (in model order; ticks = block)", "kurtosis")
        self.scatter = pg.ScatterPlotItem(size=7, pen=None, hoverable=True)
        self.scatter.sigClicked.connect(self._point_clicked)
        self.overview.addItem(self.scatter)
        self.marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("#444", width=1, style=Qt.PenStyle.DashLine))
        self.marker.setVisible(False)
        self.overview.addItem(self.marker)
        self.legend = self.overview.addLegend(offset=(-10, 10), colCount=4)
        tips = {label: why[0].upper() + why[1:] for label, why in SUMMARY_STATS.values()}
        tips.update(Quantized="Whether the plan's default applies to it (a linear layer inside "
                              "a decoder block)")
        self.table, self.table_model, self.proxy = rows_table(COLUMNS, tips)
        self.table.selectionModel().currentRowChanged.connect(self._row_changed)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)

        self.hist = plot("Weight histogram", "weight value", "log10(1 + count)")
        self.hist_curve = self.hist.plot([0, 1], [0], stepMode="center", fillLevel=0,
                                         brush=(31, 119, 180, 90), pen=pg.mkPen("#1f77b4"))
        self.rows = plot("Abs-max per output channel", "output channel (row)", "max |w|")
        self.rows_curve = self.rows.plot(pen=pg.mkPen("#d62728"))
        self.cols = plot("Abs-max per input channel", "input channel (column)", "max |w|")
        self.cols_curve = self.cols.plot(pen=pg.mkPen("#1f77b4"))
        for curve in (self.rows_curve, self.cols_curve):
            curve.setClipToView(True)
            curve.setDownsampling(auto=True, method="peak")
        self.heat = plot("|W| heatmap (block max)", "input channel", "output channel",
                         gridded=False)
        self.heat.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setLookupTable(pg.colormap.get("viridis").getLookupTable(nPts=256))
        self.heat.addItem(self.image)
        self.heat_bar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), interactive=False,
                                        width=12)
        self.heat_bar.setImageItem(self.image, insert_in=self.heat.getPlotItem())

        bar = QHBoxLayout()
        bar.addWidget(self.status, 1)
        bar.addWidget(QLabel("Overview statistic:"))
        bar.addWidget(self.stat)
        bar.addWidget(self.log_overview)
        bar.addWidget(self.log_hist)
        bar.addWidget(self.compute)
        top = QSplitter(Qt.Orientation.Horizontal)
        top.addWidget(self.overview)
        top.addWidget(self.table)
        top.setSizes([600, 600])
        details = QWidget()
        grid = QHBoxLayout(details)
        grid.setContentsMargins(0, 0, 0, 0)
        for widget in (self.hist, self.rows, self.cols, self.heat):
            grid.addWidget(widget)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(details)
        split.setSizes([500, 400])
        self.needs = NeedsRun(state)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.needs)
        layout.addWidget(split)
        state.add_action("weight_stats", "Compute weight statistics", self.start, self)

        state.modelChanged.connect(self.set_model)
        state.layerSelected.connect(self.show_layer)
        state.resultsChanged.connect(self._results_changed)
        if state.handle is not None:
            self.set_model(state.handle)

    # --- computing ------------------------------------------------------------------------
    def set_model(self, handle) -> None:
        """Show the model's statistics: from the session when this model was opened before in
        this run (no recompute), else computed as a job as soon as this view is shown, so a
        user who never looks at weights never waits behind their computation."""
        existing = self.state.session.results.get(KEY) if handle is not None else None
        self.set_stats(existing)
        self.pending = handle is not None and existing is None
        if self.pending:
            self.status.setText("Weight statistics are computed when this tab is shown.")
            if self.isVisible():
                self.start()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().showEvent(event)
        if self._overview_stale:
            self._draw_overview()
        if self.pending:
            self.start()

    def start(self):
        if self.job is not None and not self.job.is_done:
            # The Run menu shows this tab (whose showEvent starts them) and then asks again.
            return self.job
        handle = self.state.handle
        self.pending = False
        if handle is None:
            return
        self.status.setText("Computing weight statistics…")
        self.compute.setEnabled(False)

        def done(stats) -> None:
            if self.state.handle is handle:  # the user may have opened another model since
                self.state.publish(KEY, stats)
        self.job = self.state.submit("Weight statistics", lambda: weight_stats_job(handle), done)
        self.job.done.connect(lambda: self.compute.setEnabled(True))
        self.job.cancelled.connect(lambda: self.status.setText(
            "Weight statistics cancelled: nothing was kept. Press Recompute to run them again."))
        self.job.failed.connect(lambda msg, _: self.status.setText(f"Weight statistics failed: {msg}"))
        return self.job

    def _results_changed(self, key: str) -> None:
        if key == KEY:
            self.set_stats(self.state.session.results.get(KEY))

    # --- drawing --------------------------------------------------------------------------
    def set_stats(self, stats) -> None:
        self.stats = stats
        if stats is None:
            self.table_model.set_rows([])
            self.names = []
            self.scatter.clear()
            self._overview_stale = False
            self.status.setText("No model open." if self.state.handle is None else "")
            return
        self.names = [s.name for s in stats.quantizable]
        rows = list(stats.layers.values())
        self.table_model.set_rows(
            [[(str(order), order), (s.name, None),
              ("" if s.block is None else str(s.block), -1 if s.block is None else s.block),
              (s.role, None), (" x ".join(str(d) for d in s.shape), s.shape[0] * s.shape[1])]
             + [(fmt(getattr(s, key)), _sortable(getattr(s, key))) for key in SUMMARY_STATS]
             + [("yes" if s.quantizable else f"no ({s.kind}{', tied' if s.tied_to else ''})",
                 None)]
             for order, s in enumerate(rows)])
        fit_columns(self.table, self.table_model)
        self.table.setColumnWidth(1, min(self.table.columnWidth(1), 260))
        self.status.setText(f"{len(self.names)} quantizable layers of {stats.model} "
                            f"(+{len(rows) - len(self.names)} embedding / lm_head rows in the table). "
                            f"Click a point or a row to inspect a layer.")
        # Drawn in turns after the table: in one call with it they held the window 60-84 ms,
        # and their paint with the table's 65 ms more (bench_stalls.py, weight statistics).
        in_turns(self, self._draw_overview, self._show_selected)

    def _show_selected(self) -> None:
        """The current layer's plots; with none current yet, the first layer becomes current
        (drawn through `layerSelected`, here and in every view, once)."""
        if self.stats is None:
            return
        if self.state.selected_layer is None and self.names:
            self.state.select_layer(self.names[0])
        else:
            self.show_layer(self.state.selected_layer)

    def _draw_overview(self) -> None:
        """The per-layer scatter. Drawn only while the tab is shown (the overview is marked
        stale otherwise and drawn by showEvent): its setData and legend took ~1 s of the UI
        thread on the demo when statistics arrived behind another tab."""
        if self.stats is None:
            return
        if not self.isVisible():
            self._overview_stale = True
            return
        self._overview_stale = False
        key = self.stat.currentData()
        label, why = SUMMARY_STATS[key]
        values = self.stats.column(key).astype(np.float64)
        log = self.log_overview.isChecked()
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log10(np.where(values > 0, values, np.nan))
        roles = [self.stats.layers[n].role for n in self.names]
        shown = np.flatnonzero(np.isfinite(values))
        # One brush per role, shared by its points: pyqtgraph renders a symbol per distinct
        # brush, so a fresh brush per point drew 210 symbols instead of 7.
        brushes = {role: pg.mkBrush(role_color(role)) for role in dict.fromkeys(roles)}
        self.scatter.setData(x=shown.astype(np.float64), y=values[shown],
                             data=[self.names[i] for i in shown],
                             brush=[brushes[roles[i]] for i in shown])
        self.overview.setTitle(f"{label} per layer: {why}", color="k", size="10pt")
        self.overview.setLabel("left", f"log10 {label}" if log else label)
        if list(brushes) != self._legend_roles:   # the legend's labels are costly to rebuild
            self._legend_roles = list(brushes)
            self.legend.clear()
            for role, brush in brushes.items():
                self.legend.addItem(pg.ScatterPlotItem(brush=brush, pen=None, size=8), role)
        blocks = [self.stats.layers[n].block for n in self.names]
        first = {}
        for i, block in enumerate(blocks):
            first.setdefault(block, i)
        step = max(1, len(first) // 15)
        ticks = [(i, str(b)) for j, (b, i) in enumerate(first.items()) if j % step == 0]
        self.overview.getAxis("bottom").setTicks([ticks])
        self.overview.enableAutoRange()
        self._move_marker(self.state.selected_layer)

    def show_layer(self, name: str | None) -> None:
        """Redraw the selected layer's plots from the precomputed arrays (no torch work)."""
        s = self.stats.layers.get(name) if self.stats is not None and name else None
        self._move_marker(name)
        if s is None:
            if name and self.state.handle is not None and self.stats is None:
                self.needs.ask(f"No weight statistics yet for {name}.", "weight_stats")
            return
        self.needs.clear()
        counts = np.log10(1.0 + s.hist_counts) if self.log_hist.isChecked() else s.hist_counts
        self.hist_curve.setData(s.hist_edges, counts)
        self.hist.setLabel("left", "log10(1 + count)" if self.log_hist.isChecked() else "count")
        self.hist.setTitle(f"{short_name(name)}: kurtosis {s.kurtosis:.2f}, std {s.std:.3g}",
                           color="k", size="10pt")
        self.rows_curve.setData(s.row_absmax)
        self.rows.setTitle(f"Output channels (max/median {s.row_ratio:.1f})",
                           color="k", size="10pt")
        self.cols_curve.setData(s.col_absmax)
        self.cols.setTitle(f"Input channels (max/median {s.col_ratio:.1f})",
                           color="k", size="10pt")
        top = float(s.heatmap.max()) or 1.0
        self.image.setImage(s.heatmap, levels=(0.0, top), autoLevels=False)
        self.heat_bar.setLevels((0.0, top))
        self.image.setRect(0, 0, s.shape[1], s.shape[0])
        rb, cb = s.heat_block
        self.heat.setTitle(f"|W| heatmap, cell = max of {rb} x {cb} weights", color="k",
                           size="10pt")
        self.heat.autoRange(padding=0)
        for widget in (self.rows, self.cols, self.hist):
            widget.enableAutoRange()
        self._select_row(name)

    def _move_marker(self, name: str | None) -> None:
        if name in self.names:
            self.marker.setPos(self.names.index(name))
            self.marker.setVisible(True)
        else:
            self.marker.setVisible(False)

    def _select_row(self, name: str) -> None:
        current = self.table.currentIndex()
        if current.isValid() and self.proxy.index(current.row(), 1).data() == name:
            return
        index = self.proxy.mapFromSource(self.table_model.find(name, 1))
        if index.isValid():
            self.table.setCurrentIndex(index)
            self.table.scrollTo(index)

    def _point_clicked(self, _item, points, *_) -> None:
        if len(points):
            self.state.select_layer(points[0].data())

    def _row_changed(self, current, _previous) -> None:
        if current.isValid():
            self.state.select_layer(self.proxy.index(current.row(), 1).data())


