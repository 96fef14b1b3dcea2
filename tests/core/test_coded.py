"""Quantized layers held as codes (CodedLinear) and the packed codes they keep."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.jobs import run
from studio.core.kernels import dense_layers
from studio.core.layers import is_linear, weight_matrix
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quant.coded import CodedLinear, coded_layer, expanded
from studio.core.quant.grid import quantize_rtn
from studio.core.quant.pack import packed_width
from studio.core.quantize import quantize_job
from studio.core.text import text_windows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qtensor_keeps_its_codes_packed_and_gives_them_back(bits):
    w = torch.randn(24, 100)
    qt = quantize_rtn(w, QuantSpec(bits, 32, False, "rtn"))
    assert qt.packed.dtype == torch.uint8
    assert qt.packed.shape == (24, packed_width(100, bits, torch.uint8))
    codes = qt.codes
    assert codes.dtype == torch.uint8 and codes.shape == (24, 100) and qt.numel() == 2400
    assert int(codes.max()) < 2 ** bits
    assert torch.equal(quantize_rtn(w, QuantSpec(bits, 32, False, "rtn")).codes, codes)


def test_coded_linear_computes_what_the_dense_layer_did():
    torch.manual_seed(0)
    dense = nn.Linear(100, 24)
    qt = quantize_rtn(dense.weight.data, QuantSpec(4, 32, False, "rtn"))
    coded = coded_layer(dense, qt)
    assert coded.bias is dense.bias and is_linear(coded)
    x = torch.randn(3, 5, 100)
    expected = F.linear(x, qt.dequantize(), dense.bias)
    assert torch.equal(coded(x), expected)
    assert torch.equal(weight_matrix(coded), qt.dequantize())
    with pytest.raises(TypeError):
        from studio.core.layers import set_weight_matrix
        set_weight_matrix(coded, qt.dequantize())


def test_conv1d_layers_become_coded_linears_with_the_same_output():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 100)          # weight [in, out]: y = x W + b
    qt = quantize_rtn(weight_matrix(conv), QuantSpec(4, 32, False, "rtn"))
    x = torch.randn(2, 100)
    deq = qt.dequantize()
    reference = x @ deq.T + conv.bias
    assert torch.allclose(coded_layer(conv, qt)(x), reference, atol=1e-5)


def test_expanded_holds_float_weights_only_while_someone_needs_them():
    layer = coded_layer(nn.Linear(64, 8), quantize_rtn(torch.randn(8, 64),
                                                       QuantSpec(4, 32, False, "rtn")))
    model = nn.Sequential(layer)
    assert layer._held is None
    with expanded(model):
        held = layer._held
        assert held is not None and layer.weight is held
        with expanded(model):                  # a second user (another job) shares it
            assert layer._held is held
        assert layer._held is held             # the first still runs
    assert layer._held is None
    with torch.inference_mode(), expanded(model):
        inside = layer(torch.randn(2, 64))
    assert inside.shape == (2, 8)              # made and used inside inference mode
    assert layer._held is None


def test_a_variant_runs_on_codes_exactly_like_its_dense_copy(tiny_dirs):
    """The variant's model (codes, de-quantized on use) and the same model with float copies of
    the de-quantized weights give bit-identical logits, expanded or not."""
    handle = run(open_model_job(tiny_dirs["llama"]))
    ids, label = text_windows(handle.tokenizer, None, 32, 8, 0)
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, False, "rtn")), ids, label, "v"))
    coded = [m for m in variant.model.modules() if isinstance(m, CodedLinear)]
    assert len(coded) == len(variant.qtensors) > 0
    dense = copy.deepcopy(variant.model)
    dense_layers(dense)
    assert not any(isinstance(m, CodedLinear) for m in dense.modules())
    with torch.no_grad():
        reference = dense(ids[:2]).logits
        on_use = variant.model(ids[:2]).logits
        with expanded(variant.model):
            held = variant.model(ids[:2]).logits
    assert torch.equal(on_use, reference) and torch.equal(held, reference)
