"""NF4: 4-bit NormalFloat (Dettmers et al. 2023, QLoRA; bitsandbytes' `create_normal_map`).

Pretrained weights are close to normal, so the levels are the quantiles of N(0, 1) that give
each level an equal share of its probability mass, normalised to [-1, 1], with an exact zero:
2**(bits-1) levels on the positive side and 2**(bits-1) - 1 on the negative side, from
`offset` = the midpoint of 1 - 1/(2(2^b - 1)) and 1 - 1/(2 * 2^b) (0.9677 at 4 bits, as
bitsandbytes). Each group of `group_size` weights of a row is divided by its absmax (stored as
an fp16 scale, QLoRA's block of 64 is `--group-size 64`) and every weight takes the nearest
level. At 4 bits the table equals bitsandbytes' NF4 within 1e-6 (bitsandbytes rounds the offset
to 0.9677083; tested).

Double quantization of the absmax scales (QLoRA's 8-bit second level) is not done: scales are
fp16, counted at 16 bits. The table is the format's constant, not counted (see codebook.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.core.quant.codebook import CodebookTensor, fp16_values
from studio.core.quant.grid import effective_group_size
from studio.core.quant.registry import Quantizer

ROW_CHUNK = 4096


def normal_float_levels(bits: int) -> torch.Tensor:
    """The 2**bits NormalFloat levels in [-1, 1], ascending (QLoRA's construction)."""
    count = 2 ** bits
    offset = 0.5 * ((1 - 1 / (2 * (count - 1))) + (1 - 1 / (2 * count)))
    half = count // 2
    # float32 quantile points and table, as bitsandbytes computes them
    # (torch.special.ndtri is the normal quantile, scipy's norm.ppf, in double precision)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    levels = torch.tensor(sorted([*positive.tolist(), 0.0, *negative.tolist()]),
                          dtype=torch.float32)
    return levels / levels.abs().max()


def quantize_nf(w: torch.Tensor, spec, calib=None) -> CodebookTensor:
    """NF-quantize `w` [out, in]: per-group absmax scales, nearest level."""
    w = w.float()
    out, cols = w.shape
    gs = effective_group_size(spec.group_size, cols)
    groups = -(-cols // gs)
    levels = fp16_values(normal_float_levels(spec.bits))   # NF4's levels are fp16-exact too
    bounds = (levels[1:] + levels[:-1]) / 2               # nearest level = bucket of midpoints
    padded = torch.zeros(out, groups * gs)
    padded[:, :cols] = w
    scale = fp16_values(padded.view(out, groups, gs).abs().amax(dim=2))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    indices = torch.empty(out, cols, dtype=torch.uint8)
    for start in range(0, out, ROW_CHUNK):
        rows = slice(start, min(start + ROW_CHUNK, out))
        x = padded[rows].view(-1, groups, gs) / safe[rows, :, None]
        indices[rows] = torch.bucketize(x, bounds).view(-1, groups * gs)[:, :cols].to(torch.uint8)
    return CodebookTensor(indices, levels[None, None, :], scale, spec.bits, gs,
                          constant_table=True)


def storage_bits(spec, in_features: int) -> float:
    """Indices plus one fp16 absmax per group (the level table is the format's constant)."""
    groups = -(-in_features // effective_group_size(spec.group_size, in_features))
    return spec.bits + 16 * groups / in_features


@dataclass(frozen=True)
class NfOptions:
    """NF4 has no options: the levels are fixed, the group size is the spec's."""


QUANTIZER = Quantizer(
    name="nf4", title="NF4 (normal-float codebook)", options=NfOptions, calibration="none",
    code_format="codebook", quantize=quantize_nf, storage_bits=storage_bits, bits=(2, 3, 4),
    summary="QLoRA's normal-float levels times a per-group absmax scale")
