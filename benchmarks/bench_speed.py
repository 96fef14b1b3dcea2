"""Speed where users feel it (issue 19), measured in one run and printed as ratios.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_speed.py [--model demo] [--threads 1,2]
        [--repeat 3] [--prompt-tokens 128] [--new-tokens 64] [--eval-windows 40] [--seqlen 512]
        [--parts decode,bandwidth,prefill,eval,families] [--no-compile] [--quick]

1. decode: at 1 thread, int4 g32 / g64 / g128 (RTN, lm_head on the kernel too) on the torch
   path with the studio's int4 kernel (q4_native; int4 g32 on torch's own int4 kernel beside
   it) (lean decoder, q/k/v and gate/up fused; eager, and with the step compiled by
   torch.compile unless --no-compile: each compile takes minutes on a busy 2-core machine,
   its time is not in the figures) against llama.cpp's decode of a Q4_0 GGUF of the same model (made from the model's
   GGUF with llama.cpp's own quantizer, through the `cyllama` binding, in this run) and against
   fp32 eager (the lean decoder on float32 weights; fp32 through the native step beside it).
   Same random prompt ids and lengths.
2. bandwidth: fp32 and bf16 decode (native step and eager) against their memory-bandwidth
   limit, at each thread count:
   a decode step reads every weight once, so tokens/s <= copy bandwidth / weight bytes per
   token (bandwidth: a 512 MiB tensor copy, bytes read + written per second, best of 5).
3. prefill: a `--prompt-tokens` prefill on the int4 g32 model (dense prefill path, and the
   low-bit kernel path for reference) against the bf16 and fp32 baselines, at each thread count.
4. eval: evaluating an RTN W4 g128 variant on WikiText-2 (`--eval-windows` x `--seqlen`, the
   standard protocol) once the baseline's side is cached, against the baseline's own
   evaluation (one pass of the float model); the first, uncached evaluation beside them.
5. families (not in the default parts): a decoder of the same small shape (hidden 512, 8
   blocks, 8 heads of 64, 4 KV heads, MLP 1536, 32k vocabulary, random weights) in each
   family the native step follows (Llama, Qwen2, Mistral, Qwen3, Gemma, Gemma 2, Gemma 3,
   Phi-3, and Phi-3 with a partial rotary factor of 0.75, as Phi-4-mini), sliding windows of
   64 (so a 128-token prompt decodes past them): fp32 and int4 g32 (lm_head too, the studio's
   kernels) through the native step against the eager lean step on the same weights and
   codes, at 1 thread. `--families llama,gemma2` picks some.

Every speed row names its backend, threads and build. Figures depend on what else runs on the
machine: run it on a quiet machine and say so if not. `--quick` (16-token prompt, 8 new
tokens, 1 repeat, 2 x 64 evaluation) only checks that everything runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch or llama.cpp start OpenMP

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core import baseline_cache  # noqa: E402
from studio.core.backends import get_backend, gguf_of  # noqa: E402
from studio.core.bench import base_targets, bench_job, gguf_target  # noqa: E402
from studio.core.jobs import run  # noqa: E402
from studio.core.models import cache_root, open_model_job  # noqa: E402

COPY_BYTES = 512 * 2**20
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def copy_bandwidth(threads: int, repeat: int = 5) -> float:
    """GB/s of a large tensor copy (read + write) with `threads` threads: the best of `repeat`."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch the pages first
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return 2 * COPY_BYTES / best / 1e9
    finally:
        torch.set_num_threads(old)


def q4_0_gguf(model: str, given: str | None) -> Path | None:
    """The Q4_0 GGUF llama.cpp decodes: --gguf, or made from the model's own GGUF with
    llama.cpp's quantizer (kept in the cache for the next run)."""
    from studio.core.export import llama_cpp

    if given:
        return Path(given)
    source = gguf_of(model)
    if source is None:
        print(f"note: {model} has no GGUF; give --gguf FILE for the llama.cpp rows")
        return None
    target = cache_root() / "bench" / f"{source.stem}.Q4_0.gguf"
    if not target.is_file():
        print(f"making {target.name} with llama.cpp's quantizer (from {source.name}; the "
              f"source is re-quantized, which is fine for speed)")
        llama_cpp.quantize_file(source, target, "Q4_0", threads=1)
    return target


