"""Before / after without chores (quantize -> quick evaluation -> a Compare row), a failed quick
evaluation that leaves everything intact, the heartbeat probe, Preferences and the About box."""
import time


from studio.ui import settings


def open_and_wait(qtbot, window, source):
    job = window.open_model(str(source))
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.waitUntil(lambda: window.state.handle is not None, timeout=5000)


def compare_rows(window) -> dict[str, dict]:
    table = window.views["Compare"].table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    return {table.item(r, 0).text(): {h: table.item(r, c).text() for c, h in enumerate(headers)}
            for r in range(table.rowCount())}


def quantize(qtbot, window):
    view = window.views["Quantize"]
    view.windows.setValue(4)
    view.seqlen.setValue(32)
    with qtbot.waitSignal(window.state.resultsChanged, timeout=120000,
                          check_params_cb=lambda key: key == "variants"):
        window.run_action("quantize")
    return view


def test_a_new_variant_is_evaluated_and_appears_in_compare(qtbot, window, tiny_dirs):
    settings.put({"quick_eval_windows": 2, "quick_eval_seqlen": 32})
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    assert list(compare_rows(window)) == ["baseline"]        # the baseline before anything ran
    quantize(qtbot, window)
    name = next(iter(window.state.session.variants))
    # bool(): pytest-qt takes a callback's None for success (assertion style)
    qtbot.waitUntil(lambda: bool(compare_rows(window).get(name, {}).get("Perplexity")),
                    timeout=60000)
    rows = compare_rows(window)
    assert list(rows) == ["baseline", name]
    assert rows["baseline"]["Perplexity"] and rows[name]["KL"] and rows[name]["Ppl vs base"]
    assert rows[name]["Windows"] == "2"


def test_a_failed_quick_evaluation_keeps_the_variant_and_says_why(qtbot, window, tiny_dirs,
                                                                   monkeypatch):
    from studio.core.errors import StudioError
    from studio.ui import quick_eval

    def broken(*_args, **_kw):
        raise StudioError("the evaluation text is empty")
        yield  # a generator, as jobs are

    monkeypatch.setattr(quick_eval, "quick_eval_job", broken)
    open_and_wait(qtbot, window, tiny_dirs["llama"])
    quantize(qtbot, window)
    name = next(iter(window.state.session.variants))
    qtbot.waitUntil(lambda: "quick evaluation failed" in compare_rows(window).get(name, {})
                    .get("Note", ""), timeout=60000)
    from studio.ui.errors import get_reporter
    qtbot.waitUntil(lambda: any("the evaluation text is empty" in str(entry)
                                for entry in get_reporter().history), timeout=5000)
    assert "the evaluation text is empty" in compare_rows(window)[name]["Note"]
    assert name in window.state.session.variants and "baseline" in compare_rows(window)


def test_the_heartbeat_measures_a_synthetic_stall(qtbot):
    from studio.ui.heartbeat import Heartbeat

    beat = Heartbeat()
    beat.start()
    qtbot.wait(300)                        # an idle loop: ticks on time
    quiet = beat.summary()
    assert quiet["ticks"] > 5
    beat.reset()
    qtbot.wait(50)
    time.sleep(0.25)                       # the UI thread blocked for 250 ms
    qtbot.wait(100)
    stalled = beat.summary()
    beat.stop()
    assert 200 <= stalled["max_ms"] <= 1000, stalled
    assert quiet["p50_ms"] < 50            # most ticks on time, even on a busy machine


def test_preferences_round_trip_and_refuse_bad_values(qtbot, tmp_path):
    from studio.ui.preferences import PreferencesDialog

    dialog = PreferencesDialog()
    qtbot.addWidget(dialog)
    assert dialog.values()["quick_eval_windows"] == settings.DEFAULTS["quick_eval_windows"]
    text = tmp_path / "calib.txt"
    text.write_text("some text")
    dialog.threads.setValue(1)
    dialog.cache.setText(str(tmp_path / "cache"))
    dialog.calibration.setText(str(text))
    dialog.quick_windows.setValue(5)
    dialog.theme.setCurrentText("dark")
    dialog.accept()
    assert dialog.result() == dialog.DialogCode.Accepted
    assert settings.get("threads") == 1 and settings.get("quick_eval_windows") == 5
    assert settings.get("theme") == "dark" and settings.get("calibration_text") == str(text)
    assert settings.quick_eval() == (5, settings.DEFAULTS["quick_eval_seqlen"])
    again = PreferencesDialog()
    qtbot.addWidget(again)
    assert again.values() == dialog.values()                    # read back as stored

    again.calibration.setText(str(tmp_path / "missing.txt"))
    again.cache.setText(str(text))                              # a file, not a folder
    again.quick_windows.setValue(9)
    again.accept()
    assert again.result() != again.DialogCode.Accepted
    assert "not a file" in again.error.text() and "is a file" in again.error.text()
    assert settings.get("quick_eval_windows") == 5              # nothing saved


def test_about_names_versions_and_shortcuts_exist(qtbot, window):
    box = window._about()
    assert "torch" in box.text() and "transformers" in box.text()
    box.close()
    shortcuts = {a.shortcut().toString() for a in window.findChildren(type(window.back_action))}
    assert {"Alt+Left", "Alt+Right", "Ctrl+1", "Ctrl+9", "Ctrl+R", "Ctrl+L"} <= shortcuts
    window.tabs.setCurrentIndex(0)
    next(a for a in window.findChildren(type(window.back_action))
         if a.shortcut().toString() == "Ctrl+3").trigger()
    assert window.tabs.currentIndex() == 2
