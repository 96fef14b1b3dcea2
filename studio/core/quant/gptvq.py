"""GPTVQ (van Baalen et al. 2024, "GPTVQ: The Blessing of Dimensionality in LLM Quantization"),
following Qualcomm-AI-research/gptvq.

Vector quantization with GPTQ's error feedback. Each row's weights are cut into vectors of `dim`
adjacent columns; a vector is replaced by the nearest entry of a codebook of 2^(dim x bits)
vectors, so `bits` is what each weight costs in indices. A codebook serves a block of the
matrix: a group of `group_size` columns times enough rows that the codebooks cost about
`codebook_bpw` bits per weight (the paper's 0.125: 3-bit 2-D codebooks of 64 entries over 8192
weights). Entries are stored as int8 with one fp16 scale per codebook (the paper's
`--codebook-bitwidth 8 --quantize-per-codebook`); both count in `bits_per_weight`.

Per layer, with H the Hessian of its output error and U the upper Cholesky factor of H^-1 (as
GPTQ): columns are visited left to right; at the start of each column group its codebooks are
fitted to the group's weights as updated so far by k-means (EM, Mahalanobis initialisation,
100 iterations: the paper's settings), each vector is then replaced by its codebook's nearest
entry and its error is spread over the columns not yet quantized through U; finally the
codebook entries are refitted to the original weights by least squares on the whole output
error, tr((W - Q) H (W - Q)^T), with the assignments fixed (the paper's M-step; it uses 25 Adam
steps, we solve the same quadratic by conjugate gradients and keep the result only if it is
better once the entries are rounded to int8 again).

Where we differ from the reference, on purpose: distances use the exact error metric of a
vector under GPTQ's update, |(w - c) U_vv^-1|^2 with U_vv the vector's dim x dim block of U
(the reference keeps only the diagonal, weights 1 / U_jj^2 or 1 / U_jj), and k-means weighs
each vector with that same metric, so the codebook is fitted to the loss it will be judged on;
within a vector the first column's error reaches the second before the second's error is taken
(exact for the chosen entry; the reference drops that term). No per-block scaling of the
weights before VQ (the paper's optional `vq_scaling_blocksize`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.core.errors import StudioError
from studio.core.quant.grid import FP16_MAX, FP16_SMALLEST, effective_group_size
from studio.core.quant.gptq import prepare_hessian
from studio.core.quant.rtn import single_thread

BLOCK = 128          # columns per lazy batch of updates, as GPTQ
MAX_ENTRIES = 4096   # 2^(dim x bits): k-means and lookups beyond this are not worth running
CONVERGED = 1e-3     # k-means stops when fewer vectors than this change their entry
CODEBOOK_BITS = 8    # codebook entries are int8 (the paper's --codebook-bitwidth 8)


@dataclass(frozen=True)
class VQSettings:
    bits: int                    # index bits per weight
    group_size: int              # columns per codebook (-1: the whole row)
    dim: int = 2                 # weights per vector
    codebook_bpw: float = 0.125  # what the codebooks may cost, in bits per weight
    kmeans_iters: int = 100
    update_iters: int = 10       # conjugate-gradient steps of the codebook update
    damp: float = 0.01

    @property
    def entries(self) -> int:
        return 2 ** (self.dim * self.bits)

    @property
    def book_bits(self) -> int:
        """One codebook's storage: its entries plus an fp16 scale."""
        return self.entries * self.dim * CODEBOOK_BITS + 16


@dataclass
class VQTensor:
    """One vector-quantized weight matrix.

    indices [out, in / dim] (entry of the vector's codebook), codebooks [books, entries, dim]
    int8, scales [books] float32 holding fp16 values. Column group c (columns c*group_size ..)
    has `row_groups[c]` codebooks, splitting the rows as `torch.tensor_split` does; codebooks
    are numbered column group by column group."""
    indices: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    row_groups: list[int]
    shape: tuple[int, int]
    bits: int
    dim: int
    group_size: int               # effective: the input width if per-row

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        book = self.codebooks.shape[1] * self.dim * CODEBOOK_BITS + 16
        return self.bits + self.codebooks.shape[0] * book / self.numel()

    def dequantize(self) -> torch.Tensor:
        books = self.codebooks.float() * self.scales[:, None, None]
        return books.reshape(-1)[flat_index(self)].reshape(self.shape)


def flat_index(vq: VQTensor) -> torch.Tensor:
    """For every weight, its place in the flattened codebooks [books * entries * dim]:
    Q = codebooks.flatten()[flat_index] (and its adjoint, an index_add, for the update)."""
    out, cols = vq.shape
    entries = vq.codebooks.shape[1]
    book = book_of_weight(out, cols, vq.group_size, vq.row_groups, vq.dim)
    within = torch.arange(cols) % vq.dim
    pos = vq.indices.long().repeat_interleave(vq.dim, dim=1)
    return (book * entries + pos) * vq.dim + within


