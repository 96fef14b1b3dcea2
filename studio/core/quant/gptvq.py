"""GPTVQ (van Baalen et al. 2024, "GPTVQ: The Blessing of Dimensionality in LLM Quantization"),
following Qualcomm-AI-research/gptvq.

Vector quantization with GPTQ's error feedback. Each row's weights are cut into vectors of `dim`
adjacent columns; a vector is replaced by an entry of a table of 2^(dim x bits) vectors, so
`bits` is what each weight costs in indices. A table serves a block of the matrix: `columns`
input columns (the spec's group size) x `rows` output rows, as many rows as keep all the tables
within `table_bpw` bits per weight (the paper spends 0.125: its 3-bit 2-D codebooks of 64
entries serve 8192 weights). Entries are fp16 values, counted at 16 bits (the paper stores
int8 entries with a scale per codebook; the studio's vector format holds fp16 tables, so at
the same budget a table serves twice the rows).

Per layer, with H the Hessian of its output error and U the upper Cholesky factor of H^-1
(GPTQ's): columns are visited left to right; when a column group starts, its tables are fitted
to the group's weights as updated so far, by k-means (EM from a Mahalanobis initialisation, as
the paper); each vector is then replaced by its table's nearest entry and its error is spread
over the columns not yet quantized through U (lazily in blocks of 128 columns, as GPTQ);
finally the entries are refitted to the original weights by least squares on the whole output
error, tr((W - Q) H (W - Q)^T), with the assignments fixed (the paper's codebook update; it
takes 25 Adam steps, we solve the same quadratic by conjugate gradients and keep the result
only if it is still better once rounded to fp16).

Where we differ from the reference, on purpose: distances use the exact cost of a vector's
error under GPTQ's update, |(w - c) U_vv^-1|^2 with U_vv the vector's dim x dim block of U (the
reference keeps only the diagonal), and k-means weighs each vector with that same metric, so a
table is fitted to the loss it is judged on; within a vector the first column's error reaches
the second before the second's error is taken (exact for the chosen entry; the reference drops
that term). k-means runs Lloyd's iterations on a random sample of each table's rows (SAMPLE
vectors per entry) and then POLISH iterations on all of them, each phase stopping once the
objective falls by less than 0.1% (or after `kmeans_iters`; the paper runs 100 on all
vectors). On the demo's block-5 weights this took a 3-bit block from 45x to 20x GPTQ's CPU
time with a lower output error (0.0253 vs 0.0263; `benchmarks/bench_method_cost.py`): the
sample settles the entries cheaply and the polish finishes them on the loss they are judged
on. The table update takes 4 conjugate-gradient steps: 10 lowered the error by under 0.1%
for 2.5x its cost. No per-block scaling of the weights (the paper's optional
`vq_scaling_blocksize`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from studio.core.errors import StudioError
from studio.core.quant.grid import effective_group_size
from studio.core.quant.gptq import prepare_hessian
from studio.core.quant.rtn import single_thread
from studio.core.quant.vector import VectorTensor

MAX_ENTRIES = 4096   # 2^(dim x bits): k-means and lookups beyond this are not worth running
TABLE_BITS = 16      # an fp16 table entry
INNER = 16           # columns whose errors are passed on one by one (GPTQ's INNER)
SAMPLE = 32          # vectors per table entry k-means is fitted on before its polish
POLISH = 4           # Lloyd's iterations on every vector after the sample's
TOLERANCE = 1e-3     # k-means stops when its objective falls by less than this share


@dataclass(frozen=True)
class VQSettings:
    bits: int                    # index bits per weight
    group_size: int              # columns per table (-1: the whole row)
    dim: int = 2                 # weights per vector
    table_bpw: float = 0.125     # what the tables may cost, in bits per weight
    kmeans_iters: int = 25
    update_iters: int = 4        # conjugate-gradient steps of the table update
    damp: float = 0.01
    rows: int = 0                # rows per table; 0: as few as `table_bpw` allows

    @property
    def entries(self) -> int:
        return 2 ** (self.dim * self.bits)


def flat_index(indices: torch.Tensor, tables_shape, rows: int, columns: int) -> torch.Tensor:
    """For every weight, its place in the flattened tables [row blocks, column blocks, K, dim]
    (the vector format's layout): Q = tables.flatten()[flat_index], and its adjoint, an
    index_add, for the table update."""
    _, col_blocks, entries, dim = tables_shape
    out, cols = indices.shape[0], indices.shape[1] * dim
    table = (torch.arange(out) // rows)[:, None] * col_blocks \
        + (torch.arange(cols) // columns)[None, :]
    entry = indices.long().repeat_interleave(dim, dim=1)
    return (table * entries + entry) * dim + torch.arange(cols) % dim


def row_block_size(out: int, cols: int, columns: int, settings: VQSettings) -> int:
    """Rows per table: as few as keep every table within the budget (one table per column
    block over all rows at the least), unless the settings fix them."""
    if settings.rows > 0:
        return min(settings.rows, out)
    col_blocks = -(-cols // columns)
    table_bits = settings.entries * settings.dim * TABLE_BITS
    row_blocks = max(1, min(out, int(out * cols * settings.table_bpw
                                     // (table_bits * col_blocks))))
    return -(-out // row_blocks)


def gptvq_quantize(w: torch.Tensor, hessian: torch.Tensor,
                   settings: VQSettings) -> tuple[VectorTensor, str]:
    """GPTVQ-quantize `w` [out, in] with `hessian` [in, in] (GPTQ's: 2/n X^T X)."""
    out, cols = w.shape
    d = settings.dim
    gs = effective_group_size(settings.group_size, cols)
    if settings.entries > MAX_ENTRIES:
        raise StudioError(f"GPTVQ with {d}-D vectors at {settings.bits} bits would need tables "
                          f"of {settings.entries} entries; at most {MAX_ENTRIES} (use fewer "
                          f"bits or shorter vectors).")
    if cols % d or gs % d:
        raise StudioError(f"GPTVQ with {d}-D vectors needs column groups of a multiple of {d} "
                          f"columns; this layer has {cols} inputs in groups of {gs}.")
    prep = prepare_hessian(hessian, settings.damp, act_order=False)
    if prep.hinv is None:
        raise StudioError(f"GPTVQ: {prep.note}")
    rows = row_block_size(out, cols, gs, settings)
    row_blocks, col_blocks = -(-out // rows), -(-cols // gs)
    original = w.float().clone()
    original[:, prep.dead] = 0.0
    # Work on the transpose, rows padded to whole tables: a column is one contiguous row of
    # `wt` and a table's rows are one slice of it. Padding rows are zero and never counted.
    wt = torch.zeros(cols, row_blocks * rows)
    wt[:, :out] = original.T
    U = prep.hinv
    L = _metrics(U, d)                                        # [cols / d, d, d]
    tables = torch.zeros(row_blocks, col_blocks, settings.entries, d)
    indices = torch.zeros(cols // d, row_blocks * rows, dtype=torch.long)
    inner = _inner_width(gs, d)
    gen = torch.Generator().manual_seed(0)
    with single_thread():
        err = torch.zeros(inner, wt.shape[1])
        for s0 in range(0, cols, inner):
            s1 = min(s0 + inner, cols)
            if s0 % gs == 0:  # a column group starts: fit its tables to W as it is now
                c = s0 // gs
                span = slice(s0, min(s0 + gs, cols))
                tables[:, c] = _fit_tables(wt[span], L[span.start // d: span.stop // d],
                                           out, rows, settings, gen)
            for j in range(s0, s1, d):
                _quantize_vector(wt, U, L[j // d], j, s0, s1, tables[:, c], indices, err)
            if s1 < cols:     # the sub-block's errors reach every later column at once
                wt[s1:].addmm_(U[s0:s1, s1:].T, err[: s1 - s0], alpha=-1)
    indices = indices[:, :out].T.contiguous()
    index = flat_index(indices, tables.shape, rows, gs)
    tables = _update_tables(tables, index, original, hessian.float(), settings.update_iters)
    return VectorTensor(indices, tables, None, settings.bits, d, rows, gs), prep.note


def _inner_width(gs: int, d: int) -> int:
    """Columns whose errors are passed on eagerly, one by one; the rest of the matrix gets a
    run's errors in one product (GPTQ's lazy batch). Whole vectors, and runs start on column
    group boundaries so a group's tables are fitted to fully updated columns."""
    return d * math.gcd(INNER // d or 1, gs // d)


def _metrics(U: torch.Tensor, d: int) -> torch.Tensor:
    """L = U_vv^-1 for every vector position: a vector's error e costs |e L|^2 under GPTQ's
    update (U_vv its d x d diagonal block of U). [cols / d, d, d]."""
    n = U.shape[0] // d
    blocks = U.reshape(n, d, n, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # [n, d, d]
    return torch.linalg.solve_triangular(blocks, torch.eye(d).expand(n, d, d), upper=True)


def _quantize_vector(wt, U, L, j, s0, s1, table, indices, err) -> None:
    """Replace the vector at columns j .. j+d of every row by its table's nearest entry and
    pass the error on: to the vector's own later columns first, then to the run's later
    columns (the rest of the matrix gets the run's errors at once)."""
    d = L.shape[0]
    G, K, _ = table.shape
    M = L @ L.T
    CM = table @ M                                            # [G, K, d]
    # |(x - c) L|^2 - |x L|^2 = c M c^T - 2 x M c^T, one batched product over the tables
    norms = (CM * table).sum(-1)[:, None, :]                  # [G, 1, K]
    x = wt[j: j + d].T.reshape(G, -1, d)                      # [G, rows, d]
    pick = torch.baddbmm(norms, x, CM.transpose(1, 2), alpha=-2).argmin(dim=-1)   # [G, rows]
    pick = pick.reshape(-1)
    indices[j // d] = pick
    q = table.reshape(G * K, d)[pick + K * torch.arange(G).repeat_interleave(x.shape[1])]
    for k in range(d):
        col = j + k
        e = (wt[col] - q[:, k]) / U[col, col]
        wt[col] = q[:, k]
        err[col - s0] = e
        if col + 1 < s1:
            wt[col + 1: s1].addr_(U[col, col + 1: s1], e, alpha=-1)


def _fit_tables(wg, L, out, rows, settings, gen) -> torch.Tensor:
    """Tables for one column group `wg` [width, padded rows], one per block of `rows` rows:
    k-means under each vector position's metric, entries rounded to fp16. [row blocks, K, d].

    Lloyd's iterations run on a random sample of each table's rows (SAMPLE vectors per entry),
    which places the entries at a fraction of the cost, then POLISH iterations on all of them
    (on block 5, 1 polish left the error 11% higher than 4). Both stop early once the
    objective stops falling."""
    width, padded = wg.shape
    d, K = settings.dim, settings.entries
    positions, blocks = width // d, padded // rows
    X = wg.T.reshape(blocks, rows, positions, d).transpose(1, 2)           # [G, P, R, d]
    valid = (torch.arange(padded) < out).reshape(blocks, rows)            # [G, R]
    M = L @ L.transpose(1, 2)                                 # metric of each vector position
    sample = min(rows, -(-SAMPLE * K // positions))
    if sample < rows:
        keys = torch.rand(blocks, rows, generator=gen).masked_fill_(~valid, 2.0)
        chosen = keys.argsort(dim=1)[:, :sample]                         # [G, S]
        Xs = X.gather(2, chosen[:, None, :, None].expand(-1, positions, -1, d))
        C = _kmeans(Xs, valid.gather(1, chosen), L, M, K, settings.kmeans_iters)
        C = _kmeans(X, valid, L, M, K, POLISH, C)
    else:
        C = _kmeans(X, valid, L, M, K, settings.kmeans_iters)
    return fp16_values(C)


def _kmeans(X, valid, L, M, K, iters, C=None) -> torch.Tensor:
    """Lloyd's iterations under per-position metrics from `C` (or the Mahalanobis start);
    stops when the objective falls by less than TOLERANCE of itself. [G, K, d]."""
    G, P, R, d = X.shape
    weight = valid[:, None, :].expand(G, P, R).float()        # 0 for padding rows
    if C is None:
        C = _mahalanobis_init(X, weight > 0, K)
    XM = torch.einsum("gprd,pde->gpre", X, M)                 # x_n M_p
    base = ((XM * X).sum(-1) * weight).sum().item()           # the objective's fixed part
    XMw = (XM * weight[..., None]).reshape(-1, d)
    before = float("inf")
    for _ in range(iters):
        assign, cost = _assign_1d(X, C, M) if d == 1 else _assign(XM, C, M)
        total = base + (cost * weight).sum().item()
        C = _centroids(XMw, weight, M, assign, C)
        if before - total <= TOLERANCE * abs(total):
            break
        before = total
    return C


def _mahalanobis_init(X, valid, K) -> torch.Tensor:
    """The reference's initialisation: each table's vectors sorted by Mahalanobis distance from
    their mean, the entries taken at K evenly spaced ranks (deterministic, spread from the
    centre of the data to its edge)."""
    G, P, R, d = X.shape
    flat = X.reshape(G, P * R, d)
    w = valid.reshape(G, P * R, 1).float()
    n = w.sum(dim=1, keepdim=True)
    mu = (flat * w).sum(dim=1, keepdim=True) / n
    centred = (flat - mu) * w
    sigma = centred.transpose(1, 2) @ centred / n + 1e-12 * torch.eye(d)
    dist = ((centred @ torch.linalg.pinv(sigma)) * centred).sum(-1)
    dist = torch.where(w[..., 0] > 0, dist, torch.full_like(dist, float("inf")))
    order = dist.argsort(dim=1)
    ranks = (torch.linspace(0, 1, K)[None] * (n[:, :, 0] - 1)).round().long()   # [G, K]
    picked = order.gather(1, ranks)
    return flat.gather(1, picked[..., None].expand(-1, -1, d)).clone()


def _assign(XM, C, M) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step: the nearest entry of each vector under its position's metric, and its distance
    less the vector's own x M x^T. Both [G, P, R]. `XM` = x_n M_p for every vector."""
    G, P, R, d = XM.shape
    # |(x - c)|_M^2 - |x|_M^2 = c M c^T - 2 (x M) c^T: the second for all positions of a
    # table in one product
    K = C.shape[1]
    outer = (C[..., :, None] * C[..., None, :]).reshape(G, K, d * d)
    norms = (outer @ M.reshape(P, d * d).T).transpose(1, 2)   # c M_p c^T: [G, P, K]
    dist = torch.bmm(XM.reshape(G, P * R, d), C.transpose(1, 2)).reshape(G, P, R, K)
    dist.mul_(-2).add_(norms[:, :, None, :])
    cost, assign = dist.min(dim=-1)
    return assign, cost


def _assign_1d(X, C, M) -> tuple[torch.Tensor, torch.Tensor]:
    """The E-step for scalars: a scalar metric does not change which entry is nearest, so a
    bucket search between the sorted entries' midpoints finds it (n log K, not n K)."""
    G, P, R, _ = X.shape
    order = C[..., 0].argsort(dim=1)                                       # [G, K]
    levels = C[..., 0].gather(1, order)
    bounds = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    x = X.reshape(G, P * R)
    where = torch.searchsorted(bounds, x.contiguous())
    q = levels.gather(1, where).reshape(G, P, R)
    cost = (q * q - 2 * X[..., 0] * q) * M[:, 0, 0][None, :, None]       # c M c - 2 x M c
    return order.gather(1, where).reshape(G, P, R), cost


def _centroids(XMw, weight, M, assign, C) -> torch.Tensor:
    """M-step under per-position metrics: c_k = (sum M_n)^-1 sum M_n x_n over the vectors
    assigned to k; an entry nobody chose keeps its place."""
    G, K, d = C.shape
    P = M.shape[0]
    picked = (assign + K * torch.arange(G)[:, None, None]).reshape(-1)    # [G P R]
    Mn = (M.reshape(1, P, 1, d * d) * weight[..., None]).reshape(-1, d * d)
    S = torch.zeros(G * K, d * d).index_add_(0, picked, Mn).reshape(G, K, d, d)
    T = torch.zeros(G * K, d).index_add_(0, picked, XMw).reshape(G, K, d)
    used = torch.zeros(G * K).index_add_(0, picked, weight.reshape(-1)).reshape(G, K) > 0
    eye = torch.eye(d)
    solved = torch.linalg.solve(S + (~used)[..., None, None] * eye, T[..., None])[..., 0]
    return torch.where(used[..., None], solved, C)


def fp16_values(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-65504.0, 65504.0).half().float()


def output_loss(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    diff = w - q
    return ((diff @ H) * diff).sum().item()


def _update_tables(tables: torch.Tensor, index: torch.Tensor, w: torch.Tensor,
                   H: torch.Tensor, iters: int) -> torch.Tensor:
    """The update after quantization: entries refitted to the original weights on the output
    error with the assignments fixed, tr((W - Q(C)) H (W - Q(C))^T), a quadratic in C solved
    by conjugate gradients; kept only if still better once rounded to fp16."""
    if iters <= 0:
        return tables
    index = index.reshape(-1)

    def Q(C):                     # table entries -> weights
        return C[index].reshape(w.shape)

    def Qt(X):                    # its adjoint: weights -> sums per entry
        return torch.zeros(tables.numel()).index_add_(0, index, X.reshape(-1))

    C = tables.reshape(-1).clone()
    before = output_loss(w, Q(C), H)
    with single_thread():
        r = Qt((w - Q(C)) @ H)    # = b - A C, with A C = Qt(Q(C) H)
        p = r.clone()
        rr = r @ r
        for _ in range(iters):
            if rr <= 1e-30:
                break
            Ap = Qt(Q(p) @ H)
            alpha = rr / (p @ Ap).clamp_min(1e-30)
            C = C + alpha * p
            r = r - alpha * Ap
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
    C = fp16_values(C)
    return C.reshape(tables.shape) if output_loss(w, Q(C), H) < before else tables


# --- the method's declaration (studio.core.quant.registry) ------------------------------------
from studio.core.plan import QuantSpec  # noqa: E402
from studio.core.quant.registry import Quantizer, option  # noqa: E402


@dataclass(frozen=True)
class GptvqOptions:
    dim: int = option(2, low=1, high=4, title="Vector size",
                      help="weights per vector: a table has 2^(dim x bits) entries")
    table_bpw: float = option(0.125, low=0.001, high=4.0, title="Table budget (bpw)",
                              help="bits per weight the fp16 tables may cost; sets how many "
                                   "rows share one (the paper's 0.125)")
    kmeans_iters: int = option(25, low=1, high=1000, title="k-means iterations",
                               help="at most; stops when under 0.1% of vectors change entry")
    update_iters: int = option(4, low=0, high=1000, title="Table update steps",
                               help="conjugate-gradient steps refitting the tables to the "
                                    "output error after quantization (0: none)")
    damp: float = option(0.01, low=0.0, high=10.0, title="Dampening",
                         help="added to the Hessian's diagonal, as a fraction of its mean")


def settings_of(spec: QuantSpec) -> VQSettings:
    return VQSettings(spec.bits, spec.group_size, int(spec.option("dim")),
                      float(spec.option("table_bpw")), int(spec.option("kmeans_iters")),
                      int(spec.option("update_iters")), float(spec.option("damp")))


def _gptvq(w: torch.Tensor, spec: QuantSpec, calib) -> tuple[VectorTensor, str]:
    if spec.symmetric or spec.scale_dtype != "fp32":
        raise StudioError("GPTVQ stores tables of fp16 vectors, not an integer grid: a "
                          "symmetric grid or fp16 grid scales do not apply to it.")
    return gptvq_quantize(w, calib.hessian, settings_of(spec))


def storage_bits(spec: QuantSpec, in_features: int) -> float:
    """The price the plan meter and the allocator see: the indices plus the table budget.
    A layer's tables depend on its rows too (`row_block_size`), so its own count
    (`VectorTensor.storage_bits`) is at or below this, unless the layer is so small that one
    table per column group already costs more."""
    return spec.bits + float(spec.option("table_bpw"))


QUANTIZER = Quantizer(
    name="gptvq", title="GPTVQ (vector quantization)", options=GptvqOptions,
    calibration="hessian", quantize=_gptvq, code_format="vector", storage_bits=storage_bits,
    bits=(2, 3, 4),
    summary="2-D vectors from k-means tables, GPTQ's error feedback over columns, tables "
            "refitted to the output error (van Baalen et al. 2024)")
