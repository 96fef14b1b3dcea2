"""The output head's method, measured on the demo (issue 18): perplexity with the lm_head at
W4 g128 by the plan's method against RTN on the same grid.

    OMP_NUM_THREADS=1 python benchmarks/bench_head.py [--rows awq,gptq-body] [--data ../shared/data]

Rows (WikiText-2 test, 40 x 512, the standard protocol; calibration 64 x 512, seed 0, from the
second half of the WikiText-2 test rows, as bench_quant's in-domain rows):
  awq        the demo untied (its tied matrix copied into its own lm_head, saved once to a
             temporary folder), blocks float: the head by AWQ (its scales folded into the final
             norm) against RTN; fp32 of the untied copy beside them
  gptq-body  the demo as it is (tied), every block GPTQ W4 g128: the tied head (with the
             embedding, one matrix) by GPTQ on the final hidden states against RTN
Perplexity does not depend on load; the quantize time printed beside it does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import DEFAULT_DATA, in_domain_text  # noqa: E402
from studio.core.evaluate import perplexity  # noqa: E402
from studio.core.jobs import run  # noqa: E402
from studio.core.models import open_model_job  # noqa: E402
from studio.core.plan import Plan, QuantSpec, Rule  # noqa: E402
from studio.core.quantize import quantize_job  # noqa: E402
from studio.core.text import bos_token, calibration_windows, eval_windows, tokenize  # noqa: E402

CALIB = "WikiText-2 test, 2nd half"


def windows(handle, data: Path):
    bos = bos_token(handle.tokenizer)
    text = (data / "wikitext2_test.txt").read_text("utf-8")
    return (eval_windows(tokenize(handle.tokenizer, text), 512, 40, bos),
            calibration_windows(tokenize(handle.tokenizer, in_domain_text(data)), 512, 64,
                                seed=0, bos=bos))


def untied_demo(folder: Path):
    demo = run(open_model_job("demo"))
    model = demo.model
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    demo.tokenizer.save_pretrained(folder)
    return run(open_model_job(str(folder)))


def measure(handle, plan: Plan, label: str, evaluation, calib) -> None:
    start = time.perf_counter()
    variant = run(quantize_job(handle, plan, calib, CALIB, label))
    seconds = time.perf_counter() - start
    head = next(e for e in variant.layer_errors if e["layer"] == "lm_head")
    print(json.dumps({"row": label, "ppl": perplexity(variant.model, evaluation)[0],
                      "head_method": head["method"], "head_note": head["note"],
                      "bits_per_weight": variant.bits_per_weight,
                      "quantize_seconds_under_load": round(seconds, 1)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="awq,gptq-body")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)
    head = lambda method: QuantSpec(4, 128, False, method)  # noqa: E731
    if "awq" in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-head-") as tmp:
            handle = untied_demo(Path(tmp))
            evaluation, calib = windows(handle, args.data)
            print(json.dumps({"row": "untied copy, fp32",
                              "ppl": perplexity(handle.model, evaluation)[0]}), flush=True)
            for method in ("awq", "rtn"):
                plan = Plan(None).with_rule(Rule("lm_head", head(method)))
                measure(handle, plan, f"untied head W4 g128 {method}, blocks float",
                        evaluation, calib)
            del handle
    if "gptq-body" in args.rows:
        handle = run(open_model_job("demo"))
        evaluation, calib = windows(handle, args.data)
        for method in ("gptq", "rtn"):
            plan = Plan(head("gptq"))
            for name in ("lm_head", "model.embed_tokens"):   # the tied pair: one matrix
                plan = plan.with_rule(Rule(name, head(method)))
            measure(handle, plan, f"GPTQ W4 g128 blocks, tied head W4 g128 {method}",
                    evaluation, calib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
