"""Open and run every job on a model of Llama-3.2-3B's shapes, each job in a fresh child
process, measuring wall time and peak RSS against the memory guard's estimate (issue 17).

    python benchmarks/bench_large.py make               # the synthetic model, once (~6.4 GB)
    python benchmarks/bench_large.py make-gguf          # it as a Q8_0 GGUF (~3.4 GB), for a
                                                        # large GGUF's first open (run open
                                                        # --model FILE.gguf: make_large_gguf.py)
    python benchmarks/bench_large.py run [JOB ...]      # open stats rtn gptq eval eval-variant
                                                        # (rtn-noerr: RTN without error windows;
                                                        # eval-variant: $STUDIO_LARGE_VARIANT)
    python benchmarks/bench_large.py run --model demo   # the same jobs on the demo
    python benchmarks/bench_large.py guard              # the memory guard's estimate beside
                                                        # each job's measured peak (demo and
                                                        # the 2-block cut, streamed)

No multi-billion model can be downloaded here, so `make` writes one: Llama-3.2-3B's config
(hidden 3072, 28 layers, 24 query / 8 key-value heads, intermediate 8192, vocabulary 128256,
tied embedding) with random bf16 weights (normal, std 0.02; norms 1) in safetensors shards of
about 2 GB with their index, plus the demo's tokenizer (its ids are a subset of the
vocabulary). It goes to $STUDIO_LARGE (default /work/tmp_large/llama-3b-synthetic), outside
the repository, and is written one tensor at a time, so making it needs little memory.

Each job runs in `python benchmarks/bench_large.py child JOB MODEL` and the parent reads the
child's peak RSS from getrusage(RUSAGE_CHILDREN) after it exits (ru_maxrss: every page the
child ever had resident, file-backed pages included). The child prints one JSON line: wall
seconds, the guard's estimate, per-block seconds where the job has blocks. Figures taken
while other work shares the CPU are marked so by the caller; RSS does not depend on load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MIB = 2 ** 20
LARGE = Path(os.environ.get("STUDIO_LARGE", "/work/tmp_large/llama-3b-synthetic"))
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
    "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 1, "eos_token_id": 2,
}
SHARD_BYTES = 2 * 10 ** 9
CUT = LARGE.with_name(f"{LARGE.name}-2blocks")   # `make --layers 2`: the same shapes, 2 blocks
GUARD_JOBS = ("open", "stats", "rtn-noerr", "rtn", "eval", "eval-variant", "capture", "export",
              "gptq")
JOBS = ("open", "stats", "rtn", "rtn-noerr", "gptq", "eval", "eval-variant", "capture",
        "sensitivity", "bench", "export")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make_p = sub.add_parser("make")
    make_p.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                        help="a cut with fewer blocks of the same shapes (own folder)")
    gguf_p = sub.add_parser("make-gguf")
    gguf_p.add_argument("--out", type=Path, default=LARGE.with_name(f"{LARGE.name}-Q8_0.gguf"))
    run_p = sub.add_parser("run")
    run_p.add_argument("jobs", nargs="*", default=[j for j in JOBS if j != "rtn-noerr"])
    run_p.add_argument("--model", default=str(LARGE))
    run_p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    guard_p = sub.add_parser("guard", help="the guard's estimate against each job's peak")
    guard_p.add_argument("--models", nargs="*", default=["demo", str(CUT)])
    guard_p.add_argument("--jobs", nargs="*", default=list(GUARD_JOBS))
    guard_p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    guard_p.add_argument("--table", type=Path, nargs="*",
                         help="only print the table of earlier runs' JSON lines")
    child_p = sub.add_parser("child")
    child_p.add_argument("job", choices=JOBS)
    child_p.add_argument("model")
    args = parser.parse_args(argv)
    if args.command == "make":
        if args.layers != CONFIG["num_hidden_layers"]:
            CONFIG["num_hidden_layers"] = args.layers
            make(LARGE.with_name(f"{LARGE.name}-{args.layers}blocks"))
        else:
            make(LARGE)
        return 0
    if args.command == "make-gguf":
        from make_large_gguf import make_gguf
        make_gguf(LARGE, args.out)
        return 0
    if args.command == "guard":
        from fit_guard import guard_table, print_table
        if args.table:
            return print_table(args.table)
        return guard_table(args.models, args.jobs, args.out, run_in_child)
    if args.command == "child":
        from bench_large_jobs import run_child
        print(json.dumps(run_child(args.job, args.model)), flush=True)
        return 0
    for job in args.jobs:
        record = run_in_child(job, args.model)
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


def run_in_child(job: str, model: str) -> dict:
    """One job in a fresh process; its own JSON line plus the peak RSS the kernel recorded."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here),
                                         env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", job, model],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    # (ru_maxrss of RUSAGE_CHILDREN is the largest child so far: the child's own figure,
    # peak_rss_self_mib, is the one to read when several jobs ran)
    record = {"job": job, "model": model, "exit": done.returncode,
              "process_seconds": round(wall, 1), "peak_rss_children_mib": round(peak / MIB)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        record.update(json.loads(lines[-1]))
    if done.returncode != 0:
        record["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:400]
    return record


# --- the synthetic model ---------------------------------------------------------------------

def make(folder: Path) -> None:
    """Llama-3.2-3B's shapes, random bf16 weights, shards of ~2 GB and their index."""
    import torch
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        print(f"{folder} exists")
        return
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(CONFIG):
        nbytes = 2 * _numel(shape)
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        print(f"wrote {file} ({sum(t.numel() for t in tensors.values()) * 2 / 2**30:.2f} GiB)",
              flush=True)
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    copy_demo_tokenizer(folder)


def tensor_shapes(config: dict):
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    yield "model.embed_tokens.weight", (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (config["num_attention_heads"] * config["head_dim"], h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, config["num_attention_heads"] * config["head_dim"])
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_demo_tokenizer(folder: Path) -> None:
    """The demo's tokenizer files, from the folder the studio caches the demo GGUF in."""
    import shutil

    from studio.core.gguf_fast import wait_for_cache
    from studio.core.jobs import run
    from studio.core.models import demo_gguf_path, gguf_cache_folder, open_model_job

    demo = gguf_cache_folder(demo_gguf_path())
    if not (demo / "tokenizer.json").is_file():
        run(open_model_job("demo"))
        wait_for_cache(demo)   # a first open writes the cache behind the model it returns
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, folder / name)


if __name__ == "__main__":
    sys.exit(main())
