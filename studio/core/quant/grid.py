"""The integer grid every method shares: group-wise scales and zero points, codes, de-quantization.

Weights are matrices [out, in] (GPT-2's Conv1D is transposed before it gets here). Groups run
along the input dimension; `group_size == -1` means one group per output row (per-channel).
When the group size does not divide the input width, the last group is shorter, as in the GPTQ
reference code (the demo model's 576 = 4.5 x 128).

Codes are unsigned, 0 .. 2**bits - 1, with an integer zero point per group:
    w ~= scale * (code - zero)
Symmetric grids put the zero point in the middle (2**(bits-1)), as GPTQ's reference does.

Scales are float32, or fp16 values when the spec says `scale_dtype="fp16"`: every scale any
method produces comes out of `qparams_from_range`, which rounds it (`round_scale`) before a zero
point or code is computed against it, so a format storing fp16 scales holds the codes exactly.
"""
from __future__ import annotations

import torch

from studio.core.errors import StudioError
from studio.core.export.gguf_types import GgufType, fits_rows, native_type
from studio.core.plan import QuantSpec
from studio.core.quant.pack import pack_codes, unpack_codes


class QTensor:
    """One quantized weight matrix: codes [out, in] (0 .. 2**bits - 1), scale and zero
    [out, groups] float32.

    The codes are held packed, `bits` per code (`pack.pack_codes` with byte words): a variant
    keeps every quantized layer's codes for as long as it lives, and at 4 bits a byte per code
    would be twice what they need. `codes` unpacks a fresh uint8 copy.
    The "affine" code format (`quant.formats`)."""

    format = "affine"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bits: int, group_size: int) -> None:
        self.packed = pack_codes(codes, bits, torch.uint8)
        self.shape = codes.shape
        self.scale, self.zero = scale, zero
        self.bits, self.group_size = bits, group_size  # effective: the input width if per-channel

    @property
    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits, self.shape[1])

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size)

    def storage_bits(self, scale_bits: int = 16) -> float:
        """Every bit stored: the codes, a scale per group and an integer zero point per group at
        the code width (as `bits_per_weight` counts an asymmetric grid)."""
        return self.bits * self.numel() + self.scale.numel() * (scale_bits + self.bits)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return ({"qweight": pack_codes(self.codes, self.bits, torch.int32),
                 "scale": self.scale.float().contiguous(),
                 "zero": self.zero.float().contiguous()},
                {"bits": self.bits, "group_size": self.group_size})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict,
                   shape: tuple[int, int]) -> "QTensor":
        out, cols = shape
        groups = -(-cols // info["group_size"])
        words, scale, zero = (tensors.get(k) for k in ("qweight", "scale", "zero"))
        if words is None or scale is None or zero is None:
            raise StudioError("its codes, scales or zero points are missing")
        if (words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != out
                or tuple(scale.shape) != (out, groups) or tuple(zero.shape) != (out, groups)
                or not scale.is_floating_point() or not zero.is_floating_point()):
            raise StudioError(f"its tensors do not match the shape {[out, cols]} at group size "
                              f"{info['group_size']}")
        return cls(unpack_codes(words, info["bits"], cols), scale.float(), zero.float(),
                   info["bits"], info["group_size"])

    def __repr__(self) -> str:
        return f"QTensor({list(self.shape)}, bits={self.bits}, group_size={self.group_size})"


def effective_group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 or group_size >= in_features else group_size


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, groups] -> [out, in], repeating each group's value over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


# Rows per pass of the element-wise steps below: their float temporaries stay a few MB even for
# an lm_head (49152 x 576 on the demo: each full-size temporary would be 113 MiB).
ROW_CHUNK = 4096


def _row_chunks(rows: int):
    return (slice(r, min(r + ROW_CHUNK, rows)) for r in range(0, rows, ROW_CHUNK))


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of `w` [out, in] -> two [out, groups] tensors (ragged last group)."""
    out, cols = w.shape
    groups = -(-cols // group_size)
    pad = groups * group_size - cols
    if not pad:
        grouped = w.reshape(out, groups, group_size)
        return grouped.amin(dim=2), grouped.amax(dim=2)
    # Pad with the last group's own first element so padding never widens its range.
    first = (groups - 1) * group_size
    wmin = torch.empty(out, groups, dtype=w.dtype)
    wmax = torch.empty(out, groups, dtype=w.dtype)
    for rows in _row_chunks(out):
        part = w[rows]
        part = torch.cat([part, part[:, first:first + 1].expand(len(part), pad)], dim=1)
        part = part.reshape(-1, groups, group_size)
        wmin[rows], wmax[rows] = part.amin(dim=2), part.amax(dim=2)
    return wmin, wmax


# fp16's positive range: its smallest subnormal and its largest finite value.
FP16_SMALLEST = 2.0 ** -24
FP16_MAX = 65504.0


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Scales as the spec stores them (float32 tensors either way): unchanged for "fp32", the
    nearest fp16 value for "fp16", kept inside fp16's range so that a tiny scale never becomes
    0 (inf / nan codes) nor a huge one inf."""
    if scale_dtype == "fp32":
        return scale
    if scale_dtype != "fp16":
        raise ValueError(f"unknown scale dtype {scale_dtype!r}")
    return scale.clamp(FP16_SMALLEST, FP16_MAX).half().float()


