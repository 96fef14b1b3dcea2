"""Evaluation and calibration windows start with BOS exactly when the model's tokenizer asks."""
import math
import shutil

import pytest
import torch

from studio.core.errors import StudioError
from studio.core.evaluate import evaluate_job, prepare_windows
from studio.core.jobs import run
from studio.core.models import demo_gguf_path, demo_available, follow_gguf_bos, gguf_flag
from studio.core.models import open_model_job
from studio.core.text import bos_token, model_adds_bos, text_windows, tokenize, load_text

SEQLEN, WINDOWS = 32, 3


@pytest.fixture(scope="module")
def bos_llama(tiny_dirs, tmp_path_factory):
    """The tiny Llama with a tokenizer that puts <s> in front of every text (as Llama-2's)."""
    folder = tmp_path_factory.mktemp("bos") / "llama"
    shutil.copytree(tiny_dirs["llama"], folder)
    handle = run(open_model_job(tiny_dirs["llama"]))
    handle.tokenizer.add_bos_token = True
    handle.tokenizer.save_pretrained(folder)
    return run(open_model_job(folder))


def test_the_tokenizer_decides(tiny_llama, bos_llama):
    assert not model_adds_bos(tiny_llama.tokenizer)
    assert model_adds_bos(bos_llama.tokenizer)
    assert bos_token(tiny_llama.tokenizer, "auto") is None
    assert bos_token(bos_llama.tokenizer, "auto") == bos_llama.tokenizer.bos_token_id == 1
    # overridden both ways
    assert bos_token(tiny_llama.tokenizer, "yes") == 1
    assert bos_token(bos_llama.tokenizer, "no") is None
    with pytest.raises(StudioError, match="one of auto, yes, no"):
        bos_token(bos_llama.tokenizer, "maybe")


def test_windows_follow_llama_cpp(tiny_llama, bos_llama):
    """Each window's first position becomes BOS; the predicted tokens stay the same."""
    plain, label = prepare_windows(tiny_llama.tokenizer, None, SEQLEN, WINDOWS)
    with_bos, bos_label = prepare_windows(bos_llama.tokenizer, None, SEQLEN, WINDOWS)
    assert "BOS" not in label and bos_label.endswith("BOS <s> per window")
    assert (with_bos[:, 0] == 1).all() and not (plain[:, 0] == 1).any()
    assert torch.equal(with_bos[:, 1:], plain[:, 1:])
    no, _ = prepare_windows(bos_llama.tokenizer, None, SEQLEN, WINDOWS, bos="no")
    assert torch.equal(no, plain)
    calib, calib_label = text_windows(bos_llama.tokenizer, None, SEQLEN, 4, seed=3)
    calib_plain, _ = text_windows(bos_llama.tokenizer, None, SEQLEN, 4, seed=3, bos="no")
    assert (calib[:, 0] == 1).all() and torch.equal(calib[:, 1:], calib_plain[:, 1:])
    assert "BOS <s>" in calib_label


def direct_ppl(model, tokenizer, bos: int | None) -> float:
    """The standard protocol by hand: windows cut from the token stream, the first token of
    each replaced by BOS when asked, log-softmax of each position scoring the next token."""
    ids = torch.tensor(tokenizer(load_text(None)[0], add_special_tokens=False)["input_ids"])
    windows = ids[: WINDOWS * SEQLEN].reshape(WINDOWS, SEQLEN).clone()
    if bos is not None:
        windows[:, 0] = bos
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
            for t in range(1, SEQLEN):
                total -= logp[t - 1, row[t]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("setting", ["auto", "yes", "no"])
def test_evaluation_equals_a_direct_computation(bos_llama, setting):
    result = run(evaluate_job(bos_llama.model, None, bos_llama.tokenizer, None, SEQLEN, WINDOWS,
                              bos=setting))
    bos = None if setting == "no" else 1
    assert result.bos == (None if bos is None else "<s>") and result.bos_setting == setting
    assert result.protocol["bos"] == result.bos
    assert result.to_dict()["bos"] == result.bos
    assert result.tokens == WINDOWS * (SEQLEN - 1)
    assert result.ppl == pytest.approx(direct_ppl(bos_llama.model, bos_llama.tokenizer, bos),
                                       rel=1e-5)


def test_bos_changes_the_figure(bos_llama):
    """Guards the test above: on this model the two protocols do give different figures."""
    with_bos = run(evaluate_job(bos_llama.model, None, bos_llama.tokenizer, None, SEQLEN, 2))
    without = run(evaluate_job(bos_llama.model, None, bos_llama.tokenizer, None, SEQLEN, 2,
                               bos="no"))
    assert with_bos.ppl != pytest.approx(without.ppl, rel=1e-6)


@pytest.mark.skipif(not demo_available(), reason="demo model not installed")
def test_the_demo_gguf_asks_for_no_bos(tiny_llama, bos_llama):
    """The demo's GGUF says add_bos_token=false: a tokenizer that would add BOS is made to follow
    the file (what open_model_job does for every GGUF), so the demo's figures do not move."""
    path = demo_gguf_path()
    assert gguf_flag(path, "tokenizer.ggml.add_bos_token") is False
    assert gguf_flag(path, "no.such.key") is None
    tokenizer = bos_llama.tokenizer
    try:
        notes = follow_gguf_bos(tokenizer, path)
        assert notes and "add_bos_token=false" in notes[0]
        assert not model_adds_bos(tokenizer)
        assert follow_gguf_bos(tokenizer, path) == []  # already agrees: nothing to say
    finally:
        tokenizer.add_bos_token = True


def test_calibration_in_a_variant_records_bos(bos_llama):
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_text_job

    plan = Plan(QuantSpec(4, 32, method="gptq"))
    variant = run(quantize_text_job(bos_llama, plan, None, 16, SEQLEN, 0, "v"))
    assert variant.calibration.endswith("BOS <s> per window")
    tokens = tokenize(bos_llama.tokenizer, "x y")
    assert tokens[0] != 1  # the text itself is tokenized without specials


def test_cli_flags(tiny_dirs, capsys, tmp_path):
    import json

    from studio.cli import main

    args = ["eval", str(tiny_dirs["llama"]), "--seqlen", "32", "--windows", "2", "--json"]
    assert main(args) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["bos"] is None and auto["bos_setting"] == "auto"
    assert main(args + ["--bos", "yes"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["bos"] == "<s>" and forced["text"].endswith("BOS <s> per window")
    assert forced["tokens"] == auto["tokens"] and forced["ppl"] != auto["ppl"]
    out = tmp_path / "variant"
    assert main(["quantize", str(tiny_dirs["llama"]), "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--windows", "16", "--seqlen", "32", "--bos", "yes",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["source"].endswith(
        "BOS <s> per window")
