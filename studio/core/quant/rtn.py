"""Round-to-nearest (RTN): every weight to the nearest point of its group's min-max grid.

With `mse_clip`, each group's range is first shrunk to the factor that minimises the group's
reconstruction error |w - q(w)|^2.4 over a grid of candidates, as the GPTQ reference's
`Quantizer.find_params(mse=True)` does (grid 100, shrinking by at most 80%, norm 2.4): clipping
a few outliers buys a finer step for all the other weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from studio.core.plan import QuantSpec
from studio.core.quant.grid import (QTensor, effective_group_size, group_minmax,
                                    qparams_from_range, quantize_rtn)

MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def quantize_weight(w: torch.Tensor, spec: QuantSpec, mse_clip: bool | None = None) -> QTensor:
    """RTN-quantize `w` [out, in]; `mse_clip` defaults to the spec's option (RTN specs only)."""
    if mse_clip is None:
        mse_clip = spec.method == QUANTIZER.name and bool(spec.option("mse_clip"))
    w = w.float()
    if not mse_clip:
        return quantize_rtn(w, spec)
    return quantize_rtn(w, spec, clip=mse_clip_factors(w, spec))


def mse_clip_factors(w: torch.Tensor, spec: QuantSpec, grid: int = MSE_GRID,
                     max_shrink: float = MSE_MAX_SHRINK) -> torch.Tensor:
    """The best range-shrink factor per group [out, groups] (1.0 = plain min-max)."""
    gs = effective_group_size(spec.group_size, w.shape[1])
    wmin, wmax = group_minmax(w, gs)
    groups = wmin.shape[1]
    # Zero padding of a ragged last group costs nothing: every grid holds 0 exactly.
    padded = torch.zeros(w.shape[0], groups * gs)
    padded[:, : w.shape[1]] = w
    wg = padded.reshape(w.shape[0], groups, gs)
    maxq = 2 ** spec.bits - 1
    best_err = torch.full_like(wmin, float("inf"))
    best = torch.ones_like(wmin)
    with single_thread():
        for step in range(int(max_shrink * grid)):
            factor = 1.0 - step / grid
            scale, zero = qparams_from_range(wmin * factor, wmax * factor, spec.bits,
                                             spec.symmetric, spec.scale_dtype)
            scale, zero = scale[..., None], zero[..., None]
            q = (torch.clamp(torch.round(wg / scale) + zero, 0, maxq) - zero) * scale
            err = (q - wg).abs_().pow_(MSE_NORM).sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, factor), best)
    return best


@contextmanager
def single_thread():
    """For loops of many small tensor ops (GPTQ's columns, this grid search): spreading each op
    over threads costs more in synchronisation than it gains, 10x and more when other work
    shares the CPU. Restores the caller's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the method's declaration (studio.core.quant.registry) ------------------------------------
from dataclasses import dataclass  # noqa: E402

from studio.core.quant.registry import Quantizer, option  # noqa: E402


@dataclass(frozen=True)
class RtnOptions:
    mse_clip: bool = option(False, title="MSE clipping search",
                            help="shrink each group's range to minimise |w - q(w)|^2.4 "
                                 "(the GPTQ reference's mse=True)")


def _rtn(w: torch.Tensor, spec: QuantSpec, calib=None) -> QTensor:
    return quantize_weight(w, spec)


QUANTIZER = Quantizer(
    name="rtn", title="RTN (round to nearest)", options=RtnOptions, calibration="none",
    quantize=_rtn, summary="every weight to the nearest point of its group's min-max grid",
    llm_compressor="QuantizationModifier")
