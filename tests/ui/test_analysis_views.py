"""The Weights and Activations views render a tiny model's statistics and react to the user."""
import numpy as np

from studio.ui.views.activations import ActivationsView
from studio.ui.views.weights import WeightsView


def _open(qtbot, state, view, handle, key):
    view.show()
    with qtbot.waitSignal(state.resultsChanged, timeout=60000,
                          check_params_cb=lambda k: k == key):
        state.set_model(handle)


def test_weights_view_computes_when_shown_and_shows_a_layer(qtbot, state, tiny_llama):
    view = WeightsView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    assert not state.runner.active  # hidden (another tab): nothing computed yet
    with qtbot.waitSignal(state.resultsChanged, timeout=60000,
                          check_params_cb=lambda k: k == "weight_stats"):
        view.show()
    stats = state.session.results["weight_stats"]
    assert view.table_model.rowCount() == len(stats.layers)
    # the plots come in the next turns; with no layer current, the first one becomes current
    qtbot.waitUntil(lambda: len(view.scatter.points()) == len(tiny_llama.quantizable))
    qtbot.waitUntil(lambda: state.selected_layer == tiny_llama.quantizable[0].name)
    np.testing.assert_allclose(view.rows_curve.getData()[1],
                               stats.layers[state.selected_layer].row_absmax)

    name = tiny_llama.quantizable[3].name
    state.select_layer(name)
    s = stats.layers[name]
    x, y = view.cols_curve.getData()
    np.testing.assert_allclose(y, s.col_absmax)
    assert view.image.image.shape == s.heatmap.shape
    assert view.proxy.index(view.table.currentIndex().row(), 1).data() == name
    _, counts = view.hist_curve.getData()
    np.testing.assert_allclose(counts, np.log10(1 + s.hist_counts), rtol=1e-6)
    view.log_hist.setChecked(False)
    np.testing.assert_allclose(view.hist_curve.getData()[1], s.hist_counts)

    view.stat.setCurrentIndex(view.stat.findData("absmax"))
    ys = sorted(p.pos().y() for p in view.scatter.points())
    np.testing.assert_allclose(ys, sorted(stats.column("absmax")), rtol=1e-6)
    view.table.selectRow(0)  # a table row selects its layer everywhere
    assert state.selected_layer == view.proxy.index(0, 1).data()
    assert not state.failures


def test_weights_view_reuses_session_results(qtbot, state, tiny_llama):
    first = WeightsView(state)
    qtbot.addWidget(first)
    _open(qtbot, state, first, tiny_llama, "weight_stats")
    second = WeightsView(state)  # e.g. the tab re-created: no recompute
    qtbot.addWidget(second)
    second.show()
    assert not state.runner.active
    assert second.table_model.rowCount() == first.table_model.rowCount()
    state.set_model(None)
    assert first.table_model.rowCount() == 0
    state.set_model(tiny_llama)  # re-opened: its statistics come back without a job
    assert not state.runner.active
    assert first.table_model.rowCount() == second.table_model.rowCount() > 0


def _capture(qtbot, state, view, windows=2, seqlen=32):
    view.windows.setValue(windows)
    view.seqlen.setValue(seqlen)
    with qtbot.waitSignal(state.runner.jobDone, timeout=60000):
        view.start()


