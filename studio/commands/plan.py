"""compression-studio plan MODEL (--budget-bpw X | --budget-mb M) [--method M]
[--bits 2,3,4,5,6,8] [--group-sizes 32,64,128] [--kl-bits 4] [--kl-group 128] [--gguf-native]
[--lm-head SPEC|auto] [--embedding SPEC|auto] [--calib FILE] [--windows N] [--seqlen L] [--proxy-only]
--out plan.json [--json]
[--llama-cpp FILE] [--llm-compressor FILE] [--sensitivity FILE] [--measure-points N]

Measures every layer's sensitivity at every option (each width at each group size; KL end to
end at the --kl-bits widths only, the rest predicted from the proxy), or re-uses a saved sweep
that covers those options, then writes the plan that minimises the total predicted loss within
the budget. --gguf-native makes the options the GGUF types a studio grid is exactly (Q4_0,
Q5_0, Q8_0: 4, 5, 8 bits symmetric at group 32 with fp16 scales) and fp16, priced at their
GGUF bytes, so a variant of the plan exports to GGUF with no rounding. --measure-points N
quantizes the plan and N - 1 more points of its size/loss curve and measures each one's KL and
perplexity against the baseline (8 x 128 tokens of the built-in text), to check the prediction.
"""
from __future__ import annotations

import sys
from pathlib import Path

from studio.commands.common import (add_calibration_arguments, add_model_argument, open_model,
                                     print_json, run_with_progress)
from studio.core.errors import StudioError
from studio.core.quant import registry

NAME = "plan"
HELP = "choose bits per layer under a size budget from measured sensitivity"


