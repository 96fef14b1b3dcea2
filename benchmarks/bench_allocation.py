"""Mixed precision on the demo model: does the auto plan beat uniform widths at the same size?

    python benchmarks/bench_allocation.py [--method rtn] [--sensitivity /tmp/sens.json]

1. Sensitivity sweep (RTN, group 128): the proxy over all layers x 4 widths (2,3,4,8), timed;
   the KL sweep over all layers x 3 widths (3,4,8) on 8 windows of 32 tokens, timed. The sweep
   reads windows sampled from the second half of WikiText-2 (the evaluation reads the first
   ~20k tokens), so the allocation never sees the text it is scored on.
2. Uniform W4 g128 vs the auto plan at the same bytes (scales and zeros counted);
   uniform W3 g128 vs the auto plan at 3.5 bits per weight. Same method for every plan.
3. WikiText-2 perplexity, standard protocol, seqlen 512, 40 windows.

Every figure printed is measured in this run (or read from the saved sweep, which says so).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.core.allocate import allocate, loss_table, plan_size, predicted_loss  # noqa: E402
from studio.core.evaluate import perplexity  # noqa: E402
from studio.core.jobs import run  # noqa: E402
from studio.core.models import open_model_job  # noqa: E402
from studio.core.plan import Plan, QuantSpec  # noqa: E402
from studio.core.quantize import quantize_job  # noqa: E402
from studio.core.sensitivity import SensitivityResult, sensitivity_job  # noqa: E402
from studio.core.text import calibration_windows, eval_windows, tokenize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"
GROUP = 128


def progress(every: float = 0.05):
    """A Progress callback printing to stderr each time another `every` of the work is done."""
    start, last = time.perf_counter(), [-1.0]

    def show(p) -> None:
        if p.fraction - last[0] >= every or p.fraction >= 1.0 and last[0] < 1.0:
            last[0] = p.fraction
            print(f"  [{100 * p.fraction:5.1f}% {time.perf_counter() - start:7.1f} s] {p.message}",
                  file=sys.stderr, flush=True)
    return show


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="rtn", help="method of every plan (rtn, gptq, ...)")
    parser.add_argument("--sensitivity", help="re-use / save the KL sweep here")
    parser.add_argument("--seqlen", type=int, default=32, help="KL sweep window length")
    parser.add_argument("--eval-windows", type=int, default=40)
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"WikiText-2 not found at {DATA}")
        return 1
    handle = run(open_model_job("demo"))
    text = DATA.read_text(encoding="utf-8")
    rows = text.split("\n\n")
    calib_ids = tokenize(handle.tokenizer, "\n\n".join(rows[len(rows) // 2:]))
    eval_ids = tokenize(handle.tokenizer, text)
    test = eval_windows(eval_ids, 512, args.eval_windows)
    print(f"demo: {len(handle.quantizable)} quantizable layers; evaluation WikiText-2 "
          f"{test.shape[0]} x {test.shape[1]} tokens; {torch.get_num_threads()} torch threads")

    sweep_windows = calibration_windows(calib_ids, args.seqlen, 8, seed=0)
    start = time.perf_counter()
    proxy = run(sensitivity_job(handle, sweep_windows, bits=(2, 3, 4, 8), group_size=GROUP,
                                kl_windows=0, text_label="WikiText-2 second half"))
    print(f"proxy sweep: {len(proxy.layers)} layers x 4 widths in "
          f"{time.perf_counter() - start:.1f} s (job-reported {proxy.proxy_seconds:.1f} s)")

    saved = Path(args.sensitivity) if args.sensitivity else None
    if saved and saved.is_file():
        sens = SensitivityResult.load(saved)
        sens.check_model(handle)
        print(f"KL sweep: read from {saved} (measured {sens.kl_seconds:.1f} s for "
              f"{len(sens.layers)} layers x {len(sens.bits)} widths x {sens.kl_windows} windows "
              f"of {sens.seqlen} tokens)")
    else:
        sens = run(sensitivity_job(handle, sweep_windows, bits=(3, 4, 8), group_size=GROUP,
                                   method=args.method, kl_windows=8,
                                   text_label="WikiText-2 second half"), progress())
        print(f"KL sweep: {len(sens.layers)} layers x {len(sens.bits)} widths x "
              f"{sens.kl_windows} windows of {sens.seqlen} tokens in {sens.kl_seconds:.1f} s "
              f"(baseline ppl on those windows {sens.base_ppl:.2f})")
        if saved:
            sens.save(saved)

    table = loss_table(sens, handle, kind="kl", method=args.method)
    base_ppl, tokens = perplexity(handle.model, test)
    print(f"\nbaseline fp32: WikiText-2 ppl {base_ppl:.3f} ({tokens} tokens)")
    print(f"{'plan':<28} {'bpw':>6} {'MB':>8} {'pred. KL':>9} {'ppl':>8}")
    rows_out = []

    def measure(label: str, plan: Plan) -> float:
        size = plan_size(handle, plan)
        predicted, why = predicted_loss(sens, plan, "kl")
        variant = run(quantize_job(handle, plan, None, None, label))
        assert variant.size_bytes == size.size_bytes, "meter and variant disagree"
        ppl, _ = perplexity(variant.model, test)
        print(f"{label:<28} {size.bits_per_weight:6.3f} {size.size_mb:8.2f} "
              f"{predicted if predicted is not None else float('nan'):9.4f} {ppl:8.3f}",
              flush=True)
        rows_out.append((label, size, ppl))
        del variant
        return ppl

    w4 = Plan(default=QuantSpec(bits=4, group_size=GROUP, method=args.method),
              architecture=handle.architecture)
    w4_ppl = measure(f"uniform W4 g{GROUP} {args.method}", w4)
    auto4 = allocate(table, budget_mb=plan_size(handle, w4).size_bytes / 2 ** 20)
    auto4_ppl = measure("auto @ W4 bytes", auto4.plan)
    w3 = Plan(default=QuantSpec(bits=3, group_size=GROUP, method=args.method),
              architecture=handle.architecture)
    w3_ppl = measure(f"uniform W3 g{GROUP} {args.method}", w3)
    auto35 = allocate(table, budget_bpw=3.5)
    auto35_ppl = measure("auto @ 3.5 bpw", auto35.plan)

    for label, answer in (("auto @ W4 bytes", auto4), ("auto @ 3.5 bpw", auto35)):
        mix: dict[str, int] = {}
        for spec in answer.choices.values():
            key = "fp16" if spec is None else f"W{spec.bits}"
            mix[key] = mix.get(key, 0) + 1
        print(f"{label}: {mix}; solver {'exact' if answer.exact else f'gap {answer.gap:.3g}'}")
    print(f"\nauto vs uniform W4 at equal bytes: ppl {auto4_ppl:.3f} vs {w4_ppl:.3f}")
    print(f"auto 3.5 bpw vs uniform W3: ppl {auto35_ppl:.3f} vs {w3_ppl:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
