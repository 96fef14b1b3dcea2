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
import os
from dataclasses import dataclass

import numpy as np
import torch

# OpenBLAS's threads (scipy's syrk) otherwise spin for ~0.1 s after each call, fighting torch's
# threads for the same two cores; read when scipy's OpenBLAS loads, i.e. on the import below.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from scipy.linalg import blas  # noqa: E402

from studio.core.plan import QuantSpec
from studio.core.quant.grid import QTensor, compute_qparams, effective_group_size, quantize_rtn
from studio.core.quant.rtn import single_thread

log = logging.getLogger(__name__)
DAMP_RETRIES = 6
INNER = 16  # columns updated eagerly inside a block (see _quantize_columns)


class HessianAccumulator:
    """Sum of x x^T over every input row a layer sees (shared by layers reading one input).

    The sum is symmetric, so BLAS's syrk builds only its upper triangle: half the arithmetic
    of a full product, in float32 (a bfloat16 product, though faster still, rounds the sum
    enough to make GPTQ measurably worse on attention-output layers)."""

    def __init__(self, columns: int) -> None:
        self.upper = np.zeros((columns, columns), dtype=np.float32, order="F")
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float().contiguous()
        # x.T is a Fortran-ordered view of x: syrk reads it without a copy.
        blas.ssyrk(1.0, x.numpy().T, beta=1.0, c=self.upper, trans=0, lower=0, overwrite_c=1)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n X X^T, the reference's scaling."""
        upper = torch.from_numpy(np.triu(self.upper))
        full = upper + torch.triu(upper, diagonal=1).T
        return full * (2.0 / max(self.count, 1))


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
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    cols = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
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
        start = 0
        for i in members:
            rows = slice(start, start + weights[i].shape[0])
            results[i] = (QTensor(qt.codes[rows].clone(), qt.scale[rows].clone(),
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
    w[:, prep.dead] = 0.0

    static = act_order or gs == cols  # parameters fixed from the whole (original) matrix
    scale = torch.zeros(out, -(-cols // gs))
    zero = torch.zeros_like(scale)
    if static:
        scale, zero = compute_qparams(w, spec.bits, gs, spec.symmetric)
    if prep.hinv is None:
        log.warning("GPTQ: %s", prep.note)
        return quantize_rtn(w, spec), prep.note

    w = w[:, prep.perm]
    codes = torch.zeros(out, cols, dtype=torch.uint8)
    block = int(spec.option("block_size"))
    with single_thread():
        _quantize_columns(w, prep.hinv, prep.perm, codes, scale, zero, spec, gs, static, block)
    return QTensor(codes, scale, zero, spec.bits, gs), prep.note


def _quantize_columns(w, hinv, perm, codes, scale, zero, spec, gs, static, block) -> None:
    """The reference's inner loops, writing codes (and, for dynamic groups, scale/zero).

    One more level of lazy batching than the reference: inside each block of `block` columns,
    a column's error updates only the rest of its sub-block of INNER columns at once; the
    sub-block's errors reach the block's later columns in one matrix product. Same arithmetic
    (up to summation order), a fraction of the memory traffic. Sub-blocks start on group
    boundaries, so a group's range is always taken from fully updated columns."""
    out, cols = w.shape
    maxq = 2 ** spec.bits - 1
    inner = INNER if block % INNER == 0 and (static or gs % INNER == 0) else 1
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for i in range(j1, j2):
                col = perm[i1 + i].item()   # the column's place in the original order
                g = col // gs
                if not static and col % gs == 0:
                    # A new group starts here: its range from the columns as updated so far.
                    span = torch.cat([w1[:, i: i + gs], w[:, i2: i1 + i + gs]], dim=1)
                    s, z = compute_qparams(span, spec.bits, gs, spec.symmetric)
                    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                x = w1[:, i]
                c = torch.clamp(torch.round(x / scale[:, g]) + zero[:, g], 0, maxq)
                q = scale[:, g] * (c - zero[:, g])
                codes[:, col] = c.to(torch.uint8)
                e = (x - q) / h1[i, i]
                w1[:, i:j2] -= e[:, None] * h1[i, i:j2][None, :]
                err1[:, i] = e
            if j2 < i2 - i1:
                w1[:, j2:] -= err1[:, j1:j2] @ h1[j1:j2, j2:]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, str]:
    """Upper Cholesky factor of (H + damp*mean(diag H) I)^-1 (float32, as the reference), damping further
    (x10 per try) when H is not positive definite."""
    mean_diag = abs(torch.mean(torch.diag(H)).item()) or 1.0
    idx = torch.arange(H.shape[0])
    for attempt in range(DAMP_RETRIES):
        d = damp * 10 ** attempt
        Hd = H.clone()
        Hd[idx, idx] += d * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            # cholesky_solve against I: the same inverse as cholesky_inverse, ~9x faster here.
            Hi = torch.cholesky_solve(torch.eye(H.shape[0], dtype=H.dtype), L)
            U, info = torch.linalg.cholesky_ex(Hi, upper=True)
            if info == 0 and torch.isfinite(U).all():
                note = "" if attempt == 0 else (f"the Hessian was not positive definite; "
                                                f"dampened with {d:g} x mean diagonal")
                return U, note
    return None, (f"the Hessian stayed singular even dampened with {d:g} x mean diagonal; "
                  f"this layer was rounded to nearest instead")
