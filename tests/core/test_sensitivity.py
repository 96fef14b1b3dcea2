"""Sensitivity: the proxy sees planted outliers, the KL sweep equals a full re-run, the KL of
unmeasured options is predicted from the proxy, results belong to one model."""
import copy
import json

import numpy as np
import pytest
import torch

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, run
from studio.core.layers import set_weight_matrix
from studio.core.models import open_model_job
from studio.core.plan import QuantSpec
from studio.core.quant.rtn import quantize_weight
from studio.core.sensitivity import (ModelIdentity, SensitivityResult, option_label,
                                     sensitivity_job, sweep_options)
from studio.core.text import text_windows


@pytest.fixture(scope="module")
def windows(tiny_llama):
    return text_windows(tiny_llama.tokenizer, None, 32, 8, seed=0)[0]


@pytest.fixture(scope="module")
def llama_result(tiny_llama, windows):
    """Options W2/W4/W8 at g64 and g32; end to end at W2 g32 and W8 g32."""
    return run(sensitivity_job(tiny_llama, windows, bits=(2, 4, 8), group_sizes=(32, 64),
                               kl_bits=(2, 8), kl_group=32, kl_windows=4))


def double_kl(base_logits, logits):
    base = torch.log_softmax(base_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return (base.exp() * (base - other)).sum(-1).mean().item()


def test_shapes_and_monotone_in_bits(llama_result, tiny_llama):
    r = llama_result
    # The block layers, then the tied lm_head + embedding as one unit (one matrix).
    assert r.layers == [i.name for i in tiny_llama.quantizable] + ["lm_head"]
    assert r.ends == [("lm_head", "model.embed_tokens")] and r.body_rows == len(r.layers) - 1
    assert r.shapes[-1] == tuple(tiny_llama.model.lm_head.weight.shape)
    assert r.labels == ["W2 g64", "W2 g32", "W4 g64", "W4 g32", "W8 g64", "W8 g32"]
    assert [r.labels[j] for j in r.kl_options] == ["W2 g32", "W8 g32"]
    assert r.proxy_error.shape == r.sqnr_db.shape == (len(r.layers), 6)
    assert r.kl.shape == r.ppl.shape == (len(r.layers), 2)
    # More bits never hurt more, for the proxy and (nearly always) for KL.
    for group in (0, 1):
        assert np.all(np.diff(r.proxy_error[:, group::2], axis=1) < 0)
    assert np.all(r.kl[:, 0] > r.kl[:, 1])
    assert np.all(r.sqnr_db[:, 5] > r.sqnr_db[:, 1])
    # Smaller groups fit better: g32 never worse than g64 at the same width.
    assert np.all(r.proxy_error[:, 1::2] <= r.proxy_error[:, 0::2] * (1 + 1e-6))


def test_kl_sweep_equals_running_the_whole_model(llama_result, tiny_llama, windows):
    """Re-running only blocks i..end must give what quantizing the layer in the model gives."""
    r = llama_result
    ids = windows[:4]
    with torch.no_grad():
        base = tiny_llama.model(input_ids=ids, use_cache=False).logits
    for row in (0, r.body_rows - 1, r.body_rows):
        name = r.layers[row]
        model = copy.deepcopy(tiny_llama.model)
        module = model.get_submodule(name)
        spec = r.options[r.kl_options[0]]
        assert option_label(spec) == "W2 g32"
        if name == "lm_head":   # the tied matrix, changed in place: both ends read it
            assert module.weight is model.model.embed_tokens.weight
            module.weight.data.copy_(quantize_weight(module.weight.data, spec).dequantize())
        else:
            set_weight_matrix(module, quantize_weight(module.weight.data, spec).dequantize())
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        assert r.kl[row, 0] == pytest.approx(double_kl(base, logits), rel=1e-3)
        assert r.loss("kl")[row, r.kl_options[0]] == r.kl[row, 0]


def test_user_model_untouched_even_when_cancelled(tiny_llama, windows):
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p)
        if p.message.startswith("KL") and p.done >= 3:
            token.cancel()

    with pytest.raises(Cancelled):
        run(sensitivity_job(tiny_llama, windows, bits=(2, 3), group_sizes=(32,), kl_bits=(2, 3),
                            kl_group=32, kl_windows=2), progress, token)
    assert any(p.message.startswith("KL") for p in seen)
    for name, param in tiny_llama.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_proxy_ranks_a_planted_outlier_layer_as_more_sensitive(tiny_llama, windows):
    """A weight-outlier column: down_proj's input column 5 is made 30x larger and the activation
    feeding it 30x smaller, so the model computes the same function, but every group holding
    column 5 now spans a 30x wider range and rounds its other weights far more coarsely."""
    planted = copy.deepcopy(tiny_llama)
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    planted.weight(up)[5, :] /= 30.0      # up_proj's row 5 feeds down_proj's input channel 5
    planted.weight(down)[:, 5] *= 30.0
    with torch.no_grad():
        same = planted.model(input_ids=windows[:2]).logits
        base = tiny_llama.model(input_ids=windows[:2]).logits
    torch.testing.assert_close(same, base, atol=1e-4, rtol=1e-4)

    clean = run(sensitivity_job(tiny_llama, windows, bits=(3, 4), group_sizes=(32,),
                                kl_windows=0))
    dirty = run(sensitivity_job(planted, windows, bits=(3, 4), group_sizes=(32,), kl_windows=0))
    row = dirty.layers.index(down)
    assert dirty.proxy_error[row, 0] > 3 * clean.proxy_error[row, 0]
    assert int(np.argmax(dirty.proxy_error[:, 0])) == row
    assert int(np.argmax(dirty.proxy_error[:, 1])) == row
    assert clean.proxy_error[:, 0].argmax() != row  # it was not the worst before planting
    assert dirty.kl is None and dirty.kl_options == []  # proxy only
    assert dirty.loss("auto") is dirty.proxy_error


