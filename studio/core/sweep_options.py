"""The sensitivity sweep's menu of options: RTN grids (every width at every group size) or the
GGUF-native menu, how each is labelled, and which of them are measured end to end (KL)."""
from __future__ import annotations

import math
import operator
import re

from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK, NATIVE_MENU
from studio.core.plan import GROUP_SIZES, QuantSpec
from studio.core.quant.grid import native_gguf_type

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS = (32, 64, 128)
DEFAULT_KL_BITS = (4,)      # measured end to end; every other option is predicted from these
DEFAULT_KL_GROUP = 128


def option_label(spec: QuantSpec) -> str:
    """"W4 g128", "W3 ch", "W4 g64 sym": an option without its method (it is always RTN here);
    a GGUF-native option by its GGUF type ("Q4_0")."""
    native = native_gguf_type(spec)
    return native.name if native is not None else spec.grid_label


def same_grid(a: QuantSpec, b: QuantSpec) -> bool:
    """Same integer grid (what the sweep measured), whatever method rounds onto it."""
    return ((a.bits, a.group_size, a.symmetric, a.scale_dtype)
            == (b.bits, b.group_size, b.symmetric, b.scale_dtype))


def gguf_native_options() -> list[QuantSpec]:
    """The GGUF-native menu: each type of `gguf_types.NATIVE_MENU` as the studio grid it holds
    exactly (32-element groups, fp16 scales), smallest first."""
    return [QuantSpec(bits=bits, group_size=BLOCK, symmetric=symmetric, scale_dtype="fp16")
            for bits, symmetric in NATIVE_MENU]


def _whole_numbers(values, what: str) -> list[int]:
    try:
        numbers = sorted({operator.index(v) for v in values})
    except TypeError:
        raise StudioError(f"{what} must be whole numbers, not {values!r}.") from None
    if not numbers:
        raise StudioError(f"Give at least one value for {what}.")
    return numbers


def parse_widths(text: str, what: str = "Widths") -> tuple[int, ...]:
    """"2,3,4,8" into widths (checked by the options built from them)."""
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise StudioError(f"{what} takes whole numbers like 2,3,4,8, not {text!r}.") from None
    if not bits:
        raise StudioError(f"{what} needs at least one width.")
    return bits


def parse_group_sizes(text: str, what: str = "Group sizes") -> tuple[int, ...]:
    """"32,64,128" or "ch" (per-channel, also -1; a leading g is allowed) into group sizes."""
    groups = []
    for word in (w.strip().lower() for w in text.split(",")):
        number = re.fullmatch(r"g?(\d+)", word)
        if not word:
            continue
        if word in ("ch", "per-channel", "-1"):
            groups.append(-1)
        elif number and int(number.group(1)) in GROUP_SIZES:
            groups.append(int(number.group(1)))
        else:
            raise StudioError(f"{what} takes group sizes among 32, 64, 128 and ch "
                              f"(per-channel), not {word!r}.")
    if not groups:
        raise StudioError(f"{what} needs at least one group size.")
    return tuple(groups)


def sweep_options(bits=DEFAULT_BITS, group_sizes=DEFAULT_GROUPS,
                  symmetric: bool = False) -> list[QuantSpec]:
    """Every width at every group size (RTN), cheapest grid of each width first; duplicates
    are dropped. Bad widths or group sizes raise the StudioError QuantSpec gives."""
    widths = _whole_numbers(bits, "Bits")
    groups = _whole_numbers(group_sizes, "Group sizes")
    groups.sort(key=lambda g: -(g if g > 0 else math.inf))  # per-channel, 128, 64, 32
    return [QuantSpec(bits=b, group_size=g, symmetric=symmetric) for b in widths for g in groups]


def kl_columns(options: list[QuantSpec], kl_bits=DEFAULT_KL_BITS,
               kl_group: int = DEFAULT_KL_GROUP) -> list[int]:
    """Indices into `options` of the options measured end to end (each must be offered)."""
    columns = []
    for b in _whole_numbers(kl_bits, "KL widths"):
        wanted = QuantSpec(bits=b, group_size=kl_group, symmetric=options[0].symmetric,
                           scale_dtype=options[0].scale_dtype)
        found = [j for j, o in enumerate(options) if same_grid(o, wanted)]
        if not found:
            raise StudioError(f"The KL sweep measures {option_label(wanted)}, which is not among "
                              f"the options ({', '.join(option_label(o) for o in options)}). "
                              f"Add its width and group size, or choose other KL widths.")
        columns.append(found[0])
    return columns
