"""Widgets and helpers the views share: sortable table cells, plots, the "run it" banner.

Views import these from here, never from one another.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QModelIndex, QObject, QSortFilterProxyModel, Qt, QTimer
from PySide6.QtGui import QFontMetricsF, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (QFileDialog, QGraphicsItem, QHBoxLayout, QLabel, QListWidgetItem,
                               QPushButton, QTableView, QWidget)

from studio.core.errors import StudioError

SORT_KEY = Qt.ItemDataRole.UserRole + 1
# A cell's roles as plain ints: looking up PySide's enum members per cell cost a third of a fill.
_DISPLAY, _ALIGN, _TOOLTIP, _SORT = (int(Qt.ItemDataRole.DisplayRole),
                                     int(Qt.ItemDataRole.TextAlignmentRole),
                                     int(Qt.ItemDataRole.ToolTipRole), int(SORT_KEY))
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
ROLE_COLORS = {"q": "#1f77b4", "k": "#17becf", "v": "#2ca02c", "o": "#9467bd", "qkv": "#1f77b4",
               "gate": "#ff7f0e", "up": "#d62728", "gate_up": "#ff7f0e", "down": "#8c564b",
               "other": "#7f7f7f", "embedding": "#e377c2", "lm_head": "#e377c2"}


def role_color(role: str) -> str:
    return ROLE_COLORS.get(role, "#7f7f7f")


class RowsModel(QStandardItemModel):
    """A read-only table of (text, sort number or None) cells, replaced all at once.

    The cells live on Qt's side. A view asks ~8 roles of every visible cell at every paint, and
    a model answering them in Python (rowCount, columnCount and data: 12,700 calls for one
    paint of the Layers tab) had each call wait for the interpreter's lock behind any job
    running Python. Filled in one reset with the per-row signals held back: a signal per
    appended row cost 0.3-1 s at every open. No cell ever has a Python object: each is written
    through its index (Qt makes the item from the prototype), because PySide keeps the Python
    object of an item handed to the model alive after the model deleted the item, and a new
    item at the same address then met the stale one: a refill crashed within a few hundred.
    `rows` keeps the cells for `find` and `fit_columns`."""

    def __init__(self, columns=(), tips=(), tooltip_column: int | None = None) -> None:
        super().__init__()
        self.tooltip_column = tooltip_column   # its text is also its tooltip (elided names)
        self.columns: list[str] = []
        self.tips: list[str] = []
        self.rows: list[list[tuple[str, float | None]]] = []
        self._where: dict[tuple[int, str], int] = {}
        prototype = QStandardItem()
        prototype.setEditable(False)
        self.setItemPrototype(prototype)        # the model owns it from here
        self._set_header(columns, tips)

    def set_rows(self, rows, columns=None, tips=None) -> None:
        """Replace every row (and, when given, the columns and their tooltips). The same
        rows again change nothing (a model's layers from its header, then once it loaded)."""
        rows = [list(row) for row in rows]
        if rows == self.rows and (columns is None or (list(columns), list(tips or ()))
                                  == (self.columns, self.tips)):
            return
        self.beginResetModel()
        self.blockSignals(True)   # views and proxies hear of it once, from endResetModel
        try:
            self.setRowCount(0)
            if columns is not None:
                self._set_header(columns, tips)
            self.rows = rows
            self._where = {}
            self.setRowCount(len(self.rows))
            index, put, roles = self.index, self.setItemData, self._roles   # 212 x 6: 6 -> 4 ms
            for r, row in enumerate(self.rows):
                for c, (text, number) in enumerate(row):
                    put(index(r, c), roles(c, text, number))
        finally:
            self.blockSignals(False)
            self.endResetModel()

    def _set_header(self, columns, tips) -> None:
        self.columns, self.tips = list(columns), list(tips or ())
        self.setColumnCount(len(self.columns))
        self.setHorizontalHeaderLabels(self.columns)
        horizontal = Qt.Orientation.Horizontal
        for c in range(len(self.columns)):
            tip = self.tips[c] if c < len(self.tips) else ""
            self.setHeaderData(c, horizontal, tip or None, Qt.ItemDataRole.ToolTipRole)

    def _roles(self, column: int, text: str, number: float | None) -> dict:
        roles = {_DISPLAY: text, _SORT: text if number is None else float(number)}
        if number is not None:
            roles[_ALIGN] = _RIGHT
        if column == self.tooltip_column:
            roles[_TOOLTIP] = text
        return roles

    def find(self, text: str, column: int) -> QModelIndex:
        """The index of the first row whose `column` reads `text` (invalid when none)."""
        if not self._where and self.rows:
            for r, row in enumerate(self.rows):
                for c, (cell, _) in enumerate(row):
                    self._where.setdefault((c, cell), r)
        row = self._where.get((column, text))
        return QModelIndex() if row is None else self.index(row, column)


def in_turns(owner: QObject, *steps) -> None:
    """Run `steps` on the UI thread one per event-loop turn, 1 ms apart, while `owner` lives.
    Between two steps the window paints, answers input and fires its timers: work that took
    one long call (results arriving: tables, then plots) stalls it for one step at a time.
    (0 ms apart, Qt runs two steps per turn: `benchmarks/bench_stalls.py` showed it.)"""
    if steps:
        def run() -> None:
            steps[0]()
            in_turns(owner, *steps[1:])
        QTimer.singleShot(1, owner, run)


def fit_columns(table: QTableView, model: RowsModel, rows: int = 32) -> None:
    """Each column to its header and the texts of its first `rows` rows, measured here from
    the rows' own strings: Qt's resizeColumnsToContents asks ~8 roles of every cell (0.1 s on
    the demo's 212 layers, 0.3+ s under load, when the model still answered in Python)."""
    metrics = table.fontMetrics()
    header = table.horizontalHeader()
    header_metrics = header.fontMetrics()
    for c, name in enumerate(model.columns):
        texts = [row[c][0] for row in model.rows[:rows]]
        longest = max(texts, key=len, default="")
        width = max(metrics.horizontalAdvance(longest) + 12,
                    header_metrics.horizontalAdvance(name) + 24)   # room for the sort arrow
        table.setColumnWidth(c, width)


def rows_table(columns, tips: dict[str, str] | None = None
               ) -> tuple[QTableView, RowsModel, QSortFilterProxyModel]:
    """A sortable table (`layer_table`) over a RowsModel: for tables refilled whole (every
    layer of a model)."""
    model = RowsModel(columns, [(tips or {}).get(name, "") for name in columns])
    proxy = QSortFilterProxyModel()
    proxy.setSourceModel(model)
    proxy.setSortRole(SORT_KEY)
    return layer_table(proxy), model, proxy


def layer_table(proxy, row_height: int = 22) -> QTableView:
    """The studio's table of layers: sortable, whole rows, one selected, no row numbers."""
    table = QTableView()
    table.setModel(proxy)
    table.setSortingEnabled(True)
    table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(row_height)
    table.horizontalHeader().setStretchLastSection(True)
    # Columns fit the rows near the top (32), not every row (each fit read all 212 of the demo's).
    table.horizontalHeader().setResizeContentsPrecision(32)
    return table


def method_tooltips(box, detail=None) -> None:
    """Each method of a method menu explained in one sentence (the registry's `summary`; with
    `detail(quantizer)` appended), and the box's own tooltip following the chosen one."""
    from studio.core.quant import registry

    for index in range(box.count()):
        quantizer = registry.get(box.itemData(index))
        tip = f"{quantizer.title}: {quantizer.summary}"
        box.setItemData(index, tip + (f" {detail(quantizer)}" if detail else ""),
                        Qt.ItemDataRole.ToolTipRole)
    follow = lambda: box.setToolTip(box.itemData(box.currentIndex(), Qt.ItemDataRole.ToolTipRole) or "")  # noqa: E731
    box.currentIndexChanged.connect(follow)
    follow()


def fmt(value: float) -> str:
    if not np.isfinite(value):
        return "inf" if value > 0 else "-"
    return f"{value:.4g}"


def sortable(value: float) -> float:
    return float(value) if np.isfinite(value) else (1e300 if value > 0 else -1e300)


def plot_widget(**options) -> pg.PlotWidget:
    """A pyqtgraph plot whose axes repaint from a cached pixmap (`cache_axes`) and whose title
    fits its width (`FittedTitle`)."""
    widget = cache_axes(pg.PlotWidget(**options))
    FittedTitle.install(widget.getPlotItem())
    return widget


class FittedTitle(pg.LabelItem):
    """A plot title shortened with "…" to its plot's width, whole in its tooltip. pyqtgraph's
    own title holds its plot at least as wide as its text, so a long title (a layer's name
    and statistics) pushed each plot of a row past its slot, under its neighbour."""

    def __init__(self, *args, **kwargs) -> None:
        self.whole, self._fitting = "", False
        super().__init__(*args, **kwargs)

    @classmethod
    def install(cls, item: pg.PlotItem) -> None:
        old = item.titleLabel
        title = cls(old.text, size="11pt", parent=item)   # pyqtgraph's own title options
        title.setVisible(old.isVisible())
        title.setMaximumHeight(old.maximumHeight())
        item.layout.removeItem(old)
        old.setVisible(False)   # kept, not deleted: PySide and Qt then never disagree on it
        title.replaced = old
        item.layout.addItem(title, 0, 1)
        item.titleLabel = title

    def setText(self, text, **args) -> None:  # noqa: N802 (pyqtgraph API)
        if not self._fitting:
            self.whole = text
        super().setText(text, **args)

    def updateMin(self) -> None:  # noqa: N802 (pyqtgraph API)
        super().updateMin()
        self.setMinimumWidth(0)
        height = self._sizeHint[Qt.SizeHint.MinimumSize][1]
        self._sizeHint[Qt.SizeHint.MinimumSize] = (0, height)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        if not self._fitting and self.whole and self.width() > 0:
            font = self.item.font()
            size = str(self.opts.get("size", ""))
            if size.endswith("pt"):
                font.setPointSizeF(float(size[:-2]))
            fitted = QFontMetricsF(font).elidedText(self.whole, Qt.TextElideMode.ElideRight,
                                                    self.width() - 4)
            self.setToolTip(self.whole if fitted != self.whole else "")
            if fitted != self.text:
                self._fitting = True
                try:
                    self.setText(fitted)
                finally:
                    self._fitting = False
        super().resizeEvent(event)


def cache_axes(widget: pg.PlotWidget) -> pg.PlotWidget:
    """Let `widget`'s axes paint from a cached pixmap. An axis replays its picture (labels,
    ticks, grid lines across the plot) on every paint of its plot, and showing a tab of six
    plots took 100-230 ms; cached, an axis is drawn again only when its range or size changed
    (pyqtgraph's update() drops the cache)."""
    for side in ("left", "bottom", "right", "top"):
        widget.getPlotItem().getAxis(side).setCacheMode(
            QGraphicsItem.CacheMode.DeviceCoordinateCache)
    return widget


GRID_GRAY = 200   # the grid's color on the plots' white background


def grid(widget: pg.PlotWidget) -> None:
    """Grid lines at the major ticks, opaque light gray. pyqtgraph's own grid (`showGrid`)
    draws every tick level in translucent black without antialiasing, which Qt's raster engine
    blends pixel by pixel: 6-7 ms an axis against 0.3 ms opaque, and a plot's paint took 16 ms
    instead of 2-3."""
    for side in ("left", "bottom"):
        axis = widget.getPlotItem().getAxis(side)
        axis.setGrid(255)
        axis.setTickPen(pg.mkPen(GRID_GRAY, GRID_GRAY, GRID_GRAY))
        axis.setStyle(tickAlpha=255, maxTickLevel=0)


def plot(title: str, x: str, y: str, gridded: bool = True) -> pg.PlotWidget:
    """A titled plot with axis labels; `gridded=False` for an image (no lines over its data)."""
    widget = plot_widget(background="w")
    widget.setTitle(title, color="k", size="10pt")
    widget.setLabel("bottom", x)
    widget.setLabel("left", y)
    if gridded:
        grid(widget)
    widget.setMenuEnabled(False)
    return widget


def wide(color, width: float = 2.0, **style) -> dict:
    """Keyword arguments of a curve drawn wider than a pixel: its pen, and no antialiasing.
    Qt strokes a wide antialiased polyline very slowly: a 210-point curve of width 2 took
    ~600 ms to paint under load, against 13 ms at width 1 and 20 ms wide without
    antialiasing (then pyqtgraph draws it as segments), and the window waited that long at
    every redraw of the live GPTQ plot."""
    return {"pen": pg.mkPen(color, width=width, **style), "antialias": False}


def short_name(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-3:]) if len(parts) > 3 else name


