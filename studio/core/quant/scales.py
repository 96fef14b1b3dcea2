"""Per-input-channel scales that move quantization difficulty from activations to weights.

SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the activations are
divided by s and the weight columns multiplied by it, so X W^T is unchanged. Shared by the
migration preview in the analysis views and by the SmoothQuant quantizer.
"""
from __future__ import annotations

import torch


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                     eps: float = 1e-5) -> torch.Tensor:
    """Scales [in] from activation abs-max [in] and weight column abs-max [in] (over all the
    linears that read the same input)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    x = act_absmax.float().clamp_min(eps)
    w = weight_absmax.float().clamp_min(eps)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(eps)
