"""The Sensitivity and Plan views: measure, click to assign, edit, allocate, refuse bad edits."""
import numpy as np
import pytest

from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan
from studio.core.sensitivity import sensitivity_job
from studio.core.text import text_windows
from studio.ui.views.plan_editor import PlanView
from studio.ui.views.sensitivity import SensitivityView


@pytest.fixture(scope="module")
def tiny_result(tiny_llama):
    windows = text_windows(tiny_llama.tokenizer, None, 16, 8, seed=0)[0]
    return run(sensitivity_job(tiny_llama, windows, bits=(2, 4, 8), group_sizes=(32, 64),
                               kl_bits=(4,), kl_group=32, kl_windows=2))


def _wait_job(qtbot, view):
    """Wait until the view's job is over (the view clears `job` when its result arrives)."""
    qtbot.waitUntil(lambda: view.job is None, timeout=120000)


class _Click:
    """What the view reads of a pyqtgraph mouse click."""

    def __init__(self, scene_pos) -> None:
        self._pos = scene_pos

    def button(self):
        from PySide6.QtCore import Qt
        return Qt.MouseButton.LeftButton

    def scenePos(self):
        return self._pos


def test_sensitivity_view_measures_and_a_click_assigns_an_option(qtbot, state, tiny_llama,
                                                                 monkeypatch):
    import threading

    from studio.ui.views import sensitivity
    tokenized_on = []
    real = sensitivity.text_windows
    monkeypatch.setattr(sensitivity, "text_windows", lambda *a, **k: (
        tokenized_on.append(threading.current_thread()), real(*a, **k))[1])
    view = SensitivityView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    view.widths.setText("2,3")
    view.groups.setText("32,64")
    view.kl_widths.setText("3")
    view.kl_group.setCurrentIndex(view.kl_group.findData(32))
    view.kl_windows.setValue(2)
    view.seqlen.setValue(16)
    view.resize(900, 500)
    view.show()
    assert view.start() is not None
    _wait_job(qtbot, view)
    result = state.session.results["sensitivity"]
    assert result.labels == ["W2 g64", "W2 g32", "W3 g64", "W3 g32"] and result.has_kl
    # The text was tokenized by the job, not on the UI thread.
    assert tokenized_on and threading.main_thread() not in tokenized_on
    # A column per layer, then one for the tied lm_head + embedding (measured as one unit).
    assert view.image.image.shape == (4, len(tiny_llama.quantizable) + 1)
    assert not state.failures
    # One row per option; the one measured end to end is starred, and the legend says so.
    ticks = [label for _, label in view.plot.getAxis("left")._tickLevels[0]]
    assert ticks == ["W2 g64", "W2 g32", "W3 g64", "W3 g32 *"]
    assert "* = measured end to end" in view.legend.text() and view.legend.isVisibleTo(view)
    # The KL heatmap shows the predicted loss: measured KL in the starred row.
    np.testing.assert_allclose(view.values(), result.loss("kl"))

    # A click in layer 5's cell of the W3 g64 row gives that layer 3 bits at group 64.
    vb = view.plot.getPlotItem().vb
    from PySide6.QtCore import QPointF
    row = result.labels.index("W3 g64")
    scene = vb.mapViewToScene(QPointF(5.5, row + 0.5))
    assert view.cell_at(scene) == (5, row)
    with qtbot.waitSignal(state.resultsChanged, check_params_cb=lambda k: k == "plan"):
        view._clicked(_Click(scene))
    spec = state.session.plan.spec_for(result.layers[5])
    assert (spec.bits, spec.group_size) == (3, 64)
    # The plan's W4 g128 default was not measured: only layer 5 carries a mark.
    assert len(view.marks.data) == 1 and view.marks.data[0]["y"] == row + 0.5


def test_sensitivity_view_refuses_bad_fields_before_any_work(qtbot, state, tiny_llama):
    view = SensitivityView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    for field, text, message in ((view.widths, "2,x", "whole numbers"),
                                 (view.groups, "32,100", "group sizes among"),
                                 (view.kl_widths, "7", "W7 g128, which is not among")):
        before = field.text()
        field.setText(text)
        assert view.start() is None, text
        assert message in view.status.text(), text
        field.setText(before)
    view.text_path = "/no/such/text.txt"
    assert view.start() is None and "does not exist" in view.status.text()
    assert view.job is None and "sensitivity" not in state.session.results