def kernels_text(result) -> str:
    return ", ".join(f"{k} x{n}" for k, n in result.to_dict()["kernel_summary"].items())


def build_text(result) -> str:
    return ", ".join(f"{k} {v}" for k, v in result.build.items() if k != "backend")


def table(results, bandwidth: float | None = None) -> None:
    width = max(len(r.name) for r in results) + 2
    head = f"{'configuration':<{width}}{'prefill ms':>22}{'decode tok/s':>22}{'MB/token':>10}"
    if bandwidth:
        head += f"{'limit tok/s':>13}{'% of limit':>12}"
    print(head + "  kernels")
    for r in results:
        if r.error:
            print(f"{r.name:<{width}}no figures: {r.error}")
            continue
        pre = f"{r.prefill_ms:.0f} ({r.prefill_ms_range[0]:.0f}-{r.prefill_ms_range[1]:.0f})"
        dec = (f"{r.decode_tok_s:.1f} ({r.decode_tok_s_range[0]:.1f}-"
               f"{r.decode_tok_s_range[1]:.1f})")
        line = f"{r.name:<{width}}{pre:>22} {dec:>23}{r.weights_read_mb:>10.1f}"
        if bandwidth:
            limit = bandwidth * 1e9 / (r.weights_read_mb * 2**20)
            line += f"{limit:>13.0f}{100 * r.decode_tok_s / limit:>11.0f}%"
        print(f"{line}  {kernels_text(r)}")
    for build in sorted({f"{r.backend}: {build_text(r)}" for r in results if not r.error}):
        print(f"  build  {build}")


def ratio(a, b) -> str:
    if a is None or b is None or a.error or b.error:
        return "n/a"
    return f"{a.decode_tok_s / b.decode_tok_s:.2f}x"


def part_decode(handle, args, vocab) -> None:
    names = [layer.name for layer in handle.quantizable]
    targets = base_targets(handle.model, ("fp32",), layer_names=names, kernels="torch")
    targets += base_targets(handle.model, ("fp32",), layer_names=names)
    targets[-1].name = "fp32 (native step)"
    for group in (32, 64, 128):
        targets += base_targets(handle.model, ("int4",), group_size=group, layer_names=names)
    # torch's own int4 kernel beside the studio's (q4_native), same layers and codes
    targets += base_targets(handle.model, ("int4",), group_size=32, layer_names=names,
                            kernels="torch")
    gguf = q4_0_gguf(args.model, args.gguf)
    reason = get_backend("llama.cpp").unavailable_reason()
    if gguf is not None:
        targets.append(gguf_target(gguf, f"llama.cpp {gguf.name}"))
    results = run(bench_job(targets, vocab, args.prompt_tokens, args.new_tokens, args.repeat, 1))
    int4 = results[2:6]
    if args.compile:
        compiled = []
        for group in (32, 64, 128):
            compiled += base_targets(handle.model, ("int4",), group_size=group, layer_names=names)
        for target in compiled:
            target.name += " compiled"
        started = time.perf_counter()
        compiled = run(bench_job(compiled, vocab, args.prompt_tokens, args.new_tokens,
                                 args.repeat, 1, compile=True))
        print(f"(compiling and measuring the compiled steps: {time.perf_counter() - started:.0f} s; "
              f"modes: {', '.join(r.details.get('decode_step', '?') for r in compiled)})")
        results = results[:6] + compiled + results[6:]
        int4 += compiled
    print(f"\n== 1. decode at 1 thread ({args.prompt_tokens}-token prompt, {args.new_tokens} new "
          f"tokens, median (min-max) of {args.repeat})")
    if reason:
        print(f"note: {reason}")
    table(results)
    fp32 = results[0]
    llama = results[-1] if results[-1].backend == "llama.cpp" else None
    print(f"{'':<4}{'int4':<22}{'vs llama.cpp Q4_0 (target >= 2.5x)':>28}"
          f"{'vs fp32 eager (target >= 3.5x)':>34}")
    for r in [*int4, results[1]]:
        label = r.name.replace(" + lm_head", "")
        print(f"{'':<4}{label:<22}{ratio(r, llama):>28}{ratio(r, fp32):>34}")