class Refused(str):
    """A job's StudioError, returned as its result so the view hears of it without a race."""


def guarded(factory):
    """The job `factory()` with a StudioError turned into a Refused result: a job that fails
    at once could otherwise finish before the view connects to its `failed` signal."""
    def job():
        try:
            return (yield from factory())
        except StudioError as exc:
            return Refused(str(exc))
    return job


class NeedsRun(QWidget):
    """A one-line banner: what this view lacks for the current layer, and a button that runs
    the state's named action which computes it ("activations", "sensitivity", "quantize")."""

    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.action: str | None = None
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.button = QPushButton()
        self.button.clicked.connect(self._run)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 2, 6, 2)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.button)
        self.setStyleSheet("NeedsRun { background: #fff4d6; }")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        self.setVisible(False)

    def ask(self, message: str, action: str | None) -> None:
        """Show `message` with a button for `action` (None: message only)."""
        self.action = action
        self.label.setText(message)
        known = action in self.state.actions
        self.button.setVisible(known)
        if known:
            self.button.setText(self.state.actions[action][0])
        self.setVisible(True)

    def clear(self) -> None:
        self.setVisible(False)

    def _run(self) -> None:
        if self.action in self.state.actions:
            self.state.run_action(self.action)


def check_item(key: str, label: str, checked: bool, disabled_reason: str | None = None
               ) -> QListWidgetItem:
    """A checkable list entry carrying `key`; greyed out with `disabled_reason` as its tip."""
    item = QListWidgetItem(label)
    item.setData(Qt.ItemDataRole.UserRole, key)
    item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
    if disabled_reason:
        item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEnabled)
        item.setToolTip(disabled_reason)
    item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
    return item


