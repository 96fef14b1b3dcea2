"""The allocator meets its budget, says why when it cannot, and matches brute force."""
import itertools

import numpy as np
import pytest

from studio.core.allocate import MB, LossTable, allocate, predicted_loss, spec_bits
from studio.core.errors import StudioError
from studio.core.plan import QuantSpec
from studio.core.quant.grid import bits_per_weight

OPTIONS = [QuantSpec(bits=b, group_size=32) for b in (2, 3, 4, 8)] + [None]


def random_table(seed: int, layers: int = 5) -> LossTable:
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.choice([8, 16, 24])), int(rng.choice([32, 48, 64, 96])))
              for _ in range(layers)]
    # Loss falls with bits, at a different rate per layer (sensitivity), plus noise.
    scale = rng.lognormal(0.0, 1.5, size=layers)
    loss = np.array([[s * 4.0 ** -(o.bits if o else 16) * rng.uniform(0.5, 1.5) for o in OPTIONS]
                     for s in scale])
    loss[:, -1] = 0.0
    return LossTable([f"l{i}" for i in range(layers)], shapes, OPTIONS, loss, fixed_bytes=100)


def brute_force(table: LossTable, budget: int) -> float:
    costs = table.costs
    best = np.inf
    for picks in itertools.product(range(len(table.options)), repeat=len(table.names)):
        rows = np.arange(len(picks))
        if costs[rows, picks].sum() <= budget:
            best = min(best, table.loss[rows, picks].sum())
    return best


def test_spec_bits_agrees_with_grid_bits_per_weight():
    for shape in [(4, 576), (7, 100), (3, 64)]:
        for spec in [QuantSpec(bits=3, group_size=128), QuantSpec(bits=4, group_size=-1),
                     QuantSpec(bits=2, group_size=32, symmetric=True), None]:
            assert spec_bits(shape, spec) == pytest.approx(
                shape[0] * shape[1] * bits_per_weight(spec, shape[1]))


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force_on_small_tables(seed):
    table = random_table(seed)
    costs = table.costs
    lo, hi = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    for budget_bpw in np.linspace(lo / table.weights, hi / table.weights, 9):
        result = allocate(table, budget_bpw=float(budget_bpw))
        assert result.bits <= result.budget_bits
        assert result.exact
        assert result.loss == pytest.approx(brute_force(table, result.budget_bits), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_coarse_budget_grid_still_fits_and_bounds_the_optimum(seed):
    # Very few slots force rounding: the answer must still fit and the gap must be honest.
    table = random_table(seed, layers=6)
    costs = table.costs
    mid = (costs.min(axis=1).sum() + costs.max(axis=1).sum()) / 2 / table.weights
    result = allocate(table, budget_bpw=float(mid), states=7)
    optimum = brute_force(table, result.budget_bits)
    assert result.bits <= result.budget_bits
    assert result.lower_bound <= optimum + 1e-12 <= result.loss + 2e-12


def test_budget_in_megabytes_counts_fixed_bytes():
    table = random_table(1)
    costs = table.costs
    target_bits = int((costs.min(axis=1).sum() + costs.max(axis=1).sum()) // 2)
    budget_mb = (target_bits / 8 + table.fixed_bytes) / MB
    result = allocate(table, budget_mb=budget_mb)
    assert result.size_bytes <= budget_mb * MB
    assert result.size_bytes == result.bits / 8 + table.fixed_bytes
    assert result.loss == pytest.approx(brute_force(table, result.budget_bits))


def test_plan_names_every_layer_exactly():
    table = random_table(2)
    result = allocate(table, budget_bpw=4.0)
    assert [r.pattern for r in result.plan.rules] == table.names
    assert all(not r.regex for r in result.plan.rules)
    for name in table.names:
        assert result.plan.spec_for(name) == result.choices[name]


def test_pareto_curve_is_monotone_and_contains_the_answer():
    table = random_table(3, layers=6)
    result = allocate(table, budget_bpw=5.0)
    curve = result.pareto
    assert np.all(np.diff(curve.loss) < 0)
    assert np.all(np.diff(curve.bits) > 0)
    # The answer is on (or, after spending leftover bits, below) the curve at its size.
    at_or_below = curve.loss[curve.bits <= result.bits]
    assert result.loss <= at_or_below.min() + 1e-12


def test_budgets_out_of_range_are_refused_with_the_reachable_range():
    table = random_table(4)
    with pytest.raises(StudioError, match="below the smallest possible plan"):
        allocate(table, budget_bpw=1.0)
    with pytest.raises(StudioError, match="above the full-precision size"):
        allocate(table, budget_bpw=16.5)
    with pytest.raises(StudioError, match="exactly one budget"):
        allocate(table)
    with pytest.raises(StudioError, match="positive"):
        allocate(table, budget_mb=-1.0)


GROUPED = ([QuantSpec(bits=b, group_size=128) for b in (2, 3, 4, 8)]
           + [QuantSpec(bits=b, group_size=g) for b in (3, 4) for g in (32, 64)] + [None])


def grouped_table(seed: int, layers: int = 4) -> LossTable:
    """Options that differ by group size as well as width: smaller groups cost more (one scale
    and zero per group) and lose less, by a layer-dependent amount."""
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.choice([4, 8])), int(rng.choice([128, 256, 384]))) for _ in range(layers)]
    scale = rng.lognormal(0.0, 1.5, size=layers)
    benefit = {128: 1.0, 64: 0.7, 32: 0.5}
    loss = np.array([[0.0 if o is None else
                      s * 4.0 ** -o.bits * benefit[o.group_size] ** rng.uniform(0.2, 2.0)
                      for o in GROUPED] for s in scale])
    return LossTable([f"l{i}" for i in range(layers)], shapes, GROUPED, loss, fixed_bytes=10)