def part_bandwidth_prefill(handle, args, vocab, parts) -> None:
    names = [layer.name for layer in handle.quantizable]
    for threads in args.threads:
        targets = base_targets(handle.model, ("fp32", "bf16"), layer_names=names)
        targets[0].name, targets[1].name = "fp32 (native step)", "bf16 (native step)"
        targets += base_targets(handle.model, ("fp32", "bf16"), layer_names=names,
                                kernels="torch")
        if "prefill" in parts:
            targets += base_targets(handle.model, ("int4",), group_size=32, layer_names=names)
            targets += base_targets(handle.model, ("int4",), group_size=32, layer_names=names,
                                    prefill="kernel")
        results = run(bench_job(targets, vocab, args.prompt_tokens, args.new_tokens,
                                args.repeat, threads))
        if "bandwidth" in parts:
            bandwidth = copy_bandwidth(threads)
            print(f"\n== 2. fp32 / bf16 decode against the memory-bandwidth limit, {threads} "
                  f"thread(s); copy bandwidth {bandwidth:.1f} GB/s (target >= 60%)")
            table(results[:4], bandwidth)
        if "prefill" in parts:
            fp32, bf16, _, _, w4, w4_kernel = results
            print(f"\n== 3. prefill of {args.prompt_tokens} tokens, {threads} thread(s) "
                  f"(target: W4 no slower than bf16, i.e. ratio <= 1.00)")
            table(results)
            for name, r in (("W4 g32 dense prefill", w4), ("W4 g32 on the kernel", w4_kernel),
                            ("fp32", fp32)):
                print(f"    {name:<24} / bf16 = {r.prefill_ms / bf16.prefill_ms:.2f}   "
                      f"/ fp32 = {r.prefill_ms / fp32.prefill_ms:.2f}")


FAMILY_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                    vocab_size=32000, max_position_embeddings=4096, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0)
FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
            "phi3_partial")


def family_config(family: str):
    """FAMILY_SHAPE in `family`'s config class, with the family's own features switched on."""
    import transformers as tf

    window = dict(sliding_window=64)
    if family == "llama":
        return tf.LlamaConfig(**FAMILY_SHAPE)
    if family == "qwen2":
        return tf.Qwen2Config(**FAMILY_SHAPE, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**FAMILY_SHAPE, **window)
    if family == "qwen3":
        return tf.Qwen3Config(**FAMILY_SHAPE)
    if family == "gemma":
        return tf.GemmaConfig(**FAMILY_SHAPE)
    if family == "gemma2":
        return tf.Gemma2Config(**FAMILY_SHAPE, **window)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**FAMILY_SHAPE, **window, layer_types=[
            "full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(8)])
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75 if family == "phi3_partial" else 1.0}
    shape = {k: v for k, v in FAMILY_SHAPE.items() if k != "head_dim"}   # hidden / heads
    return tf.Phi3Config(**shape, **window,
                         original_max_position_embeddings=4096, rope_parameters=rope)


