"""CPU time of each Hessian method's own arithmetic on one decoder block of the demo's shapes.

What differs between GPTQ, SeqMSE and GPTVQ in a quantization job is the per-layer work after
the Hessian: the block runs and Hessians are the same for all three (`quantize.py`). This
times that work alone, in CPU seconds of this process (`time.process_time`, one torch thread),
so the ratios hold on a shared machine too. Layers as the driver groups them: q/k/v share a
Hessian, then o, gate/up, down (SmolLM2-135M: 576 wide, 192-wide k/v, 1536 MLP).
Weights: the demo's own when it opens, else Student-t draws. Hessians: with --calib-windows N,
the block's real inputs on N in-domain calibration windows (bench_quant.py's text; the model
unquantized, so not true-sequential); else random inputs with a few loud channels. Real inputs
have the outlier channels that decide methods weighted by input energy (k-means, AWQ), which
random ones lack: judge those on real Hessians.

    python benchmarks/bench_method_cost.py [--block 5] [--random] [--calib-windows 16] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from studio.core.plan import QuantSpec
from studio.core.quant import registry
from studio.core.quant.gptq import HessianAccumulator, relative_output_error
from studio.core.quant.registry import LayerCalibration

GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
          "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
          "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
ROWS = ("gptq:4:128", "seqmse:4:128", "seqmse:4:-1", "gptq:3:128", "gptvq:3:128",
        "gptq:2:64", "gptvq:2:128:table_bpw=0.25")


def open_demo():
    try:
        from studio.core.jobs import run
        from studio.core.models import open_model_job
        return run(open_model_job("demo"))
    except Exception as exc:  # no demo here: say so, and time random weights instead
        print(f"demo not available ({exc}); random weights", file=sys.stderr)
        return None


def block_weights(handle, index: int) -> dict[str, torch.Tensor]:
    if handle is not None:
        return {n: handle.weight(f"model.layers.{index}.{n}").float().clone() for n in SHAPES}
    torch.manual_seed(index)   # StudentT.sample takes no generator: seed the global one
    t = torch.distributions.StudentT(4.0)
    return {n: t.sample(shape) * 0.02 for n, shape in SHAPES.items()}


def real_hessians(handle, index: int, windows: int, seqlen: int = 512) -> dict:
    """The Hessian of each layer group's input in block `index`, from the unquantized model
    run on `windows` in-domain calibration windows (seed 0)."""
    from bench_quant import DEFAULT_DATA, in_domain_text
    from studio.core.text import bos_token, calibration_windows, tokenize

    ids = tokenize(handle.tokenizer, in_domain_text(DEFAULT_DATA))
    batch = calibration_windows(ids, seqlen, windows, seed=0, bos=bos_token(handle.tokenizer))
    accumulators, hooks = {}, []
    for group in GROUPS:
        layer = handle.module(f"model.layers.{index}.{group[0]}")
        acc = accumulators[group] = HessianAccumulator(SHAPES[group[0]][1])
        hooks.append(layer.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0])))
    try:
        with torch.no_grad():
            for window in batch:
                handle.model(input_ids=window[None])
    finally:
        for hook in hooks:
            hook.remove()
    return {group: (acc.hessian(), acc.count) for group, acc in accumulators.items()}


def hessian(cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8192, cols, generator=gen)
    x[:, :4] *= 20
    acc = HessianAccumulator(cols)
    acc.add(x[None])
    return acc.hessian()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--random", action="store_true", help="random weights, not the demo's")
    parser.add_argument("--calib-windows", type=int, default=0,
                        help="Hessians from this many real calibration windows (0: random)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_quant import run_spec

    handle = None if args.random else open_demo()
    weights = block_weights(handle, args.block)
    if args.calib_windows and handle is not None:
        hessians = real_hessians(handle, args.block, args.calib_windows)
    else:
        hessians = {g: (hessian(weights[g[0]].shape[1], i), 8192) for i, g in enumerate(GROUPS)}
    results = {}
    for row in args.rows.split(","):
        spec: QuantSpec = run_spec(row)
        quantizer = registry.get(spec.method)
        cpu = 0.0
        errors = []
        for group, (h, tokens) in hessians.items():
            calib = LayerCalibration(h, tokens)
            ws = [weights[n] for n in group]
            start = time.process_time()
            if quantizer.quantize_shared is not None:
                out = quantizer.quantize_shared(ws, calib, [spec] * len(ws))
            else:
                out = [quantizer.quantize(w, spec, calib) for w in ws]
            cpu += time.process_time() - start
            for w, qt in zip(ws, out):
                qt = qt[0] if isinstance(qt, tuple) else qt
                errors.append(relative_output_error(w, qt.dequantize(), h))
        results[row] = {"cpu_s": cpu, "mean_rel_error": sum(errors) / len(errors)}
    base = {bits: results.get(f"gptq:{bits}") for bits in ("4:128", "3:128", "2:64")}
    reference = next((r for r in base.values() if r), None)
    print(f"{'row':<32} {'CPU s/block':>11} {'x GPTQ':>7} {'mean rel. output error':>23}")
    for row, r in results.items():
        ratio = r["cpu_s"] / reference["cpu_s"] if reference else float("nan")
        print(f"{row:<32} {r['cpu_s']:11.2f} {ratio:7.2f} {r['mean_rel_error']:23.5f}",
              flush=True)
        if args.json:
            print(json.dumps({"row": row, **r, "x_gptq": ratio}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
