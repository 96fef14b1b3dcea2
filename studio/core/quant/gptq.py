"""GPTQ (Frantar et al. 2022), following IST-DASLab/gptq's `GPTQ.fasterquant`.

The layer's inputs X give the Hessian of its output error, H = 2/n X X^T. Columns are quantized
one at a time; each column's rounding error is spread over the columns not yet quantized,
weighted by the inverse Hessian (through the upper Cholesky factor of H^-1). Columns are
processed in blocks of 128 with lazy batch updates of the rest, as in the reference.

Faithful to the reference: dampening `damp` x mean(diag H); dead inputs (zero diagonal) get
H_jj = 1 and zero weights; optional act-order (columns by decreasing H_jj); group parameters
recomputed at each group's first column, or fixed up front from the original weights when
act-order is on (the reference's `static_groups`, which keeps groups contiguous in the original
column order so the result fits the shared grid). Where we differ: a group starting inside a
128-column block takes its range from the block's *updated* columns (the reference reads the
stale copy), and a Hessian that is not positive definite is damped further (x10 each try)
instead of crashing; if even that fails the layer falls back to RTN and says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from studio.core.plan import QuantSpec
from studio.core.quant.grid import QTensor, compute_qparams, effective_group_size, quantize_rtn
from studio.core.quant.rtn import single_thread

log = logging.getLogger(__name__)
DAMP_RETRIES = 6
INNER = 16  # columns updated eagerly inside a block (see _quantize_columns)
STRIP = 384  # rows per strip of a Hessian's upper triangle (4 strips measured fastest at 1536)


class HessianAccumulator:
    """Sum of x x^T over every input row a layer sees (shared by layers reading one input).

    The sum is symmetric, so only its upper triangle is built, in strips of rows: about 60%
    of the arithmetic of a full product, through the same BLAS as the rest of torch (a separate
    BLAS's threads fought torch's for the two cores). float32 throughout: a bfloat16 product
    rounds the sum enough to make GPTQ measurably worse on attention-output layers."""

    def __init__(self, columns: int) -> None:
        self.upper = torch.zeros(columns, columns)
        self.count = 0
        self.strip = -(-columns // max(1, round(columns / STRIP)))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        xt = x.T
        for i in range(0, x.shape[1], self.strip):
            self.upper[i: i + self.strip, i:].addmm_(xt[i: i + self.strip], x[:, i:])
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n X X^T, the reference's scaling. Built with one d x d temporary beside the
        sum (the inputs of a 1536-wide layer make each such copy 9 MiB)."""
        upper = self.upper.triu_()             # the strips also wrote part of the lower half
        full = upper + upper.T                 # the diagonal twice: exact, as is taking it off
        full.diagonal().sub_(upper.diagonal())
        return full.mul_(2.0 / max(self.count, 1))


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor,
                          reference: float | None = None) -> float:
    """||X Wq^T - X W^T||^2 / ||X W^T||^2 over the inputs that built `hessian` (= c X^T X).

    Exact for those inputs and much cheaper than running them again: tr(dW H dW^T) / tr(W H W^T).
    `reference` is tr(W H W^T) when already known (`output_energy`).
    """
    w = w.float()
    diff = wq.float() - w
    num = ((diff @ hessian) * diff).sum().item()
    den = output_energy(w, hessian) if reference is None else reference
    return max(num, 0.0) / max(den, 1e-30)


