"""Preferences' calibration text reaches every view that takes calibration text; each method
is explained by its registry summary; the dock's Block and Role columns are in view."""
from PySide6.QtCore import Qt

from studio.core.quant import registry
from studio.ui import settings


def test_views_start_from_the_preferred_calibration_text(qtbot, state, tmp_path):
    from studio.ui.views.activations import ActivationsView
    from studio.ui.views.quantize import QuantizeView
    from studio.ui.views.sensitivity import SensitivityView

    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    settings.put({"calibration_text": str(text), "calibration_windows": 12})
    activations, quantize, sensitivity = (ActivationsView(state), QuantizeView(state),
                                          SensitivityView(state))
    for view in (activations, quantize, sensitivity):
        qtbot.addWidget(view)
    assert activations.path == str(text) and activations.windows.value() == 12
    assert quantize.calib_path == str(text) and quantize.windows.value() == 12
    assert sensitivity.text_path == str(text)

    settings.put({"calibration_text": "", "calibration_windows": 5})   # back to the built-in
    for view in (activations, quantize, sensitivity):
        view.use_preferences()
    assert activations.path is None and quantize.calib_path is None
    assert sensitivity.text_path is None and quantize.windows.value() == 5
    text.unlink()   # a preferred file that is gone: the built-in text, not a later failure
    settings.put({"calibration_text": str(text)})
    assert settings.calibration_text() is None


def test_each_method_is_explained_in_one_sentence(qtbot, state):
    from studio.ui.views.plan_editor import PlanView
    from studio.ui.views.quantize import QuantizeView

    for view in (QuantizeView(state), PlanView(state)):
        qtbot.addWidget(view)
        box = view.method
        assert box.count() == len(registry.all_quantizers())
        for index in range(box.count()):
            quantizer = registry.get(box.itemData(index))
            assert quantizer.summary in box.itemData(index, Qt.ItemDataRole.ToolTipRole)
        box.setCurrentIndex(box.count() - 1)
        assert registry.get(box.currentData()).summary in box.toolTip()


def test_the_docks_block_and_role_columns_are_in_view(qtbot, window, tiny_dirs):
    job = window.open_model(str(tiny_dirs["llama"]))
    qtbot.waitUntil(lambda: job.is_done and window.state.handle is not None, timeout=60000)
    table = window.layer_dock.list.table
    for column in (2, 3):   # Block, Role
        right = table.columnViewportPosition(column) + table.columnWidth(column)
        assert 0 <= table.columnViewportPosition(column) and right <= table.viewport().width()


def test_plain_progress_is_coalesced_but_details_and_the_last_step_are_not():
    from studio.core.jobs import Progress
    from studio.ui.workers import _coalesced

    sent = []
    send = _coalesced(sent.append)
    for i in range(1000):          # a burst far faster than PROGRESS_EVERY
        send(Progress(i, 1000, f"step {i}"))
        if i % 100 == 0:
            send(Progress(i, 1000, "", detail={"layer": i}))
    send(Progress(1000, 1000, "done"))
    plain = [p for p in sent if p.detail is None]
    assert len([p for p in sent if p.detail is not None]) == 10
    assert plain[0].message == "step 0" and plain[-1].message == "done"
    assert len(plain) < 100
