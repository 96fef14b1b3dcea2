"""Weight statistics per layer: what makes a weight matrix hard to quantize.

For every quantizable layer (and the embedding / lm_head, marked as not quantizable) we keep a
few scalars that rank layers (abs-max, std, kurtosis, max/median ratios) and small float32
arrays to draw: a histogram of the values, the abs-max of every output row and input column,
and a block-max |W| heatmap downsampled to at most 256 x 256. The full matrix is never copied
into the result, so the statistics of a whole model stay a few MB.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from studio.core.jobs import Job, Progress
from studio.core.layers import LayerInfo
from studio.core.memory import estimate_job, guard
from studio.core.streaming import StoredParameter

HIST_BINS = 256
HEATMAP_MAX = 256
# Elements sampled (evenly strided) for the median of |W|: a ratio needs no more, and an exact
# median of every matrix would cost more than all the other statistics together.
MEDIAN_SAMPLE = 1 << 16
# Larger matrices (a large vocabulary's embedding: 128256 x 3072 = 394M weights) go through in
# row chunks: whole, their float32 copies and the histogram's integer bins took ~5x the matrix.
CHUNKED_ABOVE = 1 << 26
CHUNK_ELEMENTS = 1 << 24

# The scalar statistics a user can rank layers by: key -> (label, what it tells).
SUMMARY_STATS: dict[str, tuple[str, str]] = {
    "absmax": ("abs-max", "largest |w| in the layer"),
    "std": ("std", "standard deviation of the weights"),
    "kurtosis": ("kurtosis", "tail weight (3 for a Gaussian; higher = heavier tails)"),
    "max_median": ("max/median", "largest |w| over the median |w|"),
    "col_ratio": ("col max/median", "largest input-column abs-max over the median column"),
    "row_ratio": ("row max/median", "largest output-row abs-max over the median row"),
}


@dataclass
class LayerWeightStats:
    name: str
    block: int | None
    role: str
    kind: str
    shape: tuple[int, int]
    quantizable: bool
    absmax: float
    std: float
    kurtosis: float
    max_median: float
    col_ratio: float
    row_ratio: float
    hist_edges: np.ndarray      # [HIST_BINS + 1] float32, symmetric around 0
    hist_counts: np.ndarray     # [HIST_BINS] float32
    row_absmax: np.ndarray      # [out] float32: abs-max of each output channel
    col_absmax: np.ndarray      # [in] float32: abs-max of each input channel (weight column)
    heatmap: np.ndarray         # [<=256, <=256] float32: block max of |W|, rows = outputs
    heat_block: tuple[int, int]  # rows x columns of W that one heatmap cell covers
    tied_to: str | None = None

    def summary(self) -> dict:
        """The scalars, JSON-ready."""
        return {"name": self.name, "block": self.block, "role": self.role, "kind": self.kind,
                "shape": list(self.shape), "quantizable": self.quantizable,
                "tied_to": self.tied_to,
                **{key: _finite(getattr(self, key)) for key in SUMMARY_STATS}}

    def to_dict(self, channels: bool = False) -> dict:
        out = self.summary()
        out["histogram"] = {"edges": self.hist_edges.tolist(), "counts": self.hist_counts.tolist()}
        if channels:
            out["row_absmax"] = self.row_absmax.tolist()
            out["col_absmax"] = self.col_absmax.tolist()
        return out


@dataclass
class WeightStats:
    """Statistics of every weight layer of one model, in the inventory's order."""
    model: str
    layers: dict[str, LayerWeightStats] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def quantizable(self) -> list[LayerWeightStats]:
        return [s for s in self.layers.values() if s.quantizable]

    def column(self, key: str, quantizable_only: bool = True) -> np.ndarray:
        """One summary statistic for every (quantizable) layer, in order, as float32."""
        rows = self.quantizable if quantizable_only else list(self.layers.values())
        return np.array([getattr(s, key) for s in rows], dtype=np.float32)

    def ranked(self, key: str, top: int | None = None) -> list[LayerWeightStats]:
        """Quantizable layers from the highest value of `key` down."""
        rows = sorted(self.quantizable, key=lambda s: -_finite(getattr(s, key), -np.inf))
        return rows if top is None else rows[:top]

    def to_dict(self, channels: bool = False) -> dict:
        return {"model": self.model,
                "layers": [s.to_dict(channels) for s in self.layers.values()]}


