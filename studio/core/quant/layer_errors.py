"""A quantized layer's error figures: its relative output error on the inputs it was measured
on, beside the error plain RTN of the baseline's weight gives on the same inputs (the
quantize job's Progress.detail and the variant's error table).

Scale folds (AWQ's, SmoothQuant's) rescale a weight's rows and columns between measuring its
inputs and rounding it: both errors are taken back in the measured inputs' coordinates, the
fold recovered by least squares (`two_sided_scale`).
"""
from __future__ import annotations

import torch

from studio.core.plan import QuantSpec
from studio.core.quant import registry
from studio.core.quant.gptq import output_energy, relative_output_error
from studio.core.quant.rtn import quantize_weight


def layer_errors(w_pre: torch.Tensor, w_now: torch.Tensor, w_q: torch.Tensor, spec: QuantSpec,
                 w_base: torch.Tensor, hessian: torch.Tensor) -> tuple[float, float]:
    """(error, RTN error) of one layer's output on the inputs that built `hessian`.

    `w_pre` is the weight when the inputs were measured, `w_now` the float weight just before
    rounding, `w_q` its de-quantized rounding, `w_base` the baseline's. A fold between measuring and rounding (AWQ's scales) or
    before measuring (SmoothQuant's) scales the weight's rows and columns: it is recovered by
    least squares, so both errors are taken in the measured inputs' coordinates:
    error = |X W_eff - X W_pre| with W_eff the rounded weight with the fold undone, and the RTN
    error = |X RTN(W_base)' - X W_pre| with RTN(W_base)' carrying the fold already in W_pre.
    """
    q = unfold(w_q, two_sided_scale(w_now, w_pre))
    energy = output_energy(w_pre, hessian)
    error = relative_output_error(w_pre, q, hessian, energy)
    rtn_spec = QuantSpec(spec.bits, spec.group_size, spec.symmetric, registry.REFERENCE,
                         scale_dtype=spec.scale_dtype)
    rtn = quantize_weight(w_base.float(), rtn_spec).dequantize()
    prior = two_sided_scale(w_pre, w_base)
    if prior is not None:
        rtn = prior[0][:, None] * rtn * prior[1][None, :]
    return error, relative_output_error(w_pre, rtn, hessian, energy)


def two_sided_scale(new: torch.Tensor, old: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row and column factors (r, c) with new ~= diag(r) old diag(c), or None if unchanged.

    Folding scales into a weight multiplies its columns (scales from the preceding norm) and
    its rows (scales moved into the next linear); a few alternating least-squares steps find
    both."""
    new, old = new.float(), old.float()
    if new.shape != old.shape or torch.equal(new, old):
        return None
    r = torch.ones(old.shape[0])
    c = torch.ones(old.shape[1])
    for _ in range(4):
        a = old * r[:, None]
        c = _ls_factor(new, a, dim=0)
        a = old * c[None, :]
        r = _ls_factor(new, a, dim=1)
    return r, c


def _ls_factor(new: torch.Tensor, old: torch.Tensor, dim: int) -> torch.Tensor:
    den = (old * old).sum(dim=dim)
    s = (new * old).sum(dim=dim) / den.clamp_min(1e-30)
    return torch.where(den > 0, s, torch.ones_like(s))


def unfold(q: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if scales is None:
        return q
    r, c = (torch.where(f != 0, f, torch.ones_like(f)) for f in scales)
    return q / r[:, None] / c[None, :]