def test_results_from_another_model_are_refused(llama_result, tiny_llama, tiny_dirs):
    llama_result.check_model(tiny_llama)  # its own model: fine
    planted = copy.deepcopy(tiny_llama)
    planted.weight(planted.quantizable[0].name).mul_(1.5)
    with pytest.raises(StudioError, match="different weights"):
        llama_result.check_model(planted)
    qwen = run(open_model_job(tiny_dirs["qwen2"]))
    with pytest.raises(StudioError, match="measured on a LlamaForCausalLM"):
        llama_result.check_model(qwen)


def test_round_trip_through_a_file(llama_result, tmp_path, tiny_llama):
    path = tmp_path / "sens.json"
    llama_result.save(path)
    back = SensitivityResult.load(path)
    np.testing.assert_allclose(back.kl, llama_result.kl)
    np.testing.assert_allclose(back.proxy_error, llama_result.proxy_error)
    np.testing.assert_allclose(back.loss("kl"), llama_result.loss("kl"))
    assert back.options == llama_result.options and back.kl_options == llama_result.kl_options
    assert back.identity == llama_result.identity
    back.check_model(tiny_llama)
    path.write_text('{"format": "something else"}')
    with pytest.raises(StudioError, match="does not hold sensitivity"):
        SensitivityResult.load(path)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_kl_sweep_runs_on_other_architectures(tiny_dirs, arch):
    handle = run(open_model_job(tiny_dirs[arch]))
    ids = text_windows(handle.tokenizer, None, 16, 2, seed=1)[0]
    result = run(sensitivity_job(handle, ids, bits=(2, 8), group_sizes=(32,), kl_bits=(2, 8),
                                 kl_group=32, kl_windows=2))
    assert np.all(result.kl[:, 0] > result.kl[:, 1])
    assert np.all(np.isfinite(result.ppl))


def test_bad_input_is_refused(tiny_llama, windows):
    with pytest.raises(StudioError, match="Bits must be"):
        run(sensitivity_job(tiny_llama, windows, bits=(1, 4)))
    with pytest.raises(StudioError, match="Group size must be"):
        run(sensitivity_job(tiny_llama, windows, group_sizes=(100,)))
    with pytest.raises(StudioError, match="KL sweep wants 20 windows"):
        run(sensitivity_job(tiny_llama, windows, kl_windows=20))
    assert QuantSpec(bits=4).method == "rtn"


def test_kl_options_must_be_among_the_options(tiny_llama, windows):
    """Refused before any work: not one Progress is reported."""
    seen = []
    cases = [dict(bits=(2, 3), group_sizes=(32,), kl_bits=(4,), kl_group=32),
             dict(bits=(2, 4), group_sizes=(32, 64), kl_bits=(4,)),   # kl_group 128 not offered
             dict(bits=(2, 4), group_sizes=(32,), kl_bits=(), kl_group=32)]
    for case in cases:
        with pytest.raises(StudioError, match="not among the options|at least one"):
            run(sensitivity_job(tiny_llama, windows, kl_windows=2, **case), seen.append)
    assert seen == []
    # Proxy only: the KL widths do not matter.
    run(sensitivity_job(tiny_llama, windows[:1], bits=(2,), group_sizes=(32,), kl_windows=0))


def test_default_options_are_every_width_at_every_group():
    options = sweep_options()
    assert len(options) == 6 * 3
    assert [option_label(o) for o in options[:3]] == ["W2 g128", "W2 g64", "W2 g32"]
    # Duplicates are dropped; per-channel sorts first (the cheapest grid of a width).
    labels = [option_label(o) for o in sweep_options((4, 4, 3), (128, -1, 128))]
    assert labels == ["W3 ch", "W3 g128", "W4 ch", "W4 g128"]


