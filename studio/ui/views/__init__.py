"""The window's views, one file each. The main window shows them as tabs, in this order.

Each entry is (tab title, "module:Class"); the class takes the AppState: `View(state)`.
"""
VIEWS: list[tuple[str, str]] = [
    ("Layers", "studio.ui.views.layers:LayersView"),
    ("Evaluate", "studio.ui.views.evaluate:EvaluateView"),
    ("Compare", "studio.ui.views.compare:CompareView"),
    ("Benchmark", "studio.ui.views.benchmark:BenchmarkView"),
]
