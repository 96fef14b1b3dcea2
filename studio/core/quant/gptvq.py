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
that term). k-means stops when fewer than 0.1% of the vectors change entry, after at most
`kmeans_iters` (25; the paper runs 100: on a 576 x 576 test layer 25 left the error 3% higher
at a third of the time). No per-block scaling of the weights (the paper's optional
`vq_scaling_blocksize`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.core.errors import StudioError
from studio.core.quant.grid import effective_group_size
from studio.core.quant.gptq import prepare_hessian
from studio.core.quant.rtn import single_thread
from studio.core.quant.vector import VectorTensor

BLOCK = 128          # columns per lazy batch of updates, as GPTQ
MAX_ENTRIES = 4096   # 2^(dim x bits): k-means and lookups beyond this are not worth running
TABLE_BITS = 16      # an fp16 table entry
CONVERGED = 1e-3     # k-means stops when fewer vectors than this share change their entry


@dataclass(frozen=True)
class VQSettings:
    bits: int                    # index bits per weight
    group_size: int              # columns per table (-1: the whole row)
    dim: int = 2                 # weights per vector
    table_bpw: float = 0.125     # what the tables may cost, in bits per weight
    kmeans_iters: int = 25
    update_iters: int = 10       # conjugate-gradient steps of the table update
    damp: float = 0.01

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
    block over all rows at the least)."""
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
    W = w.float().clone()
    W[:, prep.dead] = 0.0
    original = W.clone()
    U = prep.hinv
    rows = row_block_size(out, cols, gs, settings)
    row_blocks, col_blocks = -(-out // rows), -(-cols // gs)
    tables = torch.zeros(row_blocks, col_blocks, settings.entries, d)
    indices = torch.zeros(out, cols // d, dtype=torch.long)
    block_of_row = torch.arange(out) // rows
    with single_thread():
        err = torch.zeros(out, BLOCK)
        for b0 in range(0, cols, BLOCK):
            b1 = min(b0 + BLOCK, cols)
            for j in range(b0, b1, d):
                if j % gs == 0:  # a column group starts: fit its tables to W as it is now
                    c = j // gs
                    span = slice(j, min(j + gs, cols))
                    tables[:, c] = _fit_tables(W[:, span], U, span, rows, settings)
                    row_table = tables[block_of_row, c]                # [out, K, d]
                _quantize_vector(W, U, j, d, b0, b1, row_table, indices, err)
            if b1 < cols:
                W[:, b1:] -= err[:, : b1 - b0] @ U[b0:b1, b1:]
    index = flat_index(indices, tables.shape, rows, gs)
    tables = _update_tables(tables, index, original, hessian.float(), settings.update_iters)
    return VectorTensor(indices, tables, None, settings.bits, d, rows, gs), prep.note


def _metric(U: torch.Tensor, j: int, d: int) -> torch.Tensor:
    """L = U_vv^-1 for the vector at columns j .. j+d: its error e costs |e L|^2 under GPTQ."""
    return torch.linalg.solve_triangular(U[j: j + d, j: j + d], torch.eye(d), upper=True)


def _quantize_vector(W, U, j, d, b0, b1, row_table, indices, err) -> None:
    """Replace the vector at columns j .. j+d of every row by its table's nearest entry and
    pass the error on: to the vector's own later columns first, then to the block's later
    columns (the rest of the matrix gets the whole block's errors at once)."""
    L = _metric(U, j, d)
    M = L @ L.T
    # |(x - c) L|^2 - |x L|^2 = c M c^T - 2 x M c^T
    xM = W[:, j: j + d] @ M                                   # [out, d]
    dist = ((row_table @ M) * row_table).sum(-1)              # [out, K]
    for e in range(d):
        dist -= 2 * xM[:, e, None] * row_table[:, :, e]
    pick = dist.argmin(dim=1)
    indices[:, j // d] = pick
    q = row_table[torch.arange(len(pick)), pick]              # [out, d]
    for k in range(d):
        col = j + k
        e = (W[:, col] - q[:, k]) / U[col, col]
        W[:, col] = q[:, k]
        err[:, col - b0] = e
        if col + 1 < b1:
            W[:, col + 1: b1] -= e[:, None] * U[col, col + 1: b1]


def _fit_tables(Wg, U, span, rows, settings) -> torch.Tensor:
    """Tables for one column group, one per block of `rows` rows: k-means under each vector's
    metric, entries rounded to fp16. [row blocks, K, d]."""
    out, width = Wg.shape
    d, K = settings.dim, settings.entries
    positions = width // d
    L = torch.stack([_metric(U, span.start + p * d, d) for p in range(positions)])  # [P, d, d]
    M = L @ L.transpose(1, 2)                                 # metric of each vector position
    blocks = -(-out // rows)
    padded = torch.zeros(blocks * rows, width)
    padded[:out] = Wg
    X = padded.reshape(blocks, rows, positions, d).transpose(1, 2)   # [G, P, R, d]
    valid = (torch.arange(blocks * rows) < out).reshape(blocks, 1, rows).expand(-1, positions, -1)
    C = _mahalanobis_init(X, valid, K)
    XM = X @ M[None]                                          # x_n M_p, for the M-step
    Xt = X @ L[None]                                          # x_n L_p, for the E-step
    assign = None
    for _ in range(settings.kmeans_iters):
        new = _assign(Xt, C, L)
        if assign is not None and (new != assign).float().mean() < CONVERGED:
            break
        assign = new
        C = _centroids(XM, valid, M, assign, C)
    return fp16_values(C)


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


def _assign(Xt, C, L) -> torch.Tensor:
    """E-step: the nearest entry of each vector under its position's metric. [G, P, R].
    `Xt` = X L, the vectors in their positions' metric (fixed while k-means runs)."""
    G, P, R, d = Xt.shape
    Ct = C[:, None] @ L[None]                                 # [G, P, K, d]
    K = Ct.shape[2]
    # |x - c|^2 - |x|^2 = |c|^2 - 2 x.c: one batched product per (table, position)
    norms = (Ct * Ct).sum(-1)[:, :, None, :].expand(G, P, R, K).reshape(G * P, R, K)
    dist = torch.baddbmm(norms, Xt.reshape(G * P, R, d),
                         Ct.transpose(2, 3).reshape(G * P, d, K), alpha=-2)
    return dist.argmin(dim=-1).reshape(G, P, R)


def _centroids(XM, valid, M, assign, C) -> torch.Tensor:
    """M-step under per-position metrics: c_k = (sum M_n)^-1 sum M_n x_n over the vectors
    assigned to k; an entry nobody chose keeps its place."""
    G, K, d = C.shape
    key = (assign + K * torch.arange(G)[:, None, None])[valid]             # [valid vectors]
    Mn = M[None, :, None].expand(G, -1, valid.shape[2], -1, -1)[valid]     # [valid, d, d]
    S = torch.zeros(G * K, d, d).index_add_(0, key, Mn).reshape(G, K, d, d)
    T = torch.zeros(G * K, d).index_add_(0, key, XM[valid]).reshape(G, K, d)
    used = torch.zeros(G * K).index_add_(0, key, torch.ones(len(key))).reshape(G, K) > 0
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
    update_iters: int = option(10, low=0, high=1000, title="Table update steps",
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
