"""Mixed precision on the demo model: does the auto plan beat uniform widths at the same size?

    python benchmarks/bench_allocation.py [--method rtn] [--sensitivity /tmp/sens.json]

1. Sensitivity sweep with the studio's defaults: the proxy over all layers x every option
   (widths 2,3,4,5,6,8 at group sizes 32,64,128), the KL sweep over all layers at W4 g128 only
   on 8 windows of 32 tokens, each timed; every other option's KL is predicted from the proxy
   (KL ~ c_l x proxy, c_l measured at W4 g128). The sweep reads windows sampled from the second
   half of WikiText-2 (the evaluation reads the first ~20k tokens), so the allocation never
   sees the text it is scored on.
2. Uniform W4 g128 vs the auto plan at the same bytes (scales and zeros counted);
   uniform W3 g128 vs the auto plan at 3.5 bits per weight. Same method (RTN by default) for
   every plan; each auto plan's option mix is printed.
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
from studio.core.sensitivity import (  # noqa: E402
    DEFAULT_BITS,
    DEFAULT_GROUPS,
    DEFAULT_KL_BITS,
    DEFAULT_KL_GROUP,
    SensitivityResult,
    kl_columns,
    option_label,
    sensitivity_job,
    sweep_options,
)
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
    options = sweep_options(DEFAULT_BITS, DEFAULT_GROUPS)
    kl_specs = [options[j] for j in kl_columns(options, DEFAULT_KL_BITS, DEFAULT_KL_GROUP)]
    saved = Path(args.sensitivity) if args.sensitivity else None
    sens = None
    if saved and saved.is_file():
        sens = SensitivityResult.load(saved)
        sens.check_model(handle)
        if (any(sens.column(o) is None for o in options)
                or any(sens.column(o) not in sens.kl_options for o in kl_specs)):
            print(f"{saved} does not cover the default options: measuring again")
            sens = None
        else:
            sens = sens.subset(options)
            print(f"sweep: read from {saved}, measured earlier:")
    if sens is None:
        sens = run(sensitivity_job(handle, sweep_windows, method=args.method, kl_windows=8,
                                   text_label="WikiText-2 second half"), progress())
        print("sweep, measured now:")
        if saved:
            sens.save(saved)
    measured = ", ".join(sens.labels[j] for j in sens.kl_options)
    print(f"  proxy: {len(sens.layers)} layers x {len(sens.options)} options "
          f"({', '.join(sens.labels)}) in {sens.proxy_seconds:.1f} s")
    print(f"  KL: {len(sens.layers)} layers x {len(sens.kl_options)} option(s) ({measured}) x "
          f"{sens.kl_windows} windows of {sens.seqlen} tokens in {sens.kl_seconds:.1f} s "
          f"(baseline ppl on those windows {sens.base_ppl:.2f})")

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
            key = "fp16" if spec is None else option_label(spec)
            mix[key] = mix.get(key, 0) + 1
        order = sens.labels + ["fp16"]
        counts = ", ".join(f"{mix[k]} x {k}" for k in order if k in mix)
        print(f"{label}: {counts}; solver {'exact' if answer.exact else f'gap {answer.gap:.3g}'}")
    print(f"\nauto vs uniform W4 at equal bytes: ppl {auto4_ppl:.3f} vs {w4_ppl:.3f}")
    print(f"auto 3.5 bpw vs uniform W3: ppl {auto35_ppl:.3f} vs {w3_ppl:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
