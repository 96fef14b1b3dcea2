"""The precision plan's table: a row per layer with the spec the plan gives it and which part
of the plan decided it. Refilled cell by cell (only what changed), so a rule on a few layers
does not rebuild the demo's 2,300 items (0.2 s of the UI thread)."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
)

from studio.core.plan import Plan, QuantSpec
from studio.core.quant.grid import native_gguf_type

COLUMNS = ("Layer", "Block", "Role", "Shape", "Bits", "Group", "Method", "Sym", "Scales", "Skip",
           "From")
RIGHT_ALIGNED = (1, 4, 5)


class PlanTable(QTableWidget):
    def __init__(self) -> None:
        super().__init__(0, len(COLUMNS))
        self.names: list[str] = []
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(20)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)

    def set_layers(self, layers) -> None:
        """A new model: its layers' names, no rows until the next `fill`."""
        self.names = [info.name for info in layers]
        self.setRowCount(0)

    def fill(self, plan: Plan, layers, specs: dict) -> None:
        """Show `specs` (layer name -> spec or None = 16-bit, a tied pair already resolved)."""
        partners = tied_partners(layers)
        if self.rowCount() != len(layers):
            self.clearContents()
            self.setRowCount(len(layers))
        for row, info in enumerate(layers):
            spec = specs[info.name]
            cells = [info.name, "" if info.block is None else str(info.block), info.role,
                     "x".join(map(str, info.shape)),
                     "16" if spec is None else str(spec.bits),
                     "" if spec is None else ("ch" if spec.group_size == -1
                                              else str(spec.group_size)),
                     "" if spec is None else spec.method,
                     "" if spec is None or not spec.symmetric else "yes",
                     scales_cell(spec), "yes" if spec is None else "",
                     origin(plan, info, partners.get(info.name))]
            for col, text in enumerate(cells):
                old = self.item(row, col)
                if old is None or old.text() != text:
                    self.setItem(row, col, _item(text, align_right=col in RIGHT_ALIGNED))

    def selected_names(self) -> list[str]:
        rows = sorted({index.row() for index in self.selectionModel().selectedRows()})
        return [self.names[r] for r in rows]

    def show_layer(self, name: str) -> None:
        """Make `name` the current row (a multi-row selection the user is editing stays when
        it already holds that layer)."""
        item = self.item(self.currentRow(), 0)
        if item is not None and item.text() == name:
            return
        for match in self.findItems(name, Qt.MatchFlag.MatchExactly):
            if match.column() == 0:
                if name in self.selected_names():
                    self.setCurrentCell(match.row(), 0,
                                        self.selectionModel().SelectionFlag.NoUpdate)
                else:
                    self.setCurrentCell(match.row(), 0)
                self.scrollToItem(match)
                return


def _item(text: str, align_right: bool = False) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
    if align_right:
        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return item


def scales_cell(spec: QuantSpec | None) -> str:
    """The Scales cell: "fp16 (Q4_0)" for a GGUF-native spec, "fp16" or "" (fp32) otherwise."""
    if spec is None or spec.scale_dtype == "fp32":
        return ""
    native = native_gguf_type(spec)
    return f"fp16 ({native.name})" if native is not None else "fp16"


def tied_partners(layers) -> dict:
    """name -> the LayerInfo it shares its matrix with (a tied embedding and lm_head)."""
    by_name = {info.name: info for info in layers}
    partners = {}
    for info in layers:
        if info.tied_to and info.tied_to in by_name:
            partners.setdefault(info.name, by_name[info.tied_to])
            partners.setdefault(info.tied_to, info)
    return partners


def origin(plan: Plan, info, partner) -> str:
    """Which part of the plan decides this layer: an exact rule, a regex, the default, or (a
    tied embedding) the lm_head whose matrix it is (`partner`)."""
    if partner is not None and not any(r.matches(info.name) for r in plan.rules) \
            and plan.spec_for(partner.name, default_applies=False) is not None:
        return f"tied: the {partner.role}'s matrix"
    for rule in plan.rules:
        if not rule.regex and rule.pattern == info.name:
            return "layer rule"
    for rule in reversed(plan.rules):
        if rule.regex and rule.matches(info.name):
            return f"regex {rule.pattern}"
    return "default" if info.quantizable else "not quantized"
