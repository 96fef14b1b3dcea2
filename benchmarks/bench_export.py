"""Export figures on the demo model (issue 13's table).

1. Formats: one variant exported to every format. Per export: the job's time (writing, reloading
   with the consumer library, verifying), the model files' size, bits per weight on disk against
   the studio's estimate, and the perplexity of the file as its consumer library reads it against
   the studio's figure for the same variant (WikiText-2 test, standard protocol, seqlen 512, the
   first 40 windows).
2. GGUF at Q4_0 (4-bit symmetric, 32-weight blocks, fp16 scales; every block linear): the
   studio's RTN, GPTQ and AWQ on the GGUF-native grid against the same type made by the `gguf`
   package's own quantizer from the same fp32 weights, all at equal bytes, each exported through
   the studio's GGUF writer and measured after reloading. Q4_0 rather than Q4_1: the demo's
   weights sit on a Q4_1 grid already, so a Q4_1 round-to-nearest file reproduces them and
   flatters RTN. Where the `cyllama` binding is installed, llama.cpp's own perplexity of each
   file on the same windows is printed beside it.

Calibration: 64 windows x 512 tokens, seed 0, from the second half of the WikiText-2 test rows
(disjoint from the 40 evaluation windows).

    python benchmarks/bench_export.py [--data ../shared/data] [--parts formats,gguf]
        [--calib-windows 64] [--eval-windows 40] [--out DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import in_domain_text  # noqa: E402

from studio.core.export.base import ExportOptions  # noqa: E402
from studio.core.export.job import export_job  # noqa: E402
from studio.core.jobs import run  # noqa: E402
from studio.core.models import open_model_job  # noqa: E402
from studio.core.plan import Plan, QuantSpec  # noqa: E402
from studio.core.quant.grid import QTensor  # noqa: E402
from studio.core.quantize import quantize_job  # noqa: E402
from studio.core.text import calibration_windows, eval_windows, tokenize  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
Q4_0 = dict(bits=4, group_size=32, symmetric=True, scale_dtype="fp16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--parts", default="formats,gguf")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="also print a JSON line per row")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-export-"))

    handle = run(open_model_job("demo"))
    ids = tokenize(handle.tokenizer, (args.data / "wikitext2_test.txt").read_text(encoding="utf-8"))
    evals = eval_windows(ids, 512, args.eval_windows)
    calib = calibration_windows(tokenize(handle.tokenizer, in_domain_text(args.data)), 512,
                                args.calib_windows, seed=0)
    protocol = f"WikiText-2 test, {evals.shape[0]} x 512, stride 512"
    print(f"# demo: {handle.architecture}; {protocol}; calibration {calib.shape[0]} x 512 "
          f"in-domain, seed 0; exports under {out}")
    llama = _llama_cpp()

    if "formats" in parts:
        print("\n## One variant, every format")
        print(f"{'variant':26} {'format':19} {'seconds':>8} {'MiB':>8} {'bpw disk':>9} "
              f"{'estimate':>9} {'ppl file':>9} {'ppl studio':>10} {'ratio':>7} {'max dW q':>9} "
              f"{'max dW fp':>9} {'max dlogit':>10}")
        for spec, formats in ((QuantSpec(method="gptq", **Q4_0), ("gguf", "compressed-tensors", "hf")),
                              (QuantSpec(4, 128, False, "gptq"), ("compressed-tensors", "hf"))):
            variant = _quantize(handle, spec, calib)
            for fmt in formats:
                result = run(export_job(variant, handle, fmt, out / f"{_slug(spec)}-{fmt}",
                                        ExportOptions(dtype="bf16" if fmt == "hf" else "f16"),
                                        force=True, eval_windows=evals, eval_protocol=protocol))
                e = result.evaluation
                row = {"variant": spec.label, "format": fmt, "seconds": result.seconds,
                       "mib": result.bytes / 2**20, "bpw_disk": result.bits_per_weight_on_disk,
                       "bpw_estimate": result.bits_per_weight_estimate,
                       "ppl_file": e["ppl_export"], "ppl_studio": e["ppl_variant"],
                       "ratio": e["ppl_ratio"], "max_weight_diff": result.max_weight_diff,
                       "max_float_diff": result.max_float_diff,
                       "max_logit_diff": result.max_logit_diff}
                print(f"{row['variant']:26} {fmt:19} {row['seconds']:8.1f} {row['mib']:8.2f} "
                      f"{row['bpw_disk']:9.3f} {row['bpw_estimate']:9.3f} {row['ppl_file']:9.3f} "
                      f"{row['ppl_studio']:10.3f} {row['ratio']:7.4f} "
                      f"{row['max_weight_diff']:9.2g} {row['max_float_diff']:9.2g} "
                      f"{row['max_logit_diff']:10.3g}", flush=True)
                if args.json:
                    print(json.dumps(row))
            del variant

    if "gguf" in parts:
        print("\n## GGUF Q4_0 at equal bytes: the studio's methods against gguf's own quantizer")
        print(f"{'variant':28} {'quantize s':>10} {'MiB':>8} {'bpw disk':>9} {'ppl file':>9} "
              f"{'ppl studio':>10} {'llama.cpp':>10}")
        made = [("gguf-py Q4_0 (its quantizer)", lambda: _gguf_own_q4_0(handle))]
        made += [(f"studio {m.upper()} Q4_0", lambda m=m: _quantize(handle, QuantSpec(method=m, **Q4_0), calib))
                 for m in ("rtn", "gptq", "awq")]
        for title, make in made:
            started = time.perf_counter()
            variant = make()
            seconds = time.perf_counter() - started
            result = run(export_job(variant, handle, "gguf", out / _slug_text(title),
                                    ExportOptions(), force=True, eval_windows=evals,
                                    eval_protocol=protocol))
            e = result.evaluation
            llama_ppl = llama(result.file, evals) if llama else None
            row = {"variant": title, "quantize_seconds": seconds, "mib": result.bytes / 2**20,
                   "bpw_disk": result.bits_per_weight_on_disk, "ppl_file": e["ppl_export"],
                   "ppl_studio": e["ppl_variant"], "ppl_llama_cpp": llama_ppl,
                   "exact_layers": sum(layer["exact"] for layer in result.layers),
                   "layers": len(result.layers)}
            print(f"{title:28} {seconds:10.1f} {row['mib']:8.2f} {row['bpw_disk']:9.3f} "
                  f"{row['ppl_file']:9.3f} {row['ppl_studio']:10.3f} "
                  f"{'-' if llama_ppl is None else f'{llama_ppl:.3f}':>10}   "
                  f"({row['exact_layers']}/{row['layers']} layers exact)", flush=True)
            if args.json:
                print(json.dumps(row))
            del variant
        if not llama:
            print("(llama.cpp column: install the cyllama wheel to fill it)")
    return 0


def _quantize(handle, spec: QuantSpec, calib: torch.Tensor):
    windows = None if spec.method == "rtn" else calib
    return run(quantize_job(handle, Plan(spec), windows, "wikitext-2 (2nd half)", spec.label))


def _gguf_own_q4_0(handle):
    """A variant holding exactly what `gguf.quants.quantize(W, Q4_0)` makes of each block
    linear's fp32 weights (its d and nibbles as the studio's scale and codes, zero 8)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    variant = run(quantize_job(handle, Plan(QuantSpec(method="rtn", **Q4_0)), None, None,
                               "gguf-py Q4_0"))
    for name in variant.qtensors:
        w = handle.weight(name).float().numpy()
        blocks = quantize(w, GGMLQuantizationType.Q4_0).reshape(w.shape[0], -1, 18)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 2:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(w.shape)
        scale = torch.from_numpy(d)
        qt = QTensor(torch.from_numpy(codes.astype(np.uint8)), scale,
                     torch.full_like(scale, 8.0), 4, 32)
        variant.qtensors[name] = qt
        variant.model.get_submodule(name).qt = qt
    variant.layer_errors = []
    return variant


def _llama_cpp():
    """llama.cpp's perplexity of a GGUF on the windows, when the cyllama binding is installed."""
    from studio.core.export import llama_cpp

    if not llama_cpp.available():
        return None
    return lambda path, windows: run(llama_cpp.perplexity_job(path, windows))[0]


def _slug(spec: QuantSpec) -> str:
    return _slug_text(spec.label)


def _slug_text(text: str) -> str:
    from studio.core.files import safe_name
    return safe_name(text.replace(" ", "-"))


if __name__ == "__main__":
    sys.exit(main())
