"""Evaluation: the standard perplexity protocol, KL / top-1 against a baseline, generations."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from studio.core.errors import StudioError
from studio.core.evaluate import (evaluate_job, evaluate_many_job, generations_job, perplexity,
                                  prepare_windows)
from studio.core.jobs import run
from studio.core.plan import QuantSpec
from studio.core.quant.grid import fake_quant
from studio.core.text import builtin_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A slice of the built-in text: tokenizing all of it three times per test is slow."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(builtin_text()[:20_000], encoding="utf-8")
    return path


def direct_perplexity(model, tokenizer, text, seqlen, count):
    """The protocol written out by hand: tokenize once, stride = seqlen, mean CE, exp."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    losses = []
    for w in range(min(count, len(ids) // seqlen)):
        window = torch.tensor([ids[w * seqlen:(w + 1) * seqlen]])
        with torch.no_grad():
            logits = model(window).logits[0]
        losses.append(F.cross_entropy(logits[:-1], window[0, 1:], reduction="none"))
    return math.exp(torch.cat(losses).double().mean().item()), sum(x.numel() for x in losses)


def test_perplexity_matches_direct_computation(tiny_llama, text_file):
    seqlen, count = 32, 3
    expected, tokens = direct_perplexity(tiny_llama.model, tiny_llama.tokenizer,
                                         text_file.read_text(encoding="utf-8"), seqlen, count)
    windows, label = prepare_windows(tiny_llama.tokenizer, text_file, seqlen, count)
    assert label == "eval.txt"
    ppl, n = perplexity(tiny_llama.model, windows, batch_size=2)
    assert n == tokens == count * (seqlen - 1)
    assert ppl == pytest.approx(expected, rel=1e-5)
    result = run(evaluate_job(tiny_llama.model, None, tiny_llama.tokenizer, text_file, seqlen,
                              count))
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.kl is None and result.top1 is None
    assert result.windows == count and result.tokens == tokens


def test_baseline_against_itself_has_zero_kl_and_full_agreement(tiny_llama):
    twin = copy.deepcopy(tiny_llama.model)
    # The built-in text by default (None).
    result = run(evaluate_job(twin, tiny_llama.model, tiny_llama.tokenizer, None, 24, 2))
    assert result.text.startswith("built-in")
    assert result.kl == 0.0
    assert result.top1 == 1.0
    assert result.ppl == pytest.approx(result.base_ppl, rel=1e-6)
    losses = result.token_losses
    assert len(losses.tokens) == len(losses.loss) == 24
    assert max(abs(x) for x in losses.increase) < 1e-5


def test_a_damaged_model_drifts_from_its_baseline(tiny_llama, text_file):
    damaged = copy.deepcopy(tiny_llama.model)
    for info in tiny_llama.quantizable:
        w = damaged.get_submodule(info.name).weight
        w.data = fake_quant(w.data, QuantSpec(bits=2, group_size=-1))
    result = run(evaluate_job(damaged, tiny_llama.model, tiny_llama.tokenizer, text_file, 24, 2))
    assert result.kl > 1e-4
    assert result.top1 < 1.0
    assert result.ppl != pytest.approx(result.base_ppl)
    assert any(abs(x) > 1e-3 for x in result.token_losses.increase)
    # Several models in one pass (the baseline run once per window) give the same figures.
    many = run(evaluate_many_job({"base": tiny_llama.model, "damaged": damaged},
                                 tiny_llama.model, tiny_llama.tokenizer, text_file, 24, 2))
    assert many["damaged"].kl == pytest.approx(result.kl, rel=1e-9)
    assert many["damaged"].ppl == pytest.approx(result.ppl, rel=1e-9)
    assert many["base"].kl == 0.0 and many["base"].top1 == 1.0


def test_text_shorter_than_one_window_is_a_clear_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    with pytest.raises(StudioError, match="fewer than one window"):
        run(evaluate_job(tiny_llama.model, None, tiny_llama.tokenizer, short, 512, 4))


def test_generations_side_by_side(tiny_llama):
    twin = copy.deepcopy(tiny_llama.model)
    texts = run(generations_job({"a": tiny_llama.model, "b": twin}, tiny_llama.tokenizer,
                                "def main", max_new_tokens=5))
    assert set(texts) == {"a", "b"}
    assert texts["a"] == texts["b"] and len(texts["a"]) > 0
    with pytest.raises(StudioError):
        run(generations_job({"a": twin}, tiny_llama.tokenizer, "   "))


# --- the command line ----------------------------------------------------------------------

def test_cli_eval_model_and_variant(tiny_dirs, tiny_llama, text_file, tmp_path, capsys):
    import json

    from studio.cli import main
    from studio.core.plan import Plan
    from studio.core.quantize import quantize_job
    from studio.core.variant import save_variant

    folder = str(tiny_dirs["llama"])
    text = ["--text", str(text_file)]
    assert main(["eval", folder, *text, "--seqlen", "32", "--windows", "2", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["windows"] == 2 and plain["tokens"] == 62 and "kl" not in plain

    variant = run(quantize_job(tiny_llama, Plan(default=QuantSpec(bits=4, group_size=32)),
                               None, None, "w4"))
    save_variant(variant, tmp_path / "w4")
    assert main(["eval", str(tmp_path / "w4"), *text, "--seqlen", "32", "--windows", "2",
                 "--prompt", "def f", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kl"] > 0 and 0 < data["top1"] <= 1
    assert data["base_ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert set(data["generations"]) == {"w4", "baseline"}

    assert main(["eval", folder, *text, "--seqlen", "32", "--windows", "1",
                 "--baseline", folder]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in out and "KL 0.00000" in out


def test_cli_eval_short_text_exits_2(tiny_dirs, tmp_path, capsys):
    from studio.cli import main

    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    assert main(["eval", str(tiny_dirs["llama"]), "--text", str(short)]) == 2
    assert "fewer than one window" in capsys.readouterr().err
