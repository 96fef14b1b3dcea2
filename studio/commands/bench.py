"""compression-studio bench MODEL|VARIANT: prefill latency, decode tokens/s, memory, size, kernels."""
from __future__ import annotations

import sys

from studio.commands.common import add_model_argument, print_json, run_with_progress
from studio.commands.eval import open_target

NAME = "bench"
HELP = ("CPU benchmark: prefill latency, decode tokens/s, peak memory and size, on real "
        "low-bit kernels for quantized layers")


def add_arguments(parser) -> None:
    add_model_argument(parser, "a model folder, a .gguf file, 'demo', or a VARIANT folder")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (after one warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated baseline configurations to measure too: "
                             "fp32,bf16,int8,int4 (default: fp32 for a MODEL, none for a VARIANT)")
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128),
                        help="group size of the on-the-fly int4 configuration")
    parser.add_argument("--no-lm-head", action="store_true",
                        help="keep the lm_head in bf16 in the on-the-fly int8/int4 configurations")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.core.bench import base_targets, bench_job, variant_target
    from studio.core.errors import StudioError

    target = open_target(args.model)
    handle = target.handle
    configs = _configs(args.configs, default=() if target.variant is not None else ("fp32",))
    targets = []
    if target.variant is not None:
        variant = target.variant
        disk = sum(f.stat().st_size for f in target.folder.rglob("*") if f.is_file())
        targets.append(variant_target(variant.name, variant.model, variant.qtensors, disk,
                                      {"bits_per_weight": round(variant.bits_per_weight, 4),
                                       "calibration": variant.calibration}))
    targets += base_targets(handle.model, configs, args.group_size, not args.no_lm_head,
                            layer_names=[layer.name for layer in handle.quantizable])
    if not targets:
        raise StudioError("Nothing to measure: give a MODEL, a VARIANT, or --configs.")
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    results = run_with_progress(bench_job(targets, vocab, args.prompt_tokens, args.new_tokens,
                                          args.repeat, args.threads))
    runs = [r.to_dict() for r in results]
    for run_ in runs:
        run_["model"] = target.name
    if args.json:
        print_json({**runs[0], "runs": runs})
        return 0
    print_table(runs)
    return 0


def _configs(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return default
    return tuple(part.strip() for part in text.split(",") if part.strip())


def print_table(runs: list[dict]) -> None:
    first = runs[0]
    print(f"{first['model']}: {first['prompt_tokens']}-token prefill, {first['new_tokens']} "
          f"new tokens at batch 1, median of {first['repeat']} (min-max), "
          f"{first['threads']} thread(s)")
    header = (f"{'configuration':<24} {'prefill ms':>20} {'decode tok/s':>20} "
              f"{'size MB':>9} {'weights/token MB':>17} {'peak RSS MB':>12}  kernels")
    print(header)
    for r in runs:
        pre = f"{r['prefill_ms']:.1f} ({r['prefill_ms_range'][0]:.0f}-{r['prefill_ms_range'][1]:.0f})"
        dec = (f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_range'][0]:.1f}-"
               f"{r['decode_tok_s_range'][1]:.1f})")
        kernels = ", ".join(f"{k} x{n}" for k, n in r["kernel_summary"].items())
        size = f"{r['size_mb']:.1f}{'' if r['size_source'] == 'disk' else '*'}"
        print(f"{r['name']:<24} {pre:>20} {dec:>20} {size:>9} {r['weights_read_mb']:>17.1f} "
              f"{r['peak_rss_mb']:>12.0f}  {kernels}")
    print("* size of the tensors in memory (not saved on disk)")
    for r in runs:
        for k in r["kernels"]:
            if k["fallback"]:
                print(f"{r['name']}: {k['layer']}: {k['note']}", file=sys.stderr)