def part_families(args) -> None:
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    print(f"\n== 5. the native step against the eager lean step, per family (shape "
          f"{FAMILY_SHAPE['hidden_size']} x {FAMILY_SHAPE['num_hidden_layers']} blocks, "
          f"{FAMILY_SHAPE['vocab_size']} vocabulary; {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, median of {args.repeat}, 1 thread)")
    print(f"{'family':<14}{'fp32 native':>13}{'fp32 eager':>12}{'ratio':>8}"
          f"{'int4 native':>13}{'int4 eager':>12}{'ratio':>8}  step")
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        for family in args.families:
            torch.manual_seed(0)
            folder = Path(tmp) / family
            AutoModelForCausalLM.from_config(family_config(family)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            handle = run(open_model_job(str(folder)))
            names = [layer.name for layer in handle.quantizable]
            targets = []
            for config in ("fp32", "int4"):
                native, eager = (base_targets(handle.model, (config,), layer_names=names)[0]
                                 for _ in range(2))
                eager.native_step, eager.name = False, f"{eager.name} (eager step)"
                targets += [native, eager]
            vocab = FAMILY_SHAPE["vocab_size"]
            results = run(bench_job(targets, vocab, args.prompt_tokens, args.new_tokens,
                                    args.repeat, 1))
            rates = [r.decode_tok_s for r in results]
            step = results[0].details.get("decode_step", "?")
            print(f"{family:<14}{rates[0]:>13.1f}{rates[1]:>12.1f}{rates[0] / rates[1]:>7.2f}x"
                  f"{rates[2]:>13.1f}{rates[3]:>12.1f}{rates[2] / rates[3]:>7.2f}x  "
                  f"{step[:60]}")
            del handle, targets, results


def part_eval(handle, args) -> None:
    from studio.core.evaluate import evaluate_job
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job

    text = args.data / "wikitext2_test.txt"
    if not text.is_file():
        text = None
        print("note: WikiText-2 not found; evaluating on the built-in text")
    variant = run(quantize_job(handle, Plan(QuantSpec(bits=4, group_size=128)), None, None,
                               "RTN W4 g128"))
    torch.set_num_threads(args.threads[-1])
    baseline_cache.clear_memory()

    def timed(model, baseline):
        start = time.perf_counter()
        result = run(evaluate_job(model, baseline, handle.tokenizer, text, args.seqlen,
                                  args.eval_windows))
        return time.perf_counter() - start, result

    base_seconds, base = timed(handle.model, None)
    # A fresh cache folder: the first variant evaluation computes the baseline's side.
    folder, saved = tempfile.mkdtemp(prefix="bench-speed-cache-"), os.environ.get(
        "COMPRESSION_STUDIO_CACHE")
    os.environ["COMPRESSION_STUDIO_CACHE"] = folder
    try:
        cold_seconds, cold = timed(variant.model, handle.model)
        warm_seconds, warm = timed(variant.model, handle.model)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if saved is None:
            os.environ.pop("COMPRESSION_STUDIO_CACHE", None)
        else:
            os.environ["COMPRESSION_STUDIO_CACHE"] = saved
    print(f"\n== 4. evaluation, {warm.windows} x {warm.seqlen} on {warm.text}, "
          f"{torch.get_num_threads()} thread(s) (target: cached variant <= 1.15x baseline)")
    print(f"    baseline alone (ppl {base.ppl:.3f})             {base_seconds:8.1f} s")
    print(f"    variant, baseline computed ({cold.baseline_cache})     {cold_seconds:8.1f} s   "
          f"{cold_seconds / base_seconds:.2f}x")
    print(f"    variant, baseline from cache ({warm.baseline_cache})     {warm_seconds:8.1f} s   "
          f"{warm_seconds / base_seconds:.2f}x   (ppl {warm.ppl:.3f}, KL {warm.kl:.4f}, "
          f"top-1 {warm.top1:.3f}; identical to the uncached: "
          f"{warm.to_dict()['ppl'] == cold.to_dict()['ppl'] and warm.kl == cold.kl})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--gguf", help="the llama.cpp Q4_0 file (default: made from MODEL's GGUF)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--parts", default="decode,bandwidth,prefill,eval")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="the families part's families (default: all)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile'd int4 decode rows")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks it runs")
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeat = 16, 8, 1
        args.eval_windows, args.seqlen = 2, 64
    args.threads = [int(t) for t in args.threads.split(",")]
    args.families = args.families.split(",")
    parts = set(args.parts.split(","))
    if parts == {"families"}:   # no demo needed
        part_families(args)
        return 0

    handle = run(open_model_job(args.model))
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    print(f"{handle.name}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
          f"{os.cpu_count()} cores; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if "decode" in parts:
        part_decode(handle, args, vocab)
    if parts & {"bandwidth", "prefill"}:
        part_bandwidth_prefill(handle, args, vocab, parts)
    if "eval" in parts:
        part_eval(handle, args)
    if "families" in parts:
        part_families(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
