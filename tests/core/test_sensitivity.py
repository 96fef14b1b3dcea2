"""Sensitivity: the proxy sees planted outliers, the KL sweep equals a full re-run, results
belong to one model."""
import copy

import numpy as np
import pytest
import torch

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, run
from studio.core.layers import set_weight_matrix
from studio.core.models import open_model_job
from studio.core.plan import QuantSpec
from studio.core.quant.rtn import quantize_weight
from studio.core.sensitivity import SensitivityResult, sensitivity_job
from studio.core.text import text_windows


@pytest.fixture(scope="module")
def windows(tiny_llama):
    return text_windows(tiny_llama.tokenizer, None, 32, 8, seed=0)[0]


@pytest.fixture(scope="module")
def llama_result(tiny_llama, windows):
    return run(sensitivity_job(tiny_llama, windows, bits=(2, 4, 8), group_size=32, kl_windows=4))


def double_kl(base_logits, logits):
    base = torch.log_softmax(base_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return (base.exp() * (base - other)).sum(-1).mean().item()


def test_shapes_and_monotone_in_bits(llama_result, tiny_llama):
    r = llama_result
    assert r.layers == [i.name for i in tiny_llama.quantizable]
    assert r.proxy_error.shape == r.kl.shape == r.ppl.shape == (len(r.layers), 3)
    # More bits never hurt more, for the proxy and (nearly always) for KL.
    assert np.all(np.diff(r.proxy_error, axis=1) < 0)
    assert np.all(r.kl[:, 0] > r.kl[:, 2])
    assert np.all(r.sqnr_db[:, 2] > r.sqnr_db[:, 0])


def test_kl_sweep_equals_running_the_whole_model(llama_result, tiny_llama, windows):
    """Re-running only blocks i..end must give what quantizing the layer in the model gives."""
    r = llama_result
    ids = windows[:4]
    with torch.no_grad():
        base = tiny_llama.model(input_ids=ids, use_cache=False).logits
    for row in (0, len(r.layers) - 1):
        name = r.layers[row]
        model = copy.deepcopy(tiny_llama.model)
        module = model.get_submodule(name)
        spec = r.spec(2)
        set_weight_matrix(module, quantize_weight(module.weight.data, spec).dequantize())
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        assert r.kl[row, 0] == pytest.approx(double_kl(base, logits), rel=1e-3)


def test_user_model_untouched_even_when_cancelled(tiny_llama, windows):
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p)
        if p.message.startswith("KL") and p.done >= 3:
            token.cancel()

    with pytest.raises(Cancelled):
        run(sensitivity_job(tiny_llama, windows, bits=(2, 3), group_size=32, kl_windows=2),
            progress, token)
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

    clean = run(sensitivity_job(tiny_llama, windows, bits=(3, 4), group_size=32, kl_windows=0))
    dirty = run(sensitivity_job(planted, windows, bits=(3, 4), group_size=32, kl_windows=0))
    row = dirty.layers.index(down)
    assert dirty.proxy_error[row, 0] > 3 * clean.proxy_error[row, 0]
    assert int(np.argmax(dirty.proxy_error[:, 0])) == row
    assert int(np.argmax(dirty.proxy_error[:, 1])) == row
    assert clean.proxy_error[:, 0].argmax() != row  # it was not the worst before planting
    assert dirty.kl is None  # proxy only


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
    assert back.identity == llama_result.identity
    back.check_model(tiny_llama)
    path.write_text('{"format": "something else"}')
    with pytest.raises(StudioError, match="does not hold sensitivity"):
        SensitivityResult.load(path)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_kl_sweep_runs_on_other_architectures(tiny_dirs, arch):
    handle = run(open_model_job(tiny_dirs[arch]))
    ids = text_windows(handle.tokenizer, None, 16, 2, seed=1)[0]
    result = run(sensitivity_job(handle, ids, bits=(2, 8), group_size=32, kl_windows=2))
    assert np.all(result.kl[:, 0] > result.kl[:, 1])
    assert np.all(np.isfinite(result.ppl))


def test_bad_input_is_refused(tiny_llama, windows):
    with pytest.raises(StudioError, match="Bits must be"):
        run(sensitivity_job(tiny_llama, windows, bits=(1, 4)))
    with pytest.raises(StudioError, match="KL sweep wants 20 windows"):
        run(sensitivity_job(tiny_llama, windows, kl_windows=20))
    assert QuantSpec(bits=4).method == "rtn"
