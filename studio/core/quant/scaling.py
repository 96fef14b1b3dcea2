"""Per-channel scaling groups of a decoder block, and folding a scale into them exactly.

AWQ and SmoothQuant both rescale the input channels of some linears by a vector s and undo it
in the op that produces those inputs, so the block computes the same function before any
rounding:  prev(x) / s  feeds  W * s  (columns).  A *scaling group* names the three parties:

    prev     the op whose output is divided by s (a norm, or a linear's output rows)
    linears  the linears that read that output (their input columns are multiplied by s)
    inspect  the module whose output error judges a candidate s (AWQ's `module2inspect`)

Names are relative to the block. Which groups a block has is discovered by `layout.py` (the
kinds of group follow the reference implementations, mit-han-lab/llm-awq `auto_scale.py` and
mit-han-lab/smoothquant `smooth.py`); this file only folds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.layers import is_linear, weight_matrix


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                 # op whose output is divided by s
    linears: tuple[str, ...]  # linears whose input columns are multiplied by s
    inspect: str              # module whose output error measures the group
    norm_preceded: bool       # prev is a norm: the groups SmoothQuant smooths
    rows: tuple[int, int] | None = None  # the slice of prev's outputs the linears read (fused
    #                                      qkv / gate_up); None: all of them


# --- folding ------------------------------------------------------------------------------

@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide `prev`'s output by s and multiply the linears' input columns by s, in place."""
    if not torch.all(s > 0):
        raise ValueError("scales must be positive to fold")
    divide_output(block.get_submodule(group.prev), s, group.rows)
    for name in group.linears:
        scale_input_columns(block.get_submodule(name), s)


def divide_output(module: nn.Module, s: torch.Tensor,
                  rows: tuple[int, int] | None = None) -> None:
    """Make `module`'s output channels (those in `rows` when given) come out divided by s."""
    if is_linear(module):
        w = weight_matrix(module)  # [out, in]; a view for Conv1D, so in-place ops land in it
        lo, hi = rows or (0, w.shape[0])
        if hi - lo != s.numel() or hi > w.shape[0]:
            raise ValueError(f"scale of {s.numel()} channels for outputs {lo}..{hi} of "
                             f"{w.shape[0]}")
        w[lo:hi].div_(s.to(w.dtype).view(-1, 1))
        if module.bias is not None:
            module.bias.data[lo:hi].div_(s.to(module.bias.dtype))
        return
    name = type(module).__name__
    if is_norm(module) and rows is None:
        weight = module.weight.data
        if weight.numel() != s.numel():
            raise ValueError(f"scale of {s.numel()} channels for a norm of {weight.numel()}")
        if norm_offset(module):
            # Gemma's RMSNorm multiplies by (1 + weight): (1 + w) / s == 1 + w'.
            weight.copy_((1.0 + weight.float()).div(s).sub(1.0).to(weight.dtype))
        else:
            weight.div_(s.to(weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.data.div_(s.to(module.bias.dtype))
        return
    raise StudioError(f"Cannot fold a scale into a {name}; only norms and linear layers "
                      f"can take one.")


def scale_input_columns(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply the input columns of a linear (nn.Linear or GPT-2 Conv1D) by s, in place."""
    w = weight_matrix(module)
    if w.shape[1] != s.numel():
        raise ValueError(f"scale of {s.numel()} channels for {w.shape[1]} inputs")
    w.mul_(s.to(w.dtype).view(1, -1))


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with one weight per channel (LayerNorm, RMSNorm and kin)."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__) and \
        isinstance(weight, torch.Tensor) and weight.dim() == 1


_OFFSET: dict[type, bool] = {}


@torch.no_grad()
def norm_offset(module: nn.Module) -> bool:
    """True for norms that multiply by (1 + weight) (Gemma's RMSNorm family). Probed, not
    named: with its weight (and bias) zeroed such a norm still passes its input through."""
    kind = type(module)
    if kind not in _OFFSET:
        probe = copy.deepcopy(module)
        probe.weight.zero_()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        x = torch.randn(2, probe.weight.numel(), generator=torch.Generator().manual_seed(0))
        _OFFSET[kind] = bool(probe(x.to(probe.weight.dtype)).abs().max() > 0)
    return _OFFSET[kind]