def test_sensitivity_from_another_model_is_refused(qtbot, state, tiny_dirs, tiny_result,
                                                   tmp_path):
    path = tmp_path / "sens.json"
    tiny_result.save(path)
    view = SensitivityView(state)
    qtbot.addWidget(view)
    state.set_model(run(open_model_job(tiny_dirs["qwen2"])))
    view._load(str(path))
    assert "measured on a LlamaForCausalLM" in view.status.text()
    assert "sensitivity" not in state.session.results


def test_plan_meter_matches_the_quantized_variant(qtbot, state, tiny_llama):
    from studio.core.quantize import quantize_job

    view = PlanView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    view.rule.setText(r"model.layers.*.mlp.down_proj -> 8 g64")
    view.apply_rule_text()
    view.table.selectRow(1)  # the first block linear (row 0 is the embedding)
    view.bits.setValue(2)
    view.group.setCurrentIndex(view.group.findData(-1))
    view.apply_to_selected()
    plan = state.session.plan
    assert plan.spec_for(tiny_llama.layers[1].name).bits == 2
    variant = run(quantize_job(tiny_llama, plan, None, None, "meter"))
    assert view.size.size_bytes == variant.size_bytes
    assert view.size.bits_per_weight == pytest.approx(variant.bits_per_weight)
    assert f"{variant.size_bytes:,} bytes" in view.meter.text()


def test_invalid_edits_are_refused_and_the_plan_is_unchanged(qtbot, state, tiny_llama):
    view = PlanView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    before = state.session.plan
    view.table.selectRow(2)
    view.bits.setValue(12)
    view.apply_to_selected()
    assert state.session.plan is before
    assert "Refused" in view.message.text() and "2 to 8" in view.message.text()
    for text in ("model.attention.* -> 4", "model.layers.*.mlp.down_proj -> 9",
                 "model.layers.*.mlp.down_proj -> 4 g100", "no arrow here", "(( -> 4"):
        view.rule.setText(text)
        view.apply_rule_text()
        assert state.session.plan is before, text
        assert "Refused" in view.message.text(), text
    view._load(__file__)  # not a recipe
    assert state.session.plan is before


def test_auto_allocation_meets_the_target_and_draws_the_curve(qtbot, state, tiny_llama,
                                                              tiny_result, tmp_path,
                                                              monkeypatch):
    view = PlanView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    view.auto_allocate()
    assert "Measure sensitivity first" in view.message.text()
    state.publish("sensitivity", tiny_result)
    view.target.setValue(3.5)
    assert view.auto_allocate() is not None
    _wait_job(qtbot, view)
    assert view.size.bits_per_weight <= 3.5
    assert view.loss == pytest.approx(view.allocation.loss)
    x, y = view.curve.getData()
    assert len(x) > 3 and np.all(np.diff(x) > 0)
    # Measured points: quantized and scored in a job; the text is tokenized off the UI thread.
    import threading

    from studio.core import text
    tokenized_on = []
    real = text.text_windows
    monkeypatch.setattr(text, "text_windows", lambda *a, **k: (
        tokenized_on.append(threading.current_thread()), real(*a, **k))[1])
    assert view.measure_points() is not None
    _wait_job(qtbot, view)
    assert tokenized_on and threading.main_thread() not in tokenized_on
    assert len(view.measured) == 4 and "Measured:" in view.message.text()
    assert len(view.points.getData()[0]) == 4
    # An impossible target is refused and the plan stays as it was.
    plan = state.session.plan
    view.target.setValue(1.0)
    assert view.auto_allocate() is not None
    _wait_job(qtbot, view)
    assert state.session.plan is plan and "below the smallest" in view.message.text()

    view._export("llama", str(tmp_path / "types.txt"))
    lines = (tmp_path / "types.txt").read_text().splitlines()
    assert len(lines) == len(tiny_llama.quantizable)
    view._save(str(tmp_path / "plan.json"))
    assert Plan.load(tmp_path / "plan.json") == plan


@pytest.fixture(scope="module")
def native_result(tiny_llama):
    windows = text_windows(tiny_llama.tokenizer, None, 16, 8, seed=0)[0]
    return run(sensitivity_job(tiny_llama, windows, gguf_native=True, kl_group=32,
                               kl_windows=2))


