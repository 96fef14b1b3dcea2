"""compression-studio export VARIANT --format gguf|compressed-tensors|hf --out PATH
                          [--shard-size 5GB] [--json]

Writes the variant in a format other tools load, re-opens it with that tool's library, checks
weights, logits and tokenizer against the variant, and only then moves it into place."""
from __future__ import annotations

from pathlib import Path

from studio.commands.common import add_bos_argument, open_model, print_json, run_with_progress
from studio.core.errors import StudioError
from studio.core.evaluate import DEFAULT_SEQLEN, DEFAULT_WINDOWS
from studio.core.export import all_formats, format_names
from studio.core.export.base import FLOAT_DTYPES, INEXACT_POLICIES, ExportOptions
from studio.core.export.shards import DEFAULT_SHARD_SIZE, describe_size, parse_size

NAME = "export"
HELP = "export a VARIANT as GGUF, compressed-tensors or a plain Hugging Face checkpoint, verified"

JSON_KEYS = ("path", "file", "format", "bytes", "bits_per_weight_on_disk",
             "bits_per_weight_estimate", "seconds", "verified", "max_weight_diff",
             "max_float_diff", "max_logit_diff", "tokenizer_equal", "evaluation", "notes", "layers")


def add_arguments(parser) -> None:
    parser.add_argument("variant", metavar="VARIANT", help="a variant folder written by quantize")
    parser.add_argument("--format", required=True, choices=format_names())
    parser.add_argument("--out", required=True, metavar="PATH", help="the folder to write")
    parser.add_argument("--dtype", default="f16", choices=FLOAT_DTYPES,
                        help="float type of the tensors that are not quantized (default f16)")
    parser.add_argument("--inexact", default="refuse", choices=INEXACT_POLICIES,
                        help="a layer no type of the format holds exactly: refuse the export "
                             "(default), or store the nearest type and report its error")
    parser.add_argument("--asym4", default="q5_0", choices=("q5_0", "q4_1"),
                        help="GGUF: 4-bit asymmetric layers as q5_0 (exact, default) or q4_1 "
                             "(smaller; its fp16 offset rounds)")
    parser.add_argument("--shard-size", default=describe_size(DEFAULT_SHARD_SIZE), metavar="SIZE",
                        help="at most SIZE of tensors per file (e.g. 2GB, 500MB, 4GiB; "
                             f"default {describe_size(DEFAULT_SHARD_SIZE)}); a larger export is "
                             "split: " + "; ".join(f"{f.name} into {f.splits_as}"
                                                   for f in all_formats() if f.splits_as))
    parser.add_argument("--base", metavar="MODEL",
                        help="the base model, when it moved since the variant was made")
    parser.add_argument("--force", action="store_true", help="replace PATH if it exists")
    parser.add_argument("--eval-text", metavar="FILE",
                        help="also measure the perplexity of the reloaded export and of the "
                             "variant on this text (standard protocol)")
    parser.add_argument("--eval-windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--eval-seqlen", type=int, default=DEFAULT_SEQLEN)
    add_bos_argument(parser, "--eval-bos")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.core.evaluate import prepare_windows
    from studio.core.export.job import check_destination, export_job
    from studio.core.variant import load_variant, read_variant_meta

    options = ExportOptions(dtype=args.dtype, inexact=args.inexact, gguf_asym4=args.asym4,
                            shard_size=parse_size(args.shard_size))
    if not Path(args.variant).is_dir():
        raise StudioError(f"{args.variant} is not a variant folder.")
    meta = read_variant_meta(args.variant)
    check_destination(Path(args.out), args.force)  # before the minutes spent opening the model
    handle = open_model(args.base or meta["base_source"])
    variant = load_variant(args.variant, handle)
    windows, protocol = None, None
    if args.eval_text:
        windows, protocol = prepare_windows(handle.tokenizer, args.eval_text, args.eval_seqlen,
                                            args.eval_windows, args.eval_bos)
    result = run_with_progress(export_job(variant, handle, args.format, args.out, options,
                                          force=args.force, eval_windows=windows,
                                          eval_protocol=protocol))
    summary = result.to_dict()
    if args.json:
        print_json({key: summary[key] for key in JSON_KEYS})
        return 0
    print(f"{variant.name} -> {result.file} ({result.format}): {result.bytes / 2**20:.2f} MiB, "
          f"{result.bits_per_weight_on_disk:.3f} bits/weight on disk "
          f"(estimate {result.bits_per_weight_estimate:.3f}), {result.seconds:.1f} s")
    print(f"verified: max weight difference {result.max_weight_diff:.3g} (quantized layers), "
          f"{result.max_float_diff:.3g} (other tensors), "
          f"max logit difference {result.max_logit_diff:.3g}"
          + (f" (logits from {result.logits_by})" if result.logits_by else "") + ", "
          f"tokenizer {'equal' if result.tokenizer_equal else result.tokenizer_equal}")
    inexact = [layer["name"] for layer in result.layers if not layer["exact"]]
    if inexact:
        print(f"{len(inexact)} layers not stored exactly (report.json lists their errors)")
    if result.evaluation:
        e = result.evaluation
        print(f"perplexity: export {e['ppl_export']:.4f}, variant {e['ppl_variant']:.4f} "
              f"({e['windows']} x {e['seqlen']}, {e['protocol']})")
    return 0