def output_energy(w: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H W^T): the layer's squared output norm over the inputs (times H's scale)."""
    w = w.float()
    return ((w @ hessian) * w).sum().item()


@dataclass
class PreparedHessian:
    """What GPTQ derives from a Hessian alone: shared by layers reading the same input."""
    perm: torch.Tensor            # column order (act-order) or identity
    dead: torch.Tensor            # inputs that never fire
    hinv: torch.Tensor | None     # upper Cholesky factor of the damped inverse, permuted
    note: str


def prepare_hessian(hessian: torch.Tensor, damp: float, act_order: bool) -> PreparedHessian:
    H = hessian.float()
    dead = torch.diag(H) == 0
    if dead.any():               # a copy (and a masked write) only when needed
        H = H.clone()
        H.diagonal()[dead] = 1.0
    cols = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    if act_order:
        H = H[perm][:, perm]
    hinv, note = _inverse_cholesky(H, damp)
    return PreparedHessian(perm, dead, hinv, note)


def gptq_quantize_layers(weights: list[torch.Tensor], hessian: torch.Tensor,
                         specs: list[QuantSpec]) -> list[tuple[QTensor, str]]:
    """GPTQ for layers reading one input (one Hessian): [(QTensor, note)] in their order.

    GPTQ treats every output row on its own, so layers with the same spec and input width are
    stacked into one matrix and quantized in one pass of the column loop (q/k/v, gate/up):
    the same result as one at a time, for a fraction of the loop's overhead."""
    cache: dict = {}
    results: list[tuple[QTensor, str] | None] = [None] * len(weights)
    stacks: list[tuple[QuantSpec, int, list[int]]] = []  # (spec, input width, members)
    for i, (w, spec) in enumerate(zip(weights, specs)):
        for same, cols, members in stacks:
            if same == spec and cols == w.shape[1]:
                members.append(i)
                break
        else:
            stacks.append((spec, w.shape[1], [i]))
    for spec, _, members in stacks:
        stacked = torch.cat([weights[i].float() for i in members])
        qt, note = gptq_quantize(stacked, hessian, spec, cache)
        start, codes = 0, qt.codes
        for i in members:
            rows = slice(start, start + weights[i].shape[0])
            results[i] = (QTensor(codes[rows], qt.scale[rows].clone(),
                                  qt.zero[rows].clone(), qt.bits, qt.group_size), note)
            start = rows.stop
    return results


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  cache: dict | None = None) -> tuple[QTensor, str]:
    """GPTQ-quantize `w` [out, in] with `hessian` [in, in]; returns the QTensor and a note
    ("" when nothing unusual happened). Layers sharing one Hessian pass one `cache` dict so
    its inverse is computed once."""
    w = w.float().clone()
    out, cols = w.shape
    gs = effective_group_size(spec.group_size, cols)
    act_order = bool(spec.option("act_order"))
    key = (float(spec.option("damp")), act_order)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = prepare_hessian(hessian, *key)
    prep = cache[key]
    if prep.dead.any():
        w[:, prep.dead] = 0.0

    static = act_order or gs == cols  # parameters fixed from the whole (original) matrix
    scale = torch.zeros(out, -(-cols // gs))
    zero = torch.zeros_like(scale)
    if static:
        scale, zero = compute_qparams(w, spec.bits, gs, spec.symmetric,
                                      scale_dtype=spec.scale_dtype)
    if prep.hinv is None:
        log.warning("GPTQ: %s", prep.note)
        return quantize_rtn(w, spec), prep.note

    if act_order:
        w = w[:, prep.perm]
    codes = torch.zeros(out, cols, dtype=torch.uint8)
    block = int(spec.option("block_size"))
    with single_thread():
        _quantize_columns(w, prep.hinv, prep.perm, codes, scale, zero, spec, gs, static, block)
    return QTensor(codes, scale, zero, spec.bits, gs), prep.note


def _quantize_columns(w, hinv, perm, codes, scale, zero, spec, gs, static, block) -> None:
    """The reference's inner loops, writing codes (and, for dynamic groups, scale/zero).

    Works on the transpose (one row per input column, so a column is contiguous) and does the
    per-column arithmetic through NumPy views of the same memory: the loop runs once per input
    column, and torch's per-call overhead was most of its time. Same element-wise float32
    arithmetic as the reference (division by the scale, round half to even).

    One more level of lazy batching than the reference: inside each block of `block` columns,
    a column's error updates only the rest of its sub-block of INNER columns at once; the
    sub-block's errors reach the block's later columns in one matrix product. Same arithmetic
    (up to summation order), a fraction of the memory traffic. Sub-blocks start on group
    boundaries, so a group's range is always taken from fully updated columns."""
    out, cols = w.shape
    maxq = float(2 ** spec.bits - 1)
    inner = INNER if block % INNER == 0 and (static or gs % INNER == 0) else 1
    wt = w.T.contiguous()                      # [cols, out]: row i = column i of w
    wn = wt.numpy()
    hn = hinv.numpy()
    order = perm.tolist()
    codes_t = np.zeros((cols, out), dtype=np.uint8)
    scale_t = scale.T.contiguous().numpy()     # [groups, out]
    zero_t = zero.T.contiguous().numpy()
    err_t = torch.zeros(block, out)
    en = err_t.numpy()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        for j1 in range(i1, i2, inner):
            j2 = min(j1 + inner, i2)
            for i in range(j1, j2):
                col = order[i]                 # the column's place in the original order
                g = col // gs
                if not static and col % gs == 0:
                    # A new group starts here: its range from the columns as updated so far.
                    span = wt[i: i + gs].T
                    s, z = compute_qparams(span, spec.bits, gs, spec.symmetric,
                                           scale_dtype=spec.scale_dtype)
                    scale_t[g], zero_t[g] = s[:, 0].numpy(), z[:, 0].numpy()
                x = wn[i]
                c = np.rint(x / scale_t[g])
                c += zero_t[g]
                np.maximum(c, 0.0, out=c)
                np.minimum(c, maxq, out=c)
                codes_t[col] = c
                e = x - scale_t[g] * (c - zero_t[g])
                e /= hn[i, i]
                en[i - i1] = e
                if i + 1 < j2:
                    wn[i + 1: j2] -= hn[i, i + 1: j2, None] * e
            if j2 < i2:
                wt[j2:i2].addmm_(hinv[j1:j2, j2:i2].T, err_t[j1 - i1: j2 - i1], alpha=-1)
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err_t[: i2 - i1], alpha=-1)
    codes.copy_(torch.from_numpy(codes_t).T)
    if not static:
        scale.copy_(torch.from_numpy(scale_t).T)
        zero.copy_(torch.from_numpy(zero_t).T)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, str]:
    """Upper Cholesky factor of (H + damp*mean(diag H) I)^-1 (float32, as the reference), damping
    further (x10 per try) when H is not positive definite.

    The reference inverts H through its Cholesky factor and factors the inverse again. One
    factorisation does it: with J the exchange matrix (reversed order), J H J = L L^T gives
    H = R R^T with R = J L J upper triangular, so H^-1 = (R^-1)^T R^-1 and the upper factor
    wanted is R^-1 = J L^-1 J (positive diagonal, hence the unique factor): one Cholesky and one
    triangular inverse instead of two Cholesky factorisations and a solve."""
    mean_diag = abs(torch.mean(torch.diag(H)).item()) or 1.0
    for attempt in range(DAMP_RETRIES):
        d = damp * 10 ** attempt
        # Few n x n copies alive at once: GPTQ runs while a block's kept activations are.
        Hd = H.flip(0, 1)
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            U = torch.linalg.solve_triangular(L, torch.eye(H.shape[0], dtype=H.dtype),
                                              upper=False)
            del L
            if torch.isfinite(U.sum()):  # (NaN and inf carry into the sum; no n x n mask)
                note = "" if attempt == 0 else (f"the Hessian was not positive definite; "
                                                f"dampened with {d:g} x mean diagonal")
                return U.flip(0, 1).contiguous(), note  # (LAPACK leaves it column-major)
    return None, (f"the Hessian stayed singular even dampened with {d:g} x mean diagonal; "
                  f"this layer was rounded to nearest instead")