def test_sensitivity_view_measures_the_gguf_native_menu(qtbot, state, tiny_llama):
    view = SensitivityView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    view.gguf_native.setChecked(True)
    assert not view.widths.isEnabled() and view.kl_group.currentData() == 32
    view.kl_windows.setValue(0)
    view.seqlen.setValue(16)
    assert view.start() is not None
    _wait_job(qtbot, view)
    assert state.session.results["sensitivity"].labels == ["Q4_0", "Q5_0", "Q8_0"]


def test_gguf_native_checkbox_restricts_edits_and_allocation(qtbot, state, tiny_llama,
                                                             tiny_result, native_result):
    from studio.core.quant.grid import native_gguf_type

    view = PlanView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    view.gguf_native.setChecked(True)
    assert not view.group.isEnabled() and view.group.currentData() == 32
    assert view.symmetric.isChecked() and not view.symmetric.isEnabled()
    # The default W4 g128 is no GGUF type: the meter says how many layers would round.
    assert f"{len(tiny_llama.quantizable)} layer(s) not GGUF-native" in view.meter.text()
    before = state.session.plan
    view.table.selectRow(1)
    view.bits.setValue(3)
    view.apply_to_selected()
    assert state.session.plan is before and "4, 5 or 8 bits" in view.message.text()
    view.bits.setValue(5)
    view.apply_to_selected()
    name = tiny_llama.layers[1].name
    assert native_gguf_type(state.session.plan.spec_for(name)).name == "Q5_0"
    assert view.table.item(1, 8).text() == "fp16 (Q5_0)"
    view.rule.setText(r"model.layers.*.mlp.down_proj -> 8")
    view.apply_rule_text()
    assert native_gguf_type(state.session.plan.spec_for("model.layers.0.mlp.down_proj")).name \
        == "Q8_0"

    # Allocation needs the GGUF-native options measured; then it chooses only among them.
    state.publish("sensitivity", tiny_result)
    view.target.setValue(5.0)
    assert view.auto_allocate() is None
    assert "did not measure the GGUF-native options" in view.message.text()
    state.publish("sensitivity", native_result)
    assert view.auto_allocate() is not None
    _wait_job(qtbot, view)
    specs = state.session.plan.resolve(tiny_llama.layers)
    chosen = [specs[i.name] for i in tiny_llama.quantizable]
    assert all(s is None or native_gguf_type(s) is not None for s in chosen)
    assert 4.5 < view.size.bits_per_weight <= 5.0
    assert "GGUF: " in view.meter.text() and "not GGUF-native" not in view.meter.text()
    # Unticked, edits take any grid again.
    view.gguf_native.setChecked(False)
    assert view.group.isEnabled() and "GGUF:" not in view.meter.text()


