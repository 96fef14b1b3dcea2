"""Time and peak memory of GPTQ over the whole demo model, in a fresh process (issue 4's
targets: within 60 s on the 2-core machine; peak memory no more than twice the fp32 model).

    python benchmarks/bench_gptq_cost.py [--data ../shared/data] [--bits 4] [--runs 1] [--floor]

Calibration: 64 windows x 512 tokens, seed 0, from the second half of the WikiText-2 test rows
(bench_quant.py's in-domain source). Memory is the process's RSS sampled every 10 ms:
  runtime  before the model is opened (Python, torch, transformers and its Llama code loaded)
  open     the baseline open and every weight touched, the calibration windows made
  peak     the highest RSS while the job runs
  x model  (peak - runtime) / fp32 model bytes: the baseline itself counts as 1
Run it alone: the time is wall time, and this machine's speed varies from run to run.

`--floor` first times what any GPTQ of this model on these tokens must compute at least: one
pass of the float32 blocks over the calibration set with hooks adding every distinct linear
input to its Hessian (no column loops, nothing quantized, nothing kept beyond one block's
inputs). True-sequential GPTQ does this much and more: its pass runs quantized blocks, and
parts of a block run again when Replay cannot keep their activations.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (library code: part of runtime)

from studio.core import quantize
from studio.core.jobs import run
from studio.core.layers import is_linear
from studio.core.memory import release_freed_memory
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quant.blocks import capture_block_inputs, decoder_blocks, run_block
from studio.core.quant.gptq import HessianAccumulator
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
    parser.add_argument("--floor", action="store_true",
                        help="first time one float pass of the blocks with the Hessians")
    parser.add_argument("--replay-share", type=float, default=quantize.REPLAY_SHARE,
                        help="activations kept for replay, as a share of the fp32 model "
                             "(trades memory for time)")
    args = parser.parse_args(argv)
    quantize.REPLAY_SHARE = args.replay_share

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
    print(f"GPTQ W{args.bits} g128 over {handle.name}, 64 x 512 calibration tokens, replay share "
          f"{args.replay_share:g}; fp32 model "
          f"{model / MIB:.0f} MiB; runtime {runtime / MIB:.0f} MiB; open {opened / MIB:.0f} MiB")
    if args.floor:
        forward, hessians = floor_seconds(handle.model, windows)
        print(f"floor: one float pass of the blocks {forward:.1f} s, of which Hessians "
              f"{hessians:.1f} s", flush=True)
    spec = QuantSpec(args.bits, 128, False, "gptq")
    for index in range(args.runs):
        with PeakRSS(every=0.01) as memory:
            start, cpu = time.perf_counter(), time.process_time()
            variant = run(quantize_job(handle, Plan(spec), windows, "WikiText-2 2nd half", "v"))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        held = process.memory_info().rss
        print(f"run {index + 1}: {seconds:.1f} s (CPU {cpu:.0f} s); peak {memory.peak / MIB:.0f} MiB = "
              f"{(memory.peak - runtime) / model:.2f} x model; after the job {held / MIB:.0f} MiB "
              f"= {(held - runtime) / model:.2f} x model ({len(variant.qtensors)} layers)",
              flush=True)
        del variant
        release_freed_memory()
    return 0


def floor_seconds(model, windows) -> tuple[float, float]:
    """(seconds of one pass of the float blocks with Hessian hooks, seconds in the hooks).

    Its own hooks rather than `quantize.gather_hessians`: that one runs a block without
    keeping its outputs, and this pass carries them to the next block as GPTQ does."""
    start = time.perf_counter()
    inputs = capture_block_inputs(model, windows)
    in_hooks = 0.0
    for block in decoder_blocks(model)[1]:
        sums: dict[int, HessianAccumulator] = {}
        seen: list[torch.Tensor] = []       # inputs already added in this batch (held, so
                                            # that no later tensor takes an id seen here)

        def add(module, args):
            nonlocal in_hooks
            x = args[0]
            if any(t is x for t in seen):   # q/k/v (gate/up) read one input: one Hessian
                return
            seen.append(x)
            begin = time.perf_counter()
            sums.setdefault(id(module), HessianAccumulator(x.shape[-1])).add(x)
            in_hooks += time.perf_counter() - begin

        hooks = [block.register_forward_pre_hook(lambda m, a: seen.clear())]
        hooks += [m.register_forward_pre_hook(add) for m in block.modules() if is_linear(m)]
        try:
            run_block(block, inputs, quantize.BATCH, out=inputs.hidden)
        finally:
            for hook in hooks:
                hook.remove()
        for acc in sums.values():
            acc.hessian()
    return time.perf_counter() - start, in_hooks


if __name__ == "__main__":
    raise SystemExit(main())
