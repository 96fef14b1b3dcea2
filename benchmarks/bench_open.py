"""Foundation figures: cold start to window shown, demo first open and cached open, peak RSS.

    python benchmarks/bench_open.py            # all of them
    python benchmarks/bench_open.py window     # start -> window shown only, 5 fresh processes

Each figure comes from a fresh process, so imports and caches are measured as a user meets them.
The first open de-quantizes the GGUF (`studio.core.gguf_fast` for the architectures it covers);
`--slow-path` times transformers' GGUF loader instead, for comparison. On a busy machine every
figure is slower: say so when you report them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

OPEN_AND_MEASURE = r"""
import json, resource, time
t = time.perf_counter()
from studio.core.jobs import run
from studio.core.models import open_model_job
handle = run(open_model_job("demo"))
print(json.dumps({"seconds": time.perf_counter() - t, "load_seconds": handle.load_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_open(cache: str, slow_path: bool = False) -> dict:
    env = {**os.environ, "COMPRESSION_STUDIO_CACHE": cache}
    if slow_path:
        env["STUDIO_GGUF_SLOW_PATH"] = "1"
    out = subprocess.run([sys.executable, "-c", OPEN_AND_MEASURE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_window(cache: str, png: str) -> str:
    env = {**os.environ, "COMPRESSION_STUDIO_CACHE": cache, "QT_QPA_PLATFORM": "offscreen",
           "COMPRESSION_STUDIO_CONFIG": tempfile.mkdtemp()}
    # `python -m studio` from this checkout (the console script may belong to another install)
    err = subprocess.run([sys.executable, "-m", "studio", "open", "demo", "--screenshot", png],
                         env=env, check=True, capture_output=True, text=True).stderr
    return next(line for line in err.splitlines() if line.startswith("window shown"))


def measure_start(config: str, png: str) -> tuple[float, float, float]:
    """(seconds from the process's start to the window's first expose, to the views built,
    whole run) for `compression-studio open --screenshot`: no model, the real start path."""
    import re
    import time

    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "COMPRESSION_STUDIO_CONFIG": config}
    t = time.perf_counter()
    err = subprocess.run([sys.executable, "-m", "studio", "open", "--screenshot", png], env=env,
                         check=True, capture_output=True, text=True).stderr
    total = time.perf_counter() - t
    shown = re.search(r"window shown [\d.]+ s after start \(([\d.]+) s after the process", err)
    ready = re.search(r"ready after ([\d.]+) s", err)
    since_app = re.search(r"window shown ([\d.]+) s after start", err)
    # "ready" counts from the app module's import, as "window shown ... after start" does
    offset = float(shown.group(1)) - float(since_app.group(1))
    return float(shown.group(1)), float(ready.group(1)) + offset, total


def main_window_only(repeat: int = 5) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as config:
        for _ in range(repeat):
            rows.append(measure_start(config, os.path.join(config, "window.png")))
    shown = sorted(r[0] for r in rows)
    ready = sorted(r[1] for r in rows)
    print(f"process start -> window shown (first expose): median {shown[len(shown) // 2]:.2f} s, "
          f"min {shown[0]:.2f}, max {shown[-1]:.2f} ({repeat} fresh processes)")
    print(f"process start -> views built (torch loaded):   median {ready[len(ready) // 2]:.2f} s")


def main() -> None:
    if sys.argv[1:2] == ["window"]:
        main_window_only()
        return
    slow_path = "--slow-path" in sys.argv
    with tempfile.TemporaryDirectory() as cache:
        first = measure_open(cache, slow_path)
        cached = measure_open(cache)
        window = measure_window(cache, os.path.join(cache, "window.png"))
    how = "transformers' loader" if slow_path else "direct de-quantization"
    print(f"demo first open ({how}, then cached):           {first['seconds']:.1f} s")
    print(f"demo cached open:                               {cached['seconds']:.1f} s "
          f"(of which opening {cached['load_seconds']:.1f} s)")
    print(f"peak RSS after opening the demo (cached):       {cached['peak_rss_mb']:.0f} MiB")
    print(f"peak RSS during the first open:                 {first['peak_rss_mb']:.0f} MiB")
    print(f"window (cached demo): {window}")


if __name__ == "__main__":
    main()
