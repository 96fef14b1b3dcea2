"""compression-studio quantize MODEL (--recipe plan.json | --method M --bits B --group-size G
[--symmetric] [--scale-dtype fp16 | --gguf-native] [--opt NAME=VALUE ...]) [--calib FILE]
[--windows N] [--seqlen L] [--seed S] --out VARIANT [--json]

The methods and their options come from the quantizer registry (`compression-studio methods`
lists them, plug-ins included)."""
from __future__ import annotations

import re

from studio.commands.common import (add_calibration_arguments, add_model_argument, open_model,
                                     print_json, run_with_progress)
from studio.core.errors import StudioError
from studio.core.plan import (EMBEDDING_DEFAULT, GROUP_SIZES, HEAD_DEFAULT, SCALE_DTYPES, Plan,
                              QuantSpec, end_spec, with_ends)
from studio.core.quant import registry

NAME = "quantize"
HELP = "quantize a model with one of the registered methods and write a VARIANT folder"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", metavar="PLAN.json", help="a recipe (per-layer plan)")
    source.add_argument("--method", choices=registry.names(), metavar="METHOD",
                        help=f"one method for every block linear: "
                             f"{', '.join(registry.names())} (see `methods`)")
    parser.add_argument("--bits", type=int, default=4, help="2..8 (default 4)")
    parser.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                        help="32, 64, 128 or -1 for per-channel (default 128)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid")
    scales = parser.add_mutually_exclusive_group()
    scales.add_argument("--scale-dtype", choices=SCALE_DTYPES,
                        help="how scales are stored (default fp32); fp16 computes every code "
                             "against an fp16 scale, so formats storing fp16 scales hold the "
                             "variant exactly")
    scales.add_argument("--gguf-native", action="store_true",
                        help="quantize onto a GGUF type exactly: fp16 scales, and the grid must "
                             "be one (--bits 4, 5 or 8 --group-size 32 --symmetric: Q4_0, Q5_0, "
                             "Q8_0); the variant exports to GGUF with no rounding and is sized "
                             "at those types' bytes")
    parser.add_argument("--opt", "--option", dest="option", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="a method option, e.g. damp=0.01, act_order=true, mse_clip=true, "
                             "alpha=0.5 (repeatable; `methods` lists each method's)")
    parser.add_argument("--lm-head", default=HEAD_DEFAULT, metavar="SPEC",
                        help=f"the output head (and a tied embedding, the same matrix) with "
                             f"--method: keep (as stored), w8 (8 bits per channel, the int8 "
                             f"kernel), w4g32, w6g64sym ... (default {HEAD_DEFAULT}: llama.cpp "
                             f"keeps it above the body's width too)")
    parser.add_argument("--embedding", default=EMBEDDING_DEFAULT, metavar="SPEC",
                        help="an untied input embedding with --method (read one row per token: "
                             "quantizing it saves size, not time); same words "
                             f"(default {EMBEDDING_DEFAULT})")
    add_calibration_arguments(parser, windows=64)
    parser.add_argument("--name", help="the variant's name (default: from the plan)")
    parser.add_argument("--out", required=True, metavar="VARIANT", help="folder to write")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.core.allocate import plan_title
    from studio.core.plan_ends import method_notes
    from studio.core.quantize import quantize_text_job
    from studio.core.variant import save_variant

    if args.recipe and (args.scale_dtype or args.gguf_native):
        raise StudioError("--scale-dtype and --gguf-native go with --method; a recipe carries "
                          "its own scale type per layer (make one with plan --gguf-native).")
    plan = Plan.load(args.recipe) if args.recipe else Plan(command_spec(args))
    head, embedding = (end_spec(word, args.gguf_native, args.scale_dtype or "fp32")
                       for word in (args.lm_head, args.embedding))
    handle = open_model(args.model)
    if not args.recipe:   # a recipe says itself what it does with them
        plan = with_ends(plan, handle.layers, head, embedding)
    name = args.name or plan_title(handle, plan)
    variant = run_with_progress(quantize_text_job(handle, plan, args.calib, args.windows,
                                                  args.seqlen, args.seed, name, args.bos))
    save_variant(variant, args.out)
    summary = variant.to_summary()
    if args.json:
        print_json({**summary, "out": str(args.out),
                    "calibration": {"source": summary["calibration"], "windows": args.windows,
                                    "seqlen": args.seqlen, "seed": args.seed}
                    if summary["calibration"] else None,
                    "ends_method": method_notes(plan, handle.layers),
                    "layer_errors": variant.layer_errors})
        return 0
    print(f"{name}: {summary['layers']} layers in {summary['seconds']:.1f} s, "
          f"{summary['bits_per_weight']:.2f} bits/weight in the quantized layers, "
          f"{summary['size_mb']:.1f} MiB = {summary['model_bits_per_weight']:.2f} bits/weight "
          f"over the whole model "
          f"-> {args.out}")
    print(size_line(variant))
    for note in method_notes(plan, handle.layers):   # how the ends ran (plan_ends.end_method)
        print(f"ends: {note}")
    if summary["calibration"]:
        print(f"calibration: {summary['calibration']} ({args.windows} x {args.seqlen} tokens, "
              f"seed {args.seed})")
    if summary["mean_layer_error"] is not None:
        print(f"mean layer output error {summary['mean_layer_error']:.3g} "
              f"(RTN on the same inputs: {summary['mean_rtn_error']:.3g})")
    return 0


def command_spec(args) -> QuantSpec:
    """The one spec of a --method run (a recipe carries its own scale type per layer)."""
    from studio.core.quant.grid import native_gguf_type

    spec = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                     method=args.method, options=parse_options(args.option),
                     scale_dtype="fp16" if args.gguf_native else (args.scale_dtype or "fp32"))
    if args.gguf_native and native_gguf_type(spec) is None:
        raise StudioError(f"--gguf-native needs a grid a GGUF type holds exactly: --bits 4, 5 or "
                          f"8 with --group-size 32 --symmetric (Q4_0, Q5_0, Q8_0), not "
                          f"{spec.grid_label}; use --scale-dtype fp16 for fp16 scales on "
                          f"another grid.")
    return spec


def parse_options(items: list[str]) -> dict:
    """["damp=0.01", "act_order=true"] -> {"damp": 0.01, "act_order": True}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudioError(f"Options are NAME=VALUE, not {item!r}.")
        low = value.strip().lower()
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", value.strip()) and low not in (
                "true", "yes", "on", "false", "no", "off", "nan", "inf", "infinity"):
            options[key] = value.strip()    # a word: a choice option (the method checks it)
        elif low in ("true", "yes", "on"):
            options[key] = True
        elif low in ("false", "no", "off"):
            options[key] = False
        else:
            try:
                options[key] = int(value) if low.lstrip("-").isdigit() else float(value)
            except ValueError:
                raise StudioError(f"Option {key} needs a number or true/false, "
                                  f"not {value!r}.") from None
    return options


def size_line(variant) -> str:
    """The size breakdown in words: what the embedding / lm_head are stored as."""
    parts = variant.size_breakdown
    ends = sorted({variant.specs[n].grid_label for n in variant.qtensors
                   if n in variant.end_layers})
    how = ("quantized " + "/".join(ends)) if ends else "16-bit"
    shared = "; tied: one matrix" if variant.shared else ""
    mib = lambda key: f"{parts[key] / 2**20:.2f} MiB"  # noqa: E731
    return (f"size: {mib('quantized')} quantized layers + {mib('embedding')} embedding / "
            f"lm_head ({how}{shared}) + {mib('float')} other float tensors")


