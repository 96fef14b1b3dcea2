"""compression-studio analyze MODEL [--calib FILE] [--windows N] [--seqlen L] [--seed S] [--k K]
--out stats.json: weight statistics, activation capture, outlier channels, massive activations."""
from __future__ import annotations

import json
import math
from pathlib import Path

from studio.commands.common import (add_calibration_arguments, add_model_argument, open_model,
                                     print_json, run_with_progress)
from studio.core.activations import DEFAULT_SEQLEN, DEFAULT_WINDOWS, activation_capture_job
from studio.core.errors import StudioError
from studio.core.files import write_text_atomic
from studio.core.outliers import (DEFAULT_K, DEFAULT_MASSIVE_FACTOR, check_k, find_outliers,
                                  massive_activations, token_norm_profile)
from studio.core.stats import weight_stats_job

NAME = "analyze"
HELP = ("weight statistics, activation outlier channels and massive activations of a model, "
        "written to a JSON file")
FORMAT_VERSION = 1


def add_arguments(parser) -> None:
    add_model_argument(parser)
    add_calibration_arguments(parser, DEFAULT_WINDOWS, DEFAULT_SEQLEN)
    parser.add_argument("--k", type=float, default=DEFAULT_K,
                        help=f"outlier channel: abs-max > K x the median channel (default {DEFAULT_K:g})")
    parser.add_argument("--weights-only", action="store_true",
                        help="skip the activation capture (no text needed)")
    parser.add_argument("--channels", action="store_true",
                        help="also write per-channel weight and activation abs-max arrays")
    parser.add_argument("--out", required=True, metavar="FILE", help="the JSON file to write")
    parser.add_argument("--json", action="store_true", help="print a one-object summary")


def run(args) -> int:
    check_k(args.k)  # bad input fails before minutes of work, not after
    out = Path(args.out)
    if out.is_dir():
        raise StudioError(f"--out {out} is a folder; give a file name such as stats.json.")
    handle = open_model(args.model)
    weights = run_with_progress(weight_stats_job(handle))
    report = {"version": FORMAT_VERSION, "model": handle.source,
              "architecture": handle.architecture,
              "weights": weights.to_dict(channels=args.channels)}
    if not args.weights_only:
        capture = run_with_progress(activation_capture_job(
            handle, args.calib, windows=args.windows, seqlen=args.seqlen, seed=args.seed,
            bos=args.bos))
        report["activations"] = _activations(capture, args.k, args.channels)
    text = json.dumps(_clean(report), separators=(",", ":"), allow_nan=False)
    write_text_atomic(out, text)
    json.loads(out.read_text(encoding="utf-8"))  # re-open what was written to check it
    summary = _summary(report, out)
    if args.json:
        print_json(summary)
    else:
        _print_summary(summary)
    return 0


def _activations(capture, k: float, channels: bool) -> dict:
    inputs = []
    for stats in capture.inputs:
        entry = {"input": stats.label, "layers": stats.layers, "block": stats.block,
                 "tokens": stats.tokens, "absmax_max": float(stats.absmax.max()),
                 "histogram": {"edges": stats.hist_edges.tolist(),
                               "counts": stats.hist_counts.tolist()}}
        if channels:
            entry["absmax"] = stats.absmax.tolist()
            entry["mean_abs"] = stats.mean_abs.tolist()
        inputs.append(entry)
    profile = token_norm_profile(capture)
    return {"source": capture.source, "windows": capture.windows, "seqlen": capture.seqlen,
            "seed": capture.seed, "k": k, "inputs": inputs,
            "outliers": [group.to_dict() for group in find_outliers(capture, k)],
            "massive_factor": DEFAULT_MASSIVE_FACTOR,
            "massive": [m.to_dict() for m in massive_activations(capture)],
            "token_norms": {"streams": capture.stream_names, "max": profile["max"].tolist(),
                            "median": profile["median"].tolist()}}


def _summary(report: dict, out: Path) -> dict:
    layers = [row for row in report["weights"]["layers"] if row["quantizable"]]
    top = sorted(layers, key=lambda row: -(row["kurtosis"] or 0))[:5]
    summary = {"out": str(out), "layers": len(layers),
               "highest_kurtosis": [{"name": r["name"], "kurtosis": r["kurtosis"]} for r in top]}
    acts = report.get("activations")
    if acts is not None:
        with_outliers = [g for g in acts["outliers"] if g["channels"]]
        summary.update({
            "source": acts["source"], "windows": acts["windows"], "seqlen": acts["seqlen"],
            "k": acts["k"], "inputs": len(acts["outliers"]),
            "inputs_with_outliers": [{"input": g["input"], "channels": g["channels"]}
                                     for g in with_outliers],
            "massive": acts["massive"][:5]})
    return summary


def _print_summary(summary: dict) -> None:
    print(f"wrote {summary['out']}: {summary['layers']} quantizable layers")
    for row in summary["highest_kurtosis"]:
        print(f"  kurtosis {row['kurtosis']:8.2f}  {row['name']}")
    if "k" in summary:
        flagged = summary["inputs_with_outliers"]
        print(f"activations: {summary['windows']} x {summary['seqlen']} tokens of "
              f"{summary['source']}; {len(flagged)} of {summary['inputs']} layer inputs have "
              f"channels above {summary['k']:g} x their median channel")
        for row in flagged[:10]:
            print(f"  {row['input']}: channels {row['channels'][:10]}")
        for m in summary["massive"]:
            where = m["stream"] if m["stream"] == "embeddings" else f"the output of {m['stream']}"
            print(f"  massive activation {m['value']:.0f} ({m['ratio']:.0f}x the median token) at "
                  f"{where}: token {m['token']!r} at position {m['position']} of window "
                  f"{m['window']}, channel {m['channel']}")


def _clean(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value
