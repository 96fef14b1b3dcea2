"""What a user reads about any model: the embedding's share and a tied lm_head (inspect), variant
names from their plan, and sweeps that need no logits never computing them."""
import json

import pytest
import torch

from studio.cli import main
from studio.core.allocate import plan_size, plan_title
from studio.core.jobs import run
from studio.core.layers import embedding_summary
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.sensitivity import sensitivity_job
from studio.core.text import text_windows


def test_embedding_share_and_tied_head(tiny_llama, tiny_dirs):
    tied = embedding_summary(tiny_llama.layers, tiny_llama.param_count)
    embed = tiny_llama.model.get_input_embeddings().weight
    assert tied["lm_head_tied"] and tied["embedding"] == "model.embed_tokens"
    assert tied["params"] == embed.numel() and tied["vocab"] == embed.shape[0]
    assert tied["share"] == pytest.approx(embed.numel() / tiny_llama.param_count)
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))  # tie_word_embeddings=False
    untied = embedding_summary(qwen2.layers, qwen2.param_count)
    assert not untied["lm_head_tied"] and untied["lm_head"] == "lm_head"


def test_plain_inspect_says_the_head_is_tied(tiny_dirs, capsys):
    assert main(["inspect", str(tiny_dirs["llama"])]) == 0
    out = capsys.readouterr().out
    assert "embedding model.embed_tokens: 384 tokens" in out
    assert "% of the model; the lm_head is tied to it" in out
    assert "text windows start with no BOS" in out
    assert main(["inspect", str(tiny_dirs["qwen2"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["embedding"]["lm_head_tied"] is False and data["bos"] is None


def test_variant_names_come_from_the_plan(tiny_llama):
    uniform = Plan(QuantSpec(4, 128, method="rtn"))
    assert plan_title(tiny_llama, uniform) == "RTN W4 g128"
    mixed = uniform.with_rule(Rule(r".*down_proj", QuantSpec(8, 32, method="gptq"), True))
    title = plan_title(tiny_llama, mixed)
    assert title == f"mixed {plan_size(tiny_llama, mixed).bits_per_weight:.2f} bpw, GPTQ+RTN"
    assert title != plan_title(tiny_llama, uniform)
    same_bits = uniform.with_rule(Rule(r".*down_proj", None, True))  # kept in 16 bits
    assert plan_title(tiny_llama, same_bits).startswith("mixed ")
    assert plan_title(tiny_llama, same_bits).endswith(" bpw, RTN")


def test_proxy_sweep_never_computes_logits(tiny_llama):
    head = tiny_llama.model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda *args: calls.append(1))
    try:
        windows = text_windows(tiny_llama.tokenizer, None, 32, 4, seed=0)[0]
        result = run(sensitivity_job(tiny_llama, windows, bits=(4,), group_sizes=(32,),
                                     kl_windows=0))
        assert result.kl is None and calls == []
        # the hook does see a forward that needs logits: the check above can fail
        with torch.no_grad():
            tiny_llama.model(input_ids=windows[:1])
        assert calls == [1]
    finally:
        hook.remove()


def test_size_breakdown_adds_up(tiny_llama):
    from studio.core.quantize import quantize_job

    variant = run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, method="rtn")), None, None, "v"))
    parts = variant.size_breakdown
    assert sum(parts.values()) == variant.size_bytes
    embed = tiny_llama.model.get_input_embeddings().weight
    assert parts["embedding"] == 2 * embed.numel()  # tied: the lm_head is the same tensor, once
    assert parts["quantized"] > 0 and parts["float"] > 0
    assert variant.to_summary()["size_breakdown"] == parts
