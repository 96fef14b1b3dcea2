"""The comparison view renders runs, plots and exports them."""
import csv
import json

import pytest

from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.q4_native import unavailable
from studio.core.quantize import quantize_job


@pytest.fixture
def state_with_runs(qtbot, tiny_llama):
    from studio.ui.state import AppState
    from studio.ui.views.compare import add_runs, describe_baseline, describe_variant

    state = AppState()
    state.set_model(tiny_llama)
    variant = run(quantize_job(tiny_llama, Plan(default=QuantSpec(bits=3, group_size=32)),
                               None, None, "rtn-w3"))
    state.session.variants[variant.name] = variant
    add_runs(state, [
        {**describe_baseline(tiny_llama), "kind": "eval", "ppl": 300.0, "kl": 0.0, "top1": 1.0},
        {**describe_variant(variant), "kind": "eval", "ppl": 340.5, "kl": 0.12, "top1": 0.8},
        {**describe_baseline(tiny_llama), "kind": "bench", "prefill_ms": 5.0,
         "decode_tok_s": 200.0, "peak_rss_mb": 500.0, "kernels": "fp32 dense x14"},
        {**describe_variant(variant), "kind": "bench", "prefill_ms": 4.0,
         "decode_tok_s": 260.0, "peak_rss_mb": 480.0, "kernels": "int4pack g32 x14"},
    ])
    yield state, variant
    state.runner.wait()
    state.details.wait()


