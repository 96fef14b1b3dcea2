"""One current layer across every view, back / forward, and "what to run" for missing data."""
from PySide6.QtCore import Qt

from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job


def open_and_wait(qtbot, window, source):
    job = window.open_model(str(source))
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.waitUntil(lambda: window.state.handle is not None, timeout=5000)
    # (the dock lists a new model's layers in the next event-loop turn)
    qtbot.waitUntil(lambda: window.layer_dock.list.model.rowCount()
                    == len(window.state.handle.layers), timeout=5000)


def dock_current(window) -> str | None:
    table = window.layer_dock.list.table
    index = table.currentIndex()
    return table.model().index(index.row(), 1).data() if index.isValid() else None


def test_one_layer_selected_everywhere(qtbot, window, tiny_dirs):
    from studio.ui import settings
    settings.put({"quick_eval": False})     # this test is about selection only
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    state, views = window.state, window.views
    handle = state.handle
    names = [i.name for i in handle.quantizable]
    window.tabs.setCurrentWidget(views["Weights"])   # its statistics start when shown
    qtbot.waitUntil(lambda: "weight_stats" in state.session.results, timeout=60000)
    variant = run(quantize_job(handle, Plan(default=QuantSpec(bits=4, group_size=32)),
                               None, None, "w4"))
    state.session.variants["w4"] = variant
    state.publish("variants")

    # The dock picks a layer: every view shows it.
    dock = window.layer_dock.list
    first = names[3]
    dock.show_layer(first)
    assert state.selected_layer == first
    weights = views["Weights"]
    assert weights.proxy.index(weights.table.currentIndex().row(), 1).data() == first
    assert weights.marker.isVisible() and weights.marker.value() == names.index(first)
    plan = views["Plan"]
    window.tabs.setCurrentWidget(plan)   # (a hidden Plan tab fills its table when shown)
    assert plan.table.item(plan.table.currentRow(), 0).text() == first
    for title in ("Quantize", "Compare"):
        panel = views[title].layer_view if title == "Quantize" else views[title].layer
        assert first in panel.title.text()
        # read on the details worker, drawn when the arrays come: before and after
        qtbot.waitUntil(lambda: len(panel.hist.getPlotItem().listDataItems()) == 2, timeout=20000)
        assert len(panel.channels.getPlotItem().listDataItems()) == 2
    # Views without data say what to run, with the button for it.
    activations, sensitivity = views["Activations"], views["Sensitivity"]
    assert not activations.needs.isHidden() and first in activations.needs.label.text()
    assert activations.needs.button.text() == "Run the activation capture"
    assert not sensitivity.needs.isHidden()
    assert sensitivity.needs.button.text() == "Run the sensitivity sweep"

    # A view's own table moves the current layer everywhere (here: the Plan's, the Weights').
    second = names[7]
    row = next(r for r in range(plan.table.rowCount()) if plan.table.item(r, 0).text() == second)
    plan.table.setCurrentCell(row, 0)
    assert state.selected_layer == second and dock_current(window) == second
    third = names[1]
    weights._point_clicked(None, [_Point(third)])
    assert state.selected_layer == third and dock_current(window) == third
    assert plan.table.item(plan.table.currentRow(), 0).text() == third

    # Back and forward walk the visited layers (Alt+Left / Alt+Right).
    qtbot.keyClick(window, Qt.Key.Key_Left, Qt.KeyboardModifier.AltModifier)
    assert state.selected_layer == second and dock_current(window) == second
    window.back_action.trigger()
    assert state.selected_layer == first
    window.forward_action.trigger()
    window.forward_action.trigger()
    assert state.selected_layer == third and not window.forward_action.isEnabled()

    # One click on "what to run" runs it; the banner goes once the data is there.
    activations.needs.button.click()
    qtbot.waitUntil(lambda: "activations" in state.session.results, timeout=60000)
    qtbot.waitUntil(lambda: activations.needs.isHidden(), timeout=5000)
    assert third in activations.group.layers


def test_layer_list_filters_and_sorts_by_statistics(qtbot, window, tiny_dirs):
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    state = window.state
    dock = window.layer_dock.list
    total = len(state.handle.layers)
    assert dock.proxy.rowCount() == total
    dock.roles.setCurrentIndex(dock.roles.findData("down"))
    assert 0 < dock.proxy.rowCount() < total
    assert {dock.proxy.index(r, 3).data() for r in range(dock.proxy.rowCount())} == {"down"}
    dock.roles.setCurrentIndex(0)
    dock.blocks.setCurrentIndex(dock.blocks.findData("1"))
    assert {dock.proxy.index(r, 2).data() for r in range(dock.proxy.rowCount())} == {"1"}
    dock.blocks.setCurrentIndex(0)
    dock.search.setText("q_proj")
    assert all("q_proj" in dock.proxy.index(r, 1).data() for r in range(dock.proxy.rowCount()))
    dock.search.setText("")

    # Statistics, sensitivity and plan bits become sortable columns when they exist.
    assert "kurtosis" not in dock.columns
    window.tabs.setCurrentWidget(window.views["Weights"])
    qtbot.waitUntil(lambda: "kurtosis" in dock.columns, timeout=60000)
    column = dock.columns.index("kurtosis")
    dock.table.sortByColumn(column, Qt.SortOrder.DescendingOrder)
    stats = state.session.results["weight_stats"]
    top = dock.proxy.index(0, 1).data()
    assert stats.layers[top].kurtosis == max(s.kurtosis for s in stats.layers.values())
    name = state.handle.quantizable[0].name
    from studio.core.plan import Rule
    state.session.plan = Plan(QuantSpec(bits=4, group_size=32)).with_rule(
        Rule(name, QuantSpec(bits=8, group_size=32)))
    state.publish("plan")

    def plan_bits() -> dict[str, str]:
        bits = dock.columns.index("Plan bits")
        return {dock.proxy.index(r, 1).data(): dock.proxy.index(r, bits).data()
                for r in range(dock.proxy.rowCount())}
    qtbot.waitUntil(lambda: "Plan bits" in dock.columns and plan_bits()[name] == "8")
    assert "kurtosis" in dock.columns   # kept
    bits = dock.columns.index("Plan bits")
    dock.table.sortByColumn(bits, Qt.SortOrder.DescendingOrder)
    assert dock.proxy.index(0, bits).data() == "16"       # the embedding stays float
    assert plan_bits()[state.handle.quantizable[1].name] == "4"


class _Point:
    def __init__(self, name):
        self.name = name

    def data(self):
        return self.name
