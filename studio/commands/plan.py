"""compression-studio plan MODEL (--budget-bpw X | --budget-mb M) [--method M] [--bits 2,3,4,8]
[--group-size G] [--calib FILE] [--windows N] [--seqlen L] [--proxy-only] --out plan.json [--json]
[--llama-cpp FILE] [--llm-compressor FILE] [--sensitivity FILE]

Measures every layer's sensitivity (or re-uses a saved sweep), then writes the plan that
minimises the total predicted loss within the budget.
"""
from __future__ import annotations

import sys
from pathlib import Path

from studio.commands.common import (add_calibration_arguments, add_model_argument, open_model,
                                     print_json, run_with_progress)
from studio.core.errors import StudioError
from studio.core.plan import GROUP_SIZES, METHODS

NAME = "plan"
HELP = "choose bits per layer under a size budget from measured sensitivity"


def add_arguments(parser) -> None:
    from studio.core.sensitivity import DEFAULT_KL_WINDOWS, DEFAULT_SEQLEN

    add_model_argument(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bpw", type=float, metavar="X",
                        help="average bits per weight of the block linears (scales counted)")
    budget.add_argument("--budget-mb", type=float, metavar="M",
                        help="size of the whole model in MB (2^20 bytes)")
    parser.add_argument("--method", choices=METHODS, default="rtn",
                        help="the method the plan uses (sensitivity is measured with RTN)")
    parser.add_argument("--bits", default="2,3,4,8", help="candidate widths (default 2,3,4,8)")
    parser.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                        help="32, 64, 128 or -1 for per-channel (default 128)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid")
    parser.add_argument("--no-full-precision", action="store_true",
                        help="never keep a layer in 16 bits")
    add_calibration_arguments(parser, DEFAULT_KL_WINDOWS, DEFAULT_SEQLEN, what="sensitivity sweep")
    parser.add_argument("--proxy-only", action="store_true",
                        help="allocate with the layer-output proxy only (fast, no KL sweep)")
    parser.add_argument("--sensitivity", metavar="FILE",
                        help="re-use this saved sweep when it matches, else save the new one here")
    parser.add_argument("--out", required=True, metavar="PLAN.json", help="the recipe to write")
    parser.add_argument("--llama-cpp", metavar="FILE", help="also write llama.cpp overrides")
    parser.add_argument("--llm-compressor", metavar="FILE", help="also write a recipe YAML")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise StudioError(f"--bits takes widths like 2,3,4,8, not {text!r}.") from None
    if not bits:
        raise StudioError("--bits needs at least one width.")
    return bits


