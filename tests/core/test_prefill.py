"""Prefill on the dense path: a quantized layer called with many token rows de-quantizes its
kernel's own packed weights once and runs a dense GEMM. Tolerances: the de-quantized weights
equal the kernel's formula to float32 rounding, so a layer's prefill output equals x @ W
to float32 rounding (1e-5 relative); against the kernel's own path (bf16 activations) and
through a whole model, 1e-2 relative on the logits."""
import copy

import pytest
import torch
from torch import nn

from studio.core import kernels, q4_native
from studio.core.kernels import Int4Linear, Int8Linear, kernel_for, kernel_model
from studio.core.plan import QuantSpec
from studio.core.quant.grid import quantize_rtn


def linear(out, cols, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(cols, out, bias=True)
    layer.weight.data.normal_(0, 0.05)
    return layer


def kernel_formula(kernel: Int4Linear, q) -> torch.Tensor:
    """W [out, in] as the int4 kernel computes it: (code - 8) * scale + zero, bf16 parameters."""
    scale = kernel.scales_zeros[..., 0].float().t()   # [out, kernel groups]
    zero = kernel.scales_zeros[..., 1].float().t()
    codes = q.codes.float()
    if q.bits <= 3:
        codes = codes - q.zero.repeat_interleave(q.group_size, 1)[:, :codes.shape[1]] + 8
    expand = lambda t: t.repeat_interleave(kernel.group, dim=1)   # noqa: E731
    return (codes - 8) * expand(scale) + expand(zero)


@pytest.mark.skipif(kernels.int4_block_n() is None, reason="unknown int4 packing here")
@pytest.mark.parametrize("spec, out, cols", [
    (QuantSpec(bits=4, group_size=32), 64, 128),
    (QuantSpec(bits=4, group_size=128), 128, 192),     # ragged g128 as g64 blocks
    (QuantSpec(bits=3, group_size=64, symmetric=True), 128, 128),
])
def test_int4_prefill_is_the_kernels_weights_in_one_dense_gemm(spec, out, cols):
    layer = linear(out, cols)
    q = quantize_rtn(layer.weight.data, spec)
    kernel, _ = kernel_for("x", layer, q, "torch")
    assert isinstance(kernel, Int4Linear) and kernel.prefill_rows == kernels.PREFILL_ROWS
    formula = kernel_formula(kernel, q)
    assert torch.allclose(kernel.dequantized(torch.float32).t(), formula, rtol=0,
                          atol=1e-6 * formula.abs().max().item())
    x = torch.randn(2, kernels.PREFILL_ROWS // 2 + 1, cols)
    got = kernel(x)
    if kernels.PREFILL_DTYPE == torch.float32:
        expected = x @ kernel_formula(kernel, q).t() + layer.bias
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    kernel.prefill_rows = None                      # the low-bit kernel on the same rows
    on_kernel = kernel(x)
    assert ((got - on_kernel).norm() / on_kernel.norm()).item() < 1e-2


def test_int8_prefill_matches_its_kernel():
    layer = linear(40, 96)
    q = quantize_rtn(layer.weight.data, QuantSpec(bits=8, group_size=-1))
    kernel, _ = kernel_for("x", layer, q, "torch")
    assert isinstance(kernel, Int8Linear)
    x = torch.randn(kernels.PREFILL_ROWS, 96)
    got = kernel(x)
    kernel.prefill_rows = None
    on_kernel = kernel(x)
    assert ((got - on_kernel).norm() / on_kernel.norm()).item() < 1e-2


def test_decode_rows_stay_on_the_kernel(monkeypatch):
    layer = linear(64, 128)
    kernel, _ = kernel_for("x", layer, quantize_rtn(layer.weight.data, QuantSpec(4, 32)),
                           "torch")
    calls = []
    real = Int4Linear.dequantized
    monkeypatch.setattr(Int4Linear, "dequantized", lambda self, *a: calls.append(1) or real(self))
    kernel(torch.randn(1, 1, 128))
    assert calls == []
    kernel(torch.randn(1, kernels.PREFILL_ROWS, 128))
    assert calls == [1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_logits_equal_the_kernel_path_and_the_reference(tiny_dirs, arch):
    from studio.core.jobs import run
    from studio.core.lean_decoder import LeanDecoder
    from studio.core.models import open_model_job

    handle = run(open_model_job(tiny_dirs[arch]))
    base = handle.model
    names = [info.name for info in handle.quantizable]
    qtensors = {n: quantize_rtn(base.get_submodule(n).weight.data, QuantSpec(4, 32))
                for n in names}
    reference = copy.deepcopy(base)
    for n, q in qtensors.items():
        reference.get_submodule(n).weight.data.copy_(q.dequantize())
    dense, choices = kernel_model(reference, qtensors)
    on_kernel, _ = kernel_model(reference, qtensors, prefill="kernel")
    assert any("dense GEMM" in c.note for c in choices)
    ids = torch.randint(3, 384, (1, kernels.PREFILL_ROWS + 8),
                        generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = reference(ids).logits[0, -1]
        got = LeanDecoder(dense, ids.shape[1]).forward(ids, 0)[0]
        kernel_got = LeanDecoder(on_kernel, ids.shape[1]).forward(ids, 0)[0]
    for other in (want, kernel_got):
        assert ((got - other).norm() / other.norm()).item() < 1e-2
    assert got.argmax() == want.argmax()


@pytest.mark.skipif(bool(q4_native.unavailable()), reason="no native kernel here")
def test_native_decode_rows_stay_on_the_native_kernel(monkeypatch):
    layer = linear(64, 128)
    kernel, _ = kernel_for("x", layer, quantize_rtn(layer.weight.data, QuantSpec(4, 32)))
    calls = []
    real = q4_native.dequantize
    monkeypatch.setattr(q4_native, "dequantize", lambda *a: calls.append(1) or real(*a))
    one = kernel(torch.randn(1, 1, 128))
    assert calls == []
    many = kernel(torch.randn(1, kernels.PREFILL_ROWS, 128))
    assert calls == [1] and one.shape == (1, 1, 64) and many.shape == (1, kernels.PREFILL_ROWS, 64)