def weight_stats_job(handle, layers: list[LayerInfo] | None = None) -> Job[WeightStats]:
    """Statistics of `layers` (default: every quantizable layer plus embeddings and lm_head)."""
    if layers is None:
        layers = [info for info in handle.layers
                  if info.quantizable or info.kind in ("embedding", "lm_head")]
    guard(estimate_job(handle, "stats"))
    result = WeightStats(model=handle.name)
    done_by_weight: dict[int, LayerWeightStats] = {}
    for i, info in enumerate(layers):
        yield Progress(i, len(layers), f"Weight statistics: {info.name}")
        module = handle.module(info.name)
        # A tied lm_head is the embedding matrix itself: reuse its numbers, named as itself
        # (found before reading: a streamed embedding is a large read).
        key = weight_identity(module)
        twin = done_by_weight.get(key)
        if twin is not None and twin.shape == tuple(info.shape):
            stats = replace(twin, name=info.name, role=info.role, kind=info.kind,
                            quantizable=info.quantizable, block=info.block, tied_to=twin.name)
        else:
            w = _stored_matrix(module) if isinstance(module._parameters.get("weight"),
                                                     StoredParameter) else \
                handle.weight(info.name) if info.kind != "embedding" else module.weight.data
            stats = layer_weight_stats(w, info)
            done_by_weight[key] = stats
            del w
        result.layers[info.name] = stats
    yield Progress(len(layers), len(layers), "Weight statistics done")
    return result


def _stored_matrix(module) -> torch.Tensor:
    """A streamed weight as [out, in] in its stored dtype (large ones go through in chunks)."""
    from studio.core.layers import is_conv1d

    param = module._parameters["weight"]
    w = param.read(param.dtype)
    return w.t() if is_conv1d(module) else w


def weight_identity(module) -> int:
    """Equal for layers sharing one weight: its storage, or the stored tensor when streamed."""
    param = module._parameters.get("weight")
    if param is None:
        return id(module)
    return id(param) if isinstance(param, StoredParameter) else param.data_ptr()


def layer_weight_stats(w: torch.Tensor, info: LayerInfo) -> LayerWeightStats:
    """All the statistics of one [out, in] weight matrix."""
    if w.numel() > CHUNKED_ABOVE:
        return _chunked_stats(w, info)
    # NumPy, not torch: these are memory-bound passes over small matrices, where torch's
    # thread pool costs more than it gains (10-100x slower on a busy 2-core machine).
    w = w.detach().float().numpy()
    a = np.abs(w)
    row_absmax = a.max(axis=1)
    col_absmax = a.max(axis=0)
    absmax = float(row_absmax.max())
    centred = w - np.float32(w.mean(dtype=np.float64))
    sq = np.square(centred, out=centred)
    m2 = float(sq.mean(dtype=np.float64))
    m4 = float(np.square(sq, out=sq).mean(dtype=np.float64))
    kurt = m4 / (m2 * m2) if m2 > 0 else float("nan")
    edges, counts = histogram(w, absmax)
    heat, heat_block = block_max(a)
    return LayerWeightStats(
        name=info.name, block=info.block, role=info.role, kind=info.kind,
        shape=(int(w.shape[0]), int(w.shape[1])), quantizable=info.quantizable,
        absmax=absmax, std=m2 ** 0.5, kurtosis=kurt,
        max_median=_ratio(absmax, _median(a)),
        col_ratio=_ratio(float(col_absmax.max()), float(np.median(col_absmax))),
        row_ratio=_ratio(float(row_absmax.max()), float(np.median(row_absmax))),
        hist_edges=edges, hist_counts=counts,
        row_absmax=row_absmax.astype(np.float32), col_absmax=col_absmax.astype(np.float32),
        heatmap=heat, heat_block=heat_block, tied_to=info.tied_to)


