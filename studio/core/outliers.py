"""Outlier channels, massive activations, and the SmoothQuant migration preview.

An outlier channel is an input channel whose activation abs-max exceeds k times the median
channel abs-max of that input. Layers reading the same input (q/k/v, gate/up) share their
outlier channels, so they are reported once per input with every layer that reads it.
A massive activation is a token whose largest residual-stream entry exceeds `factor` times the
median of that block's tokens (Sun et al., "Massive activations in LLMs", 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from studio.core.activations import ActivationCapture, InputStats
from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress
from studio.core.quant.scales import smoothing_scales

DEFAULT_K = 20.0
DEFAULT_MASSIVE_FACTOR = 100.0


@dataclass
class OutlierGroup:
    label: str
    layers: list[str]
    block: int | None
    channels: np.ndarray     # int indices, largest first
    values: np.ndarray       # their abs-max, float32
    median: float
    peak: float
    width: int               # input channels

    @property
    def ratio(self) -> float:
        return self.peak / self.median if self.median > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"input": self.label, "layers": self.layers, "block": self.block,
                "channels": self.channels.tolist(),
                "values": [round(float(v), 6) for v in self.values],
                "median": self.median, "peak": self.peak, "width": self.width,
                "ratio": self.ratio if np.isfinite(self.ratio) else None}


def check_k(k: float) -> float:
    k = float(k)
    if not np.isfinite(k) or k <= 0:
        raise StudioError(f"The outlier threshold k must be a positive number (k x the median "
                          f"channel abs-max), not {k:g}.")
    return k


def outlier_channels(absmax: np.ndarray, k: float) -> np.ndarray:
    """Indices of the channels whose abs-max exceeds k x the median, largest first."""
    k = check_k(k)
    absmax = np.asarray(absmax, dtype=np.float32)
    median = float(np.median(absmax)) if absmax.size else 0.0
    idx = np.nonzero(absmax > k * median)[0] if median > 0 else np.nonzero(absmax > 0)[0]
    return idx[np.argsort(-absmax[idx], kind="stable")]


def find_outliers(capture: ActivationCapture, k: float = DEFAULT_K) -> list[OutlierGroup]:
    """One row per layer input (q/k/v share a row), in model order, outliers or not."""
    k = check_k(k)
    return [_group(stats, k) for stats in capture.inputs]


def _group(stats: InputStats, k: float) -> OutlierGroup:
    channels = outlier_channels(stats.absmax, k)
    return OutlierGroup(label=stats.label, layers=list(stats.layers), block=stats.block,
                        channels=channels, values=stats.absmax[channels].astype(np.float32),
                        median=float(np.median(stats.absmax)), peak=float(stats.absmax.max()),
                        width=int(stats.absmax.size))


# --- SmoothQuant migration preview ----------------------------------------------------------

@dataclass
class SmoothingPreview:
    alpha: float
    scales: np.ndarray            # [in] float32
    act_before: np.ndarray        # [in] activation abs-max per channel
    act_after: np.ndarray
    weight_before: np.ndarray     # [in] weight column abs-max (over the layers of the input)
    weight_after: np.ndarray

    def ranges(self) -> dict[str, float]:
        """max / median of each side before and after: how hard each is to quantize."""
        return {"act_before": _spread(self.act_before), "act_after": _spread(self.act_after),
                "weight_before": _spread(self.weight_before),
                "weight_after": _spread(self.weight_after)}


def weight_columns(handle, layers: list[str]) -> np.ndarray:
    """Abs-max of every input column over all `layers` (they read the same input)."""
    with torch.inference_mode():
        cols = [handle.weight(name).abs().amax(dim=0) for name in layers]
        return torch.stack(cols).amax(dim=0).numpy().astype(np.float32)


def smoothing_preview(act_absmax: np.ndarray, weight_absmax: np.ndarray,
                      alpha: float) -> SmoothingPreview:
    """What SmoothQuant's per-channel migration with `alpha` does to both ranges."""
    act = torch.from_numpy(np.asarray(act_absmax, dtype=np.float32))
    wcol = torch.from_numpy(np.asarray(weight_absmax, dtype=np.float32))
    if act.shape != wcol.shape:
        raise StudioError(f"Activation ({act.numel()}) and weight ({wcol.numel()}) channel "
                          f"counts differ; they must describe the same input.")
    s = smoothing_scales(act, wcol, alpha)
    return SmoothingPreview(alpha=alpha, scales=s.numpy(), act_before=act.numpy(),
                            act_after=(act / s).numpy(), weight_before=wcol.numpy(),
                            weight_after=(wcol * s).numpy())


