"""Sequential MSE (SeqMSE), as in Qualcomm's AIMET (`aimet_torch.seq_mse`).

For every output channel (and every group of input columns) the clipping range is searched on a
grid of candidates, (i + 1) / N times the channel's min-max range for i < N (AIMET's default N =
20), keeping the candidate with the smallest error of the layer's *output* on calibration
inputs: inputs that come from the already-quantized previous layers ("sequential"; AIMET's
`symqt` setting, where the float and quantized outputs are both taken from those inputs). The
codes are today's affine grid, only the ranges differ from RTN.

The output error of row o over the inputs X is |X (w_o - q_o)|^2 = (w_o - q_o) H (w_o - q_o)^T
with H = X^T X (times a constant): the Hessian the driver already gathers for GPTQ, so no
activation is kept and every candidate costs one product with H's blocks.

AIMET scores each group by the output of its own columns alone, X_g (w_og - q_og)^T. That is
the whole output error for a per-channel grid; with several groups the groups' output errors
add up with cross terms, and the per-group optimum can miss. So a second step, ours: starting
from the better (per row) of AIMET's choice and RTN's, one coordinate-descent sweep over the
groups picks each group's candidate against the whole output error with the other groups held.
Each step can only lower it, so every row ends at or below both RTN's and AIMET's error.
"""
from __future__ import annotations

import torch

from studio.core.plan import QuantSpec
from studio.core.quant.grid import QTensor, effective_group_size, qparams_from_range, quantize_rtn
from studio.core.quant.rtn import single_thread

def seqmse_quantize_layers(weights: list[torch.Tensor], hessian: torch.Tensor,
                           specs: list[QuantSpec]) -> list[tuple[QTensor, str]]:
    """SeqMSE for layers reading one input (one Hessian): [(QTensor, note)] in their order.
    Rows are searched independently, so each layer is simply done on its own."""
    return [(seqmse_quantize(w, hessian, spec), "") for w, spec in zip(weights, specs)]


def seqmse_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                    candidates: int | None = None) -> QTensor:
    """SeqMSE-quantize `w` [out, in] against the output error measured by `hessian` [in, in]."""
    w = w.float()
    n = int(spec.option("candidates") if candidates is None else candidates)
    factors = [(i + 1) / n for i in range(n)]
    spans = _group_spans(w.shape[1], effective_group_size(spec.group_size, w.shape[1]))
    H = hessian.float()
    with single_thread():
        choice = _search_each_group(w, H, spec, spans, factors)
        if len(spans) > 1:
            choice = _refine_jointly(w, H, spec, spans, factors, choice)
    clip = torch.tensor(factors)[choice]                 # [out, groups]
    return quantize_rtn(w, spec, clip=clip)


def _group_spans(cols: int, gs: int) -> list[slice]:
    return [slice(c, min(c + gs, cols)) for c in range(0, cols, gs)]


def _fake_quant_group(wg: torch.Tensor, spec: QuantSpec, factor: torch.Tensor | float
                      ) -> torch.Tensor:
    """Columns `wg` [out, width] as one group, rounded onto the min-max grid shrunk by `factor`
    (a number or one per row): the same arithmetic as `grid.quantize_rtn` with a clip."""
    factor = torch.as_tensor(factor, dtype=torch.float32).reshape(-1, 1)
    scale, zero = qparams_from_range(wg.amin(dim=1, keepdim=True) * factor,
                                     wg.amax(dim=1, keepdim=True) * factor,
                                     spec.bits, spec.symmetric, spec.scale_dtype)
    codes = torch.clamp(torch.round(wg / scale) + zero, 0, 2 ** spec.bits - 1)
    return (codes - zero) * scale


def _search_each_group(w, H, spec, spans, factors) -> torch.Tensor:
    """AIMET's search: per row and group, the candidate with the smallest error of the group's
    own output, d_g H_gg d_g^T. Returns candidate indices [out, groups]."""
    choice = torch.zeros(w.shape[0], len(spans), dtype=torch.long)
    for g, span in enumerate(spans):
        wg, Hg = w[:, span], H[span, span]
        best = torch.full((w.shape[0],), float("inf"))
        for i, f in enumerate(factors):
            d = wg - _fake_quant_group(wg, spec, f)
            loss = ((d @ Hg) * d).sum(dim=1)
            better = loss < best
            best = torch.where(better, loss, best)
            choice[better, g] = i
    return choice


def _refine_jointly(w, H, spec, spans, factors, choice) -> torch.Tensor:
    """One coordinate-descent sweep over the groups on the whole output error d H d^T."""
    top = len(factors) - 1                               # factor 1.0: plain RTN
    rtn = torch.full_like(choice, top)
    start = [_dequantize_choice(w, spec, spans, factors, c) for c in (choice, rtn)]
    losses = [(((w - q) @ H) * (w - q)).sum(dim=1) for q in start]
    keep_rtn = losses[1] < losses[0]
    choice = torch.where(keep_rtn[:, None], rtn, choice)
    q = torch.where(keep_rtn[:, None], start[1], start[0])
    residual = (w - q) @ H                               # R = d H, kept up to date
    for g, span in enumerate(spans):
        Hg = H[span, span]
        wg = w[:, span]
        d_now = wg - q[:, span]
        best_gain = torch.zeros(w.shape[0])              # staying put changes nothing
        best_q = q[:, span].clone()
        for i, f in enumerate(factors):
            qg = _fake_quant_group(wg, spec, f)
            step = (wg - qg) - d_now                     # change of d on this group
            # d'Hd'^T - dHd^T = 2 step . R_g + step H_gg step^T
            gain = 2 * (step * residual[:, span]).sum(dim=1) + ((step @ Hg) * step).sum(dim=1)
            better = gain < best_gain
            best_gain = torch.where(better, gain, best_gain)
            best_q[better] = qg[better]
            choice[better, g] = i
        step = (wg - best_q) - d_now
        residual += step @ H[span, :]
        q[:, span] = best_q
    return choice


def _dequantize_choice(w, spec, spans, factors, choice) -> torch.Tensor:
    q = torch.empty_like(w)
    table = torch.tensor(factors)
    for g, span in enumerate(spans):
        q[:, span] = _fake_quant_group(w[:, span], spec, table[choice[:, g]])
    return q


# --- the method's declaration (studio.core.quant.registry) ------------------------------------
from dataclasses import dataclass  # noqa: E402

from studio.core.quant.registry import Quantizer, option  # noqa: E402


@dataclass(frozen=True)
class SeqmseOptions:
    candidates: int = option(20, low=2, high=1000, title="Candidates",
                             help="clipping ranges tried per channel or group: (i + 1) / N of "
                                  "its min-max range (AIMET's default 20)")


def _seqmse(w: torch.Tensor, spec: QuantSpec, calib) -> QTensor:
    return seqmse_quantize(w, calib.hessian, spec)


QUANTIZER = Quantizer(
    name="seqmse", title="SeqMSE (sequential output MSE)", options=SeqmseOptions,
    calibration="hessian", quantize=_seqmse,
    summary="per channel or group, the clipping range that minimises the layer's output error "
            "on inputs from the already-quantized layers (AIMET)")