def qparams_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool,
                       scale_dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for ranges [wmin, wmax] (any shape), GPTQ-reference style.
    The one place scales are made: every method's scales (and searches) come from here."""
    maxq = 2 ** bits - 1
    wmin = torch.minimum(wmin, torch.zeros_like(wmin)).float()
    wmax = torch.maximum(wmax, torch.zeros_like(wmax)).float()
    if symmetric:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    empty = (wmin == 0) & (wmax == 0)
    wmin = torch.where(empty, -torch.ones_like(wmin), wmin)
    wmax = torch.where(empty, torch.ones_like(wmax), wmax)
    scale = round_scale((wmax - wmin) / maxq, scale_dtype)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        # From the rounded scale; the clamp only acts when fp16's range bounded the scale.
        zero = torch.round(-wmin / scale).clamp_(0, maxq)
    return scale, zero


def compute_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    clip: torch.Tensor | float = 1.0,
                    scale_dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero per group of `w` [out, in]; `clip` shrinks the range (MSE search)."""
    gs = effective_group_size(group_size, w.shape[1])
    wmin, wmax = group_minmax(w.float(), gs)
    return qparams_from_range(wmin * clip, wmax * clip, bits, symmetric, scale_dtype)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    out, cols = w.shape
    gs = effective_group_size(group_size, cols)
    codes = torch.empty(out, cols, dtype=torch.uint8)
    for rows in _row_chunks(out):
        s = expand_groups(scale[rows], gs, cols)
        z = expand_groups(zero[rows], gs, cols)
        codes[rows] = torch.round(w[rows].float() / s).add_(z).clamp_(0, 2 ** bits - 1)
    return codes


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """scale * (code - zero) as float32 [out, in], written group-wise into one tensor (no
    [out, in] copies of the scales and zeros: this runs whenever a compact variant's layer
    does)."""
    out, cols = codes.shape
    gs = effective_group_size(group_size, cols)
    whole = cols // gs
    w = torch.empty(out, cols)
    if whole:
        grouped = w[:, : whole * gs].view(out, whole, gs)
        grouped.copy_(codes[:, : whole * gs].reshape(out, whole, gs))
        grouped.sub_(zero[:, :whole, None]).mul_(scale[:, :whole, None])
    if whole * gs < cols:  # the ragged last group
        tail = w[:, whole * gs:]
        tail.copy_(codes[:, whole * gs:]).sub_(zero[:, -1:]).mul_(scale[:, -1:])
    return w


def quantize_rtn(w: torch.Tensor, spec: QuantSpec,
                 clip: torch.Tensor | float = 1.0) -> QTensor:
    """Round-to-nearest onto the min-max grid (optionally with a clipped range)."""
    gs = effective_group_size(spec.group_size, w.shape[1])
    scale, zero = compute_qparams(w, spec.bits, gs, spec.symmetric, clip, spec.scale_dtype)
    codes = quantize_codes(w, scale, zero, spec.bits, gs)
    return QTensor(codes, scale, zero, spec.bits, gs)


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantize and de-quantize in one step, in `w`'s dtype (for proxies and previews)."""
    return quantize_rtn(w, spec).dequantize().to(w.dtype)


def bits_per_weight(spec: QuantSpec | None, in_features: int, scale_bits: int = 16,
                    zero_bits: int | None = None) -> float:
    """Storage cost per weight: the code plus each group's scale and (asymmetric) zero point.

    Counted as exporters store them: fp16 scales, and zero points packed at the code width.
    `None` (full precision) costs 16 bits (bf16/fp16 storage).
    """
    if spec is None:
        return 16.0
    gs = effective_group_size(spec.group_size, in_features)
    groups = -(-in_features // gs)
    zbits = 0 if spec.symmetric else (spec.bits if zero_bits is None else zero_bits)
    return spec.bits + groups * (scale_bits + zbits) / in_features


def native_gguf_type(spec: QuantSpec | None) -> GgufType | None:
    """The GGUF type `spec` is when it is GGUF-native (`gguf_types.native_type`), else None."""
    if spec is None:
        return None
    return native_type(spec.bits, spec.group_size, spec.symmetric, spec.scale_dtype)


def storage_bits_per_weight(spec: QuantSpec | None, in_features: int) -> float:
    """What a weight of a layer under `spec` costs wherever the studio counts size (the plan
    meter, the allocator, a Variant): one function so they always agree. A GGUF-native spec
    costs its GGUF type's bytes (Q4_0 4.5, Q5_0 5.5, Q8_0 8.5 bits: what that plan is for),
    every other spec the studio's estimate, `bits_per_weight`. A native spec on rows that are
    not whole GGUF blocks is no GGUF tensor, so it takes the estimate too. A method storing
    another code format (a codebook) says its own price, tables counted (`Quantizer.storage_bits`)."""
    if spec is not None and spec.quantizer.storage_bits is not None:
        return float(spec.quantizer.storage_bits(spec, in_features))
    gtype = native_gguf_type(spec)
    if gtype is not None and fits_rows(in_features):
        return gtype.bits_per_weight
    return bits_per_weight(spec, in_features)
