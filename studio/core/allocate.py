"""Bits per layer under a size budget: the plan that minimises total predicted loss.

The problem is a multiple-choice knapsack: every layer picks one option (a grid such as W4 g128
or W3 g64, or full precision), each with a storage cost in bits (codes + scales + zero points,
counted exactly as `grid.storage_bits_per_weight` counts them: a GGUF-native option at its GGUF
type's bytes) and a predicted loss (the layer's end-to-end KL, measured or predicted from the
proxy, or the proxy error itself; see `sensitivity`). Losses are assumed to add up across
layers, the usual assumption of mixed-precision allocators (HAWQ, llama.cpp's imatrix-driven
type choice).
An option a layer cannot take (a GGUF-native one on rows that are not whole 32-weight GGUF
blocks) is never chosen for it (`LossTable.allowed`).

The model's ends (lm_head, embedding; a tied pair is one matrix) are kept at the plan's setting
and counted in the fixed bytes, unless the user asks the allocator to choose them ("auto"):
each such end is then one more row (`LossTable.units`: the row's layers, both sides of a tied
pair), priced once, with the loss the sensitivity sweep measured for it, and written into the
plan as RTN rules on each of its layers. A budget in bits per weight then counts them among
the chosen weights.

The solver is a dynamic programme over a discretised budget. When every cost is a multiple of
the budget unit (small models, the tests) it is exact. Otherwise costs are rounded *up* to the
unit, so the answer always fits the real budget; a second programme with costs rounded *down*
gives a lower bound on the best possible loss, and the gap between the two is reported
(`Allocation.gap`), so "near-exact" is a checked number, never a hope.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK, fits_rows
from studio.core.plan import Plan, QuantSpec, Rule, tied_specs
from studio.core.quant.grid import native_gguf_type, storage_bits_per_weight
from studio.core.sensitivity import gguf_native_options, option_label
from studio.core.variant import float_bytes, stored_floats

MB = 2 ** 20              # "MB" as Variant.to_summary reports size_mb
FULL_PRECISION_BITS = 16  # a layer kept in full precision is stored as fp16/bf16
DEFAULT_STATES = 100_000  # budget slots of the dynamic programme


def spec_bits(shape: tuple[int, int], spec: QuantSpec | None) -> int:
    """Exact storage bits of one [out, in] weight under `spec` (grid.storage_bits_per_weight x
    count). Every price is a whole number of bits per row (codes plus whole groups' scales and
    zeros, or whole GGUF blocks), so the rounding only removes float noise."""
    out, cols = shape
    if spec is None:
        return out * cols * FULL_PRECISION_BITS
    return out * round(cols * storage_bits_per_weight(spec, cols))


def option_fits(spec: QuantSpec | None, in_features: int) -> bool:
    """Whether a layer with rows of `in_features` weights can take `spec`: a GGUF-native option
    needs whole GGUF blocks (no ragged block in GGUF), every other option fits any layer."""
    return native_gguf_type(spec) is None or fits_rows(in_features)


@dataclass
class LossTable:
    """What the allocator chooses from: layers (rows) x options (columns)."""
    names: list[str]
    shapes: list[tuple[int, int]]        # (out, in) of each layer's weight
    options: list[QuantSpec | None]      # one per column; None = full precision
    loss: np.ndarray                     # [layers, options], predicted loss of each choice
    fixed_bytes: int = 0                 # everything the plan does not choose (embeddings, norms)
    architecture: str | None = None
    allowed: np.ndarray | None = None    # [layers, options] False: that layer cannot take it
                                         # (None: every option fits every layer)
    fixed_rules: tuple = ()              # the plan's rules for the embedding / lm_head, kept
                                         # by every answer and counted in fixed_bytes
    units: dict = field(default_factory=dict)  # row name -> its layers, for an end the
                                         # allocator chooses (a tied pair: both names)
    unit_roles: dict = field(default_factory=dict)  # row name -> its roles (plan_ends.End)

    def __post_init__(self) -> None:
        self.loss = np.asarray(self.loss, dtype=np.float64)
        if self.loss.shape != (len(self.names), len(self.options)):
            raise ValueError(f"loss table is {self.loss.shape}, expected "
                             f"{(len(self.names), len(self.options))}")
        self.allowed = (np.ones(self.loss.shape, dtype=bool) if self.allowed is None
                        else np.asarray(self.allowed, dtype=bool))
        if self.allowed.shape != self.loss.shape:
            raise ValueError(f"allowed is {self.allowed.shape}, expected {self.loss.shape}")
        stuck = [n for n, row in zip(self.names, self.allowed) if not row.any()]
        if stuck:
            raise StudioError(f"Layer {stuck[0]} can take none of the options offered.")
        if len(self.options) > 127:  # the programme stores each choice in an int8
            raise StudioError(f"{len(self.options)} options per layer are too many for the "
                              f"allocator (at most 127).")
        if not np.all(np.isfinite(self.loss)):
            raise StudioError("The sensitivity table has missing or infinite values; "
                              "run the sensitivity sweep again.")

    @property
    def costs(self) -> np.ndarray:
        """[layers, options] exact storage bits (Python ints in an object-free int64 array).
        An option a layer cannot take is priced as that layer's cheapest allowed one, so it
        moves no bound; `choice_loss` keeps it from ever being chosen."""
        costs = np.array([[spec_bits(s, self.priced(n, o)) for o in self.options]
                          for n, s in zip(self.names, self.shapes)], dtype=np.int64)
        cheapest = np.where(self.allowed, costs, np.iinfo(np.int64).max).min(axis=1)
        return np.where(self.allowed, costs, cheapest[:, None])

    def priced(self, name: str, option: QuantSpec | None) -> QuantSpec | None:
        """The spec a row's option is written and stored as: an end's in the method it can run
        (`unit_spec`: a codebook method's tied head is RTN, priced as RTN)."""
        return unit_spec(name, option, self.units, self.unit_roles)

    @property
    def choice_loss(self) -> np.ndarray:
        """The loss the solver minimises: `loss`, infinite where a layer cannot take an option."""
        return np.where(self.allowed, self.loss, np.inf)

    @property
    def weights(self) -> int:
        return sum(out * cols for out, cols in self.shapes)

    def bits_to_bytes(self, bits: float) -> float:
        return bits / 8 + self.fixed_bytes


@dataclass
class ParetoCurve:
    """Optimal predicted loss against size: one point per step of the staircase."""
    bits: np.ndarray   # total bits of the chosen layers
    bpw: np.ndarray    # average bits per weight over the chosen layers
    mb: np.ndarray     # whole-model size in MB (fixed bytes included)
    loss: np.ndarray


@dataclass
class Allocation:
    choices: dict[str, QuantSpec | None]
    plan: Plan
    bits: int                  # storage bits of the chosen layers
    bpw: float
    size_bytes: float          # whole model: chosen layers + fixed bytes
    loss: float                # total predicted loss of the answer
    lower_bound: float         # no plan within the budget can predict less than this
    budget_bits: int
    pareto: ParetoCurve = field(repr=False)

    @property
    def gap(self) -> float:
        return max(0.0, self.loss - self.lower_bound)

    @property
    def exact(self) -> bool:
        return self.gap <= 1e-12 * max(1.0, abs(self.loss))

    @property
    def size_mb(self) -> float:
        return self.size_bytes / MB


def budget_bits(table: LossTable, budget_bpw: float | None = None,
                budget_mb: float | None = None) -> int:
    """The budget in storage bits of the chosen layers, checked against what is reachable."""
    if (budget_bpw is None) == (budget_mb is None):
        raise StudioError("Give exactly one budget: bits per weight or megabytes.")
    costs = table.costs
    smallest, largest = int(costs.min(axis=1).sum()), int(costs.max(axis=1).sum())
    full = sum(spec_bits(s, None) for s in table.shapes)
    if budget_bpw is not None:
        if not math.isfinite(budget_bpw) or budget_bpw <= 0:
            raise StudioError(f"The budget must be a positive number of bits per weight, "
                              f"not {budget_bpw}.")
        bits = math.floor(budget_bpw * table.weights)
        unit, fmt = "bits per weight", lambda b: f"{b / table.weights:.3f}"
    else:
        if not math.isfinite(budget_mb) or budget_mb <= 0:
            raise StudioError(f"The budget must be a positive size in MB, not {budget_mb}.")
        bits = math.floor((budget_mb * MB - table.fixed_bytes) * 8)
        unit, fmt = "MB", lambda b: f"{table.bits_to_bytes(b) / MB:.2f}"
    if bits < smallest:
        raise StudioError(f"A budget of {budget_bpw if budget_mb is None else budget_mb} {unit} "
                          f"is below the smallest possible plan with these options "
                          f"({fmt(smallest)} {unit}, every layer at its smallest width).")
    if bits > full:
        raise StudioError(f"A budget of {budget_bpw if budget_mb is None else budget_mb} {unit} "
                          f"is above the full-precision size ({fmt(full)} {unit}); "
                          f"no quantization is needed.")
    return min(bits, largest)


def allocate(table: LossTable, budget_bpw: float | None = None, budget_mb: float | None = None,
             states: int = DEFAULT_STATES) -> Allocation:
    """The plan minimising total predicted loss within the budget (see the module notes)."""
    budget = budget_bits(table, budget_bpw, budget_mb)
    costs = table.costs
    base = costs.min(axis=1)
    extra = costs - base[:, None]                  # cost above each layer's cheapest option
    span = int(extra.max(axis=1).sum())
    unit = _unit(extra, span, states)
    room = budget - int(base.sum())

    up = -(-extra // unit)                         # rounded up: answers always fit
    down = extra // unit                           # rounded down: a relaxation, for the bound
    loss_of = table.choice_loss
    best, choice = _knapsack(up, loss_of, int(up.max(axis=1).sum()), keep_choices=True)
    picks = _backtrack(choice, up, min(room // unit, len(best) - 1))
    picks = _fill_leftover(picks, costs, loss_of, budget)
    bound_curve, _ = _knapsack(down, loss_of, room // unit, keep_choices=False)

    bits = int(costs[np.arange(len(picks)), picks].sum())
    loss = float(table.loss[np.arange(len(picks)), picks].sum())
    choices = {name: table.options[j] for name, j in zip(table.names, picks)}
    plan = plan_from_choices(choices, table.architecture, table.fixed_rules, table.units,
                             table.unit_roles)
    return Allocation(choices=choices, plan=plan,
                      bits=bits, bpw=bits / table.weights,
                      size_bytes=table.bits_to_bytes(bits), loss=loss,
                      lower_bound=float(bound_curve[room // unit]), budget_bits=budget,
                      pareto=_pareto(table, best, choice, up, costs, unit))


def plan_from_choices(choices: dict[str, QuantSpec | None], architecture: str | None,
                      fixed_rules: tuple = (), units: dict | None = None,
                      roles: dict | None = None) -> Plan:
    """One exact-name rule per layer, so the plan reads the same whatever its default; the
    embedding / lm_head rules the allocator kept (`LossTable.fixed_rules`) follow them, and
    the ends it chose (`units`: row -> its layers) are rules on each of their layers, in the
    plan's method where the end can run it, else RTN on the chosen grid
    (`plan_ends.in_method`)."""
    units = units or {}
    specs = [s for n, s in choices.items() if s is not None and n not in units]
    default = max(specs, key=specs.count) if specs else None  # the most common choice
    rules = []
    for name, spec in choices.items():
        spec = unit_spec(name, spec, units, roles or {})
        for layer in units.get(name, (name,)):
            rules.append(Rule(layer, spec))
    return Plan(default=default, rules=tuple(rules) + tuple(fixed_rules),
                architecture=architecture)


def unit_spec(name: str, spec: QuantSpec | None, units: dict, roles: dict) -> QuantSpec | None:
    """A row's chosen spec as the plan writes it: for an end (`units`), in the plan's method
    where the end can run it, else RTN on that grid (`plan_ends.in_method`)."""
    from studio.core.plan_ends import End, in_method

    if name not in units or spec is None:
        return spec
    end = End(name, tuple(units[name]), tuple(roles.get(name, ("lm_head",))))
    return in_method(spec, end, spec)


# --- from a model and its sensitivity results ------------------------------------------------

def loss_table(result, handle, kind: str = "auto", full_precision: bool = True,
               method: str | None = None, gguf_native: bool = False,
               plan: Plan | None = None, auto=()) -> LossTable:
    """The allocator's table from sensitivity results (checked against `handle` first): one
    column per measured option (plus full precision); `method` overrides the method the plan's
    specs carry. `gguf_native` restricts the options to the GGUF-native menu (Q4_0, Q5_0, Q8_0,
    priced at their GGUF bytes), which the results must have measured. The embedding and
    lm_head stay as `plan` sets them, counted in the size, except the ends named in `auto`
    (any of their layer names), which the allocator chooses from their measured loss."""
    result.check_model(handle)
    if gguf_native:
        native = gguf_native_options()
        if any(result.column(o) is None for o in native):
            raise StudioError("The sensitivity sweep did not measure the GGUF-native options "
                              "(Q4_0, Q5_0, Q8_0); measure them first (GGUF-native in the "
                              "Sensitivity tab, or plan --gguf-native).")
        result = result.subset(native)
    loss = np.asarray(result.loss(kind), dtype=np.float64)
    rows = list(range(result.body_rows))
    for end in chosen_ends(handle, auto):
        row = result.end_row(end.names)
        if row is None:
            raise StudioError(f"The sensitivity sweep did not measure the {end.title}, so the "
                              f"allocator cannot choose its width: run the sweep again (it "
                              f"now measures the model's ends), or set the width yourself.")
        rows.append(row)
    loss = loss[rows]
    # Options the plan's method cannot take (NF4 at 5 bits) drop out.
    method = result.method if method is None else method
    keep = [j for j, o in enumerate(result.options) if method_takes(method, o)]
    if not keep:
        raise StudioError(f"{method} takes {', '.join(map(str, _widths(method)))} bits; the "
                          f"sensitivity sweep measured none of those widths.")
    options: list[QuantSpec | None] = [result.options[j].with_(method=method) for j in keep]
    loss = loss[:, keep]
    if full_precision:
        options.append(None)
        loss = np.concatenate([loss, np.zeros((len(loss), 1))], axis=1)
    return table_for(handle, options, loss, plan, auto)


def chosen_ends(handle, auto) -> list:
    """The ends (`plan_ends.End`) the allocator chooses: those with a layer named in `auto`."""
    from studio.core.plan_ends import ends_of

    auto = set(auto)
    return [end for end in ends_of(handle.layers) if auto & set(end.names)]


def method_takes(method: str, option: QuantSpec | None) -> bool:
    """Whether `method` can quantize at `option`'s width (NF4 only at 2-4 bits, ...)."""
    return option is None or option.bits in _widths(method)


def _widths(method: str) -> tuple[int, ...]:
    from studio.core.quant import registry
    return registry.get(method).bits


def table_for(handle, options: list[QuantSpec | None], loss: np.ndarray | None = None,
              plan: Plan | None = None, auto=()) -> LossTable:
    """A table over the handle's quantizable layers (zero loss when none is given: enough to
    check a budget before any sweep runs), then one row per end named in `auto`
    (`chosen_ends`). The other ends are not chosen: they keep `plan`'s rules for them
    (`plan_ends.end_rules`; none: kept as stored), and their bytes at that setting are part of
    the fixed bytes, so a budget in MB is the whole model's."""
    from studio.core.plan_ends import end_rules

    chosen = chosen_ends(handle, auto)
    layers = budget_layers(handle, auto)
    if loss is None:
        loss = np.zeros((len(layers), len(options)))
    allowed = np.array([[option_fits(o, i.shape[1]) for o in options] for i in layers],
                       dtype=bool).reshape(len(layers), len(options))
    for info, row in zip(layers, allowed):
        if not row.any():
            raise StudioError(f"{info.name} has rows of {info.shape[1]} weights, not whole "
                              f"{BLOCK}-weight GGUF blocks, so a GGUF-native plan can only keep "
                              f"it in 16 bits: allow full precision.")
    covered = 2 * sum(i.shape[0] * i.shape[1] for i in layers)  # their 16-bit bytes in plan_size
    unit_names = {n for end in chosen for n in end.names}
    ends = tuple(r for r in (end_rules(plan, handle.layers) if plan is not None else ())
                 if r.pattern not in unit_names)
    fixed = plan_size(handle, Plan(default=None, rules=ends)).size_bytes - covered
    return LossTable([i.name for i in layers], [tuple(i.shape) for i in layers], options, loss,
                     fixed_bytes=fixed, architecture=handle.architecture, allowed=allowed,
                     fixed_rules=ends, units={end.names[0]: end.names for end in chosen},
                     unit_roles={end.names[0]: end.roles for end in chosen})


def budget_layers(handle, auto=()) -> list:
    """The layers a budget in bits per weight counts (LayerInfo): every quantizable layer, then
    one per end the allocator chooses (`chosen_ends`: a tied pair's one matrix once, as its
    lm_head). The allocator's rows are these, and `plan_size(auto=)` averages over the same
    ones, so the bits per weight an allocation reaches is the figure the plan meter shows."""
    by_name = {i.name: i for i in handle.layers}
    return handle.quantizable + [by_name[end.names[0]] for end in chosen_ends(handle, auto)]


@dataclass(frozen=True)
class PlanSize:
    bits_per_weight: float   # the body: block linears, other quantized layers but the ends
    size_bytes: int          # the whole model as an exporter stores it
    quantized: int           # layers the plan quantizes
    breakdown: dict = field(default_factory=dict)  # size_bytes in Variant.size_breakdown's parts
    budget_bpw: float = 16.0  # over `budget_layers(auto)`: what a --budget-bpw counts
    counted_ends: tuple = ()  # the ends budget_bpw counts besides the body ("lm_head + embedding")

    @property
    def size_mb(self) -> float:
        return self.size_bytes / MB

    @property
    def bits_text(self) -> str:
        """The bits per weight a budget reaches, in words: with ends chosen by the allocator,
        over the body and them (the body alone beside it, as quantize reports it)."""
        return self.bits_words(f"{self.budget_bpw:.3f}")

    def bits_words(self, figure: str) -> str:
        """`bits_text` with the figure given as `figure` (the meter sets it in bold)."""
        if not self.counted_ends:
            return f"{figure} bits/weight"
        return (f"{figure} bits/weight over the body and the "
                f"{' and the '.join(self.counted_ends)} (the body alone "
                f"{self.bits_per_weight:.3f})")


def plan_size(handle, plan: Plan, auto=()) -> PlanSize:
    """What a variant made with `plan` will weigh: the same count as Variant.size_bytes and
    Variant.bits_per_weight (quantized layers at grid.storage_bits_per_weight, every other tensor,
    shared ones once, in 16 bits), computed without quantizing anything. `budget_bpw` averages
    over the layers a bits-per-weight budget counts with the ends named in `auto` chosen by the
    allocator (`budget_layers`), each priced as the allocator prices it (`spec_bits`)."""
    from studio.core.plan_ends import effective_specs
    specs = plan.resolve(handle.layers)
    model = handle.model
    quantized = {n: s for n, s in specs.items() if s is not None}
    # A tied embedding / lm_head quantized alike is one matrix, counted once (`tied_specs`);
    # quantized apart, each is stored.
    shared = tied_specs(handle.layers, quantized)
    weight_ids = {id(handle.module(n).weight) for n in quantized}
    ends = {id(m.weight) for m in (getattr(model, g, lambda: None)() for g in (
        "get_input_embeddings", "get_output_embeddings")) if m is not None}
    parts = {"quantized": 0.0, "embedding": 0.0, "float": 0}
    bits = weights = 0.0
    for info in handle.layers:
        spec = quantized.get(info.name)
        if info.name in shared:
            continue
        numel = info.shape[0] * info.shape[1]
        if spec is not None:
            end = id(handle.module(info.name).weight) in ends
            parts["embedding" if end else "quantized"] += (
                storage_bits_per_weight(spec, info.shape[1]) * numel / 8)
        if info.role not in ("embedding", "lm_head") and (spec is not None or info.quantizable):
            bits += storage_bits_per_weight(spec, info.shape[1]) * numel
            weights += numel
    for tensor in stored_floats(model):
        if id(tensor) not in weight_ids:
            parts["embedding" if id(tensor) in ends else "float"] += float_bytes(tensor)
    parts = {key: int(value) for key, value in parts.items()}
    counted, effective = budget_layers(handle, auto), effective_specs(plan, handle.layers)
    counted_bits = sum(spec_bits(tuple(i.shape), effective[i.name]) for i in counted)
    counted_weights = sum(i.shape[0] * i.shape[1] for i in counted)
    return PlanSize(bits / weights if weights else 16.0, sum(parts.values()), len(quantized),
                    parts, counted_bits / counted_weights if counted_weights else 16.0,
                    tuple(" + ".join(end.roles) for end in chosen_ends(handle, auto)))


def plan_title(handle, plan: Plan) -> str:
    """A variant's default name, from its plan: a uniform plan by its spec ("RTN W4 g128"), any
    plan with rules by what it adds up to ("mixed 4.25 bpw, GPTQ+RTN"), so the two never read
    alike."""
    if not plan.rules and plan.default is not None:
        return plan.default.label
    ends = {i.name: i for i in handle.layers if i.role in ("embedding", "lm_head")}
    if plan.default is not None and all(not r.regex and r.pattern in ends for r in plan.rules):
        # a uniform body with its embedding / lm_head set apart: "RTN W4 g128, lm_head W8 ch sym"
        from studio.core.plan_ends import end_setting, ends_of

        parts = []
        for end in ends_of(handle.layers):   # a tied pair set alike is one matrix: one part
            if any(r.pattern in end.names for r in plan.rules):
                spec, apart = end_setting(plan, handle.layers, end)
                if apart:
                    parts += [f"{ends[r.pattern].role} {r.spec.grid_label if r.spec else 'fp16'}"
                              for r in plan.rules if r.pattern in end.names]
                else:
                    parts.append(f"{end.roles[0]} {spec.grid_label if spec else 'fp16'}")
        parts += [f"{ends[r.pattern].role} {r.spec.grid_label if r.spec else 'fp16'}"
                  for r in plan.rules if r.pattern not in {n for e in ends_of(handle.layers)
                                                           for n in e.names}]
        return ", ".join([plan.default.label, *parts])
    methods = sorted({s.method for s in plan.resolve(handle.layers).values() if s is not None})
    size = plan_size(handle, plan)
    return (f"mixed {size.bits_per_weight:.2f} bpw, "
            f"{'+'.join(m.upper() for m in methods) or 'no layer quantized'}")


def predicted_loss(result, plan: Plan, kind: str = "auto") -> tuple[float | None, str]:
    """Sum of the per-layer loss of each layer's planned option (0 for full precision).

    Options are matched on their grid (bits, group size, symmetric, scale dtype), whatever the
    method. None, with the reason, when the plan puts a layer on a grid the sweep did not
    measure. The model's ends (the rows after the layers) count when the sweep measured
    their planned option; at another (W8 per channel, say) they add nothing, as when the
    allocator keeps them fixed.
    """
    loss = result.loss(kind)
    total = 0.0
    for row, name in enumerate(result.layers):
        spec = plan.spec_for(name, default_applies=row < result.body_rows)
        if spec is None:
            continue
        col = result.column(spec)
        if col is None and row >= result.body_rows:
            continue
        if col is None:
            return None, (f"{name} is planned at {option_label(spec)}, which the sweep did not "
                          f"measure")
        total += float(loss[row, col])
    return total, ""


# --- the dynamic programme ---------------------------------------------------------------------

def _unit(extra: np.ndarray, span: int, states: int) -> int:
    """Budget slot size: the costs' common divisor when that fits `states` slots (exact)."""
    nonzero = [int(v) for v in np.unique(extra) if v > 0]
    g = reduce(math.gcd, nonzero, 0) or 1
    return g * max(1, -(-span // (g * states)))


def _knapsack(weights: np.ndarray, loss: np.ndarray, size: int,
              keep_choices: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """best[s] = least total loss with total weight <= s (for s in 0..size)."""
    best = np.zeros(size + 1)
    choice = np.zeros((len(weights), size + 1), dtype=np.int8) if keep_choices else None
    for i, (w_row, l_row) in enumerate(zip(weights, loss)):
        new = np.full(size + 1, np.inf)
        arg = np.zeros(size + 1, dtype=np.int8)
        for j, (w, l) in enumerate(zip(w_row.tolist(), l_row.tolist())):
            if w > size:
                continue
            cand = np.full(size + 1, np.inf)
            cand[w:] = best[: size + 1 - w] + l
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        if choice is not None:
            choice[i] = arg
    return best, choice


def _backtrack(choice: np.ndarray, weights: np.ndarray, slot: int) -> np.ndarray:
    picks = np.zeros(len(choice), dtype=np.int64)
    for i in range(len(choice) - 1, -1, -1):
        j = int(choice[i, slot])
        picks[i] = j
        slot -= int(weights[i, j])
    return picks


def _fill_leftover(picks: np.ndarray, costs: np.ndarray, loss: np.ndarray,
                   budget: int) -> np.ndarray:
    """Spend what rounding left over: take the best single-layer change that still fits."""
    picks = picks.copy()
    rows = np.arange(len(picks))
    while True:
        spare = budget - int(costs[rows, picks].sum())
        delta_cost = costs - costs[rows, picks][:, None]
        gain = loss[rows, picks][:, None] - loss
        gain[delta_cost > spare] = 0.0
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[i, j] <= 1e-15 * max(1.0, abs(loss[i, j])):
            return picks
        picks[i] = j


def _pareto(table: LossTable, best: np.ndarray, choice: np.ndarray, weights: np.ndarray,
            costs: np.ndarray, unit: int, points: int = 400) -> ParetoCurve:
    """Where the optimal loss steps down, thinned to `points`, each backtracked to its real size."""
    steps = np.flatnonzero(np.diff(best, prepend=np.inf) < 0)
    if len(steps) > points:
        steps = steps[np.unique(np.linspace(0, len(steps) - 1, points).round().astype(int))]
    rows = np.arange(len(costs))
    bits, loss = [], []
    for slot in steps:
        picks = _backtrack(choice, weights, int(slot))
        bits.append(int(costs[rows, picks].sum()))
        loss.append(float(table.loss[rows, picks].sum()))
    bits_arr = np.array(bits, dtype=np.float64)
    return ParetoCurve(bits=bits_arr, bpw=bits_arr / table.weights,
                       mb=(bits_arr / 8 + table.fixed_bytes) / MB,
                       loss=np.array(loss, dtype=np.float64))
