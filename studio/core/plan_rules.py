"""The plan editor's one-line rule language: "PATTERN -> 8 [g64] [gptq] [sym]",
"PATTERN -> q5_0" or "PATTERN -> fp16" into a regex `Rule` of the plan.

Plain text in, a validated Rule out (no Qt): the Plan view parses what the user types with it,
and a command or script could take the same lines.
"""
from __future__ import annotations

import re

from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK, NATIVE_MENU, exact_type
from studio.core.plan import QuantSpec, Rule
from studio.core.quant import registry
from studio.core.quant.grid import native_gguf_type

RULE_HELP = ("regex -> bits [g32|g64|g128|ch] [method] [sym] [f16s] | q4_0|q5_0|q8_0 | fp16, "
             "e.g.  model.layers.*.mlp.down_proj -> 8")
# The GGUF-native grid: what every spec of a GGUF-native plan has besides its width.
NATIVE_GRID = {"group_size": BLOCK, "symmetric": True, "scale_dtype": "fp16"}
# Rule words naming a GGUF type: the width it is, on the native grid.
NATIVE_WORDS = {exact_type(bits, sym).name.lower(): bits for bits, sym in NATIVE_MENU}
NOT_NATIVE = ("GGUF-native plans take 4, 5 or 8 bits (Q4_0, Q5_0, Q8_0) or 16-bit; untick "
              "GGUF-native for other grids.")


def parse_rule(text: str, default: QuantSpec | None, gguf_native: bool = False) -> Rule:
    """"PATTERN -> 8 [g64] [gptq] [sym]", "PATTERN -> q5_0" or "PATTERN -> fp16" into a regex
    Rule; with `gguf_native` the spec must be a GGUF type (the grid is the native one)."""
    pattern, sep, target = text.partition("->")
    pattern, words = pattern.strip(), target.lower().replace(",", " ").split()
    if not sep or not pattern or not words:
        raise StudioError(f"A rule reads: {RULE_HELP}.")
    if words[0] in ("fp16", "skip", "none", "full"):
        return Rule(pattern, None, regex=True)
    base = default or QuantSpec()
    changes: dict = {"options": {}, **(NATIVE_GRID if gguf_native else {})}
    for word in words:
        if word in ("bit", "bits"):
            continue
        if word in NATIVE_WORDS:
            changes.update(NATIVE_GRID, bits=NATIVE_WORDS[word])
        elif word == "f16s":
            changes["scale_dtype"] = "fp16"
        elif re.fullmatch(r"\d+(bits?)?", word):
            changes["bits"] = int(re.match(r"\d+", word).group())
        elif re.fullmatch(r"g\d+", word):
            changes["group_size"] = int(word[1:])
        elif word in ("ch", "per-channel", "channel"):
            changes["group_size"] = -1
        elif word in registry.names():
            changes["method"] = word
        elif word in ("sym", "symmetric"):
            changes["symmetric"] = True
        elif word in ("asym", "asymmetric"):
            changes["symmetric"] = False
        else:
            raise StudioError(f"{word!r} is not understood in a rule. {RULE_HELP}.")
    spec = base.with_(**changes)
    if gguf_native and native_gguf_type(spec) is None:
        raise StudioError(NOT_NATIVE)
    return Rule(pattern, spec, regex=True)
