"""The layer inventory: a sortable, filterable table, and a details pane for the selected layer."""
from __future__ import annotations

from PySide6.QtCore import QSortFilterProxyModel, Qt
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from studio.core.layers import ROLES
from studio.ui.layout import column
from studio.ui.widgets import SORT_KEY, RowsModel, fit_columns, layer_table
from studio.ui.workers import LatestOnly

COLUMNS = ("#", "Layer", "Block", "Role", "Kind", "Shape", "Parameters", "dtype", "Size (KiB)",
           "Quantized by default")



class _Filter(QSortFilterProxyModel):
    """Text filter on the layer name plus a role filter."""

    def __init__(self) -> None:
        super().__init__()
        self.role = ""
        self.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.setFilterKeyColumn(1)

    def set_role(self, role: str) -> None:
        self.role = role
        self.invalidateFilter()

    def filterAcceptsRow(self, row, parent) -> bool:  # noqa: N802 (Qt API)
        if self.role:
            role = self.sourceModel().index(row, 3, parent).data()
            if role != self.role:
                return False
        return super().filterAcceptsRow(row, parent)


class LayersView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.model = RowsModel(COLUMNS, tooltip_column=1)
        self.latest = LatestOnly(state.details)   # a layer's weight summary, off the UI thread
        self.proxy = _Filter()
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_KEY)

        self.search = QLineEdit(placeholderText="Filter layers by name (e.g. mlp, layers.3., q_proj)")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.proxy.setFilterFixedString)
        self.roles = QComboBox()
        self.roles.addItem("All roles", "")
        for role in ROLES:
            self.roles.addItem(role, role)
        self.roles.currentIndexChanged.connect(lambda: self.proxy.set_role(self.roles.currentData()))
        self.count = QLabel()

        self.table = layer_table(self.proxy)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.selectionModel().currentRowChanged.connect(self._row_changed)
        self.proxy.rowsInserted.connect(self._update_count)
        self.proxy.layoutChanged.connect(self._update_count)
        self.proxy.modelReset.connect(self._update_count)
        self.search.textChanged.connect(self._update_count)
        self.roles.currentIndexChanged.connect(self._update_count)

        self.details = QTextBrowser()
        self.details.setMinimumWidth(280)

        bar = QHBoxLayout()
        bar.addWidget(self.search, 1)
        bar.addWidget(self.roles)
        bar.addWidget(self.count)
        left = column(bar, self.table)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(self.details)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(split)

        state.modelChanged.connect(self.set_model)
        state.layerSelected.connect(self._show_details)
        if state.handle is not None:
            self.set_model(state.handle)
        else:
            self.details.setHtml("<p>No model open. Use <b>File › Open demo model</b>, or open a "
                                 "Hugging Face model folder or a GGUF file.</p>")

    def set_model(self, handle) -> None:
        self.latest.forget()
        self.model.set_rows([] if handle is None else [
            [(str(order), order), (info.name, None),
             ("" if info.block is None else str(info.block), -1 if info.block is None else info.block),
             (info.role, None), (info.kind + (" (tied)" if info.tied_to else ""), None),
             (" x ".join(str(d) for d in info.shape), None),
             (f"{info.params:,}", info.params), (info.dtype, None),
             (f"{info.bytes / 1024:,.1f}", info.bytes), ("yes" if info.quantizable else "no", None)]
            for order, info in enumerate(handle.layers)])
        if handle is None:
            return
        fit_columns(self.table, self.model)
        self._update_count()
        self._show_model_summary(handle)

    def select(self, name: str) -> None:
        for row in range(self.proxy.rowCount()):
            if self.proxy.index(row, 1).data() == name:
                self.table.selectRow(row)
                return

    def _update_count(self, *_) -> None:
        total = self.model.rowCount()
        shown = self.proxy.rowCount()
        self.count.setText(f"{shown} of {total} layers" if shown != total else f"{total} layers")

    def _row_changed(self, current, _previous) -> None:
        if current.isValid():
            self.state.select_layer(self.proxy.index(current.row(), 1).data())

    def _show_model_summary(self, handle) -> None:
        notes = "".join(f"<li>{note}</li>" for note in handle.notes)
        quantizable = handle.quantizable
        self.details.setHtml(
            f"<h3>{handle.name}</h3><p>{handle.architecture} · "
            f"{handle.param_count / 1e6:.1f}M parameters · {handle.size_bytes / 2**20:.1f} MiB "
            f"{'as stored (read layer by layer)' if handle.streamed else 'in memory'} · "
            f"{len(quantizable)} quantizable layers in "
            f"{len({i.block for i in quantizable})} blocks · opened in "
            f"{handle.load_seconds:.1f} s</p>{f'<ul>{notes}</ul>' if notes else ''}"
            f"<p>Select a layer to see its details.</p>")

    def _show_details(self, name: str) -> None:
        """The layer's facts at once; its weight range when the details worker has read it."""
        from studio.core.layer_details import weight_summary_job

        handle = self.state.handle
        if handle is None:
            return
        info = handle.layer(name)
        rows = [("Role", info.role), ("Kind", info.kind), ("Block", info.block),
                ("Shape (out x in)", " x ".join(map(str, info.shape))),
                ("Parameters", f"{info.params:,}"), ("dtype", info.dtype),
                ("Size", f"{info.bytes / 1024:,.1f} KiB"),
                ("Quantized by default", "yes" if info.quantizable else "no (only if a rule names it)"),
                ("Tied to", info.tied_to or "—")]
        self._details_html(name, rows + [("min / max", "…"), ("std", "…"),
                                         ("abs-max / median |w|", "…")])

        def arrived(s) -> None:
            self._details_html(name, rows + [("min / max", f"{s.low:.4g} / {s.high:.4g}"),
                                             ("std", f"{s.std:.4g}"),
                                             ("abs-max / median |w|", f"{s.max_over_median:.1f}")])
        self.latest.request(name, f"Weights of {name}", lambda: weight_summary_job(handle, name),
                            arrived)

    def _details_html(self, name: str, rows: list[tuple]) -> None:
        table = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows)
        self.details.setHtml(f"<h3>{name}</h3><table cellspacing='4'>{table}</table>")