def _chunked_stats(w: torch.Tensor, info: LayerInfo) -> LayerWeightStats:
    """`layer_weight_stats` in row chunks (any float dtype; each chunk made float32 in turn):
    the same statistics, with sums taken chunk by chunk in float64."""
    rows, cols = w.shape
    row_block = -(-rows // HEATMAP_MAX)
    step = max(row_block, (CHUNK_ELEMENTS // max(cols, 1)) // row_block * row_block)
    chunks = [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]
    part = lambda lo, hi: w[lo:hi].float().numpy()  # noqa: E731
    row_absmax = np.empty(rows, dtype=np.float32)
    col_absmax = np.zeros(cols, dtype=np.float32)
    heat_rows, total = [], 0.0
    for lo, hi in chunks:
        a = np.abs(part(lo, hi))
        row_absmax[lo:hi] = a.max(axis=1)
        np.maximum(col_absmax, a.max(axis=0), out=col_absmax)
        heat_rows.append(_reduce_rows(a, -(-(hi - lo) // row_block))[0])
        total += float(part(lo, hi).sum(dtype=np.float64))
    absmax = float(row_absmax.max())
    mean = np.float32(total / w.numel())
    m2 = m4 = 0.0
    counts = np.zeros(HIST_BINS, dtype=np.float32)
    for lo, hi in chunks:
        x = part(lo, hi)
        counts += histogram(x, absmax)[1]
        sq = np.square(x - mean)
        m2 += float(sq.sum(dtype=np.float64))
        m4 += float(np.square(sq, out=sq).sum(dtype=np.float64))
    m2, m4 = m2 / w.numel(), m4 / w.numel()
    edges = histogram(np.zeros(1, dtype=np.float32), absmax)[0]
    heat_cols, col_block = _reduce_rows(np.ascontiguousarray(np.vstack(heat_rows).T), HEATMAP_MAX)
    flat = w.reshape(-1)
    sample = np.abs(flat[:: max(1, flat.numel() // MEDIAN_SAMPLE)].float().numpy()) \
        if flat.numel() > MEDIAN_SAMPLE else np.abs(flat.float().numpy())
    return LayerWeightStats(
        name=info.name, block=info.block, role=info.role, kind=info.kind,
        shape=(int(rows), int(cols)), quantizable=info.quantizable,
        absmax=absmax, std=m2 ** 0.5, kurtosis=m4 / (m2 * m2) if m2 > 0 else float("nan"),
        max_median=_ratio(absmax, float(np.median(sample))),
        col_ratio=_ratio(float(col_absmax.max()), float(np.median(col_absmax))),
        row_ratio=_ratio(float(row_absmax.max()), float(np.median(row_absmax))),
        hist_edges=edges, hist_counts=counts, row_absmax=row_absmax, col_absmax=col_absmax,
        heatmap=np.ascontiguousarray(heat_cols.T, dtype=np.float32),
        heat_block=(row_block, col_block), tied_to=info.tied_to)


def histogram(values, absmax: float | None = None,
              bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(edges [bins+1], counts [bins]) over [-absmax, absmax], symmetric so 0 sits mid-axis.
    `values`: a NumPy array or a tensor, any shape."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().numpy()
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if absmax is None:
        absmax = float(np.abs(values).max()) if values.size else 0.0
    absmax = absmax if absmax > 0 else 1.0
    # Uniform bins: the bin index by arithmetic, then one bincount (np.histogram's general
    # path is ~3x slower on the ~200 matrices of a model).
    x = np.multiply(values, np.float32(bins / (2 * absmax)))
    x += np.float32(bins / 2)
    np.clip(x, 0, bins - 1, out=x)
    counts = np.bincount(x.astype(np.intp), minlength=bins).astype(np.float32)
    return np.linspace(-absmax, absmax, bins + 1, dtype=np.float32), counts


def block_max(a: np.ndarray, size: int = HEATMAP_MAX) -> tuple[np.ndarray, tuple[int, int]]:
    """Downsample a non-negative matrix to at most size x size by the max of each block (so a
    single outlier weight stays visible however large the matrix is). Returns the map and the
    block size (rows, columns) each cell covers; the last cell of an axis may be ragged."""
    rows, row_block = _reduce_rows(a, size)
    cols, col_block = _reduce_rows(np.ascontiguousarray(rows.T), size)
    return np.ascontiguousarray(cols.T, dtype=np.float32), (row_block, col_block)


def _reduce_rows(a: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    # Whole blocks by a reshape (contiguous, fast), then the ragged tail on its own.
    n = a.shape[0]
    block = -(-n // size)
    whole = n // block
    out = a[: whole * block].reshape(whole, block, a.shape[1]).max(axis=1)
    if whole * block < n:
        out = np.vstack([out, a[whole * block:].max(axis=0, keepdims=True)])
    return out, block


def _median(a: np.ndarray) -> float:
    flat = a.reshape(-1)
    if flat.size > MEDIAN_SAMPLE:
        # An evenly spread sample: deterministic, and exact enough for a ratio.
        flat = flat[:: flat.size // MEDIAN_SAMPLE]
    return float(np.median(flat))


def _ratio(top: float, median: float) -> float:
    return top / median if median > 0 else float("inf") if top > 0 else float("nan")


def _finite(value: float, default: float | None = None) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else default
