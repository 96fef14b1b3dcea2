"""Compare rows: the baseline always first, ratios against it only on the same windows, and the
quick evaluation / Run all jobs the window and `compression-studio compare` share."""
import json

import pytest

from studio.cli import main
from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from studio.core.runs import (BASELINE, compare_rows, describe_baseline, describe_variant,
                              layer_errors, quick_eval_job, run_all_job,
                              worst_layers)


@pytest.fixture(scope="module")
def variant(tiny_llama):
    return run(quantize_job(tiny_llama, Plan(QuantSpec(3, 32)), None, None, "w3"))


def test_the_baseline_is_a_row_before_anything_ran(tiny_llama):
    rows = compare_rows([], tiny_llama)
    assert [r["variant"] for r in rows] == [BASELINE]
    assert rows[0]["size_ratio"] == 1.0


def test_ratios_only_on_the_same_windows(tiny_llama, variant):
    protocol = {"text": "t", "seqlen": 64, "windows": 8, "bos": None}
    base = {**describe_baseline(tiny_llama), "kind": "eval", "ppl": 20.0, "protocol": protocol}
    same = {**describe_variant(variant), "kind": "eval", "ppl": 25.0, "protocol": protocol}
    rows = compare_rows([same, base], tiny_llama)
    assert [r["variant"] for r in rows] == [BASELINE, "w3"]     # the baseline first, always
    assert rows[1]["ppl_ratio"] == pytest.approx(1.25)
    assert rows[1]["size_ratio"] == pytest.approx(variant.size_bytes / 2**20 / base["size_mb"])
    other = {**same, "protocol": {**protocol, "windows": 40}}
    row = compare_rows([base, other], tiny_llama)[1]
    assert "ppl_ratio" not in row and "other windows" in row["note"]


def test_quick_eval_and_run_all_measure_variant_and_baseline(tiny_llama, variant):
    runs = run(quick_eval_job(variant, tiny_llama, windows=2, seqlen=32))
    assert [(r["variant"], r["kind"]) for r in runs] == [(BASELINE, "eval"), ("w3", "eval")]
    assert runs[1]["kl"] > 0 and runs[0]["windows"] == runs[1]["windows"] == 2
    rows = compare_rows(runs, tiny_llama)
    assert rows[1]["ppl_ratio"] == pytest.approx(runs[1]["ppl"] / runs[0]["ppl"])
    everything = run(run_all_job(variant, tiny_llama, windows=2, seqlen=32, prompt_tokens=8,
                                 new_tokens=2, threads=1))
    kinds = {(r["variant"], r["kind"]) for r in everything}
    assert kinds == {(BASELINE, "eval"), ("w3", "eval"), (BASELINE, "bench"), ("w3", "bench")}
    rows = compare_rows(everything, tiny_llama)
    assert rows[1]["speed_ratio"] > 0
    names, errors, _ = layer_errors(variant, tiny_llama)
    worst = worst_layers(names, errors, 3)
    assert len(worst) == 3 and worst[0][1] >= worst[1][1] >= worst[2][1]
    assert worst[0][1] == errors.max()


def test_compare_command(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", str(tiny_dirs["llama"]), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), "--windows", "2", "--seqlen", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in data["rows"]] == [BASELINE, "RTN W4 g32, lm_head W8 ch sym"]
    assert data["rows"][1]["ppl_ratio"] > 0
    assert main(["compare", str(tmp_path)]) == 2        # not a variant folder
