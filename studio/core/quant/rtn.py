"""Round-to-nearest (RTN): every weight to the nearest point of its group's min-max grid.

With `mse_clip`, each group's range is first shrunk to the factor that minimises the group's
reconstruction error |w - q(w)|^2.4 over a grid of candidates, as the GPTQ reference's
`Quantizer.find_params(mse=True)` does (grid 100, shrinking by at most 80%, norm 2.4): clipping
a few outliers buys a finer step for all the other weights.
"""
from __future__ import annotations

import torch

from studio.core.plan import QuantSpec
from studio.core.quant.grid import (QTensor, compute_qparams, dequantize, effective_group_size,
                                    quantize_codes, quantize_rtn)

MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def quantize_weight(w: torch.Tensor, spec: QuantSpec, mse_clip: bool | None = None) -> QTensor:
    """RTN-quantize `w` [out, in]; `mse_clip` defaults to the spec's option (RTN specs only)."""
    if mse_clip is None:
        mse_clip = spec.method == "rtn" and bool(spec.option("mse_clip"))
    w = w.float()
    if not mse_clip:
        return quantize_rtn(w, spec)
    return quantize_rtn(w, spec, clip=mse_clip_factors(w, spec))


def mse_clip_factors(w: torch.Tensor, spec: QuantSpec, grid: int = MSE_GRID,
                     max_shrink: float = MSE_MAX_SHRINK) -> torch.Tensor:
    """The best range-shrink factor per group [out, groups] (1.0 = plain min-max)."""
    gs = effective_group_size(spec.group_size, w.shape[1])
    best_err = None
    best = None
    for step in range(int(max_shrink * grid)):
        factor = 1.0 - step / grid
        scale, zero = compute_qparams(w, spec.bits, gs, spec.symmetric, factor)
        codes = quantize_codes(w, scale, zero, spec.bits, gs)
        err = group_sums((dequantize(codes, scale, zero, gs) - w).abs().pow(MSE_NORM), gs)
        if best_err is None:
            best_err, best = err, torch.ones_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, factor), best)
    return best


def group_sums(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum [out, in] over each group of columns -> [out, groups] (ragged last group)."""
    out, cols = values.shape
    groups = -(-cols // group_size)
    pad = groups * group_size - cols
    if pad:
        values = torch.cat([values, values.new_zeros(out, pad)], dim=1)
    return values.reshape(out, groups, group_size).sum(dim=2)
