"""The memory guard before every kind of job: a refusal names both numbers and the largest
settings that fit, and those settings are then accepted (issue 16)."""
from __future__ import annotations

import re

import pytest

from studio.core import memory
from studio.core.activations import activation_capture_job
from studio.core.bench import base_targets, bench_job
from studio.core.errors import NotEnoughMemory
from studio.core.jobs import run
from studio.core.sensitivity import sensitivity_job
from studio.core.text import text_windows

SEQLEN = 32


def _free_between(handle, kind, name, low, high, **settings) -> int:
    """Memory that fits `name`=low but not `name`=high."""
    small = memory.estimate_job(handle, kind, **{**settings, name: low}).added
    large = memory.estimate_job(handle, kind, **{**settings, name: high}).added
    assert small < large, "the estimate must grow with the setting for this test to mean much"
    return (small + large) // 2


def _offered(text: str, label: str) -> int:
    found = re.search(rf"at most (\d+) {label}", text)
    assert found, text
    return int(found.group(1))


def test_capture_is_refused_with_the_windows_that_fit_and_then_runs(tiny_llama, monkeypatch):
    free = _free_between(tiny_llama, "capture", "windows", 4, 64, seqlen=SEQLEN)
    monkeypatch.setattr(memory, "available", lambda: free)
    with pytest.raises(NotEnoughMemory) as info:
        run(activation_capture_job(tiny_llama, None, windows=64, seqlen=SEQLEN))
    text = str(info.value)
    assert "Activation capture needs about" in text and "available" in text
    fit = _offered(text, "windows")
    # the largest that fits: one more window would not
    assert memory.estimate_job(tiny_llama, "capture", windows=fit, seqlen=SEQLEN).added <= free
    assert memory.estimate_job(tiny_llama, "capture", windows=fit + 1,
                               seqlen=SEQLEN).added > free
    result = run(activation_capture_job(tiny_llama, None, windows=fit, seqlen=SEQLEN))
    assert result.windows == fit


def test_sensitivity_is_refused_naming_kl_windows_and_the_proxy_only_sweep(tiny_llama,
                                                                          monkeypatch):
    windows = text_windows(tiny_llama.tokenizer, None, SEQLEN, 64, seed=0)[0]
    free = _free_between(tiny_llama, "sensitivity", "windows", 2, 64, seqlen=SEQLEN,
                         proxy_windows=8, proxy_tokens=64)
    monkeypatch.setattr(memory, "available", lambda: free)
    with pytest.raises(NotEnoughMemory) as info:
        run(sensitivity_job(tiny_llama, windows, bits=(4,), group_sizes=(32,), kl_bits=(4,),
                            kl_group=32, kl_windows=64, proxy_tokens=64))
    text = str(info.value)
    assert "proxy-only" in text
    fit = _offered(text, "KL windows")
    assert 2 <= fit < 64
    result = run(sensitivity_job(tiny_llama, windows, bits=(4,), group_sizes=(32,),
                                 kl_bits=(4,), kl_group=32, kl_windows=fit, proxy_tokens=64))
    assert result.kl_windows == fit


def test_a_benchmark_that_does_not_fit_is_refused_before_building(tiny_llama, monkeypatch):
    built = []
    targets = base_targets(tiny_llama.model, ("fp32", "int4"))
    for target in targets:
        target.build = lambda: built.append(1)   # must never be called
    monkeypatch.setattr(memory, "available", lambda: 1000)
    with pytest.raises(NotEnoughMemory, match="float32 copy.*llama.cpp backend"):
        run(bench_job(targets, 100, prompt_tokens=8, new_tokens=4, repeat=1))
    assert not built


def test_the_benchmark_estimate_counts_a_copy_of_the_largest_target(tiny_llama):
    targets = base_targets(tiny_llama.model, ("fp32", "bf16"))
    estimate = memory.estimate_bench(targets, 192)
    params = sum(p.numel() for p in tiny_llama.model.parameters())
    assert estimate.parts["the target's float32 copy"] == 4 * params
    assert memory.estimate_bench([], 192).added == 0   # llama.cpp targets: their own process


def test_evaluation_offers_fewer_windows_per_pass(tiny_llama, monkeypatch):
    free = _free_between(tiny_llama.model, "eval", "windows", 1, 8, seqlen=SEQLEN)
    with pytest.raises(NotEnoughMemory) as info:
        memory.guard_job(tiny_llama.model, "eval", free=free, windows=8, seqlen=SEQLEN)
    assert 1 <= _offered(str(info.value), "windows per forward pass") < 8


def test_rtn_with_error_windows_counts_what_its_error_figures_keep(tiny_llama):
    """RTN measures each layer's output error on a few windows: the block's weights before
    rounding, the statistics of each input and one layer's error terms stay beside the
    block (24% under the measured peak on the 3B without them)."""
    from studio.core.quantize import quantize_job, ERROR_WINDOWS
    from studio.core.plan import Plan, QuantSpec
    from studio.core.text import builtin_text, calibration_windows, tokenize

    shape = memory.model_shape(tiny_llama.model)
    with_errors = memory.estimate_job(tiny_llama, "quantize", method="rtn", windows=ERROR_WINDOWS,
                                      seqlen=SEQLEN)
    without = memory.estimate_job(tiny_llama, "quantize", method="rtn", windows=0, seqlen=SEQLEN)
    gptq = memory.estimate_job(tiny_llama, "quantize", method="gptq", windows=ERROR_WINDOWS,
                               seqlen=SEQLEN)
    kept = with_errors.parts["weights before rounding (error figures)"]
    assert kept == 4 * shape["block_params"]
    assert with_errors.parts["input statistics (error figures)"] == 4 * (
        3 * shape["hidden"] ** 2 + shape["intermediate"] ** 2)
    assert not any("error figures" in part for part in [*without.parts, *gptq.parts])
    # and the job it describes does keep them: its error figures are there
    ids = tokenize(tiny_llama.tokenizer, builtin_text()[:20_000])
    windows = calibration_windows(ids, SEQLEN, ERROR_WINDOWS, seed=0)
    variant = run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, False, "rtn")), windows,
                               "text", "rtn"))
    assert all(e["error"] is not None for e in variant.layer_errors if e["block"] is not None)
