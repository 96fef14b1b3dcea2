"""compression-studio compare VARIANT...: each variant next to its baseline, as the Compare tab.

The same core jobs as the window: `runs.quick_eval_job` (the quick evaluation a new variant
gets) or, with --bench, `runs.run_all_job` (evaluate + benchmark); the table is
`runs.compare_rows` (the baseline first; size, perplexity and speed ratios against it).
"""
from __future__ import annotations

from studio.commands.common import print_json, run_with_progress
from studio.core.runs import QUICK_SEQLEN, QUICK_WINDOWS

NAME = "compare"
HELP = "evaluate variants (and with --bench benchmark them) next to their baseline, with ratios"


def add_arguments(parser) -> None:
    parser.add_argument("variants", nargs="+", metavar="VARIANT",
                        help="variant folders written by `quantize --out` (same base model)")
    parser.add_argument("--windows", type=int, default=QUICK_WINDOWS,
                        help=f"evaluation windows (default {QUICK_WINDOWS}, the quick evaluation)")
    parser.add_argument("--seqlen", type=int, default=QUICK_SEQLEN, help="window length")
    parser.add_argument("--text", metavar="FILE", help="evaluation text (default: built-in)")
    parser.add_argument("--bench", action="store_true",
                        help="also benchmark each variant and the baseline (Run all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.commands.common import open_model
    from studio.core.errors import StudioError
    from studio.core.runs import COLUMNS, compare_rows, quick_eval_job, run_all_job
    from studio.core.variant import is_variant_folder, load_variant, read_variant_meta

    bases = set()
    for folder in args.variants:
        if not is_variant_folder(folder):
            raise StudioError(f"{folder} is not a variant folder (write one with "
                              f"`compression-studio quantize ... --out FOLDER`).")
        bases.add(read_variant_meta(folder)["base_source"])
    if len(bases) != 1:
        raise StudioError("The variants come from different base models; compare variants of "
                          "one model at a time.")
    handle = open_model(bases.pop())
    runs = []
    for folder in args.variants:
        variant = load_variant(folder, handle)
        job = run_all_job if args.bench else quick_eval_job
        runs += run_with_progress(job(variant, handle, args.windows, args.seqlen, args.text))
    rows = compare_rows(runs, handle)
    if args.json:
        print_json({"rows": rows, "runs": runs})
        return 0
    keys = ["variant", "bits_per_weight", "size_mb", "size_ratio", "ppl", "ppl_ratio", "kl",
            "top1", "decode_tok_s", "speed_ratio"]
    formats = {key: (header, fmt) for key, header, fmt in COLUMNS}
    print("  ".join(f"{formats[k][0]:>14}" for k in keys))
    for row in rows:
        print("  ".join(f"{formats[k][1].format(row[k]) if row.get(k) is not None else '':>14}"
                        for k in keys))
    return 0
