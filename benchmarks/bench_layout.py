"""What block-layout discovery (studio/core/quant/layout.py) finds and costs, per family.

For each tiny random family (tests/tiny_models.py) and the demo: the scaling groups found, how
many candidates were proved, the seconds `layout.discover` took, and whether folding random
scales into every group left the logits unchanged (max |difference|).

    PYTHONPATH=. python benchmarks/bench_layout.py [--no-demo]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core.jobs import run  # noqa: E402
from studio.core.layers import weight_matrix  # noqa: E402
from studio.core.models import demo_available, open_model_job  # noqa: E402
from studio.core.quant import layout  # noqa: E402
from studio.core.quant.blocks import decoder_blocks  # noqa: E402
from studio.core.quant.scaling import fold_scales  # noqa: E402


def measure(name: str, model) -> None:
    model = copy.deepcopy(model)
    for module in model.modules():  # non-trivial norm weights, so a wrong fold shows
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.data.add_(torch.rand_like(module.weight) * 0.5)
    candidates = []
    original = layout._Trace.candidates

    def counting(self):
        found = original(self)
        candidates.append(len(found))
        return found

    layout._Trace.candidates = counting
    try:
        start = time.perf_counter()
        layout.discover(model)
        seconds = time.perf_counter() - start
    finally:
        layout._Trace.candidates = original
    _, blocks = decoder_blocks(model)
    groups = layout.scaling_groups(blocks[0])
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for block in blocks:
            for group in layout.scaling_groups(block):
                width = weight_matrix(block.get_submodule(group.linears[0])).shape[1]
                fold_scales(block, group, torch.exp(torch.randn(width)))
        diff = (model(input_ids=ids).logits - before).abs().max().item()
    print(f"{name}: {len(groups)} groups from {sum(candidates)} candidates over "
          f"{len(candidates)} distinct block(s), {seconds:.2f} s; folded logits differ by "
          f"{diff:.2e}")
    for g in groups:
        rows = f" rows {g.rows[0]}..{g.rows[1]}" if g.rows else ""
        print(f"    {g.prev}{rows} -> {', '.join(g.linears)} (inspect {g.inspect})")


def main(argv=None) -> int:
    from tests.tiny_models import FAMILIES, make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-demo", action="store_true")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-layout-"))
    for arch in FAMILIES:
        measure(arch, run(open_model_job(make_tiny_model(arch, root / arch))).model)
    if not args.no_demo and demo_available():
        measure("demo", run(open_model_job("demo")).model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
