"""Runs: the rows of the Compare table, and the jobs that make them.

A run is a dict (JSON-friendly, kept in `Session.runs`) saying what was measured ("variant",
"plan", size...) and the figures of one evaluation ("kind": "eval") or benchmark ("bench").
The baseline is always a row; every other row carries its differences against it. The quick
evaluation a variant gets after quantization and "Run all" (evaluate + benchmark) are jobs
here, so the CLI (`compression-studio compare`) and the window give the same figures.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from studio.core import metrics
from studio.core.jobs import Job, Progress

BASELINE = "baseline"
QUICK_WINDOWS = 8          # the quick evaluation after a quantization (Preferences can change it)
QUICK_SEQLEN = 256
# (key, header, format) of the runs table and the CSV export, in order.
COLUMNS = [
    ("variant", "Variant", "{}"), ("plan", "Plan", "{}"), ("bits_per_weight", "Bits/weight", "{:.3f}"),
    ("size_mb", "Size (MB)", "{:.1f}"), ("size_ratio", "Size vs base", "{:.3f}x"),
    ("ppl", "Perplexity", "{:.3f}"), ("ppl_ratio", "Ppl vs base", "{:.4f}x"),
    ("kl", "KL", "{:.5f}"), ("top1", "Top-1", "{:.2%}"),
    ("prefill_ms", "Prefill (ms)", "{:.1f}"), ("decode_tok_s", "Tokens/s", "{:.1f}"),
    ("speed_ratio", "Speed vs base", "{:.2f}x"), ("peak_rss_mb", "Peak RSS (MB)", "{:.0f}"),
    ("quantized_mb", "of which quantized (MB)", "{:.1f}"),
    ("embedding_mb", "of which embedding/head (MB)", "{:.1f}"),
    ("float_mb", "of which other floats (MB)", "{:.2f}"),
    ("model_bits_per_weight", "Bits/weight, whole model", "{:.3f}"),
    ("kernels", "Kernels", "{}"), ("calibration", "Calibration", "{}"), ("text", "Eval text", "{}"),
    ("windows", "Windows", "{}"), ("note", "Note", "{}"),
]


# --- what a row says about its model -------------------------------------------------------

def describe_variant(variant) -> dict:
    """The columns that say what a variant is (for a run dict)."""
    labels = sorted({spec.label for spec in variant.specs.values()})
    plan = labels[0] if len(labels) == 1 else f"mixed: {', '.join(labels[:3])}" + (
        "..." if len(labels) > 3 else "")
    parts = variant.size_breakdown  # Size = quantized + embedding + other floats
    return {"variant": variant.name, "plan": plan,
            "bits_per_weight": round(variant.bits_per_weight, 4),
            "size_mb": variant.size_bytes / 2**20, "quantized_mb": parts["quantized"] / 2**20,
            "embedding_mb": parts["embedding"] / 2**20, "float_mb": parts["float"] / 2**20,
            "model_bits_per_weight": round(variant.model_bits_per_weight, 4),
            "calibration": variant.calibration or "none"}


def describe_baseline(handle) -> dict:
    """The baseline counted as variants are (`allocate.plan_size` of a plan quantizing
    nothing: matrices at 16 bits, vectors at 32, a tied matrix once)."""
    from studio.core.allocate import plan_size
    from studio.core.layers import embedding_summary
    from studio.core.plan import Plan

    embedding = embedding_summary(handle.layers, handle.param_count) or {}
    head = embedding.get("lm_head")
    params = embedding.get("params", 0) + (
        handle.layer(head).params if head and not embedding["lm_head_tied"] else 0)
    size = plan_size(handle, Plan(default=None)).size_bytes
    return {"variant": BASELINE, "plan": "full precision", "bits_per_weight": 16.0,
            "size_mb": size / 2**20, "quantized_mb": 0.0, "embedding_mb": 2 * params / 2**20,
            "float_mb": (size - 2 * params) / 2**20,
            "model_bits_per_weight": round(8 * size / handle.param_count, 4),
            "calibration": "none"}


def describe_gguf(path) -> dict:
    """The columns of a GGUF file run by llama.cpp (named as its benchmark and evaluation
    results are, so both land on one row)."""
    from studio.core.backends import gguf_label
    from studio.core.gguf_parts import total_bytes

    path = Path(path)
    return {"variant": gguf_label(path), "plan": "llama.cpp GGUF",
            "size_mb": total_bytes(path) / 2**20 if path.is_file() else None}


def eval_run(what: dict, result, text_path=None) -> dict:
    # text_path: so a later run (an exported file in Compare) can use the same text
    return {**what, "kind": "eval", **result.to_dict(), "text_path": text_path}


def bench_run(what: dict, result) -> dict:
    data = result.to_dict()
    kernels = ", ".join(f"{k} x{n}" for k, n in data["kernel_summary"].items())
    return {**what, "kind": "bench", "prefill_ms": result.prefill_ms,
            "decode_tok_s": result.decode_tok_s, "peak_rss_mb": result.peak_rss_mb,
            "threads": result.threads, "kernels": kernels, "backend": result.backend,
            "build": result.build, "fallbacks": len(result.fallbacks)}


# --- the table -----------------------------------------------------------------------------

def merged_rows(runs: list[dict]) -> list[dict]:
    """One row per variant (in first-seen order): each field's latest value wins."""
    rows: dict[str, dict] = {}
    for run in runs:
        rows.setdefault(run["variant"], {}).update(
            {k: v for k, v in run.items() if v is not None})
    return list(rows.values())


