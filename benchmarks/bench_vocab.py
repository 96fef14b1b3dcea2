"""Large vocabularies (issue 18): decode speed with a quantized lm_head and RTN's peak memory
on a model whose embedding is half its parameters, printed as ratios in one run.

    python benchmarks/bench_vocab.py [--parts decode,memory] [--threads 1] [--repeat 3]
        [--new-tokens 32] [--quick]

1. decode: a tiny-shaped Llama (hidden 128, 2 blocks) with Gemma 3's 262,144-token vocabulary
   and a tied embedding, so nearly every weight a decode step reads is the lm_head's. fp32
   (the lean decoder on float32 weights: through the native step, and eager) against variants made by `quantize_job` with the body
   at RTN W4 g32 and the lm_head (the tied embedding with it, one matrix) kept in 16-bit, at
   W8 per-channel (the default, int8 kernel) and at W4 g32 (int4 kernel). Same prompt ids.
   Target: the quantized-head variant decodes at >= 3x fp32.
2. memory: in a fresh process per run, a Llama whose tied embedding is half its parameters
   (hidden 1024, 4 blocks, 50,000 tokens: 51M + 51M parameters, 393 MiB in float32) is opened
   and quantized with RTN W4 g128 as `quantize --method rtn` does it (8 calibration windows of
   512 tokens for the error figures), the head at W8 and kept. Peak RSS (sampled) minus the
   runtime (RSS before the model is opened, libraries loaded), over the fp32 model's bytes:
   the baseline itself counts 1. Target: <= 2.

Speeds depend on what else runs: this machine is shared, so say "under load" with them.
RSS figures do not depend on load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2 ** 20


def make_model(folder: Path, vocab: int, hidden: int, layers: int, intermediate: int,
               heads: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def decode(args, root: Path) -> None:
    from studio.core.bench import base_targets, bench_job, variant_target
    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from studio.core.plan import Plan, QuantSpec, Rule
    from studio.core.quantize import quantize_job

    folder = make_model(root / "vocab262k", 262144, 128, 2, 352, 4)
    handle = run(open_model_job(str(folder), weights="memory"))
    body = QuantSpec(4, 32)
    heads = {"lm_head kept (16-bit)": None, "lm_head W8 ch (default)": QuantSpec(8, -1, True),
             "lm_head W4 g32": QuantSpec(4, 32)}
    # fp32 through the native step (its head one float product) and eager (torch's ops)
    targets = base_targets(handle.model, configs=("fp32",))
    targets += base_targets(handle.model, configs=("fp32",), kernels="torch")
    for label, spec in heads.items():
        rules = () if spec is None else (Rule("lm_head", spec),)
        variant = run(quantize_job(handle, Plan(body, rules), None, None, label))
        print(f"{label}: {variant.size_bytes / MIB:.1f} MiB, breakdown "
              f"{ {k: round(v / MIB, 2) for k, v in variant.size_breakdown.items()} }")
        targets.append(variant_target(f"RTN W4 g32, {label}", variant.model,
                                      variant.qtensors, variant.size_bytes))
    prompt, new = (8, 8) if args.quick else (32, args.new_tokens)
    results = run(bench_job(targets, 262144, prompt_tokens=prompt, new_tokens=new,
                            repeat=1 if args.quick else args.repeat, threads=args.threads))
    fp32, eager = results[0].decode_tok_s, results[1].decode_tok_s
    print(f"\ndecode, {args.threads} thread(s), {prompt}-token prompt, {new} new tokens, "
          f"median of {1 if args.quick else args.repeat} (target: quantized head >= 3x fp32)")
    for r in results:
        head = next((k for k in r.kernels if k.layer == "lm_head"), None)
        print(f"  {r.name:40s} {r.decode_tok_s:8.1f} tok/s  x{r.decode_tok_s / fp32:5.2f} fp32"
              f"  x{r.decode_tok_s / eager:5.2f} fp32 eager"
              f"  lm_head on {head.kernel if head else '?'}; weights read/step "
              f"{r.weights_read_mb:.1f} MiB; loop {r.details.get('decode_loop')}")


def memory(args, root: Path) -> None:
    folder = make_model(root / "halfembed", 50000, 1024, 4, 2816, 16)
    for head in ("w8", "keep"):
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), head],
                             capture_output=True, text=True, env={**os.environ,
                                                                  "OMP_NUM_THREADS": "1"})
        if out.returncode:
            print(out.stderr[-2000:])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"RTN W4 g128, lm_head {head}: fp32 model {r['model'] / MIB:.0f} MiB (embedding "
              f"{r['embedding_share']:.0%} of parameters); runtime {r['runtime'] / MIB:.0f} MiB; "
              f"open peak {(r.get('open_peak', 0) - r['runtime']) / r['model']:.2f} x model; "
              f"quantize peak {r['peak'] / MIB:.0f} MiB = "
              f"{(r['peak'] - r['runtime']) / r['model']:.2f} x model; variant "
              f"{r['size'] / MIB:.0f} MiB")


def child(folder: str, head: str) -> None:
    import psutil
    import transformers.models.llama.modeling_llama  # noqa: F401  (part of the runtime)

    from studio.core.bench import RssPeak
    from studio.core.jobs import run
    from studio.core.layers import embedding_summary, model_bytes
    from studio.core.models import open_model_job
    from studio.core.plan import Plan, QuantSpec, end_spec, with_ends
    from studio.core.quantize import quantize_text_job

    torch.set_num_threads(1)
    runtime = psutil.Process().memory_info().rss
    with RssPeak() as opened:
        handle = run(open_model_job(folder, weights="memory"))
    with RssPeak() as peak:
        plan = with_ends(Plan(QuantSpec(4, 128)), handle.layers, end_spec(head), None)
        variant = run(quantize_text_job(handle, plan, None, 64, 512, 0, "x"))
    share = embedding_summary(handle.layers, handle.param_count)["share"]
    print(json.dumps({"runtime": runtime, "open_peak": opened.peak, "peak": peak.peak,
                      "model": model_bytes(handle.model), "embedding_share": share,
                      "size": variant.size_bytes}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="decode,memory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vocab-") as tmp:
        if "decode" in args.parts:
            decode(args, Path(tmp))
        if "memory" in args.parts:
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
