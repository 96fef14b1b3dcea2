"""Side-by-side CPU speed of the demo model: fp32, bf16, int8 and int4 weight-only, 1 and 2 threads.

    python benchmarks/bench_speed.py [--model demo] [--threads 1,2] [--repeat 3] [--new-tokens 64]

For every configuration: prefill latency of 128 tokens (ms), decode tokens/s for 64 new tokens
at batch 1 with the KV cache (median, min-max over --repeat runs after a warm-up), and how far
decode is from the memory-bandwidth limit: a decode step must read every weight once, so
tokens/s can be at most bandwidth / weight bytes per token. The bandwidth is measured here with
a large tensor copy (bytes read + bytes written per second), at each thread count.

Figures depend on what else runs on the machine: run it on a quiet machine and say so if not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core.bench import base_targets, bench_job  # noqa: E402
from studio.core.jobs import run  # noqa: E402
from studio.core.models import open_model_job  # noqa: E402

COPY_BYTES = 512 * 2**20


def copy_bandwidth(threads: int, repeat: int = 5) -> float:
    """GB/s of a large tensor copy (read + write) with `threads` threads: the best of `repeat`."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch the pages first
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return 2 * COPY_BYTES / best / 1e9
    finally:
        torch.set_num_threads(old)


def targets_for(handle):
    names = [layer.name for layer in handle.quantizable]
    model = handle.model
    targets = base_targets(model, ("fp32", "bf16", "int8"), layer_names=names)
    targets += base_targets(model, ("int4",), group_size=32, lm_head=False, layer_names=names)
    for group in (32, 64, 128):
        targets += base_targets(model, ("int4",), group_size=group, layer_names=names)
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    handle = run(open_model_job(args.model))
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    print(f"{handle.name}; torch {torch.__version__}; prefill {args.prompt_tokens} tokens, "
          f"decode {args.new_tokens} tokens at batch 1; median (min-max) of {args.repeat} runs")
    for threads in (int(t) for t in args.threads.split(",")):
        bandwidth = copy_bandwidth(threads)
        results = run(bench_job(targets_for(handle), vocab, args.prompt_tokens, args.new_tokens,
                                args.repeat, threads))
        fp32 = next(r for r in results if r.name == "fp32")
        print(f"\n{threads} thread(s); copy bandwidth {bandwidth:.1f} GB/s")
        print(f"{'configuration':<22}{'prefill ms':>22}{'decode tok/s':>22}{'x fp32':>8}"
              f"{'MB/token':>10}{'limit tok/s':>13}{'% of limit':>12}  kernels")
        for r in results:
            limit = bandwidth * 1e9 / (r.weights_read_mb * 2**20)
            kernels = ", ".join(f"{k} x{n}" for k, n in r.to_dict()["kernel_summary"].items())
            print(f"{r.name:<22}"
                  f"{f'{r.prefill_ms:.0f} ({r.prefill_ms_range[0]:.0f}-{r.prefill_ms_range[1]:.0f})':>22}"
                  f"{f'{r.decode_tok_s:.1f} ({r.decode_tok_s_range[0]:.1f}-{r.decode_tok_s_range[1]:.1f})':>22}"
                  f"{r.decode_tok_s / fp32.decode_tok_s:>8.2f}{r.weights_read_mb:>10.1f}"
                  f"{limit:>13.0f}{100 * r.decode_tok_s / limit:>11.0f}%  {kernels}")
            notes = sorted({k.note for k in r.kernels if k.note})
            for note in notes:
                print(f"{'':<22}note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