@pytest.mark.parametrize("seed", range(3))
def test_group_size_options_meet_the_budget_and_equal_brute_force(seed):
    table = grouped_table(seed)
    costs = table.costs
    lo, hi = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    # Every plan at once (11 options ^ 4 layers): its total cost and loss.
    picks = np.array(list(itertools.product(range(len(GROUPED)), repeat=len(table.names))))
    rows = np.arange(len(table.names))
    all_costs, all_loss = costs[rows, picks].sum(axis=1), table.loss[rows, picks].sum(axis=1)
    used_small_groups = False
    for budget_bpw in np.linspace(lo / table.weights, hi / table.weights, 9):
        result = allocate(table, budget_bpw=float(budget_bpw))
        assert result.bits <= result.budget_bits <= budget_bpw * table.weights
        assert result.exact
        optimum = all_loss[all_costs <= result.budget_bits].min()
        assert result.loss == pytest.approx(optimum, rel=1e-12)
        used_small_groups |= any(s is not None and s.group_size < 128
                                 for s in result.choices.values())
    assert used_small_groups  # the menu's group sizes really are chosen somewhere


def test_nan_in_table_is_refused():
    table = random_table(5)
    loss = table.loss.copy()
    loss[0, 0] = np.nan
    with pytest.raises(StudioError, match="missing"):
        LossTable(table.names, table.shapes, table.options, loss)


def test_plan_size_equals_the_variant_size(tiny_llama):
    """The meter's bytes and bits per weight are what quantizing with the plan really gives."""
    from studio.core.allocate import plan_size
    from studio.core.jobs import run
    from studio.core.plan import Plan, Rule
    from studio.core.quantize import quantize_job

    names = [i.name for i in tiny_llama.quantizable]
    plan = Plan(default=QuantSpec(bits=4, group_size=32), architecture=tiny_llama.architecture)
    plan = plan.with_rule(Rule(names[0], QuantSpec(bits=2, group_size=-1)))
    plan = plan.with_rule(Rule(names[1], None))
    plan = plan.with_rule(Rule(r".*mlp\.down_proj", QuantSpec(bits=8, group_size=64), regex=True))
    for candidate in (plan, plan.with_rule(Rule("lm_head", QuantSpec(bits=8, group_size=32)))):
        variant = run(quantize_job(tiny_llama, candidate, None, None, "meter"))
        size = plan_size(tiny_llama, candidate)
        assert size.size_bytes == variant.size_bytes
        assert size.bits_per_weight == pytest.approx(variant.bits_per_weight, rel=1e-12)


def test_allocation_from_sensitivity_sizes_like_the_meter(tiny_llama):
    from studio.core.allocate import loss_table, plan_size
    from studio.core.jobs import run
    from studio.core.sensitivity import sensitivity_job
    from studio.core.text import text_windows

    windows = text_windows(tiny_llama.tokenizer, None, 16, 2, seed=0)[0]
    result = run(sensitivity_job(tiny_llama, windows, bits=(2, 4, 8), group_sizes=(32, 64),
                                 kl_windows=0))
    table = loss_table(result, tiny_llama, kind="proxy", method="gptq")
    assert table.options[:-1] == [o.with_(method="gptq") for o in result.options]
    assert table.options[-1] is None  # full precision
    answer = allocate(table, budget_bpw=4.5)
    size = plan_size(tiny_llama, answer.plan)
    assert size.size_bytes == int(answer.size_bytes)
    assert size.bits_per_weight == pytest.approx(answer.bpw)
    assert answer.bpw <= 4.5
    # The plan's predicted loss is the allocation's, looked up by grid (bits, group).
    total, why = predicted_loss(result, answer.plan, "proxy")
    assert why == "" and total == pytest.approx(answer.loss)


def test_predicted_loss_names_the_layer_and_option_not_measured(tiny_llama):
    from studio.core.jobs import run
    from studio.core.plan import Plan, Rule
    from studio.core.sensitivity import sensitivity_job
    from studio.core.text import text_windows

    windows = text_windows(tiny_llama.tokenizer, None, 16, 1, seed=0)[0]
    result = run(sensitivity_job(tiny_llama, windows, bits=(3, 4), group_sizes=(32, 128),
                                 kl_windows=0))
    name = result.layers[2]
    plan = Plan(default=QuantSpec(bits=4, group_size=32, method="awq"))
    total, why = predicted_loss(result, plan, "proxy")
    column = result.labels.index("W4 g32")
    # The default covers the block layers; the tied head (the last row) is not planned.
    assert result.layers[result.body_rows:] == ["lm_head"]
    assert why == "" and total == pytest.approx(
        result.proxy_error[: result.body_rows, column].sum())
    unmeasured = plan.with_rule(Rule(name, QuantSpec(bits=4, group_size=64)))
    total, why = predicted_loss(result, unmeasured, "proxy")
    assert total is None and why == f"{name} is planned at W4 g64, which the sweep did not measure"
