"""A method added by a plug-in (entry-point metadata) appears in the Quantize tab with the
options form its declaration describes, and runs from there; the plan editor lists it."""
from studio.ui.views.quantize import QuantizeView
from tests.quantizer_plugin import installed_plugin


def test_a_plugin_method_runs_from_the_quantize_tab(qtbot, state, tiny_llama, tmp_path):
    from PySide6.QtWidgets import QDoubleSpinBox

    with installed_plugin(tmp_path / "site"):
        state.set_model(tiny_llama)
        view = QuantizeView(state)
        qtbot.addWidget(view)
        view.windows.setValue(8)
        view.seqlen.setValue(64)
        index = view.method.findData("levels")
        assert index >= 0 and view.method.itemText(index) == "Even levels (test plug-in)"
        view.method.setCurrentIndex(index)
        margin = view.option_widgets["margin"]
        assert isinstance(margin, QDoubleSpinBox)
        assert (margin.minimum(), margin.maximum(), margin.value()) == (0.0, 0.5, 0.0)
        assert "shrink the range" in margin.toolTip()
        margin.setValue(0.75)                       # clamped to the declared range
        assert margin.value() == 0.5
        view.bits.setValue(3)
        with qtbot.waitSignal(state.resultsChanged, timeout=120000,
                              check_params_cb=lambda key: key == "variants"):
            view.run()
        qtbot.waitUntil(lambda: view.job is None, timeout=10000)
        assert not state.failures
        (variant,) = state.session.variants.values()
        spec = next(iter(variant.specs.values()))
        assert (spec.method, spec.bits, spec.option("margin")) == ("levels", 3, 0.5)
        assert type(next(iter(variant.qtensors.values()))).__name__ == "CodebookTensor"

        # Bits outside the method's declared widths cannot be chosen.
        view.method.setCurrentIndex(view.method.findData("pairs"))
        assert (view.bits.minimum(), view.bits.maximum()) == (2, 3)


def test_a_plugin_method_in_the_plan_editor(qtbot, state, tiny_llama, tmp_path):
    from studio.ui.views.plan_editor import PlanView, parse_rule

    with installed_plugin(tmp_path / "site"):
        state.set_model(tiny_llama)
        editor = PlanView(state)
        qtbot.addWidget(editor)
        assert editor.method.findData("levels") >= 0
        rule = parse_rule(r".*down_proj -> 3 ch levels", None)
        assert rule.spec.method == "levels" and rule.spec.bits == 3
