"""An exception raised inside any job type reaches the user through the one error path
(JobHandle.failed -> AppState.jobFailed -> ErrorReporter) with its traceback; the window stays
usable and the next job runs.

The exception is thrown into the job's generator at its first step (as a bug there would
raise), by wrapping the worker's `run`: every job type the window starts is covered without
knowing its insides.
"""
import json
import shutil

import pytest


from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from studio.core.sensitivity import sensitivity_job
from studio.core.text import text_windows
from studio.core.variant import save_variant
from studio.ui import workers
from studio.ui.errors import get_reporter

INJECTED = "injected into the job"


def failing_run(job, on_progress=None, token=None):
    """Run `job` to its first step, then raise inside it."""
    try:
        first = next(job)
    except StopIteration:
        raise AssertionError("the job ended before its first step") from None
    if on_progress is not None:
        on_progress(first)
    job.throw(RuntimeError(f"{INJECTED} at {first.message!r}"))
    raise AssertionError("the job swallowed the exception")


def test_every_job_types_failure_reaches_the_user(qtbot, window, tiny_dirs, tmp_path,
                                                  monkeypatch):
    from studio.ui.export_dialog import ExportDialog

    state, views, reporter = window.state, window.views, get_reporter()
    job = window.open_model(str(tiny_dirs["llama"]))
    qtbot.waitUntil(lambda: job.is_done and state.handle is not None, timeout=60000)
    handle = state.handle
    # What the jobs need, made without the window: a variant (also saved), sensitivity
    # results and an allocation on them, an export folder's report.
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True, "rtn")), None, None, "v"))
    state.session.variants["v"] = variant
    state.publish("variants")
    saved = save_variant(variant, tmp_path / "saved")
    windows = text_windows(handle.tokenizer, None, 16, 4, seed=0)[0]
    state.publish("sensitivity", run(sensitivity_job(handle, windows, bits=(2, 4),
                                                     group_sizes=(32,), kl_bits=(4,),
                                                     kl_group=32, kl_windows=2)))
    plan = views["Plan"]
    plan.target.setValue(3.5)
    assert plan.auto_allocate() is not None, plan.message.text()
    qtbot.waitUntil(lambda: plan.job is None and plan.allocation is not None, timeout=60000)
    export_folder = tmp_path / "export"
    shutil.copytree(tiny_dirs["llama"], export_folder)  # an "hf" export is a model folder
    (export_folder / "report.json").write_text(json.dumps({"format": "hf", "file": ""}))
    assert not reporter.history

    monkeypatch.setattr(workers, "run", failing_run)
    weights, acts, sens = views["Weights"], views["Activations"], views["Sensitivity"]
    acts.windows.setValue(2)
    acts.seqlen.setValue(32)
    sens.widths.setText("2")
    sens.groups.setText("32")
    sens.kl_windows.setValue(0)
    sens.seqlen.setValue(16)
    quant = views["Quantize"]
    quant.windows.setValue(2)
    quant.seqlen.setValue(32)
    evaluate, bench = views["Evaluate"], views["Benchmark"]
    evaluate.set_checked(["baseline", "v"])
    evaluate.seqlen.setValue(32)
    evaluate.windows.setValue(2)
    bench.set_checked(["fp32", "variant:v"])
    dialogs = []

    def export_dialog():
        dialogs.append(ExportDialog(state, variant))
        qtbot.addWidget(dialogs[-1])

    def start_export():
        dialogs[-1].destination.setText(str(tmp_path / "out"))
        dialogs[-1].start_export(force=False)

    def select_variant():
        quant.variant_list.setCurrentRow(0)
        quant.save_selected(str(tmp_path / "resaved"))

    triggers = [
        ("Opening", lambda: window.open_model(str(tiny_dirs["qwen2"]))),
        ("Weight statistics", weights.start),
        ("Activation capture", acts.start),
        ("Sensitivity", sens.start),
        ("Auto-allocate", plan.auto_allocate),
        ("Measure plan points", plan.measure_points),
        ("Quantize", quant.run),
        ("Save v", select_variant),
        ("Open saved", lambda: quant.open_folder(str(saved))),
        ("Evaluate", evaluate.run_evaluation),
        ("Generate", evaluate.run_generations),
        ("Benchmark", bench.run_benchmark),
        ("Evaluate export", lambda: views["Compare"].add_export(str(export_folder))),
        ("Check the", export_dialog),
        ("Export v", start_export),
    ]
    for title, trigger in triggers:
        before = len(reporter.history)
        trigger()
        qtbot.waitUntil(lambda: len(reporter.history) > before and not state.runner.active,
                        timeout=30000)
        shown_title, message, details = reporter.history[-1]
        assert shown_title.startswith(title) and shown_title.endswith("failed"), shown_title
        assert message.startswith("RuntimeError: " + INJECTED), (title, message)
        assert "Traceback" in details and INJECTED in details, title
        assert len(reporter.history) == before + 1, reporter.history[before:]
        assert window.isVisible() and window.isEnabled()
    assert state.handle is handle  # the failed open left the model in place
    assert list(state.session.variants) == ["v"]

    # The window is usable: the next job runs and publishes its result.
    monkeypatch.setattr(workers, "run", run)
    state.session.results.pop("weight_stats", None)
    with qtbot.waitSignal(state.resultsChanged, timeout=60000,
                          check_params_cb=lambda key: key == "weight_stats"):
        weights.start()
    assert "weight_stats" in state.session.results
    assert len(reporter.history) == len(triggers)


def test_a_studio_error_escaping_a_ui_slot_is_shown_as_a_message(qtbot, window, monkeypatch):
    """A StudioError raised on the UI thread (e.g. a full disk while saving a recipe) is the
    user's to fix: shown without a bug report's traceback."""
    import sys
    import threading

    from studio.core.errors import StudioError

    reporter = get_reporter()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    reporter.install_hooks()
    try:
        raise StudioError("Could not write plan.json: No space left on device")
    except StudioError:
        sys.excepthook(*sys.exc_info())
    qtbot.waitUntil(lambda: bool(reporter.history), timeout=5000)
    title, message, details = reporter.history[-1]
    assert "No space left" in message and details == ""


def test_a_job_that_outlives_its_window_ends_quietly(qtbot, monkeypatch):
    """Closing the window mid-job deletes the job's handle; the worker's last reports then
    have nobody to reach and must not end its thread with a traceback."""
    import threading

    from shiboken6 import delete

    from studio.core.jobs import Progress

    entered, release, seen = threading.Event(), threading.Event(), []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def job():
        entered.set()
        release.wait(10)
        yield Progress(1, 1, "done")
        return 42

    handle = workers.JobHandle("outlives")
    worker = threading.Thread(target=workers._Runnable(handle, job).run)
    worker.start()
    entered.wait(10)   # past its `started` report: deleting the handle while the worker is
    delete(handle)     # inside emit() frees what emit() is using (a crash, not a test of this)
    release.set()
    worker.join(10)
    assert not worker.is_alive() and seen == []
    with pytest.raises(RuntimeError, match="deleted"):   # what the worker would have met
        handle.done.emit()
