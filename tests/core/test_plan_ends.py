"""The embedding / lm_head as choices of a plan: a tied pair is one choice, the allocator keeps
the plan's setting for them and counts it in its budget, plan files round-trip it."""
import json

import numpy as np
import pytest

from studio.core.allocate import allocate, plan_size, spec_bits, table_for
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule, end_spec, with_ends
from studio.core.plan_ends import (describe, effective_specs, end_names, end_rules, end_setting,
                                    ends_of, with_end)

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


@pytest.fixture(scope="module")
def proxy_result(tiny_llama):
    """A proxy sweep of the tiny tied Llama: its layers, then the tied pair as one row."""
    from studio.core.sensitivity import sensitivity_job
    from studio.core.text import text_windows

    windows = text_windows(tiny_llama.tokenizer, None, 16, 2, seed=0)[0]
    return run(sensitivity_job(tiny_llama, windows, bits=(2, 4, 8), group_sizes=(32,),
                               kl_windows=0))


def test_the_allocator_chooses_the_tied_head_when_asked(tiny_llama, proxy_result, tmp_path):
    from studio.core.allocate import loss_table
    from studio.core.quantize import quantize_job

    [end] = ends_of(tiny_llama.layers)
    kept = loss_table(proxy_result, tiny_llama, kind="proxy", plan=Plan(None))
    auto = loss_table(proxy_result, tiny_llama, kind="proxy", plan=with_end(Plan(None), end, W8),
                      auto=["lm_head"])
    assert auto.names == kept.names + ["lm_head"] and auto.units == {"lm_head": end.names}
    assert auto.fixed_rules == ()   # the plan's W8 on the pair is the allocator's to change
    rows, cols = tiny_llama.module("lm_head").weight.shape
    assert kept.fixed_bytes - auto.fixed_bytes == 2 * rows * cols   # one matrix, not two
    assert np.array_equal(auto.loss[-1, :-1], proxy_result.proxy_error[-1])

    # Room for the head at W8 and every layer at its narrowest, barely.
    costs = auto.costs
    w8 = [o.bits if o else 16 for o in auto.options].index(8)
    room = costs.min(axis=1).sum() - costs[-1].min() + costs[-1, w8]
    tight = (auto.fixed_bytes + 1.02 * room / 8) / 2 ** 20
    auto.loss[-1] *= 1e-6             # the head now costs least loss per byte: lowered first
    cheap = allocate(auto, budget_mb=tight)
    assert cheap.choices["lm_head"] == QuantSpec(bits=2, group_size=32, method="rtn")
    auto.loss[-1] *= 1e12             # now it costs most: kept wide while the body is lowered
    dear = allocate(auto, budget_mb=tight)
    assert dear.choices["lm_head"] in (None, QuantSpec(bits=8, group_size=32, method="rtn"))
    assert dear.choices != cheap.choices

    for answer in (cheap, dear):
        spec, apart = end_setting(answer.plan, tiny_llama.layers, end)
        assert spec == answer.choices["lm_head"] and not apart   # one rule on each side
        answer.plan.save(tmp_path / "plan.json")
        assert Plan.load(tmp_path / "plan.json") == answer.plan
        size = plan_size(tiny_llama, answer.plan)
        assert size.size_bytes == int(answer.size_bytes) and size.size_mb <= tight
        variant = run(quantize_job(tiny_llama, answer.plan, None, None, "auto head"))
        assert variant.size_bytes == size.size_bytes


def test_auto_ends_need_a_sweep_that_measured_them(tiny_llama):
    from studio.core.allocate import loss_table
    from studio.core.errors import StudioError
    from studio.core.sensitivity import sensitivity_job
    from studio.core.text import text_windows

    windows = text_windows(tiny_llama.tokenizer, None, 16, 1, seed=0)[0]
    layers_only = run(sensitivity_job(tiny_llama, windows, bits=(4,), group_sizes=(32,),
                                      kl_windows=0, measure_ends=False))
    assert layers_only.ends == [] and layers_only.body_rows == len(tiny_llama.quantizable)
    loss_table(layers_only, tiny_llama, kind="proxy")   # fixed ends: fine
    with pytest.raises(StudioError, match="did not measure the lm_head"):
        loss_table(layers_only, tiny_llama, kind="proxy", auto=["lm_head"])


