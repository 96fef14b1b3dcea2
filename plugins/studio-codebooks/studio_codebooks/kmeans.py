"""k-means codebooks: SqueezeLLM's sensitivity-weighted non-uniform quantization
(Kim et al. 2024, "SqueezeLLM: Dense-and-Sparse Quantization", its dense part).

Each output channel (or each group of `group_size` weights of a row) gets its own table of
2**bits levels: the centroids of a weighted 1-D k-means over its weights. SqueezeLLM weights
each weight by its Fisher information; the studio has no gradients, so each weight w[r, j] is
weighted by its input channel's energy E[x_j^2] = H_jj / 2 (the Hessian diagonal from the
calibration text), which is what a lone perturbation of that weight costs in the layer's output
(OBS / GPTQ's saliency). `weighting="none"` gives plain k-means on the weights.

A table of 2**bits fp16 levels costs 16 * 2**bits bits: 0.44 bits per weight on a 576-wide
row at 4 bits, more than a g64 grid's scales and zeros (0.31). `rows` lets that many consecutive
output rows share one table (one k-means over all their weights), so `rows=2` costs 0.22 and
per-channel k-means sits below RTN / GPTQ W4 g64 in bits per weight, tables counted.

With `feedback` (the default), the table is fitted and the weights rounded as GPTVQ does with
1-D vectors (`studio.core.quant.gptvq`): columns are visited left to right, each group's
tables are fitted to its weights as updated so far (k-means under GPTQ's metric, 1 / U_jj^2),
each weight goes to its nearest level and its error is spread over the columns not yet
quantized through the inverse Hessian (GPTQ's error feedback), and the levels are finally
refitted to the layer's output error. SqueezeLLM's own answer to the same gap is its sparse
part (the most sensitive 0.45% of weights kept in fp16); on the demo's block-5 layers with
real calibration Hessians (`benchmarks/bench_method_cost.py --calib-windows 16`) feedback beat
it at fewer bits: o_proj 4-bit per-channel output error 0.0186 plain, 0.0133 with 0.45%
sparse (+0.2 bpw), 0.0046 with feedback; RTN W4 g64 0.0092.

Without feedback: Lloyd's algorithm in 1-D, batched over every row (and group): centroids start at the weighted
quantiles of the weights (deterministic; SqueezeLLM uses scikit-learn's k-means++), each
weight goes to its nearest centroid (a bucket search between sorted midpoints), each centroid
moves to its cluster's weighted mean (an empty cluster keeps its place), until no assignment
changes or `iterations` runs. Centroids are then rounded to fp16 (how they are stored and
counted) and every weight re-assigned to its nearest rounded centroid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.core.errors import StudioError
from studio.core.quant.codebook import CodebookTensor, fp16_values
from studio.core.quant.gptvq import VQSettings, gptvq_quantize
from studio.core.quant.grid import effective_group_size
from studio.core.quant.registry import Quantizer, option

ROWS_PER_BATCH = 1024   # rows (x groups) clustered at once: bounds the [rows, n, ...] temporaries


@dataclass(frozen=True)
class KmeansOptions:
    iterations: int = option(50, low=1, high=1000, title="Iterations",
                             help="at most this many Lloyd steps (stops when nothing moves)")
    weighting: str = option("hessian", choices=("hessian", "none"), title="Weighting",
                            help="weight each weight by its input's energy (diag H), or not")
    feedback: bool = option(True, title="Error feedback",
                            help="spread each weight's rounding error over the columns not yet "
                                 "quantized (GPTQ's), levels refitted to the output error")
    rows: int = option(1, low=1, high=4096, title="Rows per table",
                       help="consecutive output rows sharing one table: 2 halves what the "
                            "tables cost in bits per weight")


def quantize_kmeans(w: torch.Tensor, spec, calib) -> tuple[CodebookTensor, str]:
    if spec.option("feedback"):
        return quantize_with_feedback(w, spec, calib)
    w = w.float()
    out, cols = w.shape
    gs = effective_group_size(spec.group_size, cols)
    groups = -(-cols // gs)
    rows = min(int(spec.option("rows")), out)
    blocks = -(-out // rows)
    energy = calib.input_energy.float() if spec.option("weighting") == "hessian" \
        else torch.ones(cols)
    energy = _usable(energy)
    # One 1-D problem per table (a block of rows x a group of columns), all in one batch; a
    # ragged last group or block of rows is padded with weight 0.
    padded = torch.zeros(blocks * rows, groups * gs)
    padded[:out, :cols] = w
    weights = torch.zeros(blocks * rows, groups * gs)
    weights[:out, :cols] = energy
    points = _per_table(padded, blocks, rows, groups, gs)
    point_weights = _per_table(weights, blocks, rows, groups, gs)
    table = torch.empty(blocks * groups, 2 ** spec.bits)
    moved = 0
    batch = max(1, ROWS_PER_BATCH // rows)
    for start in range(0, blocks * groups, batch):
        part = slice(start, min(start + batch, blocks * groups))
        table[part], steps = weighted_kmeans(points[part], point_weights[part], 2 ** spec.bits,
                                             int(spec.option("iterations")))
        moved = max(moved, steps)
    table = fp16_values(table).sort(dim=1).values
    indices = nearest(points, table).view(blocks, groups, rows, gs).transpose(1, 2)
    indices = indices.reshape(blocks * rows, groups * gs)[:out, :cols].to(torch.uint8)
    note = "" if moved < int(spec.option("iterations")) else \
        f"k-means stopped at {moved} iterations before converging"
    return CodebookTensor(indices, table.view(blocks, groups, -1), None, spec.bits, gs,
                          rows=rows), note


def _per_table(x: torch.Tensor, blocks: int, rows: int, groups: int, gs: int) -> torch.Tensor:
    """[blocks * rows, groups * gs] -> one row per table [blocks * groups, rows * gs]."""
    return x.view(blocks, rows, groups, gs).transpose(1, 2).reshape(blocks * groups, rows * gs)


def quantize_with_feedback(w: torch.Tensor, spec, calib) -> tuple[CodebookTensor, str]:
    """GPTVQ with 1-D vectors and one table per row (and group): a codebook tensor."""
    if spec.option("weighting") != "hessian":
        raise StudioError("k-means with error feedback weighs each weight by the Hessian; "
                          "weighting=none needs feedback=false.")
    settings = VQSettings(spec.bits, spec.group_size, dim=1, rows=int(spec.option("rows")),
                          kmeans_iters=int(spec.option("iterations")))
    vt, note = gptvq_quantize(w.float(), calib.hessian, settings)
    table = vt.tables[..., 0]                                   # [row blocks, groups, K]
    return CodebookTensor(vt.indices, table, None, spec.bits, vt.columns, rows=vt.rows), note


def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor, k: int, iterations: int
                    ) -> tuple[torch.Tensor, int]:
    """Centroids [B, k] (ascending) of B independent weighted 1-D k-means problems x [B, n];
    and the number of Lloyd steps taken."""
    centroids = weighted_quantiles(x, weight, k)
    assign = nearest(x, centroids)
    for step in range(1, iterations + 1):
        mass = torch.zeros_like(centroids).scatter_add_(1, assign, weight)
        total = torch.zeros_like(centroids).scatter_add_(1, assign, weight * x)
        centroids = torch.where(mass > 0, total / mass.clamp_min(1e-30), centroids)
        centroids = centroids.sort(dim=1).values
        again = nearest(x, centroids)
        if torch.equal(again, assign):
            return centroids, step
        assign = again
    return centroids, iterations


def weighted_quantiles(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The values of x at the (i + 1/2)/k weighted quantiles, i < k: [B, k]."""
    order = x.argsort(dim=1)
    xs, ws = x.gather(1, order), weight.gather(1, order)
    cumulative = ws.cumsum(dim=1)
    cumulative = cumulative / cumulative[:, -1:].clamp_min(1e-30)
    targets = (torch.arange(k, dtype=x.dtype) + 0.5) / k
    where = torch.searchsorted(cumulative.contiguous(), targets.expand(len(x), k).contiguous())
    return xs.gather(1, where.clamp_max(x.shape[1] - 1))


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending `centroids` [B, k] for each of x [B, n]."""
    bounds = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(bounds.contiguous(), x.contiguous())


def _usable(energy: torch.Tensor) -> torch.Tensor:
    """Channels that never fire get a small weight rather than none, so a row whose inputs are
    all dead still clusters (on its weights alone)."""
    floor = 1e-6 * float(energy.mean()) if float(energy.mean()) > 0 else 1.0
    return energy.clamp_min(floor)


def storage_bits(spec, in_features: int) -> float:
    """Indices plus a table of 2**bits fp16 levels per row (per-channel) or per group, shared
    by `rows` rows. A layer whose rows are not a multiple of `rows` stores one more, ragged,
    table: the tensor's own count (`CodebookTensor.storage_bits`, what a variant reports)
    includes it, this price for the plan meter does not."""
    groups = -(-in_features // effective_group_size(spec.group_size, in_features))
    return spec.bits + 16 * 2 ** spec.bits * groups / (in_features * int(spec.option("rows")))


QUANTIZER = Quantizer(
    name="kmeans", title="k-means codebook (SqueezeLLM)", options=KmeansOptions,
    calibration="hessian", code_format="codebook", quantize=quantize_kmeans,
    storage_bits=storage_bits, bits=(2, 3, 4),
    summary="a non-uniform table per channel or group: k-means weighted by input energy, "
            "with GPTQ's error feedback")