class GgufFiles:
    """The GGUF files a view runs through llama.cpp (the optional backend): the open model's
    own file (the demo's, a .gguf opened) and those the user added. Their list entries have
    the key "gguf:PATH"; without the binding they are greyed out with the install command."""

    PREFIX = "gguf:"

    def __init__(self, state) -> None:
        self.state = state
        self.added: list[Path] = []

    def files(self) -> list[Path]:
        from studio.core.backends import gguf_of

        handle = self.state.handle
        own = gguf_of(handle.source) if handle is not None else None
        return list(dict.fromkeys(Path(f) for f in ([own] if own is not None else [])
                                  + self.added))

    def items(self, checked: set[str]) -> list[QListWidgetItem]:
        reason = self.unavailable()
        items = []
        for path in self.files():
            key = self.PREFIX + str(path)
            item = check_item(key, f"llama.cpp: {path.name}" + (" (unavailable)" if reason
                                                                 else ""), key in checked, reason)
            if not reason:
                item.setToolTip(str(path))
            items.append(item)
        return items

    def note(self, what: str) -> str:
        from studio.core.backends import get_backend

        llama = get_backend("llama.cpp")
        return (f"llama.cpp backend unavailable: install it with {llama.install}"
                if self.unavailable() else f"GGUF files run through llama.cpp with {what}.")

    def choose(self, parent, verb: str) -> Path | None:
        path, _ = QFileDialog.getOpenFileName(parent, f"GGUF file to {verb} with llama.cpp",
                                              "", "GGUF (*.gguf)")
        return Path(path) if path else None

    @staticmethod
    def unavailable() -> str | None:
        from studio.core.backends import get_backend
        return get_backend("llama.cpp").unavailable_reason()

    @classmethod
    def path_of(cls, key: str) -> Path | None:
        return Path(key[len(cls.PREFIX):]) if key.startswith(cls.PREFIX) else None
