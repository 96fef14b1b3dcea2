"""Per-layer arrays for the views, computed as jobs so the window never runs torch itself.

Reading a layer's weight (de-quantizing a variant's codes, or reading a streamed layer from its
file) and reducing it takes from milliseconds to a second on a large layer (an lm_head of
128k x 3k); the views ask for these on the details worker and draw the arrays when they come.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from studio.core.jobs import Job, Progress

HIST_BINS = 200


@dataclass(frozen=True)
class BeforeAfterArrays:
    """One layer in the baseline and in a variant, reduced for plotting (float32).

    edges          HIST_BINS + 1 bin edges over the baseline's central 99.8% (a few outliers
                   would squash the rest)
    counts_before  weights of the baseline in each bin; counts_after: the variant's
    cols_before    abs-max of each input channel; cols_after: the variant's
    """
    edges: np.ndarray
    counts_before: np.ndarray
    counts_after: np.ndarray
    cols_before: np.ndarray
    cols_after: np.ndarray


def before_after_job(handle, variant, name: str) -> Job[BeforeAfterArrays]:
    yield Progress(0, 1, f"Reading {name} before and after")
    before = handle.weight(name).float().numpy()
    after = variant.qtensors[name].dequantize().float().numpy()
    low, high = np.percentile(before, [0.1, 99.9])
    edges = np.linspace(float(low), float(high), HIST_BINS + 1, dtype=np.float32)
    counts = [np.histogram(values, bins=edges)[0].astype(np.float32) for values in (before, after)]
    cols = [np.abs(values).max(axis=0).astype(np.float32) for values in (before, after)]
    return BeforeAfterArrays(edges, counts[0], counts[1], cols[0], cols[1])


def weight_columns_job(handle, layers: list[str]) -> Job[np.ndarray]:
    """Abs-max of every input column over `layers` (`outliers.weight_columns`), as a job."""
    from studio.core.outliers import weight_columns

    yield Progress(0, 1, f"Reading the weights of {', '.join(layers)}")
    return weight_columns(handle, layers)


@dataclass(frozen=True)
class WeightSummary:
    """One layer's weight range, as the Layers tab's details pane shows it."""
    low: float
    high: float
    std: float
    max_over_median: float   # abs-max / median |w|: how far the largest weight sticks out


def weight_summary_job(handle, name: str) -> Job[WeightSummary]:
    """A layer's min, max, std and abs-max over median |w| (a median of the demo's embedding,
    28 M weights, takes about a second: not a job for the UI thread)."""
    yield Progress(0, 1, f"Reading {name}")
    w = handle.weight(name).float()
    absw = w.abs()
    ratio = (absw.max() / absw.median().clamp_min(1e-12)).item()
    return WeightSummary(w.min().item(), w.max().item(), w.std().item(), ratio)