def book_of_weight(out: int, cols: int, gs: int, row_groups: list[int], dim: int) -> torch.Tensor:
    """[out, cols] codebook number of every weight."""
    book = torch.empty(out, cols, dtype=torch.long)
    first = 0
    for c, span in enumerate(_spans(cols, gs)):
        for g, rows in enumerate(_row_slices(out, row_groups[c])):
            book[rows, span] = first + g
        first += row_groups[c]
    return book


def _row_slices(out: int, groups: int) -> list[slice]:
    """Rows split into `groups` contiguous parts, as `torch.tensor_split` splits them."""
    size, extra = divmod(out, groups)
    bounds = [g * size + min(g, extra) for g in range(groups + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _spans(cols: int, gs: int) -> list[slice]:
    return [slice(c, min(c + gs, cols)) for c in range(0, cols, gs)]


def books_for(rows: int, width: int, settings: VQSettings) -> int:
    """Codebooks for a column group: as many as the budget allows, at least one, at most one
    per row."""
    return max(1, min(rows, int(rows * width * settings.codebook_bpw // settings.book_bits)))


def gptvq_quantize(w: torch.Tensor, hessian: torch.Tensor, settings: VQSettings,
                   seed: int = 0) -> tuple[VQTensor, str]:
    """GPTVQ-quantize `w` [out, in] with `hessian` [in, in] (as GPTQ's: 2/n X^T X)."""
    out, cols = w.shape
    d = settings.dim
    gs = effective_group_size(settings.group_size, cols)
    if settings.entries > MAX_ENTRIES:
        raise StudioError(f"GPTVQ with {d}-D vectors at {settings.bits} bits would need "
                          f"{settings.entries} codebook entries; at most {MAX_ENTRIES} "
                          f"(use fewer bits or a smaller dimension).")
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
    gen = torch.Generator().manual_seed(seed)
    spans = _spans(cols, gs)
    row_groups = [books_for(out, s.stop - s.start, settings) for s in spans]
    indices = torch.zeros(out, cols // d, dtype=torch.long)
    codebooks, scales = [], []
    with single_thread():
        books = None
        err = torch.zeros(out, BLOCK)
        for b0 in range(0, cols, BLOCK):
            b1 = min(b0 + BLOCK, cols)
            for j in range(b0, b1, d):
                if j % gs == 0:  # a column group starts: fit its codebooks to W as it is now
                    c = j // gs
                    books = _fit_codebooks(W[:, spans[c]], U, spans[c], row_groups[c],
                                           settings, gen)
                    codebooks.append(books[0])
                    scales.append(books[1])
                    rows_of = _row_group_of(out, row_groups[c])
                    table = books[0].float() * books[1][:, None, None]   # [books, K, d]
                    row_table = table[rows_of]                            # [out, K, d]
                _quantize_vector(W, U, j, d, b1, row_table, indices, err, b0)
            if b1 < cols:
                W[:, b1:] -= err[:, : b1 - b0] @ U[b0:b1, b1:]
    vq = VQTensor(indices, torch.cat(codebooks), torch.cat(scales), row_groups,
                  (out, cols), settings.bits, d, gs)
    _update_codebooks(vq, original, hessian.float(), settings)
    return vq, prep.note


def _row_group_of(out: int, groups: int) -> torch.Tensor:
    which = torch.empty(out, dtype=torch.long)
    for g, rows in enumerate(_row_slices(out, groups)):
        which[rows] = g
    return which


def _metric(U: torch.Tensor, j: int, d: int) -> torch.Tensor:
    """L = U_vv^-1 for the vector at columns j .. j+d: its error e costs |e L|^2 under GPTQ."""
    block = U[j: j + d, j: j + d]
    return torch.linalg.solve_triangular(block, torch.eye(d), upper=True)


def _quantize_vector(W, U, j, d, b1, row_table, indices, err, b0) -> None:
    """Replace the vector at columns j .. j+d of every row by its codebook's nearest entry and
    pass the error on: to the vector's own later column first, then to the block's later
    columns (the rest of the matrix gets the block's errors at once)."""
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


def _fit_codebooks(Wg, U, span, groups, settings, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks for one column group: k-means per row group under each vector's metric,
    then entries rounded to int8 with one fp16 scale per codebook."""
    out, width = Wg.shape
    d, K = settings.dim, settings.entries
    pairs = width // d
    L = torch.stack([_metric(U, span.start + p * d, d) for p in range(pairs)])  # [P, d, d]
    M = L @ L.transpose(1, 2)                                 # metric of each vector position
    rows, valid = _padded_rows(out, groups)                   # [G, R]
    X = Wg.reshape(out, pairs, d)[rows].transpose(1, 2)       # [G, P, R, d]
    weight = valid[:, None, :].expand(-1, pairs, -1)          # padding rows count for nothing
    C = _mahalanobis_init(X, weight, K)
    XM = X @ M[None]                                          # x_n M_p, for the M-step
    Xt = X @ L[None]                                          # x_n L_p, for the E-step
    assign = None
    for _ in range(settings.kmeans_iters):
        new = _assign(Xt, C, L)
        if assign is not None and (new != assign).float().mean() < CONVERGED:
            break
        assign = new
        C = _centroids(XM, weight, M, assign, C)
    return _round_codebooks(C)


def _padded_rows(out: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers of each row group, padded to the longest with row 0 ([G, R]), and a mask."""
    parts = [torch.arange(out)[rows] for rows in _row_slices(out, groups)]
    longest = max(len(p) for p in parts)
    rows = torch.zeros(groups, longest, dtype=torch.long)
    valid = torch.zeros(groups, longest, dtype=torch.bool)
    for g, p in enumerate(parts):
        rows[g, : len(p)] = p
        valid[g, : len(p)] = True
    return rows, valid


def _mahalanobis_init(X, weight, K) -> torch.Tensor:
    """The reference's initialisation: each codebook's vectors sorted by Mahalanobis distance
    from their mean, the entries taken at K evenly spaced ranks (deterministic, spread from
    the centre of the data to its edge)."""
    G, P, R, d = X.shape
    flat = X.reshape(G, P * R, d)
    w = weight.reshape(G, P * R, 1).float()
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
    # |x - c|^2 - |x|^2 = |c|^2 - 2 x.c: one batched product per (codebook, position)
    norms = (Ct * Ct).sum(-1)[:, :, None, :].expand(G, P, R, K).reshape(G * P, R, K)
    dist = torch.baddbmm(norms, Xt.reshape(G * P, R, d),
                         Ct.transpose(2, 3).reshape(G * P, d, K), alpha=-2)
    return dist.argmin(dim=-1).reshape(G, P, R)


def _centroids(XM, weight, M, assign, C) -> torch.Tensor:
    """M-step under per-position metrics: c_k = (sum M_n)^-1 sum M_n x_n over the vectors
    assigned to k; an entry nobody chose keeps its place."""
    G, K, d = C.shape
    P = M.shape[0]
    key = (assign + K * torch.arange(G)[:, None, None])[weight]          # [valid vectors]
    Mn = M[None, :, None].expand(G, -1, weight.shape[2], -1, -1)[weight]  # [valid, d, d]
    S = torch.zeros(G * K, d, d).index_add_(0, key, Mn).reshape(G, K, d, d)
    T = torch.zeros(G * K, d).index_add_(0, key, XM[weight]).reshape(G, K, d)
    used = torch.zeros(G * K).index_add_(0, key, torch.ones(len(key))).reshape(G, K) > 0
    eye = torch.eye(d)
    solved = torch.linalg.solve(S + (~used)[..., None, None] * eye, T[..., None])[..., 0]
    return torch.where(used[..., None], solved, C)


def _round_codebooks(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 entries with one fp16 scale per codebook (the reference's
    `quantize_centroids(per_codebook=True)`)."""
    top = 2 ** (CODEBOOK_BITS - 1) - 1
    scale = C.abs().amax(dim=(1, 2)) / top
    scale = scale.clamp(FP16_SMALLEST, FP16_MAX).half().float()
    codes = torch.clamp(torch.round(C / scale[:, None, None]), -top - 1, top)
    return codes.to(torch.int8), scale


def output_loss(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    diff = w - q
    return ((diff @ H) * diff).sum().item()


def _update_codebooks(vq: VQTensor, w: torch.Tensor, H: torch.Tensor,
                      settings: VQSettings) -> None:
    """The M-step after quantization: entries refitted to the original weights on the output
    error with the assignments fixed, tr((W - Q(C)) H (W - Q(C))^T), a quadratic in C solved by
    conjugate gradients; kept only if still better once rounded to integers again."""
    if settings.update_iters <= 0:
        return
    index = flat_index(vq).reshape(-1)
    size = vq.codebooks.numel()

    def Q(C):                     # codebook entries -> weights
        return C[index].reshape(vq.shape)

    def Qt(X):                    # its adjoint: weights -> sums per entry
        return torch.zeros(size).index_add_(0, index, X.reshape(-1))

    C = (vq.codebooks.float() * vq.scales[:, None, None]).reshape(-1)
    before = output_loss(w, Q(C), H)
    with single_thread():
        r = Qt((w - Q(C)) @ H)    # = b - A C, with A C = Qt(Q(C) H)
        p = r.clone()
        rr = r @ r
        for _ in range(settings.update_iters):
            if rr <= 1e-30:
                break
            Ap = Qt(Q(p) @ H)
            alpha = rr / (p @ Ap).clamp_min(1e-30)
            C = C + alpha * p
            r = r - alpha * Ap
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
    codes, scales = _round_codebooks(C.reshape(vq.codebooks.shape))
    after = output_loss(w, Q((codes.float() * scales[:, None, None]).reshape(-1)), H)
    if after < before:
        vq.codebooks, vq.scales = codes, scales
