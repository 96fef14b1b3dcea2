"""One layer before and after quantization: shown by the Quantize and Compare views.

For the current layer and a chosen variant: the baseline's and the variant's weight histograms
overlaid, the layer's output error in every variant (its method's, beside plain RTN's on the
same inputs), and each input channel's abs-max before and after. The weights are read and
reduced on the details worker (`studio.core.layer_details`); the plots are drawn when the
arrays come, unless the selection moved on. The last few layers' arrays are kept.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from studio.ui.widgets import NeedsRun, plot, short_name, wide
from studio.ui.workers import LatestOnly

BEFORE, AFTER, RTN = "#1f77b4", "#d62728", "#999999"
KEEP = 16   # layers whose arrays are kept, so going back draws at once


class BeforeAfter(QWidget):
    def __init__(self, state, follow_current_variant: bool = True) -> None:
        super().__init__()
        self.state = state
        self.follow = follow_current_variant
        self.variant_box = QComboBox()
        self.variant_box.setToolTip("The variant compared with the baseline in these plots")
        self.variant_box.currentIndexChanged.connect(self.redraw)
        self.title = QLabel()
        self.needs = NeedsRun(state)
        self.latest = LatestOnly(state.details)
        self.kept: dict[tuple, object] = {}
        self.hist = plot("Weights before / after", "weight", "count")
        self.hist.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        self.errors = plot("Output error of this layer", "", "relative output error")
        self.errors.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        self.channels = plot("Abs-max per input channel", "input channel", "max |w|")
        self.channels.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        for widget in (self.hist, self.errors, self.channels):
            widget.setMinimumHeight(170)

        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(QLabel("Variant:"))
        top.addWidget(self.variant_box)
        plots = QHBoxLayout()
        for widget in (self.hist, self.errors, self.channels):
            plots.addWidget(widget)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.needs)
        layout.addLayout(plots, 1)

        state.layerSelected.connect(lambda _name: self.redraw())
        state.modelChanged.connect(lambda _h: self.fill_variants())
        state.resultsChanged.connect(self._results_changed)
        self.fill_variants()

    def _results_changed(self, key: str) -> None:
        if key == "variants" or (key == "current_variant" and self.follow):
            self.fill_variants()

    def fill_variants(self) -> None:
        variants = self.state.session.variants
        wanted = self.state.session.results.get("current_variant") if self.follow else None
        wanted = wanted if wanted in variants else self.variant_box.currentText()
        self.variant_box.blockSignals(True)
        self.variant_box.clear()
        self.variant_box.addItems(list(variants))
        index = self.variant_box.findText(wanted or "")
        self.variant_box.setCurrentIndex(index if index >= 0 else self.variant_box.count() - 1)
        self.variant_box.blockSignals(False)
        self.redraw()

    def variant(self):
        return self.state.session.variants.get(self.variant_box.currentText())

    def redraw(self) -> None:
        for widget in (self.hist, self.errors, self.channels):
            widget.clear()
        handle, name, variant = self.state.handle, self.state.selected_layer, self.variant()
        if handle is None:
            self.title.setText("No model open.")
            self.needs.clear()
            return
        if not name:
            self.title.setText("Select a layer (layer list, or any table or plot) to see it "
                               "before and after quantization.")
            self.needs.clear()
            return
        self.title.setText(f"<b>{name}</b>")
        if variant is None:
            self.needs.ask("No variant yet: quantize the model to see this layer after.",
                           "quantize")
            return
        if name not in variant.qtensors:
            self.needs.ask(f"{variant.name} left {short_name(name)} in full precision "
                           f"(a plan rule, or not a quantizable layer).", None)
            return
        self.needs.clear()
        self._draw_errors(name)
        key = (id(handle), id(variant), name)
        if key in self.kept:
            self._draw_arrays(self.kept[key], variant.name)
            return
        from studio.core.layer_details import before_after_job

        self.title.setText(f"<b>{name}</b> · reading the weights...")
        self.latest.request(key, f"Before / after of {name}",
                            lambda: before_after_job(handle, variant, name),
                            lambda arrays: self._arrived(key, arrays, name, variant.name),
                            lambda message, _details: self.title.setText(
                                f"<b>{name}</b> · could not be read: {message}"))

    def _arrived(self, key: tuple, arrays, name: str, label: str) -> None:
        self.kept[key] = arrays
        while len(self.kept) > KEEP:
            self.kept.pop(next(iter(self.kept)))
        self.title.setText(f"<b>{name}</b>")
        self._draw_arrays(arrays, label)

    def _draw_arrays(self, arrays, label: str) -> None:
        for counts, what, color in ((arrays.counts_before, "baseline", BEFORE),
                                    (arrays.counts_after, label, AFTER)):
            self.hist.plot(arrays.edges, counts, stepMode="center",
                           **wide(color, 1.5), name=what)
        for cols, what, color in ((arrays.cols_before, "baseline", BEFORE),
                                  (arrays.cols_after, label, AFTER)):
            curve = self.channels.plot(cols, pen=pg.mkPen(color, width=1), name=what)
            curve.setClipToView(True)
            curve.setDownsampling(auto=True, method="peak")

    def _draw_errors(self, name: str) -> None:
        """One bar per variant that quantized this layer (its method's error), and plain RTN's
        error on the same inputs beside it when the quantizer measured it."""
        names, errors, rtn = [], [], []
        for variant in self.state.session.variants.values():
            entry = next((e for e in variant.layer_errors if e.get("layer") == name), None)
            if entry is not None and entry.get("error") is not None:
                names.append(variant.name)
                errors.append(entry["error"])
                rtn.append(entry.get("rtn_error") or np.nan)
        if not names:
            self.errors.setTitle("Output error: not recorded for this layer", color="k",
                                 size="10pt")
            return
        x = np.arange(len(names), dtype=np.float32)
        self.errors.addItem(pg.BarGraphItem(x=x - 0.18, height=np.array(errors, np.float32),
                                            width=0.34, brush=AFTER, name="method"))
        rtn_values = np.array(rtn, np.float32)
        if np.isfinite(rtn_values).any():
            self.errors.addItem(pg.BarGraphItem(x=x + 0.18, height=np.nan_to_num(rtn_values),
                                                width=0.34, brush=RTN, name="RTN, same inputs"))
        self.errors.getAxis("bottom").setTicks([[(i, n) for i, n in enumerate(names)]])
        self.errors.setTitle("Output error of this layer, per variant", color="k", size="10pt")
