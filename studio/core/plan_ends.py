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


# --- which method an end runs --------------------------------------------------------------
# The ends sit outside the blocks. A method that learns from the layer's own inputs (GPTQ's
# Hessian, SeqMSE, an "activations" weighting) runs on the lm_head: its inputs are the final
# hidden states, collected with the other calibration statistics. A tied pair stays one
# matrix, quantized the same way as the head (the embedding then reads the GPTQ'd rows):
# measured on the demo (tied, W4 g128, body float, WikiText-2 40 x 512), GPTQ on the pair gave
# perplexity 30.39 against RTN's 34.10 (fp32 29.01), the head's error dominating the
# embedding's. A method that learns from a whole block and folds scales (AWQ) runs on an
# untied lm_head through its `quantize_head`: the scales fold into the final norm, which only
# the head reads. A tied head cannot take that fold (its columns are the embedding's, so every
# block's input would change): RTN. SmoothQuant would quantize the head's inputs too: RTN. An
# untied embedding is looked up, not multiplied: no inputs to learn from, so RTN.

def end_method(end: End, method: str) -> tuple[str, str]:
    """(the method `end` runs under a plan of `method`, a note saying how, "" when plain)."""
    from studio.core.quant import registry

    quantizer = registry.get(method)
    if quantizer.calibration == "none" and not quantizer.smoothing:
        return method, ""
    rtn = f"{registry.REFERENCE.upper()} on {quantizer.title}'s grid"
    if "lm_head" not in end.roles:
        return registry.REFERENCE, f"{rtn}: an embedding is looked up, not multiplied"
    if quantizer.calibration in ("hessian", "activations"):
        return method, f"{quantizer.title} on the final hidden states" + (
            "; the embedding reads the same matrix (tied)" if end.tied else "")
    if quantizer.quantize_head is not None and not end.tied:
        return method, (f"{quantizer.title} on the final hidden states, its scales folded "
                        f"into the final norm")
    if quantizer.quantize_head is not None:
        return registry.REFERENCE, (f"{rtn}: {quantizer.title}'s scales would fold into the "
                                    f"head's columns, which a tied head shares with the "
                                    f"embedding (every block's input would change)")
    return registry.REFERENCE, (f"{rtn}: {quantizer.title} learns from a whole block, and the "
                                f"head is outside the blocks")


def end_of(layers, name: str) -> End | None:
    """The End a layer belongs to (None: not an end)."""
    return next((end for end in ends_of(layers) if name in end.names), None)


def in_method(spec: QuantSpec | None, end: End, body: QuantSpec | None) -> QuantSpec | None:
    """An end's grid `spec` under the plan's method (`body`'s): the method itself where the
    end can run it (`end_method`) at that width, else RTN on the grid, so the plan says what
    quantize will run."""
    from studio.core.quant.registry import REFERENCE

    if spec is None or body is None:
        return spec
    method, _ = end_method(end, body.method)
    if method != body.method or spec.bits not in body.quantizer.bits:
        return spec.with_(method=REFERENCE, options={})
    return spec.with_(method=method, options=dict(body.options))


def body_method(plan: Plan, layers) -> str | None:
    """The plan's method: its default's, else the most common among its other layers."""
    if plan.default is not None:
        return plan.default.method
    names = end_names(layers)
    methods = [s.method for n, s in plan.resolve(layers).items()
               if s is not None and n not in names]
    return max(methods, key=methods.count) if methods else None


def method_notes(plan: Plan, layers) -> list[str]:
    """How each quantized end runs under the plan's method, in words ("lm_head: GPTQ on the
    final hidden states"; "lm_head + embedding (tied: one matrix): GPTQ on the final hidden
    ..."), for the CLI and the Plan tab."""
    from studio.core.quant.registry import REFERENCE

    specs = effective_specs(plan, layers)
    body = body_method(plan, layers)
    notes = []
    for end in ends_of(layers):
        spec = specs[end.names[0]]
        if spec is None:
            continue
        # A spec of another method than RTN runs it or falls back (the note says which); an
        # RTN end under another plan method notes why when the method could not run there.
        ran, note = end_method(end, spec.method if spec.method != REFERENCE or not body
                               else body)
        if spec.method == REFERENCE and ran != REFERENCE:
            note = ""
        if note:
            notes.append(f"{end.title}: {note}")
    return notes
