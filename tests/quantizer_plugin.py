"""A quantizer plug-in for tests, installed by `installed_plugin` as real entry-point metadata
(a temporary `*.dist-info` folder on sys.path), the way `pip install` would install one.

    levels   codebook format, no calibration: a table of 2**bits evenly spaced levels per
             output row (between the row's min and max)
    pairs    vector format, Hessian calibration: 2-D tables per row, the product of 2**bits
             levels in each coordinate, pairs chosen to minimise the input-energy-weighted error
    explodes raises inside the job (a plug-in bug)
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.core.quant.codebook import CodebookTensor, fp16_values
from studio.core.quant.registry import Quantizer, option
from studio.core.quant.vector import VectorTensor


@dataclass(frozen=True)
class LevelsOptions:
    margin: float = option(0.0, low=0.0, high=0.5, help="shrink the range by this fraction")


def _row_levels(w: torch.Tensor, count: int, margin: float) -> torch.Tensor:
    low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    span = (high - low) * (1 - margin)
    low = low + (high - low - span) / 2
    steps = torch.linspace(0, 1, count)[None, :]
    return fp16_values(low + span * steps)            # [out, count]


def quantize_levels(w, spec, calib):
    table = _row_levels(w, 2 ** spec.bits, spec.option("margin"))
    indices = (w[:, :, None] - table[:, None, :]).abs().argmin(dim=2).to(torch.uint8)
    return CodebookTensor(indices, table[:, None, :], None, spec.bits, -1)


def quantize_pairs(w, spec, calib):
    out, cols = w.shape
    weight = calib.input_energy.reshape(cols // 2, 2)  # per pair of columns
    levels = _row_levels(w, 2 ** spec.bits, 0.0)        # [out, L]
    count = levels.shape[1]
    grid = torch.stack([levels[:, :, None].expand(out, count, count),
                        levels[:, None, :].expand(out, count, count)], dim=3).reshape(out, -1, 2)
    pairs = w.reshape(out, cols // 2, 2)
    error = ((pairs[:, :, None, :] - grid[:, None, :, :]) ** 2 * weight[None, :, None, :]).sum(3)
    indices = error.argmin(dim=2)
    return VectorTensor(indices, grid[:, None], None, spec.bits, 2, 1, cols), "pairs"


def quantize_explodes(w, spec, calib):
    raise RuntimeError("the plug-in's arithmetic went wrong")


@dataclass(frozen=True)
class NoOptions:
    pass


QUANTIZERS = [
    Quantizer(name="levels", title="Even levels (test plug-in)", options=LevelsOptions,
              calibration="none", code_format="codebook", quantize=quantize_levels,
              summary="a table of evenly spaced levels per row",
              storage_bits=lambda spec, cols: spec.bits + 16 * 2 ** spec.bits / cols),
    Quantizer(name="pairs", title="Product pairs (test plug-in)", options=NoOptions,
              calibration="hessian", code_format="vector", quantize=quantize_pairs, bits=(2, 3),
              summary="pairs of weights on a product grid",
              storage_bits=lambda spec, cols: spec.bits + 16 * 2 * 4 ** spec.bits / cols),
    Quantizer(name="explodes", title="Explodes (test plug-in)", options=NoOptions,
              calibration="none", quantize=quantize_explodes),
]


@contextlib.contextmanager
def installed_plugin(folder: Path, target: str = "tests.quantizer_plugin:QUANTIZERS",
                     name: str = "studio-test-quantizers"):
    """Within: a distribution `name` whose `compression_studio.quantizers` entry point is
    `target`, found by importlib.metadata like any installed package's."""
    from studio.core.quant import registry

    dist = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{registry.GROUP}]\n{name} = {target}\n")
    sys.path.insert(0, str(folder))
    registry.reload()
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        registry.reload()
