"""Time and peak memory of GPTQ over the whole demo model, in a fresh process (issue 4's
targets: within 60 s on the 2-core machine; peak memory no more than twice the fp32 model).

    python benchmarks/bench_gptq_cost.py [--data ../shared/data] [--bits 4] [--runs 1]

Calibration: 64 windows x 512 tokens, seed 0, from the second half of the WikiText-2 test rows
(bench_quant.py's in-domain source). Memory is the process's RSS sampled every 10 ms:
  runtime  before the model is opened (Python, torch, transformers and its Llama code loaded)
  open     the baseline open and every weight touched, the calibration windows made
  peak     the highest RSS while the job runs
  x model  (peak - runtime) / fp32 model bytes: the baseline itself counts as 1
Run it alone: the time is wall time, and this machine's speed varies from run to run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
import transformers.models.llama.modeling_llama  # noqa: F401  (library code: part of runtime)

from studio.core.jobs import run
from studio.core.memory import release_freed_memory
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from studio.core.text import calibration_windows, tokenize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import DEFAULT_DATA, PeakRSS, in_domain_text  # noqa: E402

MIB = 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)

    process = psutil.Process()
    runtime = process.memory_info().rss
    handle = run(open_model_job("demo"))
    for tensor in handle.model.parameters():
        tensor.sum()                        # the mmapped weights resident, as after any use
    windows = calibration_windows(tokenize(handle.tokenizer, in_domain_text(args.data)), 512, 64,
                                  seed=0)
    release_freed_memory()
    opened = process.memory_info().rss
    model = 4 * handle.param_count
    print(f"GPTQ W{args.bits} g128 over {handle.name}, 64 x 512 calibration tokens; fp32 model "
          f"{model / MIB:.0f} MiB; runtime {runtime / MIB:.0f} MiB; open {opened / MIB:.0f} MiB")
    spec = QuantSpec(args.bits, 128, False, "gptq")
    for index in range(args.runs):
        with PeakRSS(every=0.01) as memory:
            start = time.perf_counter()
            variant = run(quantize_job(handle, Plan(spec), windows, "WikiText-2 2nd half", "v"))
            seconds = time.perf_counter() - start
        held = process.memory_info().rss
        print(f"run {index + 1}: {seconds:.1f} s; peak {memory.peak / MIB:.0f} MiB = "
              f"{(memory.peak - runtime) / model:.2f} x model; after the job {held / MIB:.0f} MiB "
              f"= {(held - runtime) / model:.2f} x model ({len(variant.qtensors)} layers)",
              flush=True)
        del variant
        release_freed_memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
