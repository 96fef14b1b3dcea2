"""The layer list: one dockable table of every layer, whose selection is the current layer.

Filter by name, role and block; sort by any column, including each weight statistic (once
computed), the layer's sensitivity (once a sweep ran) and the bits the session plan gives it.
Back / forward walk the layers visited (Alt+Left / Alt+Right).
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSortFilterProxyModel, Qt, QTimer
from PySide6.QtWidgets import (
    QComboBox,
    QDockWidget,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QStyle,
    QTableView,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.layers import ROLES
from studio.core.stats import SUMMARY_STATS
from studio.ui.widgets import SORT_KEY, RowsModel, fit_columns, fmt, layer_table, sortable

BASE_COLUMNS = ("#", "Layer", "Block", "Role", "Params")
NAME, BLOCK, ROLE = 1, 2, 3
BASE_TIPS = ("Position in the model", "The module's name in the model", "The decoder block it sits in",
             "What the layer does in its block (q, k, v, o, gate, up, down...)",
             "Number of weights")
SENSITIVITY_TIP = ("How much the model's output moves when only this layer is quantized "
                   "(KL end to end where measured, else the proxy's relative output error); "
                   "higher = give it more bits")
PLAN_TIP = "Bits the session plan gives this layer (16: left in full precision)"


class _Filter(QSortFilterProxyModel):
    """Name text, role and block filters."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.role, self.block = "", "", ""
        self.setSortRole(SORT_KEY)

    def set(self, **kw) -> None:
        for key, value in kw.items():
            setattr(self, key, value)
        self.invalidateFilter()

    def filterAcceptsRow(self, row, parent) -> bool:  # noqa: N802 (Qt API)
        model = self.sourceModel()
        name = model.index(row, NAME, parent).data() or ""
        if self.text and self.text.lower() not in name.lower():
            return False
        if self.block and model.index(row, BLOCK, parent).data() != self.block:
            return False
        return not self.role or model.index(row, ROLE, parent).data() == self.role