def compare_rows(runs: list[dict], handle=None) -> list[dict]:
    """The Compare table: the baseline first (always: described from `handle` when it has no
    run yet), then every variant with its ratios against the baseline."""
    rows = merged_rows(runs)
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    if base is None and handle is not None:
        base = describe_baseline(handle)
    rows = [r for r in rows if r["variant"] != BASELINE]
    if base is not None:
        rows.insert(0, dict(base))
    return [with_differences(row, base) for row in rows]


def with_differences(row: dict, base: dict | None) -> dict:
    """`row` plus size / perplexity / speed ratios to `base`. The perplexity ratio only when
    both were evaluated on the same windows (text, length, count, BOS): a quick 8-window figure
    over a 40-window baseline would be a false difference."""
    row = {k: v for k, v in row.items() if k not in ("size_ratio", "ppl_ratio", "speed_ratio")}
    if base is None:
        return row
    if row.get("size_mb") and base.get("size_mb"):
        row["size_ratio"] = row["size_mb"] / base["size_mb"]
    if row.get("ppl") and base.get("ppl"):
        if same_protocol(row, base):
            row["ppl_ratio"] = row["ppl"] / base["ppl"]
        elif row is not base:
            row["note"] = "perplexity on other windows than the baseline's: re-evaluate both"
    if row.get("decode_tok_s") and base.get("decode_tok_s"):
        row["speed_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
    return row


def same_protocol(a: dict, b: dict) -> bool:
    keys = ("text", "seqlen", "windows", "bos")
    return all(a.get("protocol", {}).get(k, a.get(k)) == b.get("protocol", {}).get(k, b.get(k))
               for k in keys)


def runs_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([key for key, _, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row[key] for key, _, _ in COLUMNS])
    return out.getvalue()


def pareto_front(xs: np.ndarray, ys: np.ndarray, x_better: str) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower y; lower or higher x)."""
    sign = 1.0 if x_better == "lower" else -1.0
    order = np.lexsort((ys, sign * xs))
    front, best = [], np.inf
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return np.array(front, dtype=int)


def layer_errors(variant, base_handle) -> tuple[list[str], np.ndarray, str]:
    """(layers, errors, what) per quantized layer: the method's output error where it was
    measured for every layer, else the weight's relative error against the baseline."""
    from studio.core.jobs import run

    return run(layer_errors_job(variant, base_handle))


def layer_errors_job(variant, base_handle) -> Job[tuple[list[str], np.ndarray, str]]:
    """`layer_errors` as a job: without recorded output errors, every layer is de-quantized
    (seconds on a real model), so the window runs it on a worker, one step per layer."""
    recorded = recorded_errors(variant)
    if recorded is not None:
        return recorded
    names = list(variant.qtensors)
    errors = []
    for i, name in enumerate(names):
        yield Progress(i, len(names), f"Per-layer errors of {variant.name}")
        errors.append(metrics.relative_error(base_handle.weight(name),
                                             variant.qtensors[name].dequantize()))
    return names, np.array(errors, np.float32), "weight relative error"


