"""Sensitivity: which layers can take fewer bits. A heatmap of layers x bit-widths coloured by
the measured damage on a log scale; clicking a cell gives that layer that width in the plan."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
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
from studio.core.plan import QuantSpec, Rule
from studio.ui.layout import column
from studio.ui.views.plan_editor import guarded

KEY = "sensitivity"
METRICS = {  # combo label -> (result attribute, colour-bar label)
    "KL divergence (end to end)": ("kl", "log10 KL (nats/token)"),
    "Layer output error (proxy)": ("proxy_error", "log10 relative output error"),
    "Perplexity increase": ("ppl", "log10 ppl increase"),
}


class SensitivityView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.result = None
        self.live: np.ndarray | None = None   # KL filled in while the sweep runs
        self.job = None
        self.text_path: str | None = None

        self.widths = QLineEdit("2,3,4,8")
        self.widths.setMaximumWidth(90)
        self.group = QComboBox()
        for size in (128, 64, 32, -1):
            self.group.addItem("per-channel" if size == -1 else f"g{size}", size)
        self.kl_windows = QSpinBox(minimum=0, maximum=256, value=8)
        self.kl_windows.setToolTip("windows for the end-to-end KL sweep (0: proxy only)")
        self.seqlen = QSpinBox(minimum=8, maximum=4096, value=32)
        self.seqlen.setToolTip("tokens per window; 32 keeps the demo's KL sweep under 10 min")
        self.text_button = QPushButton("Text: built-in")
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
        self.status = QLabel("Measure to see how each layer reacts to each width.")
        self.status.setWordWrap(True)
        self.hover = QLabel(" ")

        self.plot = pg.PlotWidget()
        self.plot.setBackground("w")
        self.plot.setMouseEnabled(x=True, y=False)
        self.plot.setLabel("bottom", "layer (block)")
        self.plot.setLabel("left", "bit-width")
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
        self.plot.scene().sigMouseMoved.connect(self._hovered)
        self.plot.scene().sigMouseClicked.connect(self._clicked)
        self.ranking = QTextBrowser()
        self.ranking.setMinimumWidth(300)

        bar = QHBoxLayout()
        for widget in (QLabel("Widths"), self.widths, self.group, QLabel("KL windows"),
                       self.kl_windows, QLabel("tokens"), self.seqlen, self.text_button,
                       self.run_button, self.cancel_button, save, load):
            bar.addWidget(widget)
        bar.addStretch(1)
        show = QHBoxLayout()
        show.addWidget(QLabel("Colour by"))
        show.addWidget(self.metric_box)
        show.addWidget(self.show_plan)
        show.addWidget(self.hover, 1)
        left = column(show, (self.plot, 1))
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(self.ranking)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.status)
        layout.addWidget(split, 1)

        state.modelChanged.connect(self._model_changed)
        state.resultsChanged.connect(self._results_changed)
        self._model_changed(state.handle)

    # --- running --------------------------------------------------------------------------
    def start(self):
        from studio.core.sensitivity import sensitivity_job
        from studio.core.text import text_windows

        handle = self.state.handle
        if handle is None or self.job is not None:
            return None
        try:
            bits = tuple(sorted({int(b) for b in self.widths.text().split(",") if b.strip()}))
            for b in bits:
                QuantSpec(bits=b)
            if not bits:
                raise StudioError("Give at least one width, e.g. 2,3,4,8.")
            from studio.core.sensitivity import DEFAULT_PROXY_WINDOWS
            count = max(self.kl_windows.value(), DEFAULT_PROXY_WINDOWS)
            windows, label = text_windows(handle.tokenizer, self.text_path, self.seqlen.value(),
                                          count, seed=0)
        except ValueError:
            self.status.setText("Widths are whole numbers separated by commas, e.g. 2,3,4,8.")
            return None
        except StudioError as exc:
            self.status.setText(str(exc))
            return None
        group, kl_windows = self.group.currentData(), self.kl_windows.value()
        self.result = None
        self.live = None
        self.live_bits = bits
        self.status.setText(f"Measuring {len(handle.quantizable)} layers x {len(bits)} widths "
                            f"on {label}…")
        factory = guarded(lambda: sensitivity_job(handle, windows, bits=bits, group_size=group,
                                                  kl_windows=kl_windows, text_label=label))
        self.job = self.state.submit("Sensitivity", factory, on_result=self._finished,
                                     on_progress=self._progress)
        self.job.done.connect(self._job_done)
        self.job.cancelled.connect(lambda: self.status.setText(
            "Sensitivity cancelled: nothing was kept."))
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        return self.job

    def _progress(self, p) -> None:
        self.status.setText(f"{100 * p.fraction:.0f}%  {p.message}")
        if isinstance(p.detail, tuple) and len(p.detail) == 3 and self.state.handle is not None:
            row, col, value = p.detail
            if self.live is None:
                self.live = np.full((len(self.state.handle.quantizable), len(self.live_bits)),
                                    np.nan)
            self.live[row, col] = value
            if row % 7 == 0 or row == self.live.shape[0] - 1:
                self._draw()

    def _finished(self, result) -> None:
        self._job_done()
        if isinstance(result, str):  # a StudioError, returned by `guarded`
            self.status.setText(f"Sensitivity not measured: {result}")
            return
        if self.state.handle is not None:
            self.state.publish(KEY, result)
        seconds = f"proxy {result.proxy_seconds:.1f} s"
        if result.has_kl:
            seconds += (f", KL {result.kl_windows} x {result.seqlen} tokens "
                        f"{result.kl_seconds:.0f} s (baseline ppl {result.base_ppl:.2f})")
        self.status.setText(f"Measured {len(result.layers)} layers x {len(result.bits)} widths "
                            f"on {result.text_label}: {seconds}. Click a cell to give that layer "
                            f"that width in the plan.")

    def _job_done(self, *_) -> None:
        self.job = None
        self.live = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _choose_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Text for the sweep", "",
                                              "Text (*.txt);;All files (*)")
        self.text_path = path or None
        self.text_button.setText(f"Text: {Path(path).name}" if path else "Text: built-in")

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
        from studio.core.sensitivity import SensitivityResult

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
        """[layers, widths] of the chosen metric (NaN where not measured yet)."""
        if self.result is None:
            return self.live
        attr, _ = METRICS[self.metric_box.currentText()]
        data = getattr(self.result, attr)
        if data is None:
            data = self.result.proxy_error
        if attr == "ppl" and self.result.base_ppl:
            data = np.maximum(data - self.result.base_ppl, 0.0)
        return np.asarray(data, dtype=float)

    def _bits(self) -> tuple[int, ...]:
        return self.result.bits if self.result is not None else getattr(self, "live_bits", ())

    def _names(self) -> list[str]:
        if self.result is not None:
            return self.result.layers
        handle = self.state.handle
        return [i.name for i in handle.quantizable] if handle is not None else []

    def _draw(self) -> None:
        values = self.values()
        if values is None:
            self.image.clear()
            self.marks.clear()
            self.ranking.setHtml("<p>No sensitivity measured yet.</p>")
            return
        bits, names = self._bits(), self._names()
        logs = np.log10(np.clip(values, 1e-12, None)).astype(np.float32).T  # [widths, layers]
        logs[~np.isfinite(values.T)] = np.nan
        finite = logs[np.isfinite(logs)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        self.image.setImage(np.nan_to_num(logs, nan=lo - 0.05 * (hi - lo)), levels=(lo, hi))
        self.image.setRect(0, 0, len(names), len(bits))
        self.bar.setLevels((lo, hi))
        self.bar.axis.setLabel(METRICS[self.metric_box.currentText()][1] if self.result is not None
                               else METRICS["KL divergence (end to end)"][1])
        self.plot.getAxis("left").setTicks([[(i + 0.5, f"{b}-bit") for i, b in enumerate(bits)]])
        self.plot.getAxis("bottom").setTicks([_block_ticks(names)])
        self.plot.setXRange(0, len(names), padding=0)
        self.plot.setYRange(0, len(bits), padding=0)
        self._draw_plan(bits, names)
        self._draw_ranking(values, bits, names)

    def _draw_plan(self, bits, names) -> None:
        self.marks.clear()
        if not self.show_plan.isChecked() or not names:
            return
        plan = self.state.session.plan
        xs, ys = [], []
        for i, name in enumerate(names):
            spec = plan.spec_for(name)
            if spec is not None and spec.bits in bits:
                xs.append(i + 0.5)
                ys.append(bits.index(spec.bits) + 0.5)
        self.marks.setData(xs, ys)

    def _draw_ranking(self, values, bits, names) -> None:
        col = min(range(len(bits)), key=lambda j: abs(bits[j] - 4))  # rank at the width nearest 4
        order = [i for i in np.argsort(-np.nan_to_num(values[:, col], nan=-1.0))[:15]]
        metric = self.metric_box.currentText() if self.result is not None else "KL (so far)"
        rows = "".join(f"<tr><td>{n + 1}</td><td>{names[i]}</td><td align='right'>"
                       f"{values[i, col]:.3g}</td></tr>" for n, i in enumerate(order)
                       if math.isfinite(values[i, col]))
        self.ranking.setHtml(f"<h4>Most sensitive at {bits[col]} bits</h4><p>{metric}</p>"
                             f"<table cellspacing='3'>{rows}</table><p>Cyan rings: the widths "
                             f"the plan gives each layer.</p>")

    # --- mouse ----------------------------------------------------------------------------
    def cell_at(self, scene_pos) -> tuple[int, int] | None:
        point = self.plot.getPlotItem().vb.mapSceneToView(scene_pos)
        names, bits = self._names(), self._bits()
        col, row = int(math.floor(point.x())), int(math.floor(point.y()))
        if 0 <= col < len(names) and 0 <= row < len(bits):
            return col, row
        return None

    def _hovered(self, pos) -> None:
        cell = self.cell_at(pos)
        values = self.values()
        if cell is None or values is None:
            self.hover.setText(" ")
            return
        col, row = cell
        self.hover.setText(f"{self._names()[col]} at {self._bits()[row]} bits: "
                           f"{values[col, row]:.4g}")

    def _clicked(self, event) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        cell = self.cell_at(event.scenePos())
        if cell is not None and self.result is not None:
            self.assign(self._names()[cell[0]], self._bits()[cell[1]])

    def assign(self, name: str, bits: int) -> None:
        """Give layer `name` `bits` bits in the session plan (the sweep's grid, the plan's method)."""
        plan = self.state.session.plan
        method = plan.default.method if plan.default is not None else "rtn"
        spec = QuantSpec(bits=bits, group_size=self.result.group_size,
                         symmetric=self.result.symmetric, method=method)
        self.state.session.plan = plan.with_rule(Rule(name, spec))
        self.state.publish("plan")
        self.status.setText(f"Plan: {name} -> {spec.label}.")


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
