"""Curves drawn wider than a pixel are drawn without antialiasing: Qt strokes a wide
antialiased polyline very slowly (a 210-point curve of width 2: ~600 ms per paint under load,
against ~20 ms without antialiasing), and the window waited that long at every redraw of the
live GPTQ plot."""
from types import SimpleNamespace

import numpy as np
import pyqtgraph as pg

from studio.ui.app import configure_plots
from studio.ui.before_after import BeforeAfter
from studio.ui.main_window import MainWindow


def _curves(window):
    for widget in window.findChildren(pg.PlotWidget):
        for item in widget.getPlotItem().items:
            if isinstance(item, pg.PlotDataItem):
                yield widget, item


def test_every_wide_curve_is_drawn_without_antialiasing(qtbot):
    old = pg.getConfigOption("antialias")
    configure_plots()                     # antialiasing on, as the app sets it
    try:
        window = MainWindow()
        qtbot.addWidget(window)
        _check(window)
    finally:
        pg.setConfigOptions(antialias=old)


def _check(window) -> None:
    # The before/after panels draw their curves when a layer's arrays arrive.
    edges = np.linspace(-1, 1, 65, dtype=np.float32)
    arrays = SimpleNamespace(edges=edges, counts_before=np.ones(64, np.float32),
                             counts_after=np.ones(64, np.float32),
                             cols_before=np.ones(96, np.float32),
                             cols_after=np.ones(96, np.float32))
    panels = window.findChildren(BeforeAfter)
    assert panels
    for panel in panels:
        panel._draw_arrays(arrays, "variant")
    checked = wide = 0
    for widget, item in _curves(window):
        pen = item.opts["pen"]
        width = pg.mkPen(pen).widthF() if pen is not None else 0.0
        checked += 1
        if width > 1.0:
            wide += 1
            assert item.opts["antialias"] is False, (widget, item.name(), width)
    assert checked > 10 and wide >= 4     # the Quantize, Plan, Activations and panel curves


def test_every_plots_axes_paint_from_a_cached_pixmap(qtbot):
    """An axis replays its tick labels and grid lines on every paint (2-7 ms an axis offscreen):
    every plot of the window has its axes cached (`widgets.cache_axes`) and any grid opaque
    (`widgets.grid`), and a cached
    axis shows a new range (pyqtgraph's update() drops the cache)."""
    from PySide6.QtWidgets import QGraphicsItem

    window = MainWindow()
    qtbot.addWidget(window)
    plots = window.findChildren(pg.PlotWidget)
    assert len(plots) >= 10
    for plot in plots:
        for side in ("left", "bottom"):
            axis = plot.getPlotItem().getAxis(side)
            assert axis.cacheMode() == QGraphicsItem.CacheMode.DeviceCoordinateCache, \
                (plot.objectName() or type(plot.parent()).__name__, side)
            if axis.grid is not False:   # a grid drawn translucent blends pixel by pixel
                assert axis.tickPen().color().alpha() == 255 == axis.style["tickAlpha"], side

    from studio.ui.widgets import plot
    widget = plot("t", "x", "y")
    qtbot.addWidget(widget)
    widget.resize(300, 200)
    widget.show()
    item = widget.getPlotItem()
    item.setXRange(0, 1, padding=0)
    qtbot.wait(50)
    axis = item.getAxis("bottom")

    def axis_pixels():
        area = widget.mapFromScene(axis.sceneBoundingRect()).boundingRect()
        return widget.grab(area).toImage()

    first = axis_pixels()
    item.setXRange(0, 1000, padding=0)
    qtbot.wait(50)
    assert axis_pixels() != first   # the cached axis drew its new labels