def test_the_ends_are_one_shared_choice_and_allocation_keeps_them(qtbot, state, tiny_llama,
                                                                  tiny_result, tmp_path):
    from studio.core.allocate import plan_size
    from studio.core.quantize import quantize_job

    view = PlanView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    [box] = view.ends.boxes    # a tied pair: one choice
    [end] = view.ends.ends
    assert end.tied
    box.setCurrentIndex(box.findData("w8"))
    box.activated.emit(box.currentIndex())
    plan = state.session.plan
    assert plan.spec_for("lm_head") == plan.spec_for("model.embed_tokens")
    assert plan.spec_for("lm_head").label == "RTN W8 ch sym"
    rows = {view.table.item(r, 0).text(): r for r in range(view.table.rowCount())}
    for name in end.names:
        assert view.table.item(rows[name], 4).text() == "8"
    variant = run(quantize_job(tiny_llama, plan, None, None, "ends"))
    assert variant.shared == {"model.embed_tokens": "lm_head"}
    assert view.size.size_bytes == variant.size_bytes

    # One side picked in the table: both follow (one matrix), and the row says so.
    view.table.clearSelection()
    view.table.selectRow(rows["model.embed_tokens"])
    view.bits.setValue(4)
    view.group.setCurrentIndex(view.group.findData(32))
    view.apply_to_selected()
    assert state.session.plan.spec_for("lm_head").bits == 4
    assert "both follow" in view.message.text()
    assert box.currentText().startswith("W4 g32")

    # The allocator keeps the ends as planned and counts them in the size.
    state.publish("sensitivity", tiny_result)
    view.loss_kind.setCurrentIndex(1)     # proxy
    view.target.setValue(4.0)
    assert view.auto_allocate() is not None
    _wait_job(qtbot, view)
    allocated = state.session.plan
    assert allocated.spec_for("lm_head").bits == 4 == allocated.spec_for("model.embed_tokens").bits
    assert plan_size(tiny_llama, allocated).size_bytes == int(view.allocation.size_bytes)
    assert "counted in the size: lm_head + embedding" in view.message.text()
    view._save(str(tmp_path / "plan.json"))
    assert Plan.load(tmp_path / "plan.json") == allocated
    box.setCurrentIndex(box.findData("keep"))
    box.activated.emit(box.currentIndex())
    assert state.session.plan.spec_for("lm_head") is None
    view._load(str(tmp_path / "plan.json"))
    assert box.currentText().startswith("W4 g32")

    # "auto": Auto-allocate chooses the pair's width from its measured loss, one matrix.
    box.setCurrentIndex(box.findData("auto"))
    box.activated.emit(box.currentIndex())
    assert view.ends.auto_names() == list(end.names)
    assert state.session.plan.spec_for("lm_head").bits == 4    # unchanged until allocated
    tiny = tiny_result.ends == [end.names] and tiny_result.options
    assert tiny
    view.target.setValue(2.5)                                  # bits per weight, head counted
    assert view.auto_allocate() is not None
    _wait_job(qtbot, view)
    chosen = state.session.plan
    head = chosen.spec_for("lm_head")
    assert head == chosen.spec_for("model.embed_tokens")
    assert head is None or (head.method == "rtn" and tiny_result.column(head) is not None)
    assert view.allocation.choices["lm_head"] == (head and head.with_(method="rtn"))
    assert plan_size(tiny_llama, chosen).size_bytes == int(view.allocation.size_bytes) \
        == view.size.size_bytes
    # The meter counts the pair among the weights, as the budget did: one figure.
    assert view.size.budget_bpw == view.allocation.bpw <= 2.5
    assert f"{view.allocation.bpw:.3f}</b> bits/weight over the body and the lm_head" \
        in view.meter.text()
    assert box.currentData() == "auto" and "now" in box.currentText()

def test_plan_table_refresh_touches_only_what_changed(qtbot, state, tiny_llama, tiny_result,
                                                      monkeypatch):
    """A new sensitivity result redrew every cell of the plan table and re-measured the plan's
    size on the UI thread (0.2 s on the demo): now unchanged cells and an unchanged plan's size
    are kept."""
    from studio.core import allocate
    from studio.core.plan import QuantSpec

    view = PlanView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    measured = []
    real = allocate.plan_size
    monkeypatch.setattr(allocate, "plan_size", lambda *a: (measured.append(1), real(*a))[1])
    names = [view.table.item(r, 0) for r in range(view.table.rowCount())]
    bits = [view.table.item(r, 4) for r in range(view.table.rowCount())]
    state.publish("sensitivity", tiny_result)
    assert measured == []
    assert [view.table.item(r, 0) for r in range(view.table.rowCount())] == names
    assert [view.table.item(r, 4) for r in range(view.table.rowCount())] == bits
    assert view._set_plan(Plan(QuantSpec(3, 32), architecture=tiny_llama.architecture), "3 bits")
    assert measured == [1] and view.size.quantized > 0
    assert [view.table.item(r, 0) for r in range(view.table.rowCount())] == names   # same names
    row = next(r for r in range(view.table.rowCount())
               if view.table.item(r, 0).text() == tiny_llama.quantizable[0].name)
    assert view.table.item(row, 4).text() == "3" and view.table.item(row, 4) is not bits[row]


def test_a_hidden_plan_tab_fills_its_table_when_shown(qtbot, state, tiny_llama):
    """Behind another tab the plan view only marks itself stale at an open (filling every cell
    and sizing the plan took 0.7 s of the UI thread); showing the tab fills it."""
    from PySide6.QtWidgets import QLabel, QTabWidget

    tabs = QTabWidget()
    qtbot.addWidget(tabs)
    tabs.addTab(QLabel("another view"), "Other")
    view = PlanView(state)
    tabs.addTab(view, "Plan")
    tabs.show()
    qtbot.waitExposed(tabs)
    state.set_model(tiny_llama)
    assert view.table.rowCount() == 0 and view.size is None
    tabs.setCurrentWidget(view)
    assert view.table.rowCount() == len(tiny_llama.layers)
    assert view.size is not None and "bits/weight" in view.meter.text()