def add_arguments(parser) -> None:
    from studio.core.sensitivity import (DEFAULT_BITS, DEFAULT_GROUPS, DEFAULT_KL_BITS,
                                         DEFAULT_KL_GROUP, DEFAULT_KL_WINDOWS, DEFAULT_SEQLEN)

    join = lambda values: ",".join(map(str, values))  # noqa: E731

    add_model_argument(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bpw", type=float, metavar="X",
                        help="average bits per weight of the block linears (scales "
                             "counted), and of the ends set to auto")
    budget.add_argument("--budget-mb", type=float, metavar="M",
                        help="size of the whole model in MB (2^20 bytes)")
    parser.add_argument("--method", choices=registry.names(), default=registry.REFERENCE,
                        help="the method the plan uses (sensitivity is measured with RTN)")
    # --bits and --group-sizes default to None so that --gguf-native can tell they were given.
    parser.add_argument("--bits",
                        help=f"candidate widths (default {join(DEFAULT_BITS)})")
    parser.add_argument("--group-sizes", "--group-size", dest="group_sizes",
                        help=f"candidate group sizes, each with every width: 32, 64, 128, ch "
                             f"(per-channel) (default {join(DEFAULT_GROUPS)})")
    parser.add_argument("--kl-bits", default=join(DEFAULT_KL_BITS),
                        help=f"widths measured end to end, at --kl-group; the other options' KL "
                             f"is predicted from the proxy (default {join(DEFAULT_KL_BITS)})")
    parser.add_argument("--kl-group",
                        help=f"group size of the end-to-end measurements "
                             f"(default {DEFAULT_KL_GROUP}; 32 with --gguf-native)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid")
    parser.add_argument("--gguf-native", action="store_true",
                        help="choose among the GGUF types a studio grid is exactly (Q4_0, Q5_0, "
                             "Q8_0: 4/5/8 bits symmetric, group 32, fp16 scales) and fp16, "
                             "priced at their real GGUF bytes, so a variant of the plan "
                             "exports to GGUF with no rounding; layers whose rows are not "
                             "multiples of 32 stay fp16 (replaces --bits and --group-sizes)")
    parser.add_argument("--no-full-precision", action="store_true",
                        help="never keep a layer in 16 bits")
    from studio.core.plan import EMBEDDING_DEFAULT, HEAD_DEFAULT

    parser.add_argument("--lm-head", default=HEAD_DEFAULT, metavar="SPEC",
                        help=f"the output head (and a tied embedding, one matrix), kept at this "
                             f"setting by the allocator and counted in the budget: keep, w8, "
                             f"w4g32, w6g64sym ... as quantize takes it (default {HEAD_DEFAULT}; "
                             f"q8_0/q5_0/q4_0 widths with --gguf-native); auto: the allocator "
                             f"chooses it among the options from its measured loss (a "
                             f"--budget-bpw then counts it among the weights)")
    parser.add_argument("--embedding", default=EMBEDDING_DEFAULT, metavar="SPEC",
                        help=f"an untied input embedding, the same words, auto included "
                             f"(default {EMBEDDING_DEFAULT})")
    add_calibration_arguments(parser, DEFAULT_KL_WINDOWS, DEFAULT_SEQLEN, what="sensitivity sweep")
    parser.add_argument("--proxy-only", action="store_true",
                        help="allocate with the layer-output proxy only (fast, no KL sweep)")
    parser.add_argument("--sensitivity", metavar="FILE",
                        help="re-use this saved sweep when it matches, else save the new one here")
    parser.add_argument("--out", required=True, metavar="PLAN.json", help="the recipe to write")
    parser.add_argument("--llama-cpp", metavar="FILE", help="also write llama.cpp overrides")
    parser.add_argument("--llm-compressor", metavar="FILE", help="also write a recipe YAML")
    parser.add_argument("--measure-points", type=int, default=0, metavar="N",
                        help="quantize the plan and N-1 more points of its curve and measure "
                             "their KL and perplexity (default 0: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.core.allocate import (allocate, budget_bits, loss_table, method_takes, plan_size,
                                      table_for)
    from studio.core.export.gguf_types import BLOCK
    from studio.core.plan import Plan, end_spec, with_ends
    from studio.core.plan_ends import describe, method_notes
    from studio.core.plan_export import llama_cpp_export, llm_compressor_export
    from studio.core.sensitivity import (DEFAULT_BITS, DEFAULT_GROUPS, DEFAULT_KL_GROUP,
                                         gguf_native_options, kl_columns, option_label,
                                         parse_group_sizes, parse_widths, sweep_options)

    # Every bad option is refused here, before the model is opened or anything is measured.
    if args.gguf_native and (args.bits is not None or args.group_sizes is not None):
        raise StudioError("--gguf-native chooses the options itself (Q4_0, Q5_0, Q8_0 and fp16); "
                          "leave out --bits and --group-sizes.")
    kl_group = (parse_group_sizes(args.kl_group, "--kl-group") if args.kl_group is not None
                else (BLOCK if args.gguf_native else DEFAULT_KL_GROUP,))
    if len(kl_group) != 1:
        raise StudioError(f"--kl-group takes one group size, not {args.kl_group!r}.")
    menu = {"bits": parse_widths(args.bits, "--bits") if args.bits is not None else DEFAULT_BITS,
            "group_sizes": (parse_group_sizes(args.group_sizes, "--group-sizes")
                            if args.group_sizes is not None else DEFAULT_GROUPS),
            "kl_bits": parse_widths(args.kl_bits, "--kl-bits"), "kl_group": kl_group[0]}
    options = (gguf_native_options() if args.gguf_native
               else sweep_options(menu["bits"], menu["group_sizes"], args.symmetric))
    kl_options = [] if args.proxy_only else [
        options[j] for j in kl_columns(options, menu["kl_bits"], menu["kl_group"])]
    auto_roles = {role for role, word in (("lm_head", args.lm_head),
                                          ("embedding", args.embedding))
                  if word.strip().lower() == "auto"}
    head, embedding = (None if role in auto_roles else end_spec(word, args.gguf_native)
                       for role, word in (("lm_head", args.lm_head),
                                          ("embedding", args.embedding)))
    if args.measure_points < 0:
        raise StudioError(f"--measure-points takes a count of 0 or more, not {args.measure_points}.")
    quiet = args.json and not sys.stderr.isatty()
    handle = open_model(args.model, quiet)
    # The embedding / lm_head are not chosen by the allocator: they stay at this setting,
    # counted in the budget, and the written plan carries it.
    ends = with_ends(Plan(default=None, architecture=handle.architecture), handle.layers,
                     head, embedding, method=args.method)
    auto = [i.name for i in handle.layers if i.role in auto_roles]
    # A budget nothing can meet is refused before minutes of measuring.
    planned = [o.with_(method=args.method) for o in options if method_takes(args.method, o)]
    if not planned:
        raise StudioError(f"{args.method} takes none of the widths of the menu; choose "
                          f"--bits among {', '.join(map(str, registry.get(args.method).bits))}.")
    budget_bits(table_for(handle, planned + ([] if args.no_full_precision else [None]),
                          plan=ends, auto=auto), args.budget_bpw, args.budget_mb)
    result = sweep(handle, args, menu, options, kl_options, quiet, auto)
    kind = "proxy" if args.proxy_only else "kl"
    table = loss_table(result, handle, kind=kind, full_precision=not args.no_full_precision,
                       method=args.method, gguf_native=args.gguf_native, plan=ends, auto=auto)
    answer = allocate(table, budget_bpw=args.budget_bpw, budget_mb=args.budget_mb)
    answer.plan.save(args.out)
    size = plan_size(handle, answer.plan, auto)   # its bits/weight counted as the budget's
    points = measure(handle, table, answer, args.measure_points, quiet)
    exports = {}
    for flag, export in (("llama_cpp", llama_cpp_export), ("llm_compressor", llm_compressor_export)):
        path = getattr(args, flag)
        if path:
            written = export(handle, answer.plan)
            written.save(path)
            exports[flag] = {"path": str(path), "notes": written.notes}
    label = lambda spec: "fp16" if spec is None else option_label(spec)  # noqa: E731
    order = result.labels + ["fp16"]   # the mix reads in the options' order
    counts: dict[str, int] = {}
    for spec in answer.choices.values():
        counts[label(spec)] = counts.get(label(spec), 0) + 1
    counts = {k: counts[k] for k in order if k in counts}
    report = {
        "out": str(args.out), "method": args.method, "loss": kind,
        "gguf_native": args.gguf_native,
        "budget": {"bpw": args.budget_bpw, "mb": args.budget_mb},
        "bits_per_weight": round(size.bits_per_weight, 4),
        "budget_bits_per_weight": round(size.budget_bpw, 4),
        "budget_counts": ["body", *size.counted_ends], "size_bytes": size.size_bytes,
        "size_mb": round(size.size_mb, 3), "predicted_loss": answer.loss,
        "lower_bound": answer.lower_bound, "exact": answer.exact, "layers_by_option": counts,
        "ends": describe(answer.plan, handle.layers),
        "ends_chosen": sorted(table.units),
        "ends_method": method_notes(answer.plan, handle.layers),
        "layers": {n: None if s is None else option_label(s) for n, s in answer.choices.items()},
        "sensitivity": {"options": result.labels,
                        "kl_options": [result.labels[j] for j in result.kl_options],
                        "text": result.text_label, "seqlen": result.seqlen,
                        "kl_windows": result.kl_windows, "base_ppl": result.base_ppl,
                        "proxy_seconds": round(result.proxy_seconds, 2),
                        "kl_seconds": round(result.kl_seconds, 2)},
        "pareto": {"bpw": answer.pareto.bpw, "size_mb": answer.pareto.mb,
                   "loss": answer.pareto.loss},
        "exports": exports,
        "measured_points": [p.to_dict() for p in points],
    }
    if args.json:
        print_json(report)
        return 0
    mix = ", ".join(f"{n} x {k}" for k, n in counts.items())
    native = " (GGUF-native: exports to GGUF with no rounding)" if args.gguf_native else ""
    print(f"plan{native}: {size.bits_text}, {size.size_mb:.2f} MB; {mix} "
          f"-> {args.out}")
    gap = "exact optimum" if answer.exact else f"within {answer.gap:.3g} of the optimum"
    print(f"predicted {kind} loss {answer.loss:.4g} ({gap})")
    how = "chosen by the allocator" if table.units else "kept as set"
    print(f"ends ({how}, counted in the size): {describe(answer.plan, handle.layers)}")
    for note in method_notes(answer.plan, handle.layers):
        print(f"  {note}")
    measured = ", ".join(result.labels[j] for j in result.kl_options)
    print(f"sensitivity: {len(result.layers)} layers x {len(result.options)} options on "
          f"{result.text_label}; proxy {result.proxy_seconds:.1f} s"
          + (f", KL at {measured} on {result.kl_windows} x {result.seqlen} tokens "
             f"{result.kl_seconds:.1f} s (other options predicted from the proxy)"
             if result.has_kl else ""))
    for p in points:
        print(f"measured at {p.bpw:.3f} bits/weight: KL {p.kl:.4f} nats/token "
              f"(predicted {p.predicted:.4g}), perplexity {p.ppl:.2f}")
    for flag, info in exports.items():
        print(f"{flag.replace('_', '-')}: {info['path']}")
        for note in info["notes"]:
            print(f"  note: {note}")
    return 0