def recorded_errors(variant) -> tuple[list[str], np.ndarray, str] | None:
    """`layer_errors` when the method recorded every layer's output error (instant), else None."""
    names = list(variant.qtensors)
    recorded = {e["layer"]: e.get("error") for e in variant.layer_errors if "layer" in e}
    if names and all(recorded.get(n) is not None for n in names):
        return names, np.array([recorded[n] for n in names], np.float32), "output error"
    return None


def worst_layers(names: list[str], errors: np.ndarray, count: int = 10
                 ) -> list[tuple[str, float]]:
    """Where a variant lost most (`layer_errors`' names and errors): its `count` layers of
    largest error, largest first."""
    order = np.argsort(-errors)[:count]
    return [(names[i], float(errors[i])) for i in order]


def latest_protocol(runs: list[dict]) -> dict:
    """The text, window length and count of the latest evaluation (the defaults when none)."""
    from studio.core.evaluate import DEFAULT_SEQLEN, DEFAULT_WINDOWS

    for run in reversed(runs):
        if run.get("kind") == "eval":
            return {"text_path": run.get("text_path"), "seqlen": run["seqlen"],
                    "windows": run["windows"], "bos": run.get("bos_setting", "auto")}
    return {"text_path": None, "seqlen": DEFAULT_SEQLEN, "windows": DEFAULT_WINDOWS,
            "bos": "auto"}


# --- jobs ----------------------------------------------------------------------------------

def quick_eval_job(variant, handle, windows: int = QUICK_WINDOWS, seqlen: int = QUICK_SEQLEN,
                   text_path=None, bos: str = "auto") -> Job[list[dict]]:
    """The short quality pass a variant gets after quantization: it and the baseline on the
    same windows (the baseline's side from the baseline cache after the first time); returns
    their two eval runs."""
    from studio.core.evaluate import evaluate_many_job

    models = {BASELINE: handle.model, variant.name: variant.model}
    results = yield from evaluate_many_job(models, handle.model, handle.tokenizer, text_path,
                                           seqlen, windows, bos=bos)
    return [eval_run(describe_baseline(handle), results[BASELINE], text_path),
            eval_run(describe_variant(variant), results[variant.name], text_path)]


def run_all_job(variant, handle, windows: int = QUICK_WINDOWS, seqlen: int = QUICK_SEQLEN,
                text_path=None, bos: str = "auto", prompt_tokens: int = 64,
                new_tokens: int = 32, repeat: int = 1, threads: int | None = None
                ) -> Job[list[dict]]:
    """Evaluate and benchmark `variant` next to the baseline (fp32) in one job."""
    import torch

    from studio.core.bench import base_targets, bench_job, variant_bench_target

    runs = yield from quick_eval_job(variant, handle, windows, seqlen, text_path, bos)
    yield Progress(0, 1, f"Benchmarking {variant.name} and the baseline")
    targets = base_targets(handle.model, configs=("fp32",),
                           layer_names=[layer.name for layer in handle.quantizable])
    targets.append(variant_bench_target(variant))
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    results = yield from bench_job(targets, vocab, prompt_tokens, new_tokens, repeat,
                                   threads or torch.get_num_threads())
    for result, what in zip(results, (describe_baseline(handle), describe_variant(variant))):
        if not result.error:
            runs.append(bench_run(what, result))
    return runs


def export_run_job(folder: str, base_handle, text_path, seqlen: int, windows: int,
                   bos: str = "auto"):
    """A run dict for an export folder, measured by the core's `export_eval_job`."""
    from studio.core.export.reopen import export_eval_job

    result, report = yield from export_eval_job(folder, base_handle, text_path, seqlen, windows,
                                                bos)
    variant = report.get("variant") or {}
    name = Path(report["path"]).name
    return {"variant": f"{name} [{report['format']}]",
            "plan": f"export of {variant.get('name', name)}",
            "bits_per_weight": report["bits_per_weight_on_disk"],
            "size_mb": report["bytes"] / 2**20, "calibration": variant.get("calibration") or "none",
            "kind": "eval", **result.to_dict(), "text_path": text_path}