def run(args) -> int:
    from studio.core.allocate import allocate, budget_bits, loss_table, plan_size, table_for
    from studio.core.plan import QuantSpec
    from studio.core.plan_export import llama_cpp_export, llm_compressor_export

    bits = parse_bits(args.bits)
    options = [QuantSpec(bits=b, group_size=args.group_size, symmetric=args.symmetric,
                         method=args.method) for b in bits]
    quiet = args.json and not sys.stderr.isatty()
    handle = open_model(args.model, quiet)
    # A budget nothing can meet is refused before minutes of measuring.
    budget_bits(table_for(handle, options + ([] if args.no_full_precision else [None])),
                args.budget_bpw, args.budget_mb)
    result = sweep(handle, args, bits, quiet)
    kind = "proxy" if args.proxy_only else "kl"
    table = loss_table(result, handle, kind=kind, full_precision=not args.no_full_precision,
                       method=args.method)
    answer = allocate(table, budget_bpw=args.budget_bpw, budget_mb=args.budget_mb)
    answer.plan.save(args.out)
    size = plan_size(handle, answer.plan)
    exports = {}
    for flag, export in (("llama_cpp", llama_cpp_export), ("llm_compressor", llm_compressor_export)):
        path = getattr(args, flag)
        if path:
            written = export(handle, answer.plan)
            written.save(path)
            exports[flag] = {"path": str(path), "notes": written.notes}
    counts: dict[str, int] = {}
    for spec in answer.choices.values():
        key = "fp16" if spec is None else f"{spec.bits}"
        counts[key] = counts.get(key, 0) + 1
    report = {
        "out": str(args.out), "method": args.method, "loss": kind,
        "budget": {"bpw": args.budget_bpw, "mb": args.budget_mb},
        "bits_per_weight": round(size.bits_per_weight, 4), "size_bytes": size.size_bytes,
        "size_mb": round(size.size_mb, 3), "predicted_loss": answer.loss,
        "lower_bound": answer.lower_bound, "exact": answer.exact, "layers_by_bits": counts,
        "layers": {n: None if s is None else s.bits for n, s in answer.choices.items()},
        "sensitivity": {"bits": list(result.bits), "group_size": result.group_size,
                        "text": result.text_label, "seqlen": result.seqlen,
                        "kl_windows": result.kl_windows, "base_ppl": result.base_ppl,
                        "proxy_seconds": round(result.proxy_seconds, 2),
                        "kl_seconds": round(result.kl_seconds, 2)},
        "pareto": {"bpw": answer.pareto.bpw, "size_mb": answer.pareto.mb,
                   "loss": answer.pareto.loss},
        "exports": exports,
    }
    if args.json:
        print_json(report)
        return 0
    mix = ", ".join(f"{n} x {k}{'' if k == 'fp16' else '-bit'}" for k, n in
                    sorted(counts.items(), key=lambda item: (item[0] == "fp16", item[0])))
    print(f"plan: {size.bits_per_weight:.3f} bits/weight, {size.size_mb:.2f} MB; {mix} "
          f"-> {args.out}")
    gap = "exact optimum" if answer.exact else f"within {answer.gap:.3g} of the optimum"
    print(f"predicted {kind} loss {answer.loss:.4g} ({gap})")
    print(f"sensitivity: {len(result.layers)} layers x {len(result.bits)} widths on "
          f"{result.text_label}; proxy {result.proxy_seconds:.1f} s"
          + (f", KL {result.kl_windows} x {result.seqlen} tokens {result.kl_seconds:.1f} s"
             if result.has_kl else ""))
    for flag, info in exports.items():
        print(f"{flag.replace('_', '-')}: {info['path']}")
        for note in info["notes"]:
            print(f"  note: {note}")
    return 0


def sweep(handle, args, bits, quiet):
    """The sensitivity results: a matching saved sweep, else a new one (saved when asked)."""
    from studio.core.sensitivity import DEFAULT_PROXY_WINDOWS, SensitivityResult, sensitivity_job
    from studio.core.text import text_windows

    if args.sensitivity and Path(args.sensitivity).is_file():
        saved = SensitivityResult.load(args.sensitivity)
        saved.check_model(handle)
        if (set(bits) <= set(saved.bits) and saved.group_size == args.group_size
                and saved.symmetric == args.symmetric and (args.proxy_only or saved.has_kl)):
            return _narrow(saved, bits)
    kl_windows = 0 if args.proxy_only else args.windows
    windows, label = text_windows(handle.tokenizer, args.calib, args.seqlen,
                                  max(kl_windows, DEFAULT_PROXY_WINDOWS), args.seed)
    result = run_with_progress(sensitivity_job(
        handle, windows, bits=bits, group_size=args.group_size, method=args.method,
        symmetric=args.symmetric, kl_windows=kl_windows, text_label=label, seed=args.seed), quiet)
    if args.sensitivity:
        result.save(args.sensitivity)
    return result


def _narrow(result, bits):
    """A saved sweep restricted to the widths asked for."""
    import dataclasses

    cols = [result.bits.index(b) for b in bits]
    pick = lambda a: None if a is None else a[:, cols]  # noqa: E731
    return dataclasses.replace(result, bits=tuple(bits), proxy_error=pick(result.proxy_error),
                               sqnr_db=pick(result.sqnr_db), kl=pick(result.kl),
                               ppl=pick(result.ppl))