def sweep(handle, args, menu, options, kl_options, quiet, auto=()):
    """The sensitivity results: a saved sweep covering `options` (and measuring `kl_options`
    end to end unless proxy-only, and the ends named in `auto`), else a new one over `menu`
    (saved when asked)."""
    from studio.core.allocate import chosen_ends
    from studio.core.sensitivity import (DEFAULT_PROXY_WINDOWS, SensitivityResult, same_grid,
                                         sensitivity_job)
    from studio.core.text import text_windows

    if args.sensitivity and Path(args.sensitivity).is_file():
        saved = SensitivityResult.load(args.sensitivity)
        saved.check_model(handle)
        measured = [saved.options[j] for j in saved.kl_options]
        covered = all(saved.column(o) is not None for o in options)
        kl_covered = all(any(same_grid(o, m) for m in measured) for o in kl_options)
        ends_covered = all(saved.end_row(e.names) is not None
                           for e in chosen_ends(handle, auto))
        if covered and kl_covered and ends_covered:
            return saved.subset(options)
    kl_windows = 0 if args.proxy_only else args.windows
    windows, label = text_windows(handle.tokenizer, args.calib, args.seqlen,
                                  max(kl_windows, DEFAULT_PROXY_WINDOWS), args.seed, args.bos)
    result = run_with_progress(sensitivity_job(
        handle, windows, **menu, method=args.method, symmetric=args.symmetric,
        gguf_native=args.gguf_native, kl_windows=kl_windows, text_label=label, seed=args.seed),
        quiet)
    if args.sensitivity:
        result.save(args.sensitivity)
    return result


def measure(handle, table, answer, count: int, quiet: bool) -> list:
    """--measure-points: the plan and count - 1 more points of its curve, quantized and
    measured against the baseline (none when count is 0)."""
    from studio.core import plan_points
    from studio.core.text import text_windows

    if count == 0:
        return []
    windows, _ = text_windows(handle.tokenizer, None, plan_points.SEQLEN, plan_points.WINDOWS,
                              seed=plan_points.SEED)
    targets = plan_points.point_targets(answer, count)
    return run_with_progress(plan_points.measure_points_job(handle, table, targets, windows),
                             quiet)
