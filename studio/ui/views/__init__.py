"""The window's views, one file each. The main window shows them as tabs, in this order.

Each entry is (tab title, "module:Class"); the class takes the AppState: `View(state)`.
"""
VIEWS: list[tuple[str, str]] = [
    ("Layers", "studio.ui.views.layers:LayersView"),
    ("Weights", "studio.ui.views.weights:WeightsView"),
    ("Activations", "studio.ui.views.activations:ActivationsView"),
    ("Quantize", "studio.ui.views.quantize:QuantizeView"),
    ("Evaluate", "studio.ui.views.evaluate:EvaluateView"),
    ("Compare", "studio.ui.views.compare:CompareView"),
    ("Benchmark", "studio.ui.views.benchmark:BenchmarkView"),
    ("Sensitivity", "studio.ui.views.sensitivity:SensitivityView"),
    ("Plan", "studio.ui.views.plan_editor:PlanView"),
]