class LayerList(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.columns: list[str] = []
        self.model = RowsModel(tooltip_column=NAME)
        self.proxy = _Filter()
        self.proxy.setSourceModel(self.model)

        self.back = _tool("◀", "Back to the previous layer (Alt+Left)", state.layer.back)
        self.forward = _tool("▶", "Forward (Alt+Right)", state.layer.forward)
        self.search = QLineEdit(placeholderText="Filter by name")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(lambda text: self.proxy.set(text=text))
        self.roles = QComboBox()
        self.roles.setToolTip("Show one role only")
        self.roles.addItem("all roles", "")
        for role in ROLES:
            self.roles.addItem(role, role)
        self.roles.currentIndexChanged.connect(lambda: self.proxy.set(role=self.roles.currentData()))
        self.blocks = QComboBox()
        self.blocks.setToolTip("Show one decoder block only")
        self.blocks.currentIndexChanged.connect(
            lambda: self.proxy.set(block=self.blocks.currentData() or ""))
        self.count = QLabel()

        self.table = layer_table(self.proxy, row_height=20)
        # A narrow name column keeps its most telling end: "…22.self_attn.q_proj".
        self.table.setTextElideMode(Qt.TextElideMode.ElideLeft)
        self.table.selectionModel().currentRowChanged.connect(self._row_changed)
        for signal in (self.proxy.rowsInserted, self.proxy.rowsRemoved, self.proxy.modelReset,
                       self.proxy.layoutChanged):
            signal.connect(self._update_count)

        bar = QHBoxLayout()
        bar.addWidget(self.back)
        bar.addWidget(self.forward)
        bar.addWidget(self.search, 1)
        filters = QHBoxLayout()
        filters.addWidget(self.roles)
        filters.addWidget(self.blocks)
        filters.addWidget(self.count, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(bar)
        layout.addLayout(filters)
        layout.addWidget(self.table)

        state.modelChanged.connect(lambda _h: self._rebuild_soon.start())
        state.previewChanged.connect(self.rebuild)
        state.resultsChanged.connect(self._results_changed)
        state.layerSelected.connect(self.show_layer)
        state.layer.historyChanged.connect(self._history_changed)
        # A new model's rows and new results' columns come in the next event-loop turn
        # (`widgets.in_turns`), once for what is published together, not within the call
        # that published it (with the views' own work, that call held the window 60-84 ms).
        self._rebuild_soon = QTimer(self, singleShot=True, interval=1)
        self._rebuild_soon.timeout.connect(self.rebuild)
        self._history_changed()
        self.rebuild()

    def _results_changed(self, key: str) -> None:
        if key in ("weight_stats", "sensitivity", "plan"):
            self._rebuild_soon.start()

    def rebuild(self) -> None:
        """Rows for the open model's layers, with every column the session can fill; while a
        model opens, its layers from the file's header (nothing to select or sort by yet)."""
        preview = self.state.preview_layers
        if preview is not None:
            self._show_preview(preview)
            return
        self.table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
        handle = self.state.handle
        stats = self.state.session.results.get("weight_stats") if handle else None
        scores = sensitivity_scores(self.state.session.results.get("sensitivity")) if handle else {}
        plan_bits = self._plan_bits(handle)
        columns = list(BASE_COLUMNS)
        tips = list(BASE_TIPS)
        if stats is not None:
            columns += [label for label, _ in SUMMARY_STATS.values()]
            tips += [why[0].upper() + why[1:] for _, why in SUMMARY_STATS.values()]
        if scores:
            columns.append("Sensitivity")
            tips.append(SENSITIVITY_TIP)
        if plan_bits:
            columns.append("Plan bits")
            tips.append(PLAN_TIP)
        header = self.table.horizontalHeader()
        sort_column = header.sortIndicatorSection()
        sort_name = self.columns[sort_column] if 0 <= sort_column < len(self.columns) else None
        sort_order = header.sortIndicatorOrder()
        # Rows are replaced with the view's signals and sorting off: a current-row signal
        # fired from inside the reset re-entered the model while Qt was tearing it down.
        selection = self.table.selectionModel()
        selection.blockSignals(True)
        self.table.setSortingEnabled(False)
        try:
            self._fill(handle, columns, tips, stats, scores, plan_bits)
        finally:
            self.table.setSortingEnabled(True)
            selection.blockSignals(False)
        if handle is None:
            self._update_count()
            return
        self._fit_columns()
        if sort_name in columns:
            self.table.sortByColumn(columns.index(sort_name), sort_order)
        else:
            self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self._update_count()
        self.show_layer(self.state.selected_layer)

    def _show_preview(self, layers) -> None:
        selection = self.table.selectionModel()
        selection.blockSignals(True)
        self.table.setSortingEnabled(False)
        try:
            self._fill(_Listed(layers), list(BASE_COLUMNS), list(BASE_TIPS), None, {}, {})
        finally:
            self.table.setSortingEnabled(True)
            selection.blockSignals(False)
        # Its layers are not the open model's: choosing one would send every view a name
        # they do not know. They become selectable when the model has loaded.
        self.table.setSelectionMode(QTableView.SelectionMode.NoSelection)
        self._fit_columns()
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.count.setText(f"{len(layers)} layers · loading the weights...")

    def _fit_columns(self) -> None:
        """Every column to its contents, except the layer name, which gives way so that Block,
        Role and Params stay in view at the dock's width (the full name is its tooltip)."""
        fit_columns(self.table, self.model)
        others = sum(self.table.columnWidth(c) for c in range(len(BASE_COLUMNS)) if c != NAME)
        scrollbar = self.table.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        room = self.table.width() - 2 * self.table.frameWidth() - scrollbar - others
        self.table.setColumnWidth(NAME, max(90, min(self.table.columnWidth(NAME), room, 230)))

    def _fill(self, handle, columns, tips, stats, scores, plan_bits) -> None:
        """Every row at once (one model reset): the demo's 212 rows appended one by one held
        the UI thread at each open and each new result."""
        self.columns = columns
        self._fill_blocks(handle)
        rows = []
        for position, info in enumerate(handle.layers if handle is not None else ()):
            row = [(str(position), position), (info.name, None),
                   ("" if info.block is None else str(info.block),
                    -1 if info.block is None else info.block),
                   (info.role, None), (f"{info.params:,}", info.params)]
            if stats is not None:
                s = stats.layers.get(info.name)
                row += [(fmt(getattr(s, key)), sortable(getattr(s, key))) if s is not None
                        else ("", -1e300) for key in SUMMARY_STATS]
            if scores:
                score = scores.get(info.name)
                row.append(("" if score is None else f"{score:.3g}",
                            -1e300 if score is None else score))
            if plan_bits:
                bits = plan_bits.get(info.name, 16)
                row.append((str(bits), bits))
            rows.append(row)
        self.model.set_rows(rows, columns, tips)

    def _plan_bits(self, handle) -> dict[str, int]:
        if handle is None:
            return {}
        try:
            specs = self.state.session.plan.resolve(handle.layers)
        except StudioError:   # a rule for another model: the Plan view says so
            return {}
        return {name: spec.bits for name, spec in specs.items() if spec is not None}

    def _fill_blocks(self, handle) -> None:
        current = self.blocks.currentData()
        self.blocks.blockSignals(True)
        self.blocks.clear()
        self.blocks.addItem("all blocks", "")
        if handle is not None:
            for block in sorted({i.block for i in handle.layers if i.block is not None}):
                self.blocks.addItem(f"block {block}", str(block))
        index = self.blocks.findData(current)
        self.blocks.setCurrentIndex(max(index, 0))
        self.blocks.blockSignals(False)
        self.proxy.set(block=self.blocks.currentData() or "")

    def show_layer(self, name: str | None) -> None:
        """Select (and scroll to) the current layer's row, without announcing it again."""
        if not name:
            return
        current = self.table.currentIndex()
        if current.isValid() and self.proxy.index(current.row(), NAME).data() == name:
            return
        index = self.proxy.mapFromSource(self.model.find(name, NAME))
        if index.isValid():
            self.table.setCurrentIndex(index)
            self.table.scrollTo(index)

    def _row_changed(self, current, _previous) -> None:
        if current.isValid():
            self.state.select_layer(self.proxy.index(current.row(), NAME).data())

    def _history_changed(self) -> None:
        self.back.setEnabled(self.state.layer.can_back)
        self.forward.setEnabled(self.state.layer.can_forward)

    def _update_count(self, *_) -> None:
        total, shown = self.model.rowCount(), self.proxy.rowCount()
        self.count.setText(f"{shown} of {total}" if shown != total else f"{total} layers")


def sensitivity_scores(result) -> dict[str, float]:
    """One number per layer from a sweep: KL at the first option measured end to end, else the
    proxy error at the option nearest W4 g128 (what the Sensitivity view ranks by)."""
    if result is None:
        return {}
    options = result.options
    if result.has_kl and result.kl_options:
        values = np.asarray(result.loss("kl"), dtype=float)[:, result.kl_options[0]]
    else:
        col = min(range(len(options)), key=lambda j: (abs(options[j].bits - 4),
                                                       abs(options[j].group_size - 128)))
        values = np.asarray(result.proxy_error, dtype=float)[:, col]
    return {name: float(v) for name, v in zip(result.layers, values) if np.isfinite(v)}


class _Listed:
    """What `_fill` reads of a handle (its layers), for a layer list from a header."""

    def __init__(self, layers) -> None:
        self.layers = layers


def _tool(text: str, tip: str, slot) -> QToolButton:
    button = QToolButton()
    button.setText(text)
    button.setToolTip(tip)
    button.clicked.connect(slot)
    return button


class LayerDock(QDockWidget):
    def __init__(self, state) -> None:
        super().__init__("Layers")
        self.setObjectName("layer_dock")   # saveState / restoreState find it by this name
        self.list = LayerList(state)
        self.list.setMinimumWidth(300)   # name, block and role visible without scrolling
        self.setWidget(self.list)
        self.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
