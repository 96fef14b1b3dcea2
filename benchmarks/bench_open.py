"""Foundation figures: cold start to window shown, demo first open and cached open, peak RSS.

    python benchmarks/bench_open.py

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


def main() -> None:
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
