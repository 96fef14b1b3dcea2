"""The plan's Pareto plot: the allocator's least predicted loss at each size, the chosen plan,
and the KL measured on real quantized models at a few points of the curve."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QLabel

from studio.ui.widgets import cache_axes, grid, wide


class ParetoPlot(pg.PlotWidget):
    def __init__(self) -> None:
        super().__init__()
        cache_axes(self)
        self.setBackground("w")
        self.setLabel("bottom", "average bits per weight (scales counted)")
        self.setLabel("left", "total KL (nats/token)")
        self.setLogMode(y=True)
        self.getAxis("left").enableAutoSIPrefix(False)
        grid(self)
        self.addLegend(offset=(-10, 10))
        self.curve = self.plot(**wide("#1f77b4", 2), name="predicted optimum")
        self.chosen = pg.ScatterPlotItem(size=16, symbol="star", brush="#d62728", pen=None,
                                         name="chosen plan")
        self.points = pg.ScatterPlotItem(size=9, symbol="o", brush="#2ca02c", pen="k",
                                         name="measured")
        self.addItem(self.points)
        self.addItem(self.chosen)  # on top of a measured point at the same place
        self.note = QLabel("Auto-allocate to see the curve.")
        self.note.setWordWrap(True)

    def draw(self, answer, measured: list[dict], kind: str) -> None:
        """`answer`: the last allocation (None: nothing to draw); `measured`: its measured
        points; `kind`: the loss it minimised ("kl" or "proxy")."""
        if answer is None:
            self.curve.setData([], [])
            self.chosen.setData([], [])
            self.points.setData([], [])
            return
        curve = answer.pareto
        self.setLabel("left", "total KL (nats/token)" if kind == "kl"
                      else "sum of layer output errors (proxy)")
        keep = curve.loss > 0  # log axis: the all-16-bit end has zero loss
        self.curve.setData(curve.bpw[keep], curve.loss[keep])
        if answer.loss > 0:
            self.chosen.setData([answer.bpw], [np.log10(answer.loss)])
        self.points.setData([p["bpw"] for p in measured],
                            [np.log10(max(p["kl"], 1e-12)) for p in measured])
        self.note.setText(
            f"Blue: least predicted loss at each size (sum of per-layer losses, assumed "
            f"additive; a layer's KL is measured at the sweep's * options and predicted from "
            f"its output error at the others). "
            f"Red star: the chosen plan ({answer.bpw:.3f} bpw). Green: measured KL of real "
            f"quantized models.")
