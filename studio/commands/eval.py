"""compression-studio eval MODEL|VARIANT: perplexity (standard protocol), KL and top-1 vs baseline."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from studio.commands.common import (add_bos_argument, add_model_argument, open_model, print_json,
                                     run_with_progress)
from studio.core.evaluate import DEFAULT_SEQLEN, DEFAULT_WINDOWS

NAME = "eval"
HELP = "perplexity of a model or variant on a text, and KL / top-1 agreement against its baseline"


def add_arguments(parser) -> None:
    add_model_argument(parser, "a model folder, a .gguf file, 'demo', a VARIANT folder or an "
                                "export folder")
    parser.add_argument("--text", metavar="FILE", help="evaluation text (default: built-in text)")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="window length")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                        help="number of windows (at most; the text may hold fewer)")
    parser.add_argument("--baseline", metavar="MODEL",
                        help="model to compare against (a VARIANT knows its own)")
    add_bos_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--prompt", help="also generate greedily from this prompt, side by side")
    parser.add_argument("--backend", default="torch",
                        help="torch, or llama.cpp: the GGUF of MODEL (the demo's own file, a "
                             ".gguf, a GGUF export folder) or --gguf run by llama.cpp on the "
                             "same windows, KL / top-1 against the torch baseline (MODEL's "
                             "base, --baseline, or MODEL itself through torch)")
    parser.add_argument("--gguf", metavar="FILE", help="the GGUF file for --backend llama.cpp")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads (default 1: the cores are shared)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass
class Opened:
    """What eval and bench need from a MODEL or VARIANT argument."""
    name: str
    model: object              # the float model evaluation runs
    tokenizer: object
    baseline: object | None    # the baseline handle (a variant's base, or --baseline)
    handle: object             # the opened model handle (the base for a variant)
    variant: object | None = None
    folder: Path | None = None


def open_target(source: str, baseline: str | None = None) -> Opened:
    from studio.core.export.reopen import is_export_folder, open_export_job
    from studio.core.variant import is_variant_folder, load_variant

    if is_export_folder(source):  # read back through its consumer library, like any user's
        handle, report = run_with_progress(open_export_job(source))
        base = open_model(baseline or (report.get("variant") or {}).get("base"))
        return Opened(f"{Path(report['path']).name} [{report['format']}]", handle.model,
                      base.tokenizer, base, handle, folder=Path(report["path"]))
    if Path(source).is_dir() and is_variant_folder(source):
        from studio.core.variant import read_variant_meta
        meta = read_variant_meta(source)
        base = open_model(baseline or meta["base_source"])
        variant = load_variant(source, base)
        return Opened(variant.name, variant.model, base.tokenizer, base, base, variant,
                      Path(source))
    handle = open_model(source)
    base = open_model(baseline) if baseline else None
    return Opened(handle.name, handle.model, handle.tokenizer, base, handle)


def run(args) -> int:
    from studio.core.backends import get_backend
    from studio.core.evaluate import evaluate_job, generations_job

    backend = get_backend(args.backend)
    if backend.name == "llama.cpp":
        return run_llama_cpp(args)
    target = open_target(args.model, args.baseline)
    base_model = target.baseline.model if target.baseline is not None else None
    result = run_with_progress(evaluate_job(target.model, base_model, target.tokenizer,
                                            args.text, args.seqlen, args.windows,
                                            args.batch_size, args.bos), quiet=False)
    data = {"model": target.name, **result.to_dict()}
    if target.variant is not None:
        data["bits_per_weight"] = round(target.variant.bits_per_weight, 4)
        data["calibration"] = target.variant.calibration
    if args.prompt:
        models = {target.name: target.model}
        if base_model is not None:
            models["baseline"] = base_model
        data["generations"] = run_with_progress(
            generations_job(models, target.tokenizer, args.prompt), quiet=False)
        data["prompt"] = args.prompt
    if args.json:
        print_json(data)
        return 0
    print_table(data)
    return 0


def run_llama_cpp(args) -> int:
    from studio.core.backends import get_backend, gguf_of, no_gguf_message
    from studio.core.errors import StudioError
    from studio.core.evaluate import evaluate_gguf_job

    reason = get_backend("llama.cpp").unavailable_reason()
    if reason:
        raise StudioError(reason[0].upper() + reason[1:] + ".")
    gguf = Path(args.gguf) if args.gguf else gguf_of(args.model)
    if gguf is None:
        raise StudioError(no_gguf_message(args.model))
    if not gguf.is_file():
        raise StudioError(f"{gguf} does not exist.")
    target = open_target(args.model, args.baseline)
    # The reference is the torch model of the same weights unless a baseline is known.
    base = target.baseline.model if target.baseline is not None else target.model
    result = run_with_progress(evaluate_gguf_job(gguf, base, target.tokenizer, args.text,
                                                 args.seqlen, args.windows, args.threads,
                                                 args.bos),
                               quiet=False)
    data = {"model": f"{gguf.name} [llama.cpp]", "gguf": str(gguf),
            "baseline": f"{target.baseline.name if target.baseline else target.name} [torch]",
            "build": {**get_backend("llama.cpp").build_info(), "threads": args.threads},
            **result.to_dict()}
    if args.json:
        print_json(data)
        return 0
    print_table(data)
    return 0


def print_table(data: dict) -> None:
    print(f"{data['model']}: perplexity {data['ppl']:.4f} on {data['text']} "
          f"({data['windows']} windows x {data['seqlen']} tokens, {data['tokens']} predicted "
          f"tokens, {data['seconds']:.1f} s)")
    if "kl" in data:
        print(f"baseline perplexity {data['base_ppl']:.4f}   KL {data['kl']:.5f} nats/token "
              f"(p99 {data['kl_p99']:.4f})   top-1 agreement {100 * data['top1']:.2f}%")
    else:
        print("no baseline given: KL and top-1 agreement need --baseline MODEL", file=sys.stderr)
    for name, text in data.get("generations", {}).items():
        print(f"\n[{name}] {data['prompt']}{text}")
