"""Measured points on the allocator's size/loss curve: the plan is quantized at a few budgets
and each variant's KL and perplexity against the baseline are measured on a short text, so
the curve's predicted loss can be checked against real models.

Used by the Plan tab (the green points beside its Pareto curve) and by
`compression-studio plan --measure-points N`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from studio.core.errors import StudioError
from studio.core.jobs import Progress

# A short pass: 8 windows of 128 tokens on the built-in text, seeded apart from calibration.
SEQLEN = 128
WINDOWS = 8
SEED = 1


@dataclass(frozen=True)
class MeasuredPoint:
    bpw: float          # the quantized plan's bits per weight (scales counted)
    predicted: float    # the allocator's predicted loss for it
    kl: float           # mean KL divergence to the baseline, nats/token
    ppl: float          # perplexity on the same windows

    def to_dict(self) -> dict:
        return asdict(self)


def point_targets(answer, count: int = 4) -> list[float]:
    """The chosen plan's bits per weight, then `count - 1` more spread along its curve (never
    below the curve's smallest size, which a budget could not meet)."""
    if count < 1:
        raise StudioError(f"Measure at least one point, not {count}.")
    bpw = answer.pareto.bpw
    quantiles = np.linspace(0.2, 0.8, count - 1) if count > 1 else []
    spread = [float(np.quantile(bpw, q)) for q in quantiles]
    return [answer.bpw] + [max(b, float(bpw.min())) for b in spread]


def measure_points_job(handle, table, targets: list[float], windows):
    """Job: for each target bits/weight, allocate under it, quantize that plan (the table's
    method) and measure KL and perplexity on `windows` against the baseline.
    Returns [MeasuredPoint] in the order of `targets`."""
    from studio.core import metrics
    from studio.core.allocate import allocate, plan_size
    from studio.core.evaluate import window_logits
    from studio.core.quantize import quantize_job

    yield Progress(0, len(targets) + 1, "Scoring the baseline")
    base = [logits for _, _, logits in window_logits(handle.model, windows)]
    points = []
    for i, bpw in enumerate(targets):
        yield Progress(i + 1, len(targets) + 1, f"Measuring the plan at {bpw:.2f} bits/weight")
        answer = allocate(table, budget_bpw=bpw)
        variant = yield from quantize_job(handle, answer.plan, None, None, "measure")
        kl = nll = 0.0
        tokens = 0
        for (_, ids, logits), ref in zip(window_logits(variant.model, windows), base):
            kl += metrics.kl_divergence(ref, logits).sum().item()
            nll += metrics.token_nll(logits, ids).sum().item()
            tokens += ids.numel()
        del variant
        # at the bits per weight the curve is drawn in (the ends the table chooses counted)
        auto = [n for names in table.units.values() for n in names]
        points.append(MeasuredPoint(bpw=plan_size(handle, answer.plan, auto).budget_bpw,
                                    predicted=answer.loss, kl=kl / tokens,
                                    ppl=metrics.perplexity(nll, tokens - len(windows))))
    return points
