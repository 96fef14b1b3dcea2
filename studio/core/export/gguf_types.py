"""Which GGUF block type holds a studio code exactly: the one table the GGUF writer, the
GGUF-native plan menu and the allocator's GGUF pricing all read.

A studio code is unsigned u in [0, 2**bits - 1] with an integer zero z per group and
w = s * (u - z). GGUF's legacy block types hold 32 weights with one fp16 scale d:
    Q4_0  x = d * (q - 8),  q in [0, 15]      18 bytes / 32 weights
    Q5_0  x = d * (q - 16), q in [0, 31]      22 bytes
    Q8_0  x = d * q,        q in [-128, 127]  34 bytes
    Q4_1  x = d * q + m,    q in [0, 15]      20 bytes (m an fp16 offset: -s*z rounded)
    Q5_1  x = d * q + m,    q in [0, 31]      24 bytes
so a code maps exactly when u - z (plus the type's offset) fits the type's range: it does for
every width and sign but 8-bit asymmetric (u - z spans [-255, 255]). With d = s, the mapping is
exact when the scale is an fp16 value (a GGUF-native plan quantizes with fp16 scales); otherwise
d rounds s once to fp16. Blocks never straddle groups when the group size is a multiple of 32,
so any studio group size (and per-channel) maps, provided the row length is a multiple of 32.
K-quants re-quantize their scales per 256-weight super-block: never exact.
"""
from __future__ import annotations

from dataclasses import dataclass

BLOCK = 32


@dataclass(frozen=True)
class GgufType:
    name: str          # gguf.GGMLQuantizationType member name
    block_bytes: int   # bytes per 32-weight block
    offset: int        # q = u - z + offset  (types with an m term store q = u, see `affine`)
    qmin: int
    qmax: int
    affine: bool = False  # x = d*q + m (Q4_1 / Q5_1): m = -d*z rounded to fp16, not exact

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / BLOCK


TYPES = {t.name: t for t in (
    GgufType("Q4_0", 18, 8, 0, 15),
    GgufType("Q5_0", 22, 16, 0, 31),
    GgufType("Q8_0", 34, 0, -128, 127),
    GgufType("Q4_1", 20, 0, 0, 15, affine=True),
    GgufType("Q5_1", 24, 0, 0, 31, affine=True),
)}


def exact_type(bits: int, symmetric: bool, asym4: str = "q5_0") -> GgufType | None:
    """The smallest GGUF type holding every code of this width exactly (scales aside), or the
    user's choice for 4-bit asymmetric (Q4_1 is smaller, its offset rounds); None for 8-bit
    asymmetric."""
    if bits <= 4 and (symmetric or bits < 4):
        return TYPES["Q4_0"]      # q = u - z + 8: [8 - z, 8 - z + 2**bits - 1] within [0, 15]
    if bits == 4:
        return TYPES["Q4_1"] if asym4 == "q4_1" else TYPES["Q5_0"]
    if bits == 5 and symmetric:
        return TYPES["Q5_0"]      # z = 16: q = u
    if bits <= 7 or symmetric:
        return TYPES["Q8_0"]      # q = u - z within [-127, 127] (8-bit sym: u - 128)
    return None


def fits_rows(in_features: int) -> bool:
    return in_features % BLOCK == 0


def gguf_bits_per_weight(bits: int, symmetric: bool, in_features: int,
                         asym4: str = "q5_0") -> float | None:
    """Bits per weight of this spec as a GGUF tensor, or None when no legacy type holds it."""
    gtype = exact_type(bits, symmetric, asym4)
    if gtype is None or not fits_rows(in_features):
        return None
    return gtype.bits_per_weight


# The GGUF-native plan menu: the specs each GGUF type holds with no rounding at all (32-element
# groups, fp16 scales), one per type, smallest first.
NATIVE_MENU = (
    (4, True),    # Q4_0, 4.5 bits per weight
    (5, True),    # Q5_0, 5.5
    (8, True),    # Q8_0, 8.5
)


def native_type(bits: int, group_size: int, symmetric: bool, scale_dtype: str) -> GgufType | None:
    """The GGUF type a spec *is* when it belongs to the GGUF-native menu (a NATIVE_MENU width at
    32-element groups with fp16 scales): it exports with no rounding and costs exactly that
    type's bytes. None for every other spec, however close."""
    if scale_dtype != "fp16" or group_size != BLOCK or (bits, symmetric) not in NATIVE_MENU:
        return None
    return exact_type(bits, symmetric)
