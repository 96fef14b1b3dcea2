"""How a variant's layers are laid out in a compressed-tensors checkpoint: each layer's stored
scheme, its tensors, and config.json's `quantization_config`.

Facts this relies on (compressed-tensors 0.20, read from its code and checked by reloading):
- compressed-tensors counts in signed integers, q = u - 2**(b-1), with a signed zero, and
  de-quantizes (q - zq) * scale; its packers add the offset back, so the bits stored are the
  studio's unsigned codes u and zeros z unchanged, and a symmetric studio zero (2**(b-1)) is
  its zero 0, which a symmetric checkpoint must not contain.
- "pack-quantized": `weight_packed` int32, each row one dense little-endian bit stream (code i
  at bit i*b, straddling words for 3/5/6/7 bits: the studio's `pack_codes`, read correctly by
  compressed-tensors >= 0.17), `weight_scale` [out, groups], `weight_shape` int64 [out, in],
  and for asymmetric layers `weight_zero_point` packed the same way along the output dimension.
- "int-quantized" (what vLLM reads for W8A8): the signed codes as an int8 `weight`, zeros (if
  any) as unpacked int8.
- Groups must divide the input width: there is no ragged last group.
- Modules are matched by exact name (the first of exact names, regexes, class names wins), so
  each layer's group is unambiguous; vLLM needs every other linear layer in `ignore`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from studio.core.quant.grid import QTensor
from studio.core.quant.pack import pack_codes

PACKED = "pack-quantized"
INT_CODES = "int-quantized"
MIXED = "mixed-precision"


@dataclass(frozen=True)
class Scheme:
    """How one layer is stored; the checkpoint has one config group per distinct Scheme."""
    bits: int
    group_size: int | None      # None: one scale per output row (compressed-tensors "channel")
    symmetric: bool
    act_bits: int | None = None  # per-token dynamic activation quantization (SmoothQuant)

    @property
    def format(self) -> str:
        return INT_CODES if self.act_bits else PACKED

    def describe(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        acts = f" A{self.act_bits} per-token" if self.act_bits else ""
        return (f"int{self.bits} {'sym' if self.symmetric else 'asym'} {group}{acts} "
                f"({self.format})")

    def config_group(self, targets: list[str]) -> dict:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "strategy": "channel" if self.group_size is None else "group",
                   "group_size": self.group_size, "dynamic": False}
        inputs = None
        if self.act_bits:  # the studio's ActQuant: symmetric, per token, from each input
            inputs = {"num_bits": self.act_bits, "type": "int", "symmetric": True,
                      "strategy": "token", "dynamic": True}
        return {"targets": targets, "weights": weights, "input_activations": inputs,
                "output_activations": None, "format": self.format}


def stored_group(qt: QTensor) -> int | None:
    """The group size in the file: None for per-channel; a group that does not divide the width
    becomes gcd(group, width), each scale and zero repeated (exact: the ragged last group is a
    whole number of the smaller groups)."""
    cols = qt.shape[1]
    return None if qt.group_size >= cols else math.gcd(qt.group_size, cols)


def scheme_for(qt: QTensor, symmetric: bool, act_bits: int | None) -> Scheme:
    # A layer asked for symmetric stays so only if every zero is the midpoint; otherwise its
    # zeros are written (still exact).
    symmetric = symmetric and bool((qt.zero == 2 ** (qt.bits - 1)).all())
    return Scheme(qt.bits, stored_group(qt), symmetric, act_bits)


def zeros_are_codes(qt: QTensor) -> bool:
    """Whether every zero is a whole number in the code range (what the file can hold)."""
    zero = qt.zero
    return bool(((zero == zero.round()) & (zero >= 0) & (zero < 2 ** qt.bits)).all())


def regrouped(per_group: torch.Tensor, qt: QTensor, group: int | None) -> torch.Tensor:
    """[out, groups] at the variant's group size -> at the stored group size."""
    if group is None or group == qt.group_size:
        return per_group
    return per_group.repeat_interleave(qt.group_size // group, dim=1)[:, : qt.shape[1] // group]


def layer_tensors(qt: QTensor, scheme: Scheme, scale_dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """The layer's tensors by local name ("weight_scale", ...); prefix them with the module."""
    scale = regrouped(qt.scale, qt, scheme.group_size).to(scale_dtype).contiguous()
    zero = regrouped(qt.zero, qt, scheme.group_size)
    offset = 2 ** (qt.bits - 1)
    if scheme.format == INT_CODES:
        tensors = {"weight": (qt.codes.to(torch.int16) - offset).to(torch.int8),
                   "weight_scale": scale}
        if not scheme.symmetric:
            tensors["weight_zero_point"] = (zero - offset).to(torch.int8).contiguous()
        return tensors
    tensors = {"weight_packed": pack_codes(qt.codes, qt.bits),
               "weight_scale": scale,
               "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64)}
    if not scheme.symmetric:  # one bit stream per column of groups
        columns = zero.to(torch.uint8).t().contiguous()
        tensors["weight_zero_point"] = pack_codes(columns, qt.bits).t().contiguous()
    return tensors


def quantization_config(schemes: dict[str, Scheme], ignore: list[str], version: str) -> dict:
    """config.json's `quantization_config` for layers stored as `schemes` ({module: Scheme})."""
    targets: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        targets.setdefault(scheme, []).append(name)
    formats = {scheme.format for scheme in targets}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",  # anything else is read as a dense checkpoint
        "config_groups": {f"group_{i}": scheme.config_group(names)
                          for i, (scheme, names) in enumerate(targets.items())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }
