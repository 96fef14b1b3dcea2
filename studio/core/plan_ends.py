"""The model's two ends in a plan: the input embedding and the output head (lm_head).

They are ordinary plan layers (exact-name rules, `plan.with_ends`), but a user sets them as
one or two choices, not as layers among hundreds: a tied pair is one matrix, so it is one
choice ("lm_head + embedding"), written as the same rule on both names so a recipe reads the
same as the model stores it. The Plan tab, the allocator (which keeps the ends at the plan's
setting and counts them in its size) and `plan` on the command line all read them from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from studio.core.plan import Plan, QuantSpec, Rule, tied_specs


@dataclass(frozen=True)
class End:
    """One choice a user makes about the ends: its layers (both sides of a tied pair)."""
    title: str               # "lm_head + embedding (tied: one matrix)", "lm_head", "embedding"
    names: tuple[str, ...]   # the lm_head first when it is in
    roles: tuple[str, ...]

    @property
    def tied(self) -> bool:
        return len(self.names) > 1


def ends_of(layers) -> list[End]:
    """The choices for a model's ends (LayerInfo items): one for a tied pair, else one each
    for the lm_head and the embedding that exist. Positional embeddings (GPT-2's wpe) are
    embeddings too, but read by position, not by token: left to rules."""
    layers = list(layers)
    head = next((i for i in layers if i.role == "lm_head"), None)
    token = _token_embedding(layers, head)
    if head is not None and token is not None and head.tied_to == token.name:
        return [End("lm_head + embedding (tied: one matrix)", (head.name, token.name),
                    ("lm_head", "embedding"))]
    ends = []
    if head is not None:
        ends.append(End("lm_head", (head.name,), ("lm_head",)))
    if token is not None:
        ends.append(End("embedding", (token.name,), ("embedding",)))
    return ends


def _token_embedding(layers, head):
    """The token embedding: the one the head is tied to, else the embedding with the head's
    vocabulary (rows), else the first."""
    embeddings = [i for i in layers if i.role == "embedding"]
    if head is not None:
        for info in embeddings:
            if info.name == head.tied_to or info.shape[0] == head.shape[0]:
                return info
    return embeddings[0] if embeddings else None


def end_names(layers) -> set[str]:
    return {name for end in ends_of(layers) for name in end.names}


def effective_specs(plan: Plan, layers) -> dict[str, QuantSpec | None]:
    """Spec per layer as a variant of `plan` is made: `Plan.resolve`, then a tied pair
    quantized alike made one (a spec on either side covers both, `plan.tied_specs`)."""
    layers = list(layers)
    specs = plan.resolve(layers)
    quantized = {n: s for n, s in specs.items() if s is not None}
    tied_specs(layers, quantized)
    return {name: quantized.get(name) for name in specs}


def end_setting(plan: Plan, layers, end: End) -> tuple[QuantSpec | None, bool]:
    """(the end's spec as quantize applies it, whether the two sides of a tied pair were
    planned apart: each stored, the pair untied)."""
    specs = effective_specs(plan, layers)
    chosen = [specs[name] for name in end.names]
    return chosen[0], any(s != chosen[0] for s in chosen)


def with_end(plan: Plan, end: End, spec: QuantSpec | None) -> Plan:
    """`plan` with `spec` (None: kept as stored) for the end: the same exact rule on each of
    its names, so a tied pair stays one matrix and the recipe says so."""
    for name in end.names:
        plan = plan.with_rule(Rule(name, spec))
    return plan


def end_rules(plan: Plan, layers) -> tuple[Rule, ...]:
    """The plan's rules that decide the ends, as exact rules (a regex rule matching an end is
    resolved to its spec), so a plan made elsewhere (the allocator's) keeps the plan's ends."""
    names = end_names(layers)
    specs = plan.resolve(layers)
    decided = {name for name in names
               if any(r.matches(name) for r in plan.rules)}
    return tuple(Rule(name, specs[name]) for name in sorted(decided))


def describe(plan: Plan, layers) -> str:
    """"lm_head + embedding (tied: one matrix) W8 ch sym" in words, for messages and titles."""
    parts = []
    for end in ends_of(layers):
        spec, apart = end_setting(plan, layers, end)
        how = "kept 16-bit" if spec is None else spec.grid_label
        parts.append(f"{end.title} {how}" + (" (planned apart: untied)" if apart else ""))
    return "; ".join(parts)
