"""The embedding / lm_head as choices of a plan: a tied pair is one choice, the allocator keeps
the plan's setting for them and counts it in its budget, plan files round-trip it."""
import json

import numpy as np

from studio.core.allocate import allocate, plan_size, spec_bits, table_for
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule, end_spec
from studio.core.plan_ends import describe, effective_specs, end_rules, end_setting, ends_of, with_end

W8 = end_spec("w8")
W4 = QuantSpec(bits=4, group_size=32)


def test_a_tied_pair_is_one_choice_and_an_untied_model_has_two(tiny_llama, tiny_dirs):
    [end] = ends_of(tiny_llama.layers)
    assert end.tied and set(end.names) == {"lm_head", "model.embed_tokens"}
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    assert [e.names for e in ends_of(qwen2.layers)] == [("lm_head",), ("model.embed_tokens",)]
    # GPT-2's positional table is an embedding too, but not a token one: not an end.
    gpt2 = run(open_model_job(tiny_dirs["gpt2"]))
    assert [e.names for e in ends_of(gpt2.layers)] == [("lm_head", "transformer.wte")]


def test_a_rule_on_either_side_covers_the_pair_and_round_trips(tiny_llama, tmp_path):
    [end] = ends_of(tiny_llama.layers)
    only_head = Plan(W4).with_rule(Rule("lm_head", W8))
    specs = effective_specs(only_head, tiny_llama.layers)
    assert specs["lm_head"] == specs["model.embed_tokens"] == W8
    assert end_setting(only_head, tiny_llama.layers, end) == (W8, False)
    plan = with_end(Plan(W4), end, W8)
    assert {r.pattern for r in plan.rules} == set(end.names)   # written on both: one choice
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert describe(plan, tiny_llama.layers) == "lm_head + embedding (tied: one matrix) W8 ch sym"
    apart = plan.with_rule(Rule("model.embed_tokens", W4))
    assert end_setting(apart, tiny_llama.layers, end) == (W8, True)
    assert "untied" in describe(apart, tiny_llama.layers)
    kept = with_end(plan, end, None)
    assert end_setting(kept, tiny_llama.layers, end) == (None, False)


def test_the_allocator_keeps_the_head_as_planned_and_counts_it(tiny_llama):
    options = [QuantSpec(bits=b, group_size=32) for b in (2, 4, 8)] + [None]
    rng = np.random.default_rng(0)
    loss = rng.random((len(tiny_llama.quantizable), len(options))) * [4, 2, 1, 0]
    plan = Plan(W4).with_rule(Rule("model.layers.0.mlp.up_proj", W4, regex=False))
    plan = plan.with_rule(Rule(r"lm_h.*", W8, regex=True))     # a regex naming the head
    kept = table_for(tiny_llama, options, loss)
    headed = table_for(tiny_llama, options, loss, plan)
    assert headed.fixed_rules == end_rules(plan, tiny_llama.layers) == (Rule("lm_head", W8),)
    # The tied matrix once, at W8 per channel instead of 16 bits.
    rows, cols = tiny_llama.module("lm_head").weight.shape
    w8_bytes = plan_size(tiny_llama, Plan(None, (Rule("lm_head", W8),))).size_bytes
    assert kept.fixed_bytes - headed.fixed_bytes == (
        plan_size(tiny_llama, Plan(None)).size_bytes - w8_bytes)
    assert kept.fixed_bytes - headed.fixed_bytes == 2 * rows * cols - spec_bits((rows, cols),
                                                                                 W8) // 8
    budget = (headed.fixed_bytes + 6 * headed.weights / 8) / 2 ** 20
    answer = allocate(headed, budget_mb=budget)
    assert answer.plan.spec_for("lm_head") == W8
    size = plan_size(tiny_llama, answer.plan)
    assert size.size_bytes == int(answer.size_bytes) and size.size_mb <= budget
    # The same budget without the head quantized leaves less room for the body.
    assert allocate(kept, budget_mb=budget).bits < answer.bits


def test_plan_command_keeps_the_head_setting(tiny_dirs, tmp_path, capsys):
    from studio.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_dirs["llama"]), "--budget-bpw", "4", "--bits", "2,4",
                 "--group-sizes", "32", "--proxy-only", "--windows", "2", "--seqlen", "16",
                 "--lm-head", "w4g32", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ends"] == "lm_head + embedding (tied: one matrix) W4 g32"
    plan = Plan.load(out)
    assert plan.spec_for("lm_head") == end_spec("w4g32")
    assert report["size_bytes"] == plan_size(run(open_model_job(tiny_dirs["llama"])),
                                             plan).size_bytes
    assert main(["plan", str(tiny_dirs["llama"]), "--budget-bpw", "4", "--lm-head", "w9",
                 "--out", str(out)]) == 2
    assert "not a setting for the embedding / lm_head" in capsys.readouterr().err


def test_the_plan_meter_splits_the_size_as_a_variant_does(tiny_llama):
    from studio.core.quantize import quantize_job

    [end] = ends_of(tiny_llama.layers)
    plan = with_end(Plan(W4), end, W8)
    size = plan_size(tiny_llama, plan)
    variant = run(quantize_job(tiny_llama, plan, None, None, "split"))
    assert size.breakdown == variant.size_breakdown
    assert size.size_bytes == variant.size_bytes == sum(size.breakdown.values())


def test_a_tied_pair_set_alike_is_named_once(tiny_llama, tiny_dirs):
    from studio.core.allocate import plan_title
    from studio.core.plan import with_ends

    [end] = ends_of(tiny_llama.layers)
    from_tab = with_end(Plan(W4), end, W8)                        # both names: the Plan tab
    from_cli = with_ends(Plan(W4), tiny_llama.layers, W8, None)   # the head only: quantize
    assert plan_title(tiny_llama, from_tab) == plan_title(tiny_llama, from_cli) == \
        "RTN W4 g32, lm_head W8 ch sym"
    apart = from_tab.with_rule(Rule("model.embed_tokens", W4))
    assert plan_title(tiny_llama, apart) == "RTN W4 g32, lm_head W8 ch sym, embedding W4 g32"
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    untied = with_ends(Plan(W4), qwen2.layers, W8, W4)
    assert plan_title(qwen2, untied) == "RTN W4 g32, lm_head W8 ch sym, embedding W4 g32"
