"""The Quantize panel runs a job, plots each layer's error live, and manages variants."""
import numpy as np

from studio.ui.views.quantize import QuantizeView


def _view(qtbot, state, handle):
    state.set_model(handle)
    view = QuantizeView(state)
    qtbot.addWidget(view)
    view.windows.setValue(8)
    view.seqlen.setValue(64)
    return view


def test_run_plots_errors_and_publishes_a_variant(qtbot, state, tiny_llama, tmp_path):
    view = _view(qtbot, state, tiny_llama)
    view.method.setCurrentIndex(view.method.findData("gptq"))
    view.bits.setValue(3)
    view.group.setCurrentIndex(view.group.findData(32))
    seen = []
    with qtbot.waitSignal(state.resultsChanged, timeout=120000,
                          check_params_cb=lambda key: key == "variants"):
        view.run()
        view.job.progress.connect(seen.append)
    qtbot.waitUntil(lambda: view.job is None, timeout=10000)
    assert not state.failures
    name = "GPTQ W3 g32, lm_head W8 ch sym"   # the lm_head setting's default
    assert list(state.session.variants) == [name]
    variant = state.session.variants[name]
    assert variant.shared == {"model.embed_tokens": "lm_head"}   # tied: one matrix
    assert any("block 0" in p.message for p in seen)
    # The plot holds one point per layer for the method and for RTN, as recorded.
    x, y = view.curve.getData()
    _, y_rtn = view.rtn_curve.getData()
    errors = [e["error"] for e in variant.layer_errors if e["error"] is not None]
    # every block layer, and the lm_head: under GPTQ it learns from the final hidden states
    assert len(x) == len(tiny_llama.quantizable) + 1
    assert [e["layer"] for e in variant.layer_errors if e["error"] is not None][-1] == "lm_head"
    np.testing.assert_allclose(10.0 ** y, errors, rtol=1e-4)   # a log axis holds log10
    assert np.all(y < y_rtn)
    assert view.variant_list.count() == 1 and "3." in view.variant_info.text()

    # Save, delete, open again.
    with qtbot.waitSignal(state.runner.jobDone, timeout=30000):
        view.save_selected(str(tmp_path / "v"))
    assert (tmp_path / "v" / "variant.json").is_file()
    view.delete_selected()
    assert not state.session.variants and view.variant_list.count() == 0
    with qtbot.waitSignal(state.resultsChanged, timeout=30000,
                          check_params_cb=lambda key: key == "variants"):
        view.open_folder(str(tmp_path / "v"))
    assert list(state.session.variants) == [name]


def test_cancel_keeps_everything_unchanged(qtbot, state, tiny_llama):
    import torch

    view = _view(qtbot, state, tiny_llama)
    view.method.setCurrentIndex(view.method.findData("gptq"))
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    view.run()
    job = view.job
    job.progress.connect(lambda p: job.cancel())   # cancel at the first progress report
    with qtbot.waitSignal(job.cancelled, timeout=60000):
        pass
    qtbot.waitUntil(lambda: view.job is None, timeout=10000)
    assert "Cancelled" in view.status.text()
    assert not state.session.variants
    assert all(torch.equal(v, tiny_llama.model.state_dict()[k]) for k, v in before.items())
    assert view.run_button.isEnabled()


def test_smoothquant_defaults_to_w8_per_channel(qtbot, state, tiny_llama):
    view = _view(qtbot, state, tiny_llama)
    view.method.setCurrentIndex(view.method.findData("smoothquant"))
    spec = view.spec()
    assert (spec.bits, spec.group_size, spec.symmetric) == (8, -1, True)
    assert set(spec.options) == {"alpha", "act_bits"}


def test_awq_says_how_many_calibration_windows_it_reads(qtbot, state, tiny_llama):
    from studio.core.quant.awq import windows_used

    view = _view(qtbot, state, tiny_llama)
    view.windows.setValue(200)                      # more than AWQ reads at 64 tokens
    view.method.setCurrentIndex(view.method.findData("awq"))
    with qtbot.waitSignal(state.runner.jobDone, timeout=120000):
        view.run()
        view.job.cancel()
    assert f"AWQ reads the first {windows_used(64)} of these windows" in view.plot_title.text()


def test_fp16_scales_say_which_gguf_type_the_grid_is(qtbot, state, tiny_llama):
    view = _view(qtbot, state, tiny_llama)
    assert view.spec().scale_dtype == "fp32" and not view.scales_note.isVisibleTo(view)
    view.fp16_scales.setChecked(True)
    assert view.spec().scale_dtype == "fp16" and view.scales_note.isVisibleTo(view)
    assert "at 4, 5 or 8 bits, group 32, symmetric" in view.scales_note.text()  # W4 g128
    view.group.setCurrentIndex(view.group.findData(32))
    view.symmetric.setChecked(True)
    view.bits.setValue(5)
    assert "GGUF Q5_0 (5.5 bits/weight)" in view.scales_note.text()
    assert view.spec().label == "RTN W5 g32 sym f16s"
    # a GGUF-native body takes its lm_head onto a GGUF type too (Q8_0), or leaves it as stored
    assert view.plan().spec_for("lm_head").grid_label == "W8 g32 sym f16s"
    view.lm_head.setCurrentIndex(view.lm_head.findData("keep"))
    assert not view.plan().rules