def test_compare_view_renders_two_runs(qtbot, state_with_runs, tmp_path):
    from studio.ui.views.compare import CompareView, compare_rows, merged_rows

    state, variant = state_with_runs
    view = CompareView(state)
    qtbot.addWidget(view)
    view.resize(1400, 900)
    view.show()
    layer = next(iter(variant.qtensors))
    state.select_layer(layer)   # the before / after plots follow the current layer
    assert view.table.rowCount() == 2
    headers = [view.table.horizontalHeaderItem(c).text() for c in range(view.table.columnCount())]
    cells = {view.table.item(r, 0).text(): {h: view.table.item(r, c).text()
                                            for c, h in enumerate(headers)}
             for r in range(2)}
    assert cells["rtn-w3"]["Perplexity"] == "340.500"
    assert cells["rtn-w3"]["Tokens/s"] == "260.0"
    assert cells["baseline"]["Top-1"] == "100.00%"
    parts = variant.size_breakdown
    assert cells["rtn-w3"]["of which embedding/head (MB)"] == \
        f"{parts['embedding'] / 2**20:.1f}" == cells["baseline"]["of which embedding/head (MB)"]
    assert cells["rtn-w3"]["of which quantized (MB)"] == f"{parts['quantized'] / 2**20:.1f}"
    # Bars, scatters, the histogram of one quantized layer (read on the details worker) and the
    # per-layer errors are drawn.
    qtbot.waitUntil(lambda: len(view.histogram.getPlotItem().listDataItems()) == 2, timeout=20000)
    qtbot.waitUntil(lambda: len(view.errors.getPlotItem().listDataItems()) == 2, timeout=20000)
    for plot in (view.ppl_bars, view.speed_bars, view.size_scatter, view.speed_scatter,
                 view.histogram, view.errors):
        assert plot.getPlotItem().listDataItems() or plot.getPlotItem().items, plot
    assert view.hist_variant.currentText() == "rtn-w3"
    assert len(view.histogram.getPlotItem().listDataItems()) == 2   # baseline and variant
    assert len(view.errors.getPlotItem().listDataItems()) == 2      # the line and its points
    # Ratios against the baseline, from the same (merged) runs.
    assert cells["rtn-w3"]["Ppl vs base"] == f"{340.5 / 300.0:.4f}x"
    assert cells["rtn-w3"]["Speed vs base"] == f"{260.0 / 200.0:.2f}x"

    view.export_runs(tmp_path / "runs.csv")
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [r["variant"] for r in rows] == ["baseline", "rtn-w3"]
    assert float(rows[1]["decode_tok_s"]) == 260.0
    view.export_runs(tmp_path / "runs.json")
    data = json.loads((tmp_path / "runs.json").read_text())
    assert len(data["runs"]) == 4
    assert data["rows"] == compare_rows(state.session.runs, state.handle)
    assert [r["variant"] for r in data["rows"]] == [r["variant"] for r in merged_rows(state.session.runs)]
    view.export_charts(tmp_path / "charts.png")
    assert (tmp_path / "charts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    view.clear_runs()
    assert view.table.rowCount() == 1                      # the baseline is always a row
    assert view.table.item(0, 0).text() == "baseline"


def test_per_layer_errors_without_recorded_ones_are_computed_off_the_ui_thread(
        qtbot, state_with_runs, monkeypatch):
    """A variant whose method recorded no output errors is de-quantized layer by layer to
    rank its layers: on the details worker, drawn when the figures arrive."""
    import threading

    from studio.core import runs
    from studio.ui.views.compare import CompareView

    state, variant = state_with_runs
    variant.layer_errors = []            # as a method that records none leaves it
    threads = []
    real = runs.metrics.relative_error
    monkeypatch.setattr(runs.metrics, "relative_error", lambda *a: (
        threads.append(threading.current_thread()), real(*a))[1])
    view = CompareView(state)
    qtbot.addWidget(view)
    view.refresh()          # hidden: the charts wait until the tab is shown
    assert not view.errors.getPlotItem().listDataItems() and not threads
    view.show()
    qtbot.waitUntil(lambda: len(view.errors.getPlotItem().listDataItems()) == 2, timeout=20000)
    assert len(threads) == len(variant.qtensors)
    assert threading.main_thread() not in threads
    assert view.errors.getPlotItem().getAxis("left").labelText == "weight relative error"
    view.refresh()                       # cached: not computed again
    assert len(threads) == len(variant.qtensors)


def test_pareto_front():
    import numpy as np

    from studio.ui.views.compare import pareto_front

    size = np.array([10.0, 20.0, 15.0, 30.0])
    ppl = np.array([12.0, 10.0, 13.0, 9.0])
    assert sorted(pareto_front(size, ppl, "lower").tolist()) == [0, 1, 3]


def test_evaluate_and_benchmark_views_feed_the_comparison(qtbot, tiny_llama):
    from studio.ui.state import AppState
    from studio.ui.views.benchmark import BenchmarkView
    from studio.ui.views.compare import CompareView
    from studio.ui.views.evaluate import EvaluateView

    state = AppState()
    failures = []
    state.jobFailed.connect(lambda *args: failures.append(args))
    state.set_model(tiny_llama)
    variant = run(quantize_job(tiny_llama, Plan(default=QuantSpec(bits=4, group_size=32)),
                               None, None, "w4"))
    state.session.variants["w4"] = variant
    state.publish("variants")
    evaluate, bench, compare = EvaluateView(state), BenchmarkView(state), CompareView(state)
    for view in (evaluate, bench, compare):
        qtbot.addWidget(view)

    evaluate.set_checked(["baseline", "w4"])
    evaluate.seqlen.setValue(32)
    evaluate.windows.setValue(2)
    evaluate.bos.setCurrentIndex(evaluate.bos.findData("yes"))  # this tokenizer adds none
    with qtbot.waitSignal(evaluate.run_evaluation().done, timeout=60_000):
        pass
    from studio.ui.views.compare import latest_protocol
    assert evaluate.results["w4"].bos == "<s>" and "each starting with BOS <s>" in \
        evaluate.summary.text()
    assert latest_protocol(state.session.runs)["bos"] == "yes"  # an export added later matches
    evaluate.new_tokens.setValue(4)
    with qtbot.waitSignal(evaluate.run_generations().done, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: evaluate.generations_layout.count() == 2)
    assert "background-color:" in evaluate.tokens.toHtml()

    bench.set_checked(["fp32", "variant:w4"])
    bench.prompt_tokens.setValue(8)
    bench.new_tokens.setValue(3)
    bench.repeat.setValue(1)
    with qtbot.waitSignal(bench.run_benchmark().done, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: bench.table.rowCount() == 2)
    assert f"{'int4pack' if unavailable() else 'q4native'} g32" in bench.table.item(1, 7).text()
    assert bench.kernels.rowCount() > 0
    state.runner.wait()
    assert not failures

    qtbot.waitUntil(lambda: compare.table.rowCount() == 2)
    row = {compare.table.horizontalHeaderItem(c).text(): compare.table.item(1, c).text()
           for c in range(compare.table.columnCount())}
    assert row["Variant"] == "w4" and row["Perplexity"] and row["Tokens/s"] and row["KL"]
