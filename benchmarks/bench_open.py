"""Foundation figures: cold start to window shown, demo first open and cached open, peak RSS.

    python benchmarks/bench_open.py            # all of them
    python benchmarks/bench_open.py window     # start -> window shown only, 5 fresh processes
    python benchmarks/bench_open.py compare BASE_CHECKOUT [N]   # before/after, alternated

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
import importlib, json, resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "warm":   # what the window imports on threads before the user opens a model
    from studio.ui.app import PRELOAD, PRELOAD_BEHIND
    for name in PRELOAD + PRELOAD_BEHIND:
        importlib.import_module(name)
imported = time.perf_counter() - t
from studio.core.jobs import run
from studio.core.models import open_model_job
t_open = time.perf_counter()
handle = run(open_model_job("demo"))
opened = time.perf_counter() - t_open
t_tok = time.perf_counter()
handle.tokenizer   # deferred by newer code to the first job that needs it
print(json.dumps({"seconds": time.perf_counter() - t - (time.perf_counter() - t_tok),
                  "imports": imported, "open": opened,
                  "tokenizer": time.perf_counter() - t_tok, "load_seconds": handle.load_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_open(cache: str, slow_path: bool = False, warm: bool = False,
                 code: str | None = None) -> dict:
    """One open of the demo in a fresh process. `warm`: the window's imports done first (the
    window does them on threads while the user looks at it), so `open` is what a user waits
    for after asking. `code`: the checkout to run (PYTHONPATH), for before/after runs."""
    env = {**os.environ, "COMPRESSION_STUDIO_CACHE": cache}
    if code:
        env["PYTHONPATH"] = code
    if slow_path:
        env["STUDIO_GGUF_SLOW_PATH"] = "1"
    # (run from the checkout: `python -c` puts the working folder first on the path)
    out = subprocess.run([sys.executable, "-c", OPEN_AND_MEASURE, "warm" if warm else "cold"],
                         env=env, check=True, capture_output=True, text=True,
                         cwd=code or None).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(base: str, repeat: int) -> None:
    """This checkout against `base`, alternated in fresh processes and fresh caches, so that a
    busy machine weighs on both alike; medians and their ratios."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    for _ in range(repeat):
        for name, code in (("base", base), ("this", here)):
            with tempfile.TemporaryDirectory() as cache:
                first = measure_open(cache, warm=True, code=code)
                cold = measure_open(cache, code=code)
                cached = measure_open(cache, warm=True, code=code)
            for key, value in (("first open (imports done)", first["open"]),
                               ("first open, peak RSS (MiB)", first["peak_rss_mb"]),
                               ("cached open, fresh process", cold["seconds"]),
                               ("cached open (imports done)", cached["open"]),
                               ("then the tokenizer (first job)", cached["tokenizer"]),
                               ("cached open, peak RSS (MiB)", cached["peak_rss_mb"])):
                rows[name].setdefault(key, []).append(value)

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    print(f"{'':44} {'base':>8} {'this':>8} {'this/base':>9}   ({repeat} runs each, medians)")
    for key in rows["this"]:
        b, t = median(rows["base"][key]), median(rows["this"][key])
        print(f"{key:44} {b:8.2f} {t:8.2f} {t / b if b else float('nan'):9.2f}")


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
    if sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
        return
    slow_path = "--slow-path" in sys.argv
    with tempfile.TemporaryDirectory() as cache:
        first = measure_open(cache, slow_path)
        cached = measure_open(cache)
        warm = measure_open(cache, warm=True)
        window = measure_window(cache, os.path.join(cache, "window.png"))
    how = "transformers' loader" if slow_path else "direct de-quantization"
    print(f"demo first open ({how}, then cached):           {first['seconds']:.1f} s "
          f"(imports {first['imports'] + first['seconds'] - first['open']:.1f} s, "
          f"open {first['open']:.1f} s)")
    print(f"demo cached open, fresh process:                {cached['seconds']:.1f} s "
          f"(of which opening {cached['open']:.1f} s)")
    print(f"demo cached open, imports done (as the window): {warm['open']:.1f} s; the "
          f"tokenizer, at the first job that needs it: {warm['tokenizer']:.1f} s")
    print(f"peak RSS after opening the demo (cached):       {cached['peak_rss_mb']:.0f} MiB")
    print(f"peak RSS during the first open:                 {first['peak_rss_mb']:.0f} MiB")
    print(f"window (cached demo): {window}")


if __name__ == "__main__":
    main()
