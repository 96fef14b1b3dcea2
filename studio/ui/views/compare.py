"""Before / after: every evaluation and benchmark run side by side, in a table and in plots.

Runs live in `state.session.runs` (dicts written by the Evaluate and Benchmark views, keyed by
"variant"); the table shows one row per variant, merging its latest evaluation and benchmark.
Plots: bars of perplexity and decode speed, Pareto scatters (size vs perplexity, tokens/s vs
perplexity) with the non-dominated points joined, one layer's weight histogram before and after,
and the per-layer error of each variant. Runs export as CSV or JSON, the charts as a PNG.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QBuffer, QIODevice, Qt
from PySide6.QtWidgets import (
    QComboBox,
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

from studio.core import metrics
from studio.core.files import write_bytes_atomic, write_text_atomic
from studio.ui.layout import column

BASELINE = "baseline"
# (key, header, format) of the runs table and the CSV export, in order.
COLUMNS = [
    ("variant", "Variant", "{}"), ("plan", "Plan", "{}"), ("bits_per_weight", "Bits/weight", "{:.3f}"),
    ("size_mb", "Size (MB)", "{:.1f}"), ("quantized_mb", "of which quantized (MB)", "{:.1f}"),
    ("embedding_mb", "of which embedding/head (MB)", "{:.1f}"),
    ("ppl", "Perplexity", "{:.3f}"), ("kl", "KL", "{:.5f}"),
    ("top1", "Top-1", "{:.2%}"), ("prefill_ms", "Prefill (ms)", "{:.1f}"),
    ("decode_tok_s", "Tokens/s", "{:.1f}"), ("peak_rss_mb", "Peak RSS (MB)", "{:.0f}"),
    ("kernels", "Kernels", "{}"), ("calibration", "Calibration", "{}"), ("text", "Eval text", "{}"),
]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22"]


# --- runs: what the Evaluate and Benchmark views store -------------------------------------

def describe_variant(variant) -> dict:
    """The columns that say what a variant is (for a run dict)."""
    labels = sorted({spec.label for spec in variant.specs.values()})
    plan = labels[0] if len(labels) == 1 else f"mixed: {', '.join(labels[:3])}" + (
        "..." if len(labels) > 3 else "")
    parts = variant.size_breakdown  # Size = quantized + embedding + other floats
    return {"variant": variant.name, "plan": plan,
            "bits_per_weight": round(variant.bits_per_weight, 4),
            "size_mb": variant.size_bytes / 2**20, "quantized_mb": parts["quantized"] / 2**20,
            "embedding_mb": parts["embedding"] / 2**20,
            "calibration": variant.calibration or "none"}


def describe_baseline(handle) -> dict:
    """The baseline counted as variants are: float tensors at 16 bits each."""
    from studio.core.layers import embedding_summary

    embedding = embedding_summary(handle.layers, handle.param_count) or {}
    head = embedding.get("lm_head")
    params = embedding.get("params", 0) + (
        handle.layer(head).params if head and not embedding["lm_head_tied"] else 0)
    return {"variant": BASELINE, "plan": "full precision", "bits_per_weight": 16.0,
            "size_mb": 2 * handle.param_count / 2**20, "quantized_mb": 0.0,
            "embedding_mb": 2 * params / 2**20, "calibration": "none"}


def add_runs(state, runs: list[dict]) -> None:
    state.session.runs.extend(runs)
    state.publish("runs")


def latest_protocol(runs: list[dict]) -> dict:
    """The text, window length and count of the latest evaluation (the defaults when none)."""
    from studio.core.evaluate import DEFAULT_SEQLEN, DEFAULT_WINDOWS

    for run in reversed(runs):
        if run.get("kind") == "eval":
            return {"text_path": run.get("text_path"), "seqlen": run["seqlen"],
                    "windows": run["windows"], "bos": run.get("bos_setting", "auto")}
    return {"text_path": None, "seqlen": DEFAULT_SEQLEN, "windows": DEFAULT_WINDOWS,
            "bos": "auto"}


def export_run_job(folder: str, base_handle, text_path, seqlen: int, windows: int,
                   bos: str = "auto"):
    """A run dict for an export folder, measured by the core's `export_eval_job`."""
    from studio.core.export.reopen import export_eval_job

    result, report = yield from export_eval_job(folder, base_handle, text_path, seqlen, windows,
                                                bos)
    variant = report.get("variant") or {}
    name = Path(report["path"]).name
    return {"variant": f"{name} [{report['format']}]",
            "plan": f"export of {variant.get('name', name)}",
            "bits_per_weight": report["bits_per_weight_on_disk"],
            "size_mb": report["bytes"] / 2**20, "calibration": variant.get("calibration") or "none",
            "kind": "eval", **result.to_dict(), "text_path": text_path}


