"""Quality and time of each quantization method on the demo model (issue 4's table).

Perplexity: WikiText-2 test, standard protocol (consecutive windows, stride = seqlen) at
seqlen 512 over the first 40 windows. Calibration, 64 windows x 512 tokens, seed 0, from
  in-domain:     the second half of the WikiText-2 test rows (disjoint from those 40 windows)
  out-of-domain: tinyshakespeare
Methods: RTN, GPTQ, AWQ at W4 g128 and W3 g128 (asymmetric), SmoothQuant W8A8 (per-channel
symmetric weights, per-token activations) next to the same W8A8 without smoothing. RTN uses no
calibration, so it is run once.

    python benchmarks/bench_quant.py [--data ../shared/data] [--calib-windows 64]
        [--methods rtn,gptq,awq,smoothquant] [--bits 4,3] [--sources wikitext,shakespeare]
        [--runs METHOD:BITS:GROUP[:KEY=VALUE...],...]

--runs replaces the methods x bits grid with the listed runs, any registered method (plug-ins
included), e.g. issue 14's codebook rows at equal bits per weight:
    --runs rtn:4:64,nf4:4:64,kmeans:4:-1:rows=2,gptq:4:64
(k-means per channel with one table per 2 rows: 4.19 bpw on the demo, tables counted, under
RTN / GPTQ W4 g64's 4.3125; `rows=1`, a table per row, is 4.375)
(GROUP -1 = per-channel; asymmetric grids, as the rest of the table); the Hessian methods':
    --runs seqmse:4:128,rtn:4:-1,seqmse:4:-1,gptvq:3:128:table_bpw=0.125,gptq:2:64,gptvq:2:128:table_bpw=0.25
(the bpw column counts GPTVQ's fp16 tables, as `Variant.bits_per_weight` does).

Prints one row per run as it finishes (and a JSON line per row with --json); the time column
is the quantization job's wall time on this machine (say in the note if other work shared it).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil

from studio.core.evaluate import perplexity
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from studio.core.text import bos_label, bos_token, calibration_windows, eval_windows, tokenize

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def in_domain_text(data: Path) -> str:
    """The second half of the WikiText-2 test rows: the 40 evaluation windows read only the
    first ~20k tokens, so this half never overlaps them."""
    rows = (data / "wikitext2_test.txt").read_text(encoding="utf-8").split("\n\n")
    return "\n\n".join(rows[len(rows) // 2:])


class PeakRSS:
    """The process's peak resident memory while a `with` block runs (sampled every `every` s)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every

    def __enter__(self):
        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--methods", default="rtn,gptq,awq,smoothquant")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--sources", default="wikitext,shakespeare")
    parser.add_argument("--runs", help="METHOD:BITS:GROUP[:KEY=VALUE...],... (see above)")
    parser.add_argument("--skip-fp32", action="store_true",
                        help="leave out the FP32 row (runs split over several processes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    handle = run(open_model_job(args.model))
    wiki_ids = tokenize(handle.tokenizer, (args.data / "wikitext2_test.txt").read_text("utf-8"))
    bos = bos_token(handle.tokenizer)  # windows start with BOS when the model asks (text.py)
    evaluation = eval_windows(wiki_ids, args.seqlen, args.eval_windows, bos)
    sources = {
        "wikitext": ("WikiText-2 test, 2nd half", in_domain_text(args.data)),
        "shakespeare": ("tinyshakespeare", (args.data / "tinyshakespeare.txt").read_text("utf-8")),
    }
    calib = {key: (label, calibration_windows(tokenize(handle.tokenizer, text), args.seqlen,
                                              args.calib_windows, seed=0, bos=bos))
             for key, (label, text) in sources.items() if key in args.sources.split(",")}
    print(f"model {handle.name}; perplexity on WikiText-2 test, {evaluation.shape[0]} windows x "
          f"{args.seqlen} tokens; calibration {args.calib_windows} x {args.seqlen} tokens, seed 0; "
          f"BOS per window: {bos_label(handle.tokenizer, bos) or 'none'}",
          flush=True)
    model_mib = handle.size_bytes / 2 ** 20
    print(f"fp32 model {model_mib:.0f} MiB; peak = the process's peak RSS during the job, "
          f"+ = its rise over the RSS with the baseline open", flush=True)
    print(f"{'method':<22} {'calibration':<26} {'ppl':>8} {'quant s':>8} {'bpw':>6} "
          f"{'peak MiB':>9} {'+ MiB':>6}", flush=True)

    def report(method: str, calibration: str, ppl: float, seconds: float | None, bpw: float,
               memory: PeakRSS | None = None):
        secs = "" if seconds is None else f"{seconds:8.1f}"
        peak = rise = ""
        if memory is not None:
            peak, rise = f"{memory.peak / 2**20:9.0f}", f"{(memory.peak - memory.before) / 2**20:6.0f}"
        print(f"{method:<22} {calibration:<26} {ppl:8.3f} {secs:>8} {bpw:6.3f} {peak:>9} "
              f"{rise:>6}", flush=True)
        if args.json:
            print(json.dumps({"method": method, "calibration": calibration, "ppl": ppl,
                              "seconds": seconds, "bits_per_weight": bpw,
                              "peak_rss_mib": memory and memory.peak / 2**20,
                              "rss_rise_mib": memory and (memory.peak - memory.before) / 2**20}),
                  flush=True)

    if not args.skip_fp32:
        report("FP32", "-", perplexity(handle.model, evaluation)[0], None, 32.0)
    methods = [] if args.runs else args.methods.split(",")
    specs = [QuantSpec(int(b), 128, False, m) for m in methods if m != "smoothquant"
             for b in args.bits.split(",")]
    if "smoothquant" in methods:
        specs.append(QuantSpec(8, -1, True, "smoothquant"))
    specs += [run_spec(item) for item in (args.runs.split(",") if args.runs else [])]
    for spec in specs:
        runs = [(None, None)] if not spec.quantizer.needs_text else list(calib.values())
        for label, windows in runs:
            with PeakRSS() as memory:
                start = time.perf_counter()
                variant = run(quantize_job(handle, Plan(spec), windows, label, spec.label))
                seconds = time.perf_counter() - start
            name = spec.label + (" A8" if variant.act_bits else "") + "".join(
                f" {k}={v}" for k, v in spec.options.items())
            report(name, label or "none", perplexity(variant.model, evaluation)[0], seconds,
                   variant.bits_per_weight, memory)
            del variant
    if "smoothquant" in methods:
        # The row SmoothQuant is judged against: the same W8A8 (per-channel symmetric weights,
        # per-token activations) without moving any range from activations into weights.
        from studio.core.quant.smoothquant import install_act_quant

        spec = QuantSpec(8, -1, True, "rtn")
        variant = run(quantize_job(handle, Plan(spec), None, None, "naive W8A8"))
        install_act_quant(variant.model, {name: 8 for name in variant.qtensors})
        report("RTN W8 ch sym A8 (naive)", "none", perplexity(variant.model, evaluation)[0],
               variant.seconds, variant.bits_per_weight)
    return 0


def run_spec(item: str) -> QuantSpec:
    """"kmeans:4:-1:feedback=false" -> QuantSpec(4, -1, method="kmeans", options=...)."""
    from studio.commands.quantize import parse_options

    method, bits, group, *options = item.split(":")
    return QuantSpec(int(bits), int(group), False, method, parse_options(options))


if __name__ == "__main__":
    sys.exit(main())
