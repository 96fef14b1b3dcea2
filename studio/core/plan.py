"""What to do to each layer: QuantSpec (one layer's settings) and Plan (name / regex / default).

A plan resolves a layer name in this order: an exact-name rule, else the *last* regex rule that
matches (so a rule bar applied later overrides an earlier one), else the default. A rule whose
spec is None leaves the layer in full precision. Embeddings and lm_head are only quantized when a
rule names them; the default applies to the linear layers inside the blocks.
Recipes are versioned JSON (`to_json` / `from_json`).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from studio.core.errors import StudioError
from studio.core.quant.registry import REFERENCE

GROUP_SIZES = (-1, 32, 64, 128)  # -1: one group per output channel (per-channel)
# How a quantizer stores its scales. "fp16": every scale is an fp16 value and the codes are
# computed against it, so a format storing fp16 scales (GGUF's blocks) holds the variant exactly.
SCALE_DTYPES = ("fp32", "fp16")
RECIPE_FORMAT = "compression-studio-recipe"
RECIPE_VERSION = 1  # scale_dtype was added without a new version: fp32 specs are written as before

@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    method: str = REFERENCE   # the round-to-nearest method (`quant.registry`)
    options: dict = field(default_factory=dict)
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise StudioError(f"Bits must be a whole number from 2 to 8, not {self.bits!r}.")
        if self.group_size not in GROUP_SIZES:
            raise StudioError(f"Group size must be one of 32, 64, 128 or -1 (per-channel), "
                              f"not {self.group_size!r}.")
        if self.scale_dtype not in SCALE_DTYPES:
            raise StudioError(f"Scales are stored as fp32 or fp16, not {self.scale_dtype!r}.")
        if self.symmetric not in (True, False):
            raise StudioError(f"'symmetric' is true or false, not {self.symmetric!r}.")
        if not isinstance(self.options, dict):
            raise StudioError(f"A spec's options are an object of settings, "
                              f"not {_short(self.options)}.")
        quantizer = self.quantizer  # an unknown method is refused here, with the valid ones
        quantizer.check_bits(self.bits)
        quantizer.check_options(self.options)

    @property
    def quantizer(self):
        """The method's declaration (`quant.registry`)."""
        from studio.core.quant import registry
        if not isinstance(self.method, str):
            raise StudioError(f"A method is a name, not {_short(self.method)}.")
        return registry.get(self.method)

    def option(self, name: str) -> Any:
        if name in self.options:
            return self.options[name]
        return self.quantizer.defaults()[name]

    def with_(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)

    @property
    def grid_label(self) -> str:
        """"W4 g128", "W3 ch", "W4 g32 sym f16s" (f16s: fp16 scales): the grid, no method."""
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return (f"W{self.bits} {group}{' sym' if self.symmetric else ''}"
                f"{' f16s' if self.scale_dtype == 'fp16' else ''}")

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.grid_label}"

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.scale_dtype == "fp32":
            # Left out when it is the default: recipes and variants of fp32 specs stay readable
            # by studios that predate the field (which refuse an fp16 spec, rather than ignore it).
            del data["scale_dtype"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        if not isinstance(data, dict):
            raise StudioError(f"A layer spec is an object of settings, not {_short(data)}.")
        allowed = {"bits", "group_size", "symmetric", "method", "options", "scale_dtype"}
        extra = sorted(str(k) for k in set(data) - allowed)
        if extra:
            raise StudioError(f"Unknown field(s) in a layer spec: {', '.join(extra)}.")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise StudioError(f"A spec's options are an object of settings, not {_short(options)}.")
        return cls(**{**data, "options": dict(options)})


def check_option(method: str, name: str, value: Any) -> None:
    """A method option's value has the declared type and range (`quant.registry`)."""
    from studio.core.quant import registry
    registry.get(method).check_options({name: value})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# A regex from a recipe runs against every layer name: patterns that can backtrack
# exponentially (a repeated group that itself repeats, e.g. "(a+)+") or very long ones are
# refused, so a recipe cannot hang the studio.
MAX_PATTERN = 500


def check_pattern(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN:
        raise StudioError(f"Rule pattern is {len(pattern)} characters; at most {MAX_PATTERN}.")
    stack = [False]  # per open group: does it contain a quantifier?
    i, escaped = 0, False
    while i < len(pattern):
        c = pattern[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "[":  # a character class: skip to its end
            j = pattern.find("]", i + 2)
            i = len(pattern) if j < 0 else j
        elif c == "(":
            stack.append(False)
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()
            following = pattern[i + 1:i + 2]
            if inner and following in ("*", "+", "{"):
                raise StudioError(f"Rule pattern {pattern!r} repeats a group that repeats "
                                  f"itself, which can take forever to match; simplify it.")
            stack[-1] = stack[-1] or inner
        elif c in "*+{":
            stack[-1] = True
        i += 1


@dataclass(frozen=True)
class Rule:
    pattern: str            # an exact layer name, or a regex when `regex` is True
    spec: QuantSpec | None  # None: keep this layer in full precision
    regex: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise StudioError(f"A rule's pattern is a layer name or a regex, not {_short(self.pattern)}.")
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise StudioError(f"A rule's spec is a QuantSpec or None, not {_short(self.spec)}.")
        if self.regex:
            check_pattern(self.pattern)
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise StudioError(f"Rule {self.pattern!r} is not a valid regular expression: {exc}.")

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None if self.regex else name == self.pattern


@dataclass(frozen=True)
class Plan:
    default: QuantSpec | None = field(default_factory=QuantSpec)
    rules: tuple[Rule, ...] = ()
    architecture: str | None = None  # the model class a recipe was written for, when known

    def spec_for(self, name: str, default_applies: bool = True) -> QuantSpec | None:
        for rule in self.rules:
            if not rule.regex and rule.pattern == name:
                return rule.spec
        for rule in reversed(self.rules):
            if rule.regex and rule.matches(name):
                return rule.spec
        return self.default if default_applies else None

    def resolve(self, layers: Iterable) -> dict[str, QuantSpec | None]:
        """Spec per layer (LayerInfo items); checks every rule matches something first."""
        layers = list(layers)
        names = [layer.name for layer in layers]
        self.check_rules_match(names)
        return {layer.name: self.spec_for(layer.name, default_applies=layer.quantizable)
                for layer in layers}

    def check_rules_match(self, names: Iterable[str]) -> None:
        names = list(names)
        for rule in self.rules:
            if not any(rule.matches(n) for n in names):
                kind = "regex" if rule.regex else "layer name"
                raise StudioError(f"The {kind} {rule.pattern!r} in the plan matches no layer "
                                  f"of this model.")

    def with_rule(self, rule: Rule) -> "Plan":
        """A new plan with `rule` added; an exact rule replaces an earlier one for the same name."""
        kept = tuple(r for r in self.rules if r.regex or rule.regex or r.pattern != rule.pattern)
        return replace(self, rules=kept + (rule,))

    # --- recipes -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "architecture": self.architecture,
            "default": None if self.default is None else self.default.to_dict(),
            "rules": [{"pattern": r.pattern, "regex": r.regex,
                       "spec": None if r.spec is None else r.spec.to_dict()} for r in self.rules],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
            raise StudioError("This file is not a Compression Studio recipe.")
        if data.get("version") != RECIPE_VERSION:
            raise StudioError(f"Recipe version {data.get('version')!r} is not supported "
                              f"(this studio reads version {RECIPE_VERSION}).")
        spec = lambda d: None if d is None else QuantSpec.from_dict(d)  # noqa: E731
        rules = data.get("rules", [])
        architecture = data.get("architecture")
        if not isinstance(rules, list) or not all(isinstance(r, dict) and "pattern" in r
                                                  for r in rules):
            raise StudioError("A recipe's rules are a list of objects with a pattern.")
        if architecture is not None and not isinstance(architecture, str):
            raise StudioError(f"A recipe's architecture is a name, not {_short(architecture)}.")
        rules = tuple(Rule(r["pattern"], spec(r.get("spec")), r.get("regex", False) is True)
                      for r in rules)
        return cls(default=spec(data.get("default")), rules=rules, architecture=architecture)

    def save(self, path: str | Path) -> None:
        from studio.core.files import write_text_atomic
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from studio.core.files import read_json
        data = read_json(Path(path), f"Recipe file {path} does not exist.")
        try:
            return cls.from_json(data)
        except StudioError as exc:
            raise StudioError(f"Recipe file {path}: {exc}") from None

    def check_architecture(self, architecture: str) -> None:
        if self.architecture and self.architecture != architecture:
            raise StudioError(f"This recipe was written for {self.architecture}, "
                              f"but the model is {architecture}.")


# --- the embedding and the lm_head -----------------------------------------------------------
# What `quantize --method` does with the output head unless told: 8-bit codes, one symmetric
# scale per row. llama.cpp's mixes keep the output matrix above the body's width (Q6_K in
# Q4_K_M, Q8_0 in Q8_0 / Q4_0 plans) because its error reaches every logit; W8 per-channel is as
# close to lossless, halves the 16-bit matrix that can be a large vocabulary's biggest tensor,
# and runs on the int8 CPU kernel every decode step (a 16-bit head was read in float32).
# A tied embedding is the same matrix, so it follows the head; an untied one is read one row
# per token (no decode cost), so it stays as stored unless asked.
HEAD_DEFAULT = "w8"
EMBEDDING_DEFAULT = "keep"
_END_WORD = re.compile(r"w([2-8])(?:g(32|64|128|-1))?(sym)?")


def end_spec(word: str, gguf_native: bool = False, scale_dtype: str = "fp32"
             ) -> QuantSpec | None:
    """A command-line word for the embedding / lm_head: "keep" (as stored), "w8" (8 bits per
    channel, symmetric), "w4g32", "w6g64sym" ... (RTN: these layers sit outside the blocks).
    `gguf_native`: the width on its GGUF type (w8 -> Q8_0, w4 -> Q4_0, w5 -> Q5_0); else
    scales of `scale_dtype`, as the body's."""
    word = word.strip().lower()
    if word in ("keep", "fp16", "none"):
        return None
    match = _END_WORD.fullmatch(word)
    if not match:
        raise StudioError(f"{word!r} is not a setting for the embedding / lm_head: keep, w8, "
                          f"w4g32, w6g64sym ... (bits 2-8, group 32/64/128/-1).")
    bits, group, sym = int(match.group(1)), int(match.group(2) or -1), bool(match.group(3))
    if gguf_native:
        from studio.core.export.gguf_types import native_type

        if native_type(bits, 32, True, "fp16") is None:
            raise StudioError(f"With --gguf-native the embedding / lm_head take a GGUF type: "
                              f"w4, w5 or w8 (Q4_0, Q5_0, Q8_0), or keep; not {word!r}.")
        return QuantSpec(bits, 32, symmetric=True, scale_dtype="fp16")
    return QuantSpec(bits, group, symmetric=sym or (bits == 8 and group == -1),
                     scale_dtype=scale_dtype)


def with_ends(plan: Plan, layers, head: QuantSpec | None,
              embedding: QuantSpec | None, method: str | None = None) -> Plan:
    """`plan` with rules for the lm_head and an untied input embedding (a tied one is the
    head's matrix and follows it); a layer the plan already names keeps its rule. Each end
    takes the plan's method (`method`, else its default's) where it can run it, else RTN on
    the grid (`plan_ends.in_method`)."""
    from studio.core.plan_ends import end_of, in_method

    body = plan.default if method is None else QuantSpec(
        bits=min(registry_bits(method)), method=method)
    named = lambda name: any(r.matches(name) for r in plan.rules)  # noqa: E731
    for info in layers:
        spec = head if info.role == "lm_head" else embedding if info.role == "embedding" else None
        tied = info.role == "embedding" and any(i.tied_to == info.name for i in layers)
        if spec is not None and not tied and not named(info.name):
            end = end_of(layers, info.name)
            plan = plan.with_rule(Rule(info.name, spec if end is None
                                       else in_method(spec, end, body)))
    return plan


def registry_bits(method: str) -> tuple[int, ...]:
    from studio.core.quant import registry
    return registry.get(method).bits


def tied_specs(layers, specs: dict[str, QuantSpec]) -> dict[str, str]:
    """{embedding: lm_head} when the model ties the two (LayerInfo.tied_to) and `specs` (layer
    -> spec of the layers to quantize) quantizes them alike: one weight, quantized once (as
    the lm_head) and held by both, as a tied checkpoint stores it once. A spec for either side
    alone covers both (`specs` gains the other side). Two different specs untie them: each is
    stored, and the size says so."""
    head = next((i for i in layers if i.role == "lm_head" and i.tied_to), None)
    if head is None:
        return {}
    mine, theirs = specs.get(head.name), specs.get(head.tied_to)
    if (mine is None and theirs is None) or (mine and theirs and mine != theirs):
        return {}
    specs[head.name] = specs[head.tied_to] = mine or theirs
    return {head.tied_to: head.name}