def merged_rows(runs: list[dict]) -> list[dict]:
    """One row per variant (in first-seen order): each field's latest value wins."""
    rows: dict[str, dict] = {}
    for run in runs:
        rows.setdefault(run["variant"], {}).update(
            {k: v for k, v in run.items() if v is not None})
    return list(rows.values())


def runs_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([key for key, _, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row[key] for key, _, _ in COLUMNS])
    return out.getvalue()


def pareto_front(xs: np.ndarray, ys: np.ndarray, x_better: str) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower y; lower or higher x)."""
    sign = 1.0 if x_better == "lower" else -1.0
    order = np.lexsort((ys, sign * xs))
    front, best = [], np.inf
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return np.array(front, dtype=int)


def layer_errors(variant, base_handle) -> tuple[list[str], np.ndarray, str]:
    """(layers, errors, what) per quantized layer: the method's output error where it was
    measured for every layer, else the weight's relative error against the baseline."""
    names = list(variant.qtensors)
    recorded = {e["layer"]: e.get("error") for e in variant.layer_errors if "layer" in e}
    if names and all(recorded.get(n) is not None for n in names):
        return names, np.array([recorded[n] for n in names], np.float32), "output error"
    errors = [metrics.relative_error(base_handle.weight(n), variant.qtensors[n].dequantize())
              for n in names]
    return names, np.array(errors, np.float32), "weight relative error"


# --- the view ------------------------------------------------------------------------------

