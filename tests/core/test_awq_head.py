"""AWQ on the output head: an untied lm_head's scales fold into what feeds it (the final norm,
or OPT's project_out) exactly before rounding, and lower its output error against RTN; a tied
head keeps RTN, and the plan says why."""
import copy

import pytest
import torch

from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, end_spec, with_ends
from studio.core.plan_ends import method_notes
from studio.core.quant.awq_head import awq_head, fold_into_feeder, head_feeder
from studio.core.quant.blocks import capture_block_inputs, decoder_blocks, run_block
from studio.core.quant.grid import quantize_rtn
from studio.core.quantize import head_rows

AWQ = QuantSpec(bits=4, group_size=32, method="awq")


def untied(model):
    """`model` with an lm_head of its own (a copy of the tied matrix)."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def final_states(model, ids):
    """The last block's outputs for `ids` (what the quantize job carries to the head)."""
    inputs = capture_block_inputs(model, ids)
    for block in decoder_blocks(model)[1]:
        inputs = inputs.with_hidden(run_block(block, inputs))
    return inputs.hidden


def salient(model) -> None:
    """Outlier channels in what feeds the head, as trained LLMs have (a few final-norm
    channels 30x), so the scale search has something to find."""
    weight = head_feeder(model).weight
    with torch.no_grad():
        weight.add_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        weight[..., [3, 17, 40]] *= 30


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "opt"])
def test_the_fold_leaves_the_float_logits_unchanged(family_dirs, arch):
    """Divide the final norm (Gemma's (1 + w) one; OPT's LayerNorm with a bias) by s and the
    head's columns by 1 / s: before rounding, every logit is what it was."""
    model = untied(run(open_model_job(family_dirs[arch])).model)
    salient(model)
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        head = model.get_output_embeddings()
        _, s = awq_head(head.weight, head_rows(model, final_states(model, ids)), AWQ)
        assert not torch.allclose(s, torch.ones_like(s)), "s = 1 proves nothing"
        norm_before = head_feeder(model).weight
        fold_into_feeder(model, s)
        head.weight.mul_(s)
        assert head_feeder(model).weight is not norm_before   # a new tensor, not written into
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_awq_lowers_the_heads_error_against_rtn(family_dirs):
    """On the head's own inputs, Q(W s) / s against W is closer than RTN(W) (both grids W4
    g32); and the search alone, without clipping, does too."""
    model = untied(run(open_model_job(family_dirs["qwen2"])).model)
    salient(model)
    ids = torch.randint(3, 300, (8, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = head_rows(model, final_states(model, ids))
        w = model.lm_head.weight.float()

        def error(w_q):
            return ((x @ (w_q - w).T).norm() / (x @ w.T).norm()).item()

        rtn = error(quantize_rtn(w, AWQ).dequantize())
        for options in ({}, {"clip": False}):
            qt, s = awq_head(w, x, AWQ.with_(options=options))
            assert error(qt.dequantize() / s) < 0.8 * rtn, options


def test_an_awq_plan_runs_awq_on_an_untied_head_and_rtn_on_a_tied_one(tiny_llama, tiny_dirs):
    """Through the quantize job: the untied head's note, its error below RTN's on the final
    hidden states, the folded final norm among the variant's changed floats and the variant's
    logits near the float model's; a tied head under AWQ keeps RTN, and the plan says why."""
    from studio.core.quantize import quantize_job
    from studio.core.text import text_windows

    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    salient(qwen2.model)
    plan = with_ends(Plan(AWQ), qwen2.layers, end_spec("w4g32"), None)
    assert plan.spec_for("lm_head").method == "awq"
    assert method_notes(plan, qwen2.layers) == [
        "lm_head: AWQ on the final hidden states, its scales folded into the final norm"]
    windows = text_windows(qwen2.tokenizer, None, 32, 16, seed=0)[0]
    variant = run(quantize_job(qwen2, plan, windows, "text", "awq head"))
    head = next(e for e in variant.layer_errors if e["layer"] == "lm_head")
    assert head["method"] == "awq" and "folded into the final norm" in head["note"]
    assert head["error"] < head["rtn_error"]
    assert "model.norm.weight" in variant.floats
    with torch.no_grad():
        own = qwen2.model(input_ids=windows[:2]).logits
        got = variant.model(input_ids=windows[:2]).logits
    assert ((got - own).norm() / own.norm()).item() < 0.2

    tied = with_ends(Plan(AWQ), tiny_llama.layers, end_spec("w4g32"), None)
    assert tied.spec_for("lm_head").method == "rtn"
    [note] = method_notes(tied, tiny_llama.layers)
    assert note.startswith("lm_head + embedding (tied: one matrix): RTN on AWQ's grid: AWQ's "
                           "scales would fold into the head's columns, which a tied head "
                           "shares with the embedding")
