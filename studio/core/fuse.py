"""One matmul where a block runs several on the same input: q/k/v, and gate/up.

A decode step at batch 1 is many small matmuls, and on a 135M model each kernel call's fixed
cost (dispatch, casting the input to bf16 and back, allocating the output) is a visible part of
it. Layers that read the same input are fused into one module of the same kind whose output is
split afterwards: three calls become one for q/k/v, two become one for gate/up.

* int4 kernel layers (same group, same input width): their packed rows are blocks of whole
  output rows (`kernels.int4_block_n`), so the fused buffer is the row blocks one after the
  other; scales and zeros concatenate along the output axis.
* native int4 layers (same group and input width): codes, scales and mins are whole rows,
  concatenated.
* int8 kernel layers without a zero-point term: rows and per-row scales concatenate.
* float Linear layers of one dtype: weights (and biases) concatenate.

The originals are re-pointed at slices of the fused weights, so fusing costs no memory and the
model's own forward (which still calls them one by one) keeps working. Layers with input hooks
(SmoothQuant's simulated activation quantization), with mixed kinds or shapes, stay unfused.
Each output column is the same dot product as before, so results are unchanged (tested).
"""
from __future__ import annotations

import torch
from torch import nn

from studio.core.kernels import Int4Linear, Int8Linear
from studio.core.q4_native import NativeInt4Linear


class Fused:
    """Calls one fused module and splits its output into the original layers' outputs."""

    def __init__(self, module: nn.Module, sizes: list[int]) -> None:
        self.module, self.sizes = module, sizes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(x).split(self.sizes, dim=-1)


def fuse(modules: list[nn.Module]) -> Fused | None:
    """A fused call for `modules` (all reading the same input), or None when they cannot be."""
    if len(modules) < 2 or any(m._forward_pre_hooks or m._forward_hooks for m in modules):
        return None
    kinds = {type(m) for m in modules}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is Int4Linear:
        return _fuse_int4(modules)
    if kind is NativeInt4Linear:
        return _fuse_native(modules)
    if kind is Int8Linear:
        return _fuse_int8(modules)
    if kind is nn.Linear:
        return _fuse_linear(modules)
    return None


def _biases(modules) -> torch.Tensor | None | bool:
    """The concatenated biases, None when no layer has one, False when only some have."""
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        return False
    return torch.cat([b.detach() for b in biases])


def _fuse_int4(modules: list[Int4Linear]) -> Fused | None:
    first = modules[0]
    if (any(m.block_n is None or m.group != first.group or m.in_features != first.in_features
            for m in modules)):
        return None
    bias = _biases(modules)
    if bias is False:
        return None
    packed = torch.cat([m.packed for m in modules])        # whole row blocks, one after another
    scales_zeros = torch.cat([m.scales_zeros for m in modules], dim=1).contiguous()
    sizes = [m.out_features for m in modules]
    fused = Int4Linear(packed, scales_zeros, first.group, first.in_features, sum(sizes), bias)
    fused.prefill_rows = first.prefill_rows
    start = 0
    for m, size in zip(modules, sizes):   # the originals read the fused bytes: no second copy
        m.packed = packed[start:start + size]
        start += size
    return Fused(fused, sizes)


def _fuse_native(modules: list[NativeInt4Linear]) -> Fused | None:
    first = modules[0]
    if any(m.group != first.group or m.in_features != first.in_features for m in modules):
        return None
    bias = _biases(modules)
    if bias is False:
        return None
    tensors = {name: torch.cat([m.tensors()[name] for m in modules]) for name in first.tensors()}
    fused = NativeInt4Linear(tensors, first.group, first.in_features, bias, first.prefill_rows,
                             first.prefill_dtype)
    sizes = [m.out_features for m in modules]
    start = 0
    for m, size in zip(modules, sizes):   # rows are whole: the originals read slices
        for name, tensor in tensors.items():
            setattr(m, name, tensor[start:start + size])
        start += size
    return Fused(fused, sizes)


def _fuse_int8(modules: list[Int8Linear]) -> Fused | None:
    first = modules[0]
    if any(m.offset is not None or m.in_features != first.in_features for m in modules):
        return None
    bias = _biases(modules)
    if bias is False:
        return None
    weight = torch.cat([m.weight for m in modules])
    scales = torch.cat([m.scales for m in modules])
    fused = Int8Linear(weight, scales, None, bias)
    fused.prefill_rows = first.prefill_rows
    sizes = [m.out_features for m in modules]
    start = 0
    for m, size in zip(modules, sizes):
        m.weight = weight[start:start + size]
        start += size
    return Fused(fused, sizes)


def _fuse_linear(modules: list[nn.Linear]) -> Fused | None:
    first = modules[0]
    if any(m.weight.dtype != first.weight.dtype or m.in_features != first.in_features
           for m in modules):
        return None
    bias = _biases(modules)
    if bias is False:
        return None
    weight = torch.cat([m.weight.detach() for m in modules])
    sizes = [m.out_features for m in modules]
    fused = nn.Linear(first.in_features, sum(sizes), bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    start = 0
    for m, size in zip(modules, sizes):
        m.weight = nn.Parameter(weight[start:start + size], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(fused.bias[start:start + size], requires_grad=False)
        start += size
    return Fused(fused, sizes)