def _spread(values: np.ndarray) -> float:
    median = float(np.median(values))
    return float(values.max()) / median if median > 0 else float("inf")


# --- massive activations --------------------------------------------------------------------

@dataclass
class MassiveActivation:
    """One token whose residual stream holds a massive entry, over the blocks where it does."""
    window: int
    position: int
    token: str
    channel: int         # the channel of its largest entry
    value: float         # that entry's |h|, at the stream where the ratio peaks
    ratio: float         # value / the median per-token max of that stream
    stream: str          # where the ratio peaks: "embeddings" or a block name
    row: int             # index of that stream in capture.stream_*: 0 = first block input
    rows: list[int]      # every stream where the token is massive

    def to_dict(self) -> dict:
        return {"window": self.window, "position": self.position, "token": self.token,
                "channel": self.channel, "value": self.value, "ratio": self.ratio,
                "stream": self.stream, "streams": len(self.rows),
                "first_stream": self.rows[0], "last_stream": self.rows[-1]}


def massive_activations(capture: ActivationCapture, factor: float = DEFAULT_MASSIVE_FACTOR,
                        limit: int = 200) -> list[MassiveActivation]:
    """Tokens whose largest residual entry exceeds `factor` x the median token's in some stream
    (embeddings or a block output), one entry per token, largest ratio first (at most `limit`)."""
    if not factor > 0:
        raise StudioError(f"The massive-activation factor must be positive, not {factor:g}.")
    found: dict[tuple[int, int], MassiveActivation] = {}
    for row in range(capture.stream_max.shape[0]):
        peaks = capture.stream_max[row]
        median = float(np.median(peaks))
        if median <= 0:
            continue
        for window, pos in np.argwhere(peaks > factor * median).tolist():
            value = float(peaks[window, pos])
            entry = found.get((window, pos))
            if entry is None:
                entry = found[(window, pos)] = MassiveActivation(
                    window=window, position=pos, token=capture.token(window, pos), channel=0,
                    value=0.0, ratio=0.0, stream="", row=row, rows=[])
            entry.rows.append(row)
            if value / median > entry.ratio:
                entry.value, entry.ratio, entry.row = value, value / median, row
                entry.stream = capture.stream_names[row]
                entry.channel = int(capture.stream_dim[row, window, pos])
    return sorted(found.values(), key=lambda m: -m.ratio)[:limit]


def token_norm_profile(capture: ActivationCapture) -> dict[str, np.ndarray]:
    """Per stream position (embeddings, each block output): the largest and the median token
    norm, float32 [blocks + 1], for the 'where do massive activations appear' chart."""
    flat = capture.stream_norm.reshape(capture.stream_norm.shape[0], -1)
    return {"max": flat.max(axis=1).astype(np.float32),
            "median": np.median(flat, axis=1).astype(np.float32)}


# --- as jobs, for the window's details worker -----------------------------------------------
# A capture of many windows makes these seconds of NumPy with the GIL held in stretches: the
# Activations view asks for them on the details worker instead of computing them when a
# capture is published.

def outliers_job(capture: ActivationCapture, k: float) -> Job[list[OutlierGroup]]:
    yield Progress(0, 1, "Finding outlier channels")
    return find_outliers(capture, k)


@dataclass
class MassiveFindings:
    profile: dict[str, np.ndarray]           # token_norm_profile
    massive: list[MassiveActivation]


def massive_job(capture: ActivationCapture,
                factor: float = DEFAULT_MASSIVE_FACTOR) -> Job[MassiveFindings]:
    yield Progress(0, 2, "Token norms along the residual stream")
    profile = token_norm_profile(capture)
    yield Progress(1, 2, "Finding massive activations")
    return MassiveFindings(profile, massive_activations(capture, factor))
