"""The tables refilled whole (`widgets.RowsModel`): their cells sort by number, are read only,
carry their tooltips, and a paint of the table runs no Python (each Python call of a paint
waits for the interpreter's lock behind a job's Python)."""
import gc
import random
import sys

from PySide6.QtCore import Qt

from studio.ui.widgets import SORT_KEY, rows_table

ROWS = [[("a.q_proj", None), ("10", 10.0), ("x", None)],
        [("b.k_proj", None), ("9", 9.0), ("y", None)],
        [("c.v_proj", None), ("100", 100.0), ("z", None)]]


def test_cells_sort_by_number_and_are_read_only(qtbot):
    table, model, proxy = rows_table(("Layer", "Size", "Note"), {"Layer": "The name"})
    model.tooltip_column = 0
    qtbot.addWidget(table)
    model.set_rows(ROWS)
    table.sortByColumn(1, Qt.SortOrder.AscendingOrder)
    assert [proxy.index(r, 1).data() for r in range(3)] == ["9", "10", "100"]   # not "10" < "9"
    cell = model.index(2, 1)
    assert cell.data(SORT_KEY) == 100.0 and not model.flags(cell) & Qt.ItemFlag.ItemIsEditable
    assert model.index(0, 1).data(Qt.ItemDataRole.TextAlignmentRole) & Qt.AlignmentFlag.AlignRight
    assert model.index(1, 0).data(Qt.ItemDataRole.ToolTipRole) == "b.k_proj"
    assert model.index(1, 2).data(Qt.ItemDataRole.ToolTipRole) is None
    header = Qt.Orientation.Horizontal
    assert model.headerData(0, header, Qt.ItemDataRole.ToolTipRole) == "The name"
    assert model.headerData(1, header, Qt.ItemDataRole.ToolTipRole) is None
    assert proxy.mapFromSource(model.find("c.v_proj", 0)).row() == 2

    resets = []
    proxy.modelReset.connect(lambda: resets.append(1))
    proxy.rowsInserted.connect(lambda *_: resets.append("row"))
    model.set_rows([row[:2] for row in ROWS[:2]], ("Layer", "Size"), ())   # new columns
    assert resets == [1], "one reset, not a signal per row"
    model.set_rows([row[:2] for row in ROWS[:2]], ("Layer", "Size"), ())
    assert resets == [1], "the same rows again: no reset"
    assert (model.rowCount(), model.columnCount(), model.columns) == (2, 2, ["Layer", "Size"])
    assert not model.find("c.v_proj", 0).isValid()


def test_painting_the_table_runs_no_python(qtbot):
    table, model, _ = rows_table(("Layer", "Size", "Note"))
    qtbot.addWidget(table)
    model.set_rows(ROWS * 20)
    table.resize(600, 400)
    table.show()
    qtbot.waitExposed(table)
    table.grab()          # the first paint may look up, once, which methods Python overrides

    entries = []
    here = sys._getframe()

    def count(frame, event, arg):
        if event == "call" and frame.f_back is here:   # Qt calling into Python
            entries.append(frame.f_code.co_name)

    sys.setprofile(count)
    try:
        table.grab()
    finally:
        sys.setprofile(None)
    assert entries == []


def test_many_refills_keep_every_cell(qtbot):
    """Refilled hundreds of times with tables of every size, the cells and headers read what
    was put in. (Items handed to the model from Python left PySide objects behind for items
    the model had deleted; a later item at the same address crashed the process within ~300
    refills.)"""
    table, model, proxy = rows_table(("a", "b", "c"))
    qtbot.addWidget(table)
    table.show()
    pick = random.Random(0)
    for i in range(300):
        n = pick.randint(0, 200)
        model.set_rows([[(f"{i}-{r}", None), (str(r), float(r)), ("x", None)] for r in range(n)],
                       ("a", "b", "c"), ("the name", "", "a note"))   # as the layer dock does
        if i % 20 == 0:
            gc.collect()
            table.grab()
        assert model.rowCount() == proxy.rowCount() == n
        for r in pick.sample(range(n), min(n, 3)):
            assert model.index(r, 0).data() == f"{i}-{r}"
            assert model.index(r, 1).data(SORT_KEY) == float(r)
        assert model.headerData(2, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole) == "a note"
