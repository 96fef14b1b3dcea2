"""The demo's jobs on this checkout against an earlier one, side by side: issue 17's "the demo's
jobs no slower than before streaming by more than 10%", and its figures unchanged to the digit.

    python benchmarks/bench_demo_speed.py [BASE] [--repeat N] [--jobs open,stats,rtn,gptq,eval]

BASE: a checkout folder, or a git commit of this repository (extracted with `git archive` into
a temporary folder; nothing in the repository changes). Default: the commit streaming was
built on (the parent of the one that added `studio/core/streaming.py`).

Every job runs in a fresh process of its own, the two checkouts alternated job by job, so a
machine that gets busier weighs on both alike; each side has its own GGUF cache, filled by one
untimed open first (a first open is not what is compared: the cache format may differ). The
open is a cached open with the imports done, until the tokenizer is parsed (newer code defers
that parse to the first job); each other job is timed alone after it. RTN and GPTQ are timed
with their error figures (as `quantize --method` runs them) and then evaluated: their
perplexities can differ from BASE's for reasons other than streaming (e.g. since issue 18
GPTQ learns the lm_head), the evaluation of the model itself must not. Medians
and the ratio this / base are printed, with every job's quality figure from both sides
(perplexity, RTN/GPTQ bits per weight and perplexity), which must be equal. Times are only
meaningful on a quiet machine; say so when you report them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DATA = HERE.parent / "shared" / "data"
JOBS = ("open", "stats", "rtn", "gptq", "eval")
LIMIT = 1.10   # the bound: no slower by more than 10%

# One job in a fresh process; prints one JSON line. Written against the API both sides share
# (open_model_job, weight_stats_job, quantize_text_job, evaluate_job).
CHILD = r"""
import json, sys, time
job, data, calib, evals = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
import torch
torch.set_num_threads(int(sys.argv[5]))
import studio
from studio.core.jobs import run
from studio.core.models import open_model_job
import transformers.models.llama.modeling_llama  # (the model's module: an import, not the job)
t = time.perf_counter()
handle = run(open_model_job("demo"))
handle.tokenizer   # (newer code defers its parse to the first job that needs it: counted here)
record = {"code": studio.__file__, "open": time.perf_counter() - t}
windows, seqlen = (int(x) for x in (calib if job in ("rtn", "gptq") else evals).split("x"))
t = time.perf_counter()
if job == "stats":
    from studio.core.stats import weight_stats_job
    run(weight_stats_job(handle))
elif job in ("rtn", "gptq"):
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_text_job
    from studio.core.evaluate import evaluate_job
    variant = run(quantize_text_job(handle, Plan(QuantSpec(4, 128, False, job)),
                                    data + "/tinyshakespeare.txt", windows, seqlen, 0, job))
    record["seconds"] = time.perf_counter() - t
    record["bits_per_weight"] = variant.bits_per_weight
    ew, el = (int(x) for x in evals.split("x"))
    record["quality"] = run(evaluate_job(variant.model, None, handle.tokenizer,
                                         data + "/wikitext2_test.txt", el, ew)).ppl
elif job == "eval":
    from studio.core.evaluate import evaluate_job
    record["quality"] = run(evaluate_job(handle.model, None, handle.tokenizer,
                                         data + "/wikitext2_test.txt", seqlen, windows)).ppl
record.setdefault("seconds", record["open"] if job == "open" else time.perf_counter() - t)
print(json.dumps(record))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", help="a checkout folder or a git commit (default: "
                                                "the commit before streaming)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each job on each side")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"of {', '.join(JOBS)}")
    parser.add_argument("--calib", default="16x512", help="RTN / GPTQ calibration, WINDOWSxLEN")
    parser.add_argument("--eval", default="4x512", help="evaluation windows, WINDOWSxLEN")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each job")
    args = parser.parse_args()
    jobs = [job for job in args.jobs.split(",") if job]
    if unknown := set(jobs) - set(JOBS):
        parser.error(f"unknown jobs: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="bench-demo-speed-") as scratch:
        scratch = Path(scratch)
        sides = {"base": checkout(args.base, scratch), "this": HERE}
        caches = {name: scratch / f"cache-{name}" for name in sides}
        for name, code in sides.items():   # untimed: each side's GGUF cache
            child(code, caches[name], "open", args)
        rows: dict[str, dict[str, list[dict]]] = {job: {"base": [], "this": []} for job in jobs}
        for run_index in range(args.repeat):
            for job in jobs:
                for name, code in sides.items():
                    record = child(code, caches[name], job, args)
                    rows[job][name].append(record)
                    print(f"run {run_index + 1}/{args.repeat} {job:5} {name}: "
                          f"{record['seconds']:.2f} s", file=sys.stderr)
        report(rows, sides, args)


def checkout(base: str | None, scratch: Path) -> Path:
    """The BASE code as a folder: itself, or a commit extracted with `git archive`."""
    if base and Path(base).is_dir():
        return Path(base).resolve()
    commit = base or pre_streaming_commit()
    folder = scratch / "base"
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    print(f"base: commit {commit} in {folder}", file=sys.stderr)
    return folder


def pre_streaming_commit() -> str:
    """The parent of the commit that added studio/core/streaming.py."""
    added = subprocess.run(["git", "-C", str(HERE), "log", "--diff-filter=A", "--format=%H",
                            "--", "studio/core/streaming.py"], check=True, capture_output=True,
                           text=True).stdout.split()
    return added[-1] + "^"


def child(code: Path, cache: Path, job: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "COMPRESSION_STUDIO_CACHE": str(cache),
           "OMP_NUM_THREADS": str(args.threads), "COMPRESSION_STUDIO_CONFIG": str(cache / "cfg")}
    env.pop("COMPRESSION_STUDIO_WEIGHTS", None)   # each side's default
    done = subprocess.run([sys.executable, "-c", CHILD, job, str(DATA), args.calib, args.eval,
                           str(args.threads)], env=env, cwd=code, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"{job} failed on {code}:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    if not record["code"].startswith(str(code)):   # the other side's install answered
        sys.exit(f"{job} on {code} imported studio from {record['code']}")
    return record


def report(rows: dict, sides: dict, args) -> None:
    def median(values):
        return sorted(values)[len(values) // 2]

    print(f"base: {sides['base']}\nthis: {sides['this']}\n{args.repeat} runs of each job on "
          f"each side, alternated, {args.threads} thread(s); calibration {args.calib}, "
          f"evaluation {args.eval}; medians")
    print(f"{'job':8} {'base s':>9} {'this s':>9} {'this/base':>9}  {'<= 1.10':7}  quality "
          f"(base / this)")
    for job, sides_rows in rows.items():
        base = median([r["seconds"] for r in sides_rows["base"]])
        this = median([r["seconds"] for r in sides_rows["this"]])
        ratio = this / base if base else float("nan")
        quality = ""
        if "quality" in sides_rows["this"][0]:
            qb, qt = sides_rows["base"][0]["quality"], sides_rows["this"][0]["quality"]
            quality = f"ppl {qb!r} / {qt!r} {'same' if qb == qt else 'DIFFERENT'}"
        if "bits_per_weight" in sides_rows["this"][0]:
            bb, bt = (sides_rows[s][0]["bits_per_weight"] for s in ("base", "this"))
            quality += f"; bpw {bb:.4f} / {bt:.4f}"
        print(f"{job:8} {base:9.2f} {this:9.2f} {ratio:9.3f}  "
              f"{'yes' if ratio <= LIMIT else 'NO':7}  {quality}")


if __name__ == "__main__":
    main()