def test_activations_view_capture_outliers_and_preview(qtbot, state, tiny_llama):
    view = ActivationsView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    # before any capture: empty 0..1 frames, not a range padded around flat zero bars
    for plot in (view.act_plot, view.w_plot, view.act_hist, view.smooth_plot):
        assert [list(r) for r in plot.viewRange()] == [[0, 1], [0, 1]]
    _capture(qtbot, state, view)
    capture = state.session.results["activations"]
    assert capture.windows == 2 and capture.seqlen == 32
    # found on the details worker, shown when they come
    qtbot.waitUntil(lambda: view.table_model.rowCount() == len(capture.inputs), timeout=20000)

    name = "model.layers.1.mlp.up_proj"
    state.select_layer(name)
    assert name in view.group.layers and view.group.layers[0].endswith("gate_proj")
    heights = view.act_bars.getData()[1]
    np.testing.assert_allclose(heights, capture.input_of(name).absmax)
    view.act_plot.getViewBox().updateAutoRange()        # as its next paint does
    assert view.act_plot.viewRange()[1][1] >= heights.max()   # ranged to the data again
    # without weight statistics, the weight columns are read on the details worker
    qtbot.waitUntil(lambda: view.weight_cols is not None, timeout=20000)
    np.testing.assert_allclose(view.w_bars.getData()[1], view.weight_cols)

    view.alpha.setValue(100)  # alpha 1: all the difficulty goes to the weights
    np.testing.assert_allclose(view.smooth_act.getData()[1], 1.0, rtol=1e-4)
    assert "activations" in view.ranges.text()

    view.k.setValue(1.5)
    qtbot.waitUntil(lambda: sum(len(g.channels) for g in view.groups) > 0, timeout=20000)
    view.k.setValue(0.0)  # refused with a sentence, not a crash
    assert "positive" in view.k_note.text() and view.table_model.rowCount() == 0
    view.k.setValue(20.0)
    qtbot.waitUntil(lambda: view.table_model.rowCount() == len(capture.inputs), timeout=20000)
    qtbot.waitUntil(lambda: view.profile_max.getData()[1] is not None, timeout=20000)
    assert view.profile_max.getData()[1].shape == (capture.stream_norm.shape[0],)
    assert not state.failures


def test_outliers_and_massive_activations_are_found_off_the_ui_thread(qtbot, state, tiny_llama,
                                                                     monkeypatch):
    """A published capture used to be searched on the UI thread (seconds for a large one)."""
    import threading

    from studio.core import outliers

    threads = []
    for name in ("find_outliers", "massive_activations", "token_norm_profile"):
        real = getattr(outliers, name)

        def spy(*args, _real=real, **kwargs):
            threads.append(threading.current_thread() is threading.main_thread())
            return _real(*args, **kwargs)
        monkeypatch.setattr(outliers, name, spy)
    view = ActivationsView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    _capture(qtbot, state, view)
    capture = state.session.results["activations"]
    qtbot.waitUntil(lambda: view.table_model.rowCount() == len(capture.inputs), timeout=20000)
    qtbot.waitUntil(lambda: "massive" in view.massive_note.text().lower()
                    or "exceeds" in view.massive_note.text(), timeout=20000)
    qtbot.waitUntil(lambda: not view.massive_note.text().startswith("Finding"), timeout=20000)
    assert len(threads) == 3 and not any(threads)


def test_activations_view_reports_bad_text_and_keeps_nothing(qtbot, state, tiny_llama, tmp_path):
    view = ActivationsView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    view._set_path(str(empty))
    _capture(qtbot, state, view)
    assert state.failures and "empty" in state.failures[0]
    assert "Capture failed" in view.status.text()
    assert "activations" not in state.session.results


def test_activations_view_cancel_keeps_nothing(qtbot, state, tiny_llama):
    view = ActivationsView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    view.windows.setValue(64)
    view.seqlen.setValue(128)
    with qtbot.waitSignal(state.runner.jobDone, timeout=60000):
        view.start()
        view.job.cancel()
    assert "cancelled" in view.status.text()
    assert "activations" not in state.session.results


def test_a_capture_that_does_not_fit_says_what_would(qtbot, state, tiny_llama, monkeypatch):
    from studio.core import memory

    view = ActivationsView(state)
    qtbot.addWidget(view)
    state.set_model(tiny_llama)
    small = memory.estimate_job(tiny_llama, "capture", windows=2, seqlen=32).added
    monkeypatch.setattr(memory, "available", lambda: small)
    _capture(qtbot, state, view, windows=64, seqlen=32)
    qtbot.waitUntil(lambda: "at most" in view.status.text(), timeout=10000)
    assert state.failures and "needs about" in state.failures[0]
    assert "at most" in view.status.text() and "windows (64 asked)" in view.status.text()
    assert "activations" not in state.session.results
    qtbot.waitUntil(view.run_button.isEnabled, timeout=10000)   # to lower it and run again
