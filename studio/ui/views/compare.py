"""Before / after: every evaluation and benchmark run side by side, in a table and in plots.

Runs live in `state.session.runs` (dicts written by the Evaluate and Benchmark views, keyed by
"variant"); the table shows one row per variant, merging its latest evaluation and benchmark.
Plots: bars of perplexity and decode speed, Pareto scatters (size vs perplexity, tokens/s vs
perplexity) with the non-dominated points joined, one layer's weight histogram before and after,
and the per-layer error of each variant. Runs export as CSV or JSON, the charts as a PNG.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QBuffer, QIODevice, Qt
from PySide6.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.files import write_bytes_atomic, write_text_atomic
from studio.core.runs import (  # noqa: F401  (re-exported: the views' tests read them here)
    BASELINE,
    COLUMNS,
    compare_rows,
    describe_baseline,
    describe_variant,
    export_run_job,
    latest_protocol,
    layer_errors_job,
    recorded_errors,
    merged_rows,
    pareto_front,
    run_all_job,
    runs_csv,
    worst_layers,
)
from studio.ui.before_after import BeforeAfter
from studio.ui.layout import column
from studio.ui.widgets import grid, plot_widget, wide

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22"]


def add_runs(state, runs: list[dict]) -> None:
    state.add_runs(runs)


# --- the view ------------------------------------------------------------------------------

class CompareView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self._errors: dict[tuple, tuple] = {}  # (name, id) -> layer_errors(...), cached
        self._errors_asked: set[tuple] = set()  # keys being computed on the details worker
        self._charts_stale = False              # runs changed while the tab was hidden
        self.rows: list[dict] = []
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([header for _, header, _ in COLUMNS])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._row_chosen)

        self.ppl_bars = self._plot("Perplexity (lower is better)", "", "perplexity")
        self.speed_bars = self._plot("Decode speed", "", "tokens/s")
        self.size_scatter = self._plot("Size vs perplexity", "size (MB)", "perplexity")
        self.speed_scatter = self._plot("Speed vs perplexity", "tokens/s", "perplexity")
        self.errors = self._plot("Per-layer error (click: that layer)",
                                 "layer (model order)", "error")
        self.errors.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        self.error_marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("#444", style=Qt.PenStyle.DashLine))
        self.layer = BeforeAfter(state)
        self.histogram = self.layer.hist   # the current layer's weights before / after
        self.hist_variant = self.layer.variant_box
        self.charts = QWidget()
        grid = QGridLayout(self.charts)
        for i, plot in enumerate((self.ppl_bars, self.speed_bars, self.size_scatter,
                                  self.speed_scatter)):
            grid.addWidget(plot, 0, i)
        grid.addWidget(self.errors, 1, 0)
        grid.addWidget(self.layer, 1, 1, 1, 3)

        self.status = QLabel()
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        self.run_all_button = QPushButton("Run all on variant")
        self.run_all_button.setToolTip("Evaluate and benchmark the chosen variant next to the "
                                       "baseline in one job (quick-evaluation settings of "
                                       "Preferences)")
        self.run_all_button.clicked.connect(self.run_all)
        buttons.addWidget(self.run_all_button)
        for text, slot in (("Add exported model...", self.add_export),
                           ("Export runs (CSV/JSON)...", self.choose_export_runs),
                           ("Save charts (PNG)...", self.choose_export_charts),
                           ("Clear runs", self.clear_runs)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            buttons.addWidget(button)
        buttons.addStretch(1)

        top = column(self.table, self.status)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(self.charts)
        split.setSizes([260, 640])
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(split)

        state.resultsChanged.connect(self._results_changed)
        state.modelChanged.connect(lambda _h: self.refresh())
        state.layerSelected.connect(lambda _name: self._move_error_marker())
        self.refresh()

    def _plot(self, title: str, x: str, y: str) -> pg.PlotWidget:
        plot = plot_widget(title=title)
        plot.setBackground("w")
        grid(plot)
        plot.setLabel("bottom", x)
        plot.setLabel("left", y)
        plot.setMinimumHeight(220)
        plot.getViewBox().setDefaultPadding(0.08)
        plot.getAxis("left").enableAutoSIPrefix(False)
        plot.getAxis("bottom").enableAutoSIPrefix(False)
        return plot

    # --- running ---------------------------------------------------------------------------
    def run_all(self, name: str | None = None):
        """Evaluate and benchmark a variant (the chosen one) and the baseline in one job."""
        from studio.ui import settings

        handle = self.state.handle
        variant = self.state.session.variants.get(name or self.hist_variant.currentText())
        if handle is None or variant is None:
            self.status.setText("Quantize the model first (Quantize tab): Run all measures a "
                                "variant next to the baseline.")
            return None
        windows, seqlen = settings.quick_eval()
        return self.state.submit(f"Run all on {variant.name}",
                                 lambda: run_all_job(variant, handle, windows, seqlen,
                                                     threads=settings.threads()),
                                 on_result=self.state.add_runs)

    def add_export(self, folder: str | None = None):
        """Re-open an export folder through its consumer library and measure its perplexity,
        KL and top-1 against the baseline, on the text of the latest evaluation run."""
        handle = self.state.handle
        if handle is None:
            self.status.setText("Open the base model first.")
            return None
        if not folder:
            folder = QFileDialog.getExistingDirectory(self, "Add an exported model (its folder)")
            if not folder:
                return None
        protocol = latest_protocol(self.state.session.runs)
        return self.state.submit(f"Evaluate export {Path(folder).name}",
                                 lambda: export_run_job(folder, handle, **protocol),
                                 on_result=lambda run: self.state.add_runs([run]))

    # --- refresh ---------------------------------------------------------------------------
    def _results_changed(self, key: str) -> None:
        if key in ("runs", "variants"):
            self.refresh()

    def refresh(self) -> None:
        rows = compare_rows(self.state.session.runs, self.state.handle)
        self.rows = rows
        self._fill_table(rows)
        self._draw_charts()
        self.run_all_button.setEnabled(bool(self.state.session.variants))
        measured = len(self.state.session.runs)
        if self.state.handle is None:
            self.status.setText("No model open.")
        elif not self.state.session.variants and not measured:
            self.status.setText("Only the baseline so far: quantize the model (Quantize tab); "
                                "each variant is evaluated briefly and appears here.")
        else:
            self.status.setText(f"{measured} runs over {len(rows)} rows. Ratios are against "
                                f"the baseline; its perplexity comes from the same windows.")

    def _draw_charts(self) -> None:
        """Bars, scatters and per-layer errors, only while the tab is shown: redrawn behind
        another tab after every evaluation and benchmark, they held the UI thread (~0.3-1 s
        under load); showEvent draws them when the user comes."""
        if not self.isVisible():
            self._charts_stale = True
            return
        self._charts_stale = False
        self._draw_bars(self.rows)
        self._draw_scatter(self.size_scatter, self.rows, "size_mb", "lower")
        self._draw_scatter(self.speed_scatter, self.rows, "decode_tok_s", "higher")
        self._draw_errors()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().showEvent(event)
        if self._charts_stale:
            self._draw_charts()

    def _fill_table(self, rows: list[dict]) -> None:
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, (key, _, fmt) in enumerate(COLUMNS):
                value = row.get(key)
                item = QTableWidgetItem("" if value is None else fmt.format(value))
                if isinstance(value, (int, float)):
                    item.setData(Qt.ItemDataRole.UserRole, value)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if row["variant"] == BASELINE:
                    item.setBackground(pg.mkColor("#eef3fb"))
                self.table.setItem(r, c, item)

    def _row_chosen(self) -> None:
        """A variant's row chosen: the before / after plots show that variant."""
        rows = self.table.selectionModel().selectedRows()
        if rows:
            index = self.hist_variant.findText(self.table.item(rows[0].row(), 0).text())
            if index >= 0:
                self.hist_variant.setCurrentIndex(index)

    def _draw_bars(self, rows: list[dict]) -> None:
        for plot, key in ((self.ppl_bars, "ppl"), (self.speed_bars, "decode_tok_s")):
            plot.clear()
            have = [row for row in rows if row.get(key) is not None]
            values = np.array([row[key] for row in have], np.float32)
            if not len(values):
                continue
            x = np.arange(len(values), dtype=np.float32)
            brushes = [self._colour(rows, row) for row in have]
            plot.addItem(pg.BarGraphItem(x=x, height=values, width=0.6, brushes=brushes))
            plot.getAxis("bottom").setTicks([[(i, row["variant"]) for i, row in enumerate(have)]])
            low = 0.0 if key == "decode_tok_s" else float(values.min()) * 0.95
            plot.setYRange(low, float(values.max()) * 1.05)

    def _draw_scatter(self, plot: pg.PlotWidget, rows: list[dict], key: str, better: str) -> None:
        plot.clear()
        have = [row for row in rows if row.get(key) is not None and row.get("ppl") is not None]
        if not have:
            return
        xs = np.array([row[key] for row in have], np.float32)
        ys = np.array([row["ppl"] for row in have], np.float32)
        front = pareto_front(xs, ys, better)
        if len(front) > 1:
            plot.plot(xs[front], ys[front], pen=pg.mkPen("#888", width=1, style=Qt.PenStyle.DashLine))
        for i, row in enumerate(have):
            color = self._colour(rows, row)
            plot.plot([xs[i]], [ys[i]], pen=None, symbol="o", symbolSize=10, symbolBrush=color)
            # Labels point away from the right edge so they stay inside the plot.
            right_half = xs[i] > (xs.min() + xs.max()) / 2
            label = pg.TextItem(row["variant"], color=color, anchor=(1 if right_half else 0, 1))
            label.setPos(float(xs[i]), float(ys[i]))
            plot.addItem(label)

    @staticmethod
    def _colour(rows: list[dict], row: dict) -> str:
        """One colour per variant, the same in every chart."""
        return COLORS[rows.index(row) % len(COLORS)]

    # --- per-layer errors ------------------------------------------------------------------
    def _draw_errors(self) -> None:
        self.errors.clear()
        self.errors.addItem(self.error_marker)
        handle = self.state.handle
        self.error_layers: list[str] = []
        if handle is None:
            return
        what, worst = "error", []
        self._ask_errors(handle)
        for i, (name, variant) in enumerate(self.state.session.variants.items()):
            key = (name, id(variant))
            if key not in self._errors:
                continue   # being computed: drawn when it arrives
            layers, errors, what = self._errors[key]
            if not len(errors):
                continue
            color = COLORS[(i + 1) % len(COLORS)]
            self.errors.plot(np.arange(len(errors), dtype=np.float32), errors,
                             **wide(color, 1.5), name=name)
            points = pg.ScatterPlotItem(np.arange(len(errors), dtype=np.float32), errors,
                                        data=layers, size=6, pen=None, brush=color, hoverable=True)
            points.sigClicked.connect(self._error_clicked)
            self.errors.addItem(points)
            self.error_layers = layers
            worst += [f"{name}: " + ", ".join(f"{layer.removeprefix('model.')} ({error:.3g})"
                                              for layer, error in worst_layers(layers, errors, 3))]
        self.errors.setLabel("left", what)
        self.errors.setToolTip("Largest errors: " + "; ".join(worst) if worst else "")
        self._move_error_marker()

    def _ask_errors(self, handle) -> None:
        """Compute the per-layer errors of variants that have none cached, on the details
        worker (a variant whose method recorded no output errors is de-quantized layer by
        layer: seconds, which on the UI thread froze the window after a GPTQ run)."""
        missing = []
        for name, variant in self.state.session.variants.items():
            key = (name, id(variant))
            if key in self._errors or key in self._errors_asked:
                continue
            recorded = recorded_errors(variant)
            if recorded is not None:
                self._errors[key] = recorded
            else:
                missing.append((key, variant))
        if not missing:
            return
        self._errors_asked.update(key for key, _ in missing)

        def job():
            out = {}
            for key, variant in missing:
                out[key] = yield from layer_errors_job(variant, handle)
            return out

        def arrived(results: dict) -> None:
            self._errors_asked.difference_update(results)
            if handle is self.state.handle:
                self._errors.update(results)
                self._draw_errors()

        def failed(*_) -> None:
            self._errors_asked.difference_update(key for key, _ in missing)

        self.errors_job = self.state.details.submit("Per-layer errors", job, arrived,
                                                    on_failed=failed)

    def _error_clicked(self, _item, points, *_) -> None:
        if len(points):
            self.state.select_layer(points[0].data())

    def _move_error_marker(self) -> None:
        name = self.state.selected_layer
        layers = getattr(self, "error_layers", [])
        self.error_marker.setVisible(name in layers)
        if name in layers:
            self.error_marker.setPos(layers.index(name))

    # --- export ----------------------------------------------------------------------------
    def choose_export_runs(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export runs", "runs.csv",
                                              "CSV (*.csv);;JSON (*.json)")
        if path:
            self.export_runs(Path(path))

    def export_runs(self, path: Path) -> None:
        rows = compare_rows(self.state.session.runs, self.state.handle)
        if path.suffix.lower() == ".json":
            write_text_atomic(path, json.dumps({"rows": rows, "runs": self.state.session.runs},
                                               indent=2, default=str))
        else:
            write_text_atomic(path, runs_csv(rows))
        self.status.setText(f"Runs exported to {path}")

    def choose_export_charts(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save charts", "charts.png", "PNG (*.png)")
        if path:
            self.export_charts(Path(path))

    def export_charts(self, path: Path) -> None:
        buffer = QBuffer()
        buffer.open(QIODevice.OpenModeFlag.WriteOnly)
        self.charts.grab().save(buffer, "PNG")
        write_bytes_atomic(path, bytes(buffer.data()))
        self.status.setText(f"Charts saved to {path}")

    def clear_runs(self) -> None:
        self.state.session.runs.clear()
        self.state.publish("runs")
