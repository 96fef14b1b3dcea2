"""The window fits a 1366 x 768 laptop screen: toolbar rows wrap instead of widening it."""
from studio.ui.layout import FlowLayout


def test_the_window_fits_a_laptop_screen(qtbot, window):
    window.resize(1366, 740)
    window.show()
    qtbot.waitExposed(window)
    assert window.minimumSizeHint().width() <= 1366 - 150   # room left for the dock to widen
    assert window.minimumSizeHint().height() <= 740
    for title, view in window.views.items():
        assert view.minimumSizeHint().width() <= 900, title
    assert window.width() <= 1366


def test_a_flow_layout_wraps_its_row_and_keeps_every_widget_inside(qtbot):
    from PySide6.QtWidgets import QPushButton, QWidget

    host = QWidget()
    qtbot.addWidget(host)
    flow = FlowLayout(host)
    buttons = [QPushButton(f"button number {i}") for i in range(8)]
    for button in buttons:
        flow.addWidget(button)
    one_row = flow.sizeHint()
    host.resize(one_row.width() // 3, 300)
    host.show()
    qtbot.waitExposed(host)
    tops = {b.geometry().top() for b in buttons}
    assert len(tops) >= 3                                  # wrapped onto several rows
    assert all(b.geometry().right() <= host.width() for b in buttons)
    assert flow.heightForWidth(host.width()) > one_row.height() * 2
    assert flow.minimumSize().width() < one_row.width() // 3


def test_results_do_not_widen_the_window(qtbot, window, tiny_dirs, tmp_path):
    """A view's texts after a model's statistics arrive (a status line naming a model with a
    long name) still fit."""
    window.resize(1366, 740)
    window.show()
    folder = tmp_path / ("Llama-3.2-Instruct-with-a-long-descriptive-folder-name-" * 2 + "q4")
    folder.symlink_to(tiny_dirs["llama"], target_is_directory=True)
    job = window.open_model(str(folder))
    qtbot.waitUntil(lambda: job.is_done and window.state.handle is not None, timeout=60000)
    weights = window.views["Weights"]
    window.tabs.setCurrentWidget(weights)          # starts the weight statistics
    qtbot.waitUntil(lambda: weights.table_model.rowCount() > 0, timeout=60000)
    assert "quantizable layers" in weights.status.text()
    qtbot.wait(50)                                 # the layouts take in the new texts
    for title, view in window.views.items():
        assert view.minimumSizeHint().width() <= 900, title
    assert window.width() <= 1366


def test_a_long_plot_title_shortens_to_its_plot_instead_of_widening_it(qtbot):
    from studio.ui.widgets import plot

    whole = "model.layers.22.self_attn.q_proj: kurtosis 10.89, std 0.284, max/median 5.1"
    widget = plot(whole, "x", "y")
    qtbot.addWidget(widget)
    widget.resize(220, 180)
    widget.show()
    qtbot.waitExposed(widget)
    item, title = widget.getPlotItem(), widget.getPlotItem().titleLabel
    qtbot.waitUntil(lambda: title.text != whole)
    assert item.width() <= widget.viewport().width() + 1
    assert title.text.endswith("…") and title.toolTip() == whole
    widget.resize(1000, 180)                       # room again: the whole title, no tooltip
    qtbot.waitUntil(lambda: title.text == whole)
    assert title.toolTip() == ""
    widget.setTitle("short", color="k", size="10pt")
    assert title.text == "short"
