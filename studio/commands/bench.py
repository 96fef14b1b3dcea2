"""compression-studio bench MODEL|VARIANT: prefill latency, decode tokens/s, memory, size, kernels."""
from __future__ import annotations

import sys
from pathlib import Path

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
    from studio.core.backends import BACKENDS

    parser.add_argument("--backend", default="torch",
                        help="comma-separated backends to run on: "
                             + ", ".join(f"{b.name}" + (f" (needs {b.install})" if b.install else "")
                                         for b in BACKENDS.values())
                             + "; llama.cpp runs the GGUF of MODEL (the demo's own file, a "
                               ".gguf, a GGUF export folder) or --gguf")
    parser.add_argument("--compile", action="store_true",
                        help="decode through a torch.compile'd step (Llama-family models; "
                             "compiled once per model and length before the warm-up, which "
                             "can take minutes; eager with the reason where it cannot)")
    parser.add_argument("--kernels", default="native",
                        help="comma-separated low-bit kernel sets for quantized layers: native "
                             "(the studio's, 4- and 8-bit codes x int8 activations, built with "
                             "the machine's C compiler on first use; torch's where it cannot "
                             "build), torch (torch's int4pack / int8pack); both: each quantized "
                             "configuration measured on each")
    parser.add_argument("--gguf", action="append", default=[], metavar="FILE",
                        help="a GGUF file for the llama.cpp backend (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.core.backends import get_backend, gguf_of, no_gguf_message
    from studio.core.bench import base_targets, bench_job, gguf_target, variant_bench_target
    from studio.core.errors import StudioError
    from studio.core.kernels import KERNEL_SETS

    backends = _configs(args.backend, default=("torch",))
    for name in backends:
        get_backend(name)   # an unknown name is bad input
    ggufs = []
    if "llama.cpp" in backends or args.gguf:
        ggufs = [Path(f) for f in args.gguf] or [gguf_of(args.model)]
        if ggufs[0] is None:
            if "torch" not in backends:
                raise StudioError(no_gguf_message(args.model))
            print(f"llama.cpp figures skipped: {no_gguf_message(args.model)}", file=sys.stderr)
            ggufs = []
        reason = get_backend("llama.cpp").unavailable_reason()
        if reason:   # listed as unavailable; the torch figures still come out
            print(f"llama.cpp figures skipped: {reason}", file=sys.stderr)
    torch_wanted = "torch" in backends or args.configs is not None
    if not torch_wanted:   # llama.cpp alone: no torch model to open
        targets = [gguf_target(path) for path in ggufs]
        results = run_with_progress(bench_job(targets, _gguf_vocab(ggufs[0]), args.prompt_tokens,
                                              args.new_tokens, args.repeat, args.threads))
        return _report([r.to_dict() for r in results], str(args.model), args.json)

    target = open_target(args.model)
    handle = target.handle
    configs = _configs(args.configs, default=() if target.variant is not None else ("fp32",))
    kernels = _configs(args.kernels, default=("native",))
    unknown = [k for k in kernels if k not in KERNEL_SETS]
    if unknown or not kernels:
        raise StudioError(f"Unknown kernels {', '.join(unknown)}; choose from "
                          f"{', '.join(KERNEL_SETS)}.")
    targets = []
    if target.variant is not None and "torch" in backends:
        targets += [variant_bench_target(target.variant, kernels=kernel) for kernel in kernels]
    targets += base_targets(handle.model, configs, args.group_size, not args.no_lm_head,
                            layer_names=[layer.name for layer in handle.quantizable],
                            kernels=kernels[0])
    quantized = [c for c in configs if c in ("int8", "int4")]
    if quantized:
        for kernel in kernels[1:]:
            targets += base_targets(handle.model, quantized, args.group_size,
                                    not args.no_lm_head, kernels=kernel,
                                    layer_names=[layer.name for layer in handle.quantizable])
    targets += [gguf_target(path) for path in ggufs]
    if not targets:
        raise StudioError("Nothing to measure: give a MODEL, a VARIANT, or --configs.")
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    results = run_with_progress(bench_job(targets, vocab, args.prompt_tokens, args.new_tokens,
                                          args.repeat, args.threads, compile=args.compile))
    return _report([r.to_dict() for r in results], target.name, args.json)


def _report(runs: list[dict], model: str, as_json: bool) -> int:
    from studio.core.backends import BACKENDS

    for run_ in runs:
        run_["model"] = model
    unavailable = {b.name: {"reason": b.unavailable_reason(), "install": b.install}
                   for b in BACKENDS.values() if not b.available()}
    if as_json:
        ok = [r for r in runs if "error" not in r] or runs
        print_json({**ok[0], "runs": runs, "backends_unavailable": unavailable})
        return 0
    print_table(runs)
    return 0


def _gguf_vocab(path) -> int:
    """The vocabulary of a GGUF (prompt ids are drawn from it), without opening the model."""
    from gguf import GGUFReader

    from studio.core.errors import StudioError

    try:
        field = GGUFReader(str(path)).get_field("tokenizer.ggml.tokens")
    except Exception as exc:  # gguf-py raises plain errors for damaged files
        raise StudioError(f"{Path(path).name} is not a readable GGUF file: {exc}") from None
    return len(field.data) if field is not None else 32000


def _configs(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return default
    return tuple(part.strip() for part in text.split(",") if part.strip())


SIZE_MARKS = {"disk": "", "memory": "*", "stored": "+", "variant": "+"}


def print_table(runs: list[dict]) -> None:
    failed = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    for r in failed:
        print(f"{r['name']}: no figures: {r['error']}", file=sys.stderr)
    if not runs:
        return
    first = runs[0]
    print(f"{first['model']}: {first['prompt_tokens']}-token prefill, {first['new_tokens']} "
          f"new tokens at batch 1, median of {first['repeat']} (min-max), "
          f"{first['threads']} thread(s)")
    width = max(24, *(len(r["name"]) for r in runs))
    header = (f"{'configuration':<{width}} {'prefill ms':>20} {'decode tok/s':>20} "
              f"{'size MB':>9} {'weights/token MB':>17} {'peak RSS MB':>12}  kernels")
    print(header)
    for r in runs:
        pre = f"{r['prefill_ms']:.1f} ({r['prefill_ms_range'][0]:.0f}-{r['prefill_ms_range'][1]:.0f})"
        dec = (f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_range'][0]:.1f}-"
               f"{r['decode_tok_s_range'][1]:.1f})")
        kernels = ", ".join(f"{k} x{n}" for k, n in r["kernel_summary"].items())
        size = f"{r['size_mb']:.1f}{SIZE_MARKS.get(r['size_source'], '')}"
        print(f"{r['name']:<{width}} {pre:>20} {dec:>20} {size:>9} {r['weights_read_mb']:>17.1f} "
              f"{r['peak_rss_mb']:>12.0f}  {kernels}")
    marks = {r["size_source"] for r in runs}
    if "memory" in marks:
        print("* size of the tensors in memory (not saved on disk)")
    if marks & {"stored", "variant"}:
        print("+ the size as a GGUF export stores it (codes, scales and zero points; other "
              "matrices in 16 bits, vectors in 32), the size quantize, Compare and export give; "
              "the tensors as they run here are runtime_mb in --json")
    for r in runs:
        parts = r.get("size_breakdown")
        if parts:
            print(f"  {r['name']}: " + ", ".join(
                f"{k} {v / 2**20:.2f} MB" for k, v in parts.items()))
    for r in runs:
        build = ", ".join(f"{k} {v}" for k, v in r["build"].items() if k not in ("backend",))
        step = f"; decode step {r['decode_step']}" if r.get("decode_step") else ""
        print(f"{r['name']}: {r['backend']} ({build}){step}")
    for r in runs:
        for k in r["kernels"]:
            if k["fallback"]:
                print(f"{r['name']}: {k['layer']}: {k['note']}", file=sys.stderr)