class CompareView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self._errors: dict[tuple, tuple] = {}  # (name, id) -> layer_errors(...), cached
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([header for _, header, _ in COLUMNS])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)

        self.ppl_bars = self._plot("Perplexity (lower is better)", "", "perplexity")
        self.speed_bars = self._plot("Decode speed", "", "tokens/s")
        self.size_scatter = self._plot("Size vs perplexity", "size (MB)", "perplexity")
        self.speed_scatter = self._plot("Speed vs perplexity", "tokens/s", "perplexity")
        self.histogram = self._plot("Weights before / after", "weight", "count")
        self.histogram.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        self.errors = self._plot("Per-layer error", "layer (model order)", "error")
        self.errors.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        self.charts = QWidget()
        grid = QGridLayout(self.charts)
        for i, plot in enumerate((self.ppl_bars, self.speed_bars, self.size_scatter,
                                  self.speed_scatter, self.histogram, self.errors)):
            grid.addWidget(plot, i // 3, i % 3)

        self.hist_variant = QComboBox()
        self.hist_layer = QComboBox()
        self.hist_variant.currentIndexChanged.connect(self._fill_layers)
        self.hist_layer.currentIndexChanged.connect(self._draw_histogram)
        self.status = QLabel()
        buttons = QHBoxLayout()
        for text, slot in (("Add exported model...", self.add_export),
                           ("Export runs (CSV/JSON)...", self.choose_export_runs),
                           ("Save charts (PNG)...", self.choose_export_charts),
                           ("Clear runs", self.clear_runs)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(QLabel("Histogram:"))
        buttons.addWidget(self.hist_variant)
        buttons.addWidget(self.hist_layer)

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
        state.layerSelected.connect(self._layer_selected)
        self.refresh()

    def _plot(self, title: str, x: str, y: str) -> pg.PlotWidget:
        plot = pg.PlotWidget(title=title)
        plot.setBackground("w")
        plot.showGrid(x=True, y=True, alpha=0.25)
        plot.setLabel("bottom", x)
        plot.setLabel("left", y)
        plot.setMinimumHeight(220)
        plot.getViewBox().setDefaultPadding(0.08)
        plot.getAxis("left").enableAutoSIPrefix(False)
        plot.getAxis("bottom").enableAutoSIPrefix(False)
        return plot

    # --- an exported file as a run ----------------------------------------------------------
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
                                 on_result=lambda run: add_runs(self.state, [run]))

    # --- refresh ---------------------------------------------------------------------------
    def _results_changed(self, key: str) -> None:
        if key in ("runs", "variants"):
            self.refresh()

    def refresh(self) -> None:
        rows = merged_rows(self.state.session.runs)
        self._fill_table(rows)
        self._draw_bars(rows)
        self._draw_scatter(self.size_scatter, rows, "size_mb", "lower")
        self._draw_scatter(self.speed_scatter, rows, "decode_tok_s", "higher")
        self._fill_variants()
        self._draw_errors()
        self.status.setText(f"{len(self.state.session.runs)} runs over {len(rows)} variants."
                            if rows else "No runs yet: evaluate or benchmark a variant first.")

    def _fill_table(self, rows: list[dict]) -> None:
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, (key, _, fmt) in enumerate(COLUMNS):
                value = row.get(key)
                item = QTableWidgetItem("" if value is None else fmt.format(value))
                if isinstance(value, (int, float)):
                    item.setData(Qt.ItemDataRole.UserRole, value)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)

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

    # --- histogram and per-layer errors -----------------------------------------------------
    def _fill_variants(self) -> None:
        current = self.hist_variant.currentText()
        self.hist_variant.blockSignals(True)
        self.hist_variant.clear()
        self.hist_variant.addItems(list(self.state.session.variants))
        index = self.hist_variant.findText(current)
        self.hist_variant.setCurrentIndex(max(index, 0))
        self.hist_variant.blockSignals(False)
        self._fill_layers()

    def _fill_layers(self) -> None:
        variant = self.state.session.variants.get(self.hist_variant.currentText())
        current = self.hist_layer.currentText() or self.state.selected_layer
        self.hist_layer.blockSignals(True)
        self.hist_layer.clear()
        if variant is not None:
            self.hist_layer.addItems(list(variant.qtensors))
            index = self.hist_layer.findText(current or "")
            self.hist_layer.setCurrentIndex(max(index, 0))
        self.hist_layer.blockSignals(False)
        self._draw_histogram()

    def _layer_selected(self, name: str) -> None:
        index = self.hist_layer.findText(name)
        if index >= 0:
            self.hist_layer.setCurrentIndex(index)

    def _draw_histogram(self) -> None:
        self.histogram.clear()
        variant = self.state.session.variants.get(self.hist_variant.currentText())
        name = self.hist_layer.currentText()
        handle = self.state.handle
        if variant is None or not name or handle is None:
            return
        before = handle.weight(name).float().flatten().numpy()
        after = variant.qtensors[name].dequantize().flatten().numpy()
        # The central 99.8% of the baseline's weights: a few outliers would squash the rest.
        low, high = np.percentile(before, [0.1, 99.9])
        edges = np.linspace(float(low), float(high), 201, dtype=np.float32)
        for values, label, color in ((before, "baseline", "#1f77b4"), (after, variant.name, "#d62728")):
            counts, _ = np.histogram(values, bins=edges)
            self.histogram.plot(edges, counts.astype(np.float32), stepMode="center",
                                pen=pg.mkPen(color, width=1.5), name=label)
        self.histogram.setTitle(f"Weights before / after: {name.removeprefix('model.')}")

    def _draw_errors(self) -> None:
        self.errors.clear()
        handle = self.state.handle
        if handle is None:
            return
        what = "error"
        for i, (name, variant) in enumerate(self.state.session.variants.items()):
            key = (name, id(variant))
            if key not in self._errors:
                self._errors[key] = layer_errors(variant, handle)
            layers, errors, what = self._errors[key]
            if len(errors):
                self.errors.plot(np.arange(len(errors), dtype=np.float32), errors,
                                 pen=pg.mkPen(COLORS[i % len(COLORS)], width=1.5), symbol="o",
                                 symbolSize=4, symbolPen=None,
                                 symbolBrush=COLORS[i % len(COLORS)], name=name)
        self.errors.setLabel("left", what)

    # --- export ----------------------------------------------------------------------------
    def choose_export_runs(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export runs", "runs.csv",
                                              "CSV (*.csv);;JSON (*.json)")
        if path:
            self.export_runs(Path(path))

    def export_runs(self, path: Path) -> None:
        rows = merged_rows(self.state.session.runs)
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