def synthetic(proxy, kl, kl_options, options=None) -> SensitivityResult:
    proxy = np.asarray(proxy, dtype=float)
    layers = [f"l{i}" for i in range(len(proxy))]
    options = options or [QuantSpec(bits=b) for b in (2, 3, 4, 8)]
    return SensitivityResult(
        identity=ModelIdentity("X", tuple(layers), "f"), layers=layers,
        shapes=[(8, 128)] * len(layers), options=options, method="rtn", proxy_error=proxy,
        sqnr_db=-10 * np.log10(np.maximum(proxy, 1e-30)), kl_options=kl_options,
        kl=None if kl is None else np.asarray(kl, dtype=float),
        ppl=None if kl is None else np.ones((len(proxy), len(kl_options))), base_ppl=1.0,
        text_label="t", seqlen=8, kl_windows=1, proxy_tokens=8, proxy_seconds=0.0,
        kl_seconds=0.0)


def test_predicted_kl_is_measured_where_measured_and_scales_with_the_proxy_elsewhere():
    # Options W2 W3 W4 W8 (g128); KL measured at W3 (column 1) and W8 (column 3).
    r = synthetic(proxy=[[0.1, 0.01, 0.004, 1e-5],
                         [0.5, 0.05, 0.01, 0.001],
                         [0.02, 0.0, 0.001, 0.0]],    # exact anchors: no ratio to take
                  kl=[[0.05, 1e-4], [0.2, 0.004], [0.003, 0.0]], kl_options=[1, 3])
    expected = [
        # W2: nearest anchor in log proxy is W3 -> 0.05 x 0.1 / 0.01; W4: W3 again (x2.5 away
        # against x400) -> 0.05 x 0.004 / 0.01.
        [0.5, 0.05, 0.02, 1e-4],
        # W4's proxy 0.01 is x5 from W3's, x10 from W8's: W3 -> 0.2 x 0.01 / 0.05.
        [2.0, 0.2, 0.04, 0.004],
        # The anchor's proxy is 0: its measured KL is used as is.
        [0.003, 0.003, 0.003, 0.0],
    ]
    np.testing.assert_allclose(r.loss("kl"), expected, rtol=1e-12)
    np.testing.assert_allclose(r.loss("auto"), expected, rtol=1e-12)
    assert r.loss("proxy") is r.proxy_error
    with pytest.raises(StudioError, match="Unknown loss"):
        r.loss("mse")
    with pytest.raises(StudioError, match="proxy-only"):
        synthetic(proxy=[[0.1, 0.01, 0.001, 0.0001]], kl=None, kl_options=[]).loss("kl")


def test_subset_keeps_the_measurements_of_the_options_left(llama_result):
    wanted = [QuantSpec(bits=8, group_size=32), QuantSpec(bits=2, group_size=32),
              QuantSpec(bits=4, group_size=64)]
    sub = llama_result.subset(wanted)
    assert sub.labels == ["W8 g32", "W2 g32", "W4 g64"]
    assert [sub.labels[j] for j in sub.kl_options] == ["W2 g32", "W8 g32"]
    np.testing.assert_array_equal(sub.kl, llama_result.kl)
    full = llama_result.loss("kl")
    cols = [llama_result.column(s) for s in wanted]
    np.testing.assert_allclose(sub.loss("kl"), full[:, cols])
    with pytest.raises(StudioError, match="did not measure W3 g32"):
        llama_result.subset([QuantSpec(bits=3, group_size=32)])


def test_version_1_files_are_refused(tmp_path, llama_result):
    old = llama_result.to_json()
    old.update(version=1, bits=[2, 4, 8], group_size=32, symmetric=False)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(StudioError, match="version 1.*run the sensitivity sweep again"):
        SensitivityResult.load(path)


def test_damaged_tables_are_refused(llama_result):
    import dataclasses

    with pytest.raises(StudioError, match="proxy table"):
        dataclasses.replace(llama_result, proxy_error=llama_result.proxy_error[:, :2])
    with pytest.raises(StudioError, match="kl table"):
        dataclasses.replace(llama_result, kl_options=[0])


def test_an_untied_model_has_its_head_and_embedding_measured_apart(tiny_dirs):
    """Each end's KL equals the model re-run with only that matrix quantized."""
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    ids = text_windows(qwen2.tokenizer, None, 16, 2, seed=0)[0]
    r = run(sensitivity_job(qwen2, ids, bits=(2,), group_sizes=(32,), kl_bits=(2,),
                            kl_group=32, kl_windows=2))
    assert r.ends == [("lm_head",), ("model.embed_tokens",)]
    assert r.layers[r.body_rows:] == ["lm_head", "model.embed_tokens"]
    with torch.no_grad():
        base = qwen2.model(input_ids=ids, use_cache=False).logits
    for row, name in ((r.body_rows, "lm_head"), (r.body_rows + 1, "model.embed_tokens")):
        model = copy.deepcopy(qwen2.model)
        weight = model.get_submodule(name).weight
        weight.data.copy_(quantize_weight(weight.data, r.options[0]).dequantize())
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        assert r.kl[row, 0] == pytest.approx(double_kl(base, logits), rel=1e-3)
        assert r.proxy_error[row, 0] > 0
