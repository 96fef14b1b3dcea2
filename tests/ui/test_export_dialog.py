"""The Export dialog: the layer check before any work, the export job, its verification."""
import json

import pytest
from PySide6.QtWidgets import QMessageBox

from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from studio.ui.export_dialog import ExportDialog


@pytest.fixture(scope="module")
def variant(tiny_llama):
    return run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, True, "rtn")), None, None,
                            "RTN W4 g32 sym"))


def _dialog(qtbot, state, handle, variant, fmt):
    state.set_model(handle)
    state.session.variants[variant.name] = variant
    dialog = ExportDialog(state, variant)
    qtbot.addWidget(dialog)
    dialog.format.setCurrentIndex(dialog.format.findData(fmt))
    qtbot.waitUntil(lambda: dialog.preflight is not None and dialog.export_button.isEnabled()
                    and not state.runner.active, timeout=60000)
    return dialog


@pytest.mark.parametrize("fmt", ["gguf", "compressed-tensors", "hf"])
def test_export_verifies_and_reports(qtbot, state, tiny_llama, variant, tmp_path, fmt):
    dialog = _dialog(qtbot, state, tiny_llama, variant, fmt)
    assert dialog.table.rowCount() == len(variant.qtensors)
    assert "quantized layers stored exactly" in dialog.summary.text()
    dialog.destination.setText(str(tmp_path / "out"))
    with qtbot.waitSignal(state.resultsChanged, timeout=120000,
                          check_params_cb=lambda key: key == "exports"):
        dialog.start_export()
    qtbot.waitUntil(lambda: dialog.job is None, timeout=10000)
    assert not state.failures
    assert dialog.result.verified and dialog.result.format == fmt
    assert "Exported and verified" in dialog.status.text()
    assert state.session.results["exports"][-1]["variant"] == variant.name
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verified"]


def test_the_shard_size_splits_the_files_and_a_bad_one_is_said(qtbot, state, tiny_llama,
                                                              variant, tmp_path):
    dialog = _dialog(qtbot, state, tiny_llama, variant, "compressed-tensors")
    dialog.shard_size.setText("5 parsecs")
    dialog.shard_size.editingFinished.emit()
    assert not dialog.export_button.isEnabled() and "shard size" in dialog.summary.text()
    dialog.shard_size.setText("30KB")
    dialog.shard_size.editingFinished.emit()
    qtbot.waitUntil(lambda: dialog.export_button.isEnabled() and not state.runner.active,
                    timeout=60000)
    dialog.destination.setText(str(tmp_path / "out"))
    with qtbot.waitSignal(state.resultsChanged, timeout=120000,
                          check_params_cb=lambda key: key == "exports"):
        dialog.start_export()
    qtbot.waitUntil(lambda: dialog.job is None, timeout=10000)
    assert dialog.result.verified and dialog.result.options["shard_size"] == "30KB"
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    dialog.format.setCurrentIndex(dialog.format.findData("gguf"))   # the same setting splits
    assert dialog.shard_size.isEnabled() and "gguf-split" in dialog.shard_size.toolTip()
    assert dialog.options().shard_size == 30_000


def test_an_existing_destination_is_replaced_only_when_the_user_agrees(
        qtbot, state, tiny_llama, variant, tmp_path, monkeypatch):
    dialog = _dialog(qtbot, state, tiny_llama, variant, "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    dialog.destination.setText(str(out))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    dialog.start_export()
    assert dialog.job is None and (out / "mine.txt").is_file()


def test_cancel_leaves_nothing_at_the_destination(qtbot, state, tiny_llama, variant, tmp_path):
    dialog = _dialog(qtbot, state, tiny_llama, variant, "hf")
    dialog.destination.setText(str(tmp_path / "out"))
    dialog.start_export()
    job = dialog.job
    job.cancel()
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.waitUntil(lambda: dialog.job is None, timeout=10000)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    assert "Cancelled" in dialog.status.text()


def test_the_window_opens_the_dialog_on_the_current_variant(qtbot, state, tiny_llama, variant):
    from studio.ui.main_window import MainWindow

    state.set_model(tiny_llama)
    window = MainWindow(state)
    qtbot.addWidget(window)
    assert window.export_variant() is None          # nothing quantized yet: a message instead
    assert "quantize" in window.statusBar().currentMessage()
    state.session.variants[variant.name] = variant
    dialog = window.export_variant()
    qtbot.addWidget(dialog)
    assert dialog.variant is variant and dialog.isVisible()
    qtbot.waitUntil(lambda: not state.runner.active, timeout=60000)


def test_the_quantize_tab_exports_the_selected_variant(qtbot, state, tiny_llama, variant):
    from studio.ui.views.quantize import QuantizeView

    state.set_model(tiny_llama)
    view = QuantizeView(state)
    qtbot.addWidget(view)
    assert not view.export_button.isEnabled()
    state.session.variants[variant.name] = variant
    state.publish("variants")
    view.variant_list.setCurrentRow(0)
    assert view.export_button.isEnabled()
    dialog = view.export_selected()
    qtbot.addWidget(dialog)
    assert dialog.variant is variant
    qtbot.waitUntil(lambda: not state.runner.active, timeout=60000)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf"])
def test_compare_adds_an_exported_model_as_a_run(qtbot, state, tiny_llama, variant, tmp_path,
                                                 fmt):
    from studio.core.export.base import ExportOptions
    from studio.core.export.job import export_job
    from studio.ui.views.compare import CompareView, merged_rows

    run(export_job(variant, tiny_llama, fmt, tmp_path / "out", ExportOptions(dtype="f32")))
    state.set_model(tiny_llama)
    state.session.runs.append({"variant": variant.name, "kind": "eval", "ppl": 1.0,
                               "seqlen": 64, "windows": 2, "text_path": None})
    view = CompareView(state)
    qtbot.addWidget(view)
    with qtbot.waitSignal(state.resultsChanged, timeout=60000,
                          check_params_cb=lambda key: key == "runs"):
        view.add_export(str(tmp_path / "out"))
    assert not state.failures
    row = merged_rows(state.session.runs)[-1]
    assert row["variant"] == f"out [{fmt}]"
    assert (row["windows"], row["seqlen"]) == (2, 64)     # the latest evaluation's protocol
    # f32 export of exact weights: the file measures as the variant does.
    from studio.core.evaluate import evaluate_job
    direct = run(evaluate_job(variant.model, tiny_llama.model, tiny_llama.tokenizer, None, 64, 2))
    assert row["ppl"] == pytest.approx(direct.ppl, rel=1e-4)
    assert view.table.rowCount() == 3          # the baseline row, the variant, the export