def test_plan_command_lets_the_allocator_choose_the_head(tiny_dirs, tmp_path, capsys):
    from studio.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_dirs["llama"]), "--budget-mb", "0.1", "--bits", "2,4,8",
                 "--group-sizes", "32", "--proxy-only", "--windows", "2", "--seqlen", "16",
                 "--lm-head", "auto", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ends_chosen"] == ["lm_head"]
    plan = Plan.load(out)
    handle = run(open_model_job(tiny_dirs["llama"]))
    spec, apart = end_setting(plan, handle.layers, ends_of(handle.layers)[0])
    assert not apart and report["layers"]["lm_head"] == (None if spec is None else
                                                         f"W{spec.bits} g32")
    assert report["size_bytes"] == plan_size(handle, plan).size_bytes <= 0.1 * 2 ** 20


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # a tied pair; an untied head and embedding
def test_a_bpw_budget_with_auto_ends_is_the_meters_and_quantizes_figure(arch, tiny_dirs):
    """The allocator's bits per weight counted the ends it chose among the weights while the
    plan meter averaged the body alone (2.998 against 3.122 in the window): both now average
    over `budget_layers`, and the size is quantize's to the byte."""
    from studio.core.allocate import loss_table
    from studio.core.quantize import quantize_job
    from studio.core.sensitivity import sensitivity_job
    from studio.core.text import text_windows

    handle = run(open_model_job(tiny_dirs[arch]))
    windows = text_windows(handle.tokenizer, None, 16, 2, seed=0)[0]
    result = run(sensitivity_job(handle, windows, bits=(2, 4, 8), group_sizes=(32,),
                                 kl_windows=0))
    auto = sorted(end_names(handle.layers))
    table = loss_table(result, handle, kind="proxy", plan=Plan(None), auto=auto)
    answer = allocate(table, budget_bpw=3.0)
    size = plan_size(handle, answer.plan, auto)
    assert size.budget_bpw == answer.bpw <= 3.0
    assert size.size_bytes == int(answer.size_bytes)
    assert f"{answer.bpw:.3f} bits/weight over the body and the" in size.bits_text
    variant = run(quantize_job(handle, answer.plan, None, None, "auto ends"))
    assert variant.size_bytes == size.size_bytes
    assert variant.bits_per_weight == pytest.approx(size.bits_per_weight, abs=1e-9)
    # The ends are chosen, not left as stored: the two figures differ by what they cost.
    assert size.budget_bpw != pytest.approx(size.bits_per_weight)
    # Without auto ends the budget is the body's, as quantize reports it.
    fixed = allocate(loss_table(result, handle, kind="proxy", plan=Plan(None)), budget_bpw=3.0)
    assert plan_size(handle, fixed.plan).budget_bpw == fixed.bpw == pytest.approx(
        plan_size(handle, fixed.plan).bits_per_weight)


def _head_inputs(model, windows):
    """What the lm_head reads, and what the last block gives, on the float model."""
    seen = {}
    head = model.get_output_embeddings()
    last = model.model.layers[-1] if hasattr(model, "model") and hasattr(model.model, "layers") \
        else model.model.decoder.layers[-1]
    hooks = [head.register_forward_pre_hook(lambda m, a: seen.setdefault("head", a[0])),
             last.register_forward_hook(lambda m, a, out: seen.setdefault(
                 "last", out[0] if isinstance(out, tuple) else out))]
    try:
        import torch
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen["head"], seen["last"]


@pytest.mark.parametrize("arch", ["qwen2", "opt", "gemma2"])
def test_the_heads_hessian_is_that_of_what_it_reads(arch, family_dirs):
    """The lm_head's calibration comes from the last block's outputs through the final norm
    (and soft-capping plays no part): 2/n X X^T of the head's own inputs."""
    import torch

    from studio.core.quantize import head_calibration
    from studio.core.text import text_windows

    handle = run(open_model_job(family_dirs[arch]))
    windows = text_windows(handle.tokenizer, None, 16, 3, seed=0)[0]
    x, last = _head_inputs(handle.model, windows)
    calib = head_calibration(handle.model, last)
    x = x.reshape(-1, x.shape[-1]).double()
    assert calib.tokens == x.shape[0]
    torch.testing.assert_close(calib.hessian.double(), 2 * x.T @ x / x.shape[0],
                               rtol=1e-4, atol=1e-5)


def test_the_head_runs_gptq_on_its_inputs_and_the_rest_rtn_on_the_grid(tiny_llama, tiny_dirs):
    """Under a GPTQ plan the head is GPTQ'd on the final hidden states (a lower error on them
    than RTN's), a tied pair as one matrix; an untied embedding and SmoothQuant take RTN on the
    grid, and the plan says so (AWQ's head: test_awq_head.py)."""
    from studio.core.plan_ends import method_notes
    from studio.core.quantize import quantize_job
    from studio.core.text import text_windows

    gptq = QuantSpec(bits=4, group_size=32, method="gptq")
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    plan = with_ends(Plan(gptq), qwen2.layers, end_spec("w4g32"), end_spec("w4g32"))
    assert plan.spec_for("lm_head").method == "gptq"             # the plan's method
    assert plan.spec_for("model.embed_tokens").method == "rtn"   # looked up: RTN
    assert method_notes(plan, qwen2.layers) == [
        "lm_head: GPTQ on the final hidden states",
        "embedding: RTN on GPTQ's grid: an embedding is looked up, not multiplied"]
    windows = text_windows(qwen2.tokenizer, None, 32, 16, seed=0)[0]
    variant = run(quantize_job(qwen2, plan, windows, "text", "gptq head"))
    head = next(e for e in variant.layer_errors if e["layer"] == "lm_head")
    assert head["method"] == "gptq" and "final hidden states" in head["note"]
    assert head["error"] < head["rtn_error"]

    # A tied pair: GPTQ on the head's inputs, the embedding reading the same codes.
    tied = with_ends(Plan(gptq), tiny_llama.layers, end_spec("w4g32"), None)
    assert tied.spec_for("lm_head").method == "gptq"
    [note] = method_notes(tied, tiny_llama.layers)
    assert note == ("lm_head + embedding (tied: one matrix): GPTQ on the final hidden states; "
                    "the embedding reads the same matrix (tied)")
    windows = text_windows(tiny_llama.tokenizer, None, 32, 16, seed=0)[0]
    variant = run(quantize_job(tiny_llama, tied, windows, "text", "gptq tied"))
    head = next(e for e in variant.layer_errors if e["layer"] == "lm_head")
    assert head["method"] == "gptq" and head["error"] < head["rtn_error"]
    assert variant.shared == {"model.embed_tokens": "lm_head"}
    smooth = QuantSpec(bits=8, group_size=-1, symmetric=True, method="smoothquant")
    sq = with_ends(Plan(smooth), qwen2.layers, end_spec("w8"), None)
    assert sq.spec_for("lm_head").method == "rtn"
    assert "learns from a whole block, and the head is outside" in method_notes(sq, qwen2.layers)[0]
