"""The window's views, one file each. The main window shows them as tabs, in this order.

Each entry is (tab title, "module:Class"); the class takes the AppState: `View(state)`.
"""
VIEWS: list[tuple[str, str]] = [
    # The user's path through the studio: see, judge, plan, quantize, measure, compare.
    ("Layers", "studio.ui.views.layers:LayersView"),
    ("Weights", "studio.ui.views.weights:WeightsView"),
    ("Activations", "studio.ui.views.activations:ActivationsView"),
    ("Sensitivity", "studio.ui.views.sensitivity:SensitivityView"),
    ("Plan", "studio.ui.views.plan_editor:PlanView"),
    ("Quantize", "studio.ui.views.quantize:QuantizeView"),
    ("Evaluate", "studio.ui.views.evaluate:EvaluateView"),
    ("Benchmark", "studio.ui.views.benchmark:BenchmarkView"),
    ("Compare", "studio.ui.views.compare:CompareView"),
]