# --- the method's declaration (studio.core.quant.registry) ------------------------------------
from studio.core.quant.registry import Quantizer, option  # noqa: E402


@dataclass(frozen=True)
class GptqOptions:
    damp: float = option(0.01, low=0.0, high=10.0, title="Dampening",
                         help="added to the Hessian's diagonal, as a fraction of its mean")
    block_size: int = option(128, low=1, high=1 << 16, title="Block size",
                             help="columns per lazy-update block")
    # act_order on by default: columns by decreasing Hessian diagonal with groups fixed from the
    # original weights ("static" order, llm-compressor's default: no runtime cost). On the demo
    # at W4 g128 it took WikiText-2 ppl from 38.24 to 36.27 (RTN 39.14).
    act_order: bool = option(True, title="Act-order",
                             help="quantize columns by decreasing Hessian diagonal")


def _gptq(w: torch.Tensor, spec: QuantSpec, calib) -> tuple[QTensor, str]:
    return gptq_quantize(w, calib.hessian, spec)


def _gptq_shared(weights: list[torch.Tensor], calib, specs: list[QuantSpec]):
    return gptq_quantize_layers(weights, calib.hessian, specs)


QUANTIZER = Quantizer(
    name="gptq", title="GPTQ", options=GptqOptions, calibration="hessian", quantize=_gptq,
    quantize_shared=_gptq_shared,
    summary="column by column, each rounding error spread over the columns not yet quantized",
    llm_compressor="GPTQModifier",
    llm_compressor_options=lambda spec: {"dampening_frac": spec.option("damp"),
                                         "block_size": spec.option("block_size")})
