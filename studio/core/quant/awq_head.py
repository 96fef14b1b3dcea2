"""AWQ on an untied output head: activation-aware scales for the lm_head, folded into what
feeds it (the final norm, or OPT's project_out), as `awq.py` folds a block's into its norms.

The head reads the final hidden states through the final norm, so its input channels have
the same outliers a block's linears see, and a 4-bit head gains from the same protection. The
head is one linear, so the scale search judges a candidate s by the head's own output error
x (Q(W s) / s)^T - x W^T on a token sample; it runs in chunks of vocabulary rows, as a large
vocabulary's logits for a thousand tokens would not fit at once. Then the clip search and
the rounding of `awq.py`, on W s with inputs x / s.

A tied head cannot take the fold: multiplying its columns by s would scale the embedding it
shares, and with it every block's input (`plan_ends.end_method` keeps such a head on RTN and
says so).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from studio.core.plan import QuantSpec
from studio.core.quant.awq import (CLIP_TOKENS, SEARCH_TOKENS, STATS_TOKENS, fake_quant_matrix,
                                   search_clip)
from studio.core.quant.grid import QTensor, effective_group_size, expand_groups, quantize_rtn

ERROR_CHUNK = 16 * 2 ** 20   # elements of a [tokens, vocabulary rows] error block at a time


@torch.no_grad()
def awq_head(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec
             ) -> tuple[QTensor, torch.Tensor]:
    """(the codes of the scaled, clipped head, the scales s [d]) for an lm_head `weight`
    [vocab, d] reading `x` [tokens, d] (the final hidden states through the final norm). The
    caller folds s away: what feeds the head divided by s, the head's columns multiplied by
    it (the codes are of W s)."""
    weight, x = weight.float(), x.float()
    x_mean = _strided(x, STATS_TOKENS).abs().mean(0)
    search = _strided(x, SEARCH_TOKENS)
    best_loss, best = math.inf, torch.ones_like(x_mean)
    for step in range(int(spec.option("grid"))):
        s = x_mean.pow(step / int(spec.option("grid"))).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = _output_error(weight, fake_quant_matrix(weight * s, spec) / s, search)
        if loss < best_loss:   # a NaN loss never wins: the head then stays unscaled
            best_loss, best = loss, s
    w = weight * best
    if spec.option("clip"):
        bound = search_clip(w, _strided(x, CLIP_TOKENS) / best, spec)
        gs = effective_group_size(spec.group_size, w.shape[1])
        bound = expand_groups(bound, gs, w.shape[1])
        w = torch.clamp(w, -bound, bound)
    return quantize_rtn(w, spec), best


def _strided(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """About `tokens` rows of x, evenly strided (calibration windows are random already; a
    stride spreads the sample over them and over positions)."""
    return x[::max(1, x.shape[0] // tokens)][:tokens]


def _output_error(weight: torch.Tensor, candidate: torch.Tensor, x: torch.Tensor) -> float:
    """mean((x candidate^T - x weight^T)^2), a chunk of output rows at a time."""
    rows = max(1, ERROR_CHUNK // x.shape[0])
    total = 0.0
    for start in range(0, weight.shape[0], rows):
        delta = candidate[start:start + rows] - weight[start:start + rows]
        total += (x @ delta.T).pow(2).sum().item()
    return total / (x.shape[0] * weight.shape[0])


def head_feeder(model: nn.Module) -> nn.Module:
    """The module whose output the lm_head reads: OPT's project_out when it has one, else the
    final norm (`sensitivity.FINAL_NORMS`)."""
    from studio.core.errors import StudioError
    from studio.core.sensitivity import FINAL_NORMS

    project = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out",
                      None)
    if project is not None:
        return project
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise StudioError(f"{type(model).__name__}: the studio cannot find the final norm that "
                      f"feeds the lm_head, so AWQ's scales have nowhere to fold.")


@torch.no_grad()
def fold_into_feeder(model: nn.Module, s: torch.Tensor) -> None:
    """Divide what feeds the head by s, on new tensors (the job's model shares its tensors
    with the baseline until it writes them)."""
    from studio.core.quant.scaling import divide_output

    feeder = head_feeder(model)
    for key, parameter in list(feeder._parameters.items()):
        if parameter is not None:
            feeder._parameters[key] = nn.Parameter(parameter.detach().clone(),
                                                   requires_grad=False)
    divide_output(feeder, s)
