"""Low-bit CPU kernels give the de-quantized float result; misfits fall back visibly."""
import copy

import pytest
import torch
from torch import nn

from studio.core import q4_native
from studio.core.kernels import PREFILL_DTYPE, Int4Linear, Int8Linear, kernel_for, kernel_model
from studio.core.plan import QuantSpec
from studio.core.q4_native import NativeLinear
from studio.core.quant.grid import quantize_rtn


def layer(out, cols, bias=False, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(cols, out, bias=bias)
    linear.weight.data.normal_(0, 0.05)
    if bias:
        linear.bias.data.normal_(0, 0.1)
    return linear


needs_native = pytest.mark.skipif(bool(q4_native.unavailable()),
                                  reason=f"native kernel: {q4_native.unavailable()}")


def check_kernel_matches_float(linear, spec, kind, group=None, kernels="torch"):
    """The kernel's product against the de-quantized float one: torch's kernels see bf16
    inputs (the expected side rounds x the same way); the native one quantizes x to int8 per
    32 values, an error the 1e-2 bound covers (measured ~5e-3)."""
    q = quantize_rtn(linear.weight.data, spec)
    kernel, choice = kernel_for("x", linear, q, kernels)
    assert isinstance(kernel, kind), choice
    if group is not None and spec.bits <= 4:
        name = "q4native" if kind is NativeLinear else "int4pack"
        assert choice.kernel == f"{name} g{group}"
    x = torch.randn(5, 3, linear.in_features)
    rounded = x if kind is NativeLinear else x.to(torch.bfloat16).float()
    expected = rounded @ q.dequantize().t()
    if linear.bias is not None:
        expected = expected + linear.bias
    got = kernel(x).float()
    assert got.shape == expected.shape
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-2, (spec, rel.item())
    return choice


@pytest.mark.parametrize("spec, cols, group", [
    (QuantSpec(bits=4, group_size=32), 128, 32),
    (QuantSpec(bits=4, group_size=64, symmetric=True), 128, 64),
    (QuantSpec(bits=4, group_size=128), 192, 64),     # ragged g128 over 192 runs as g64
    (QuantSpec(bits=4, group_size=-1), 96, 32),       # per-channel rows as g32 blocks
    (QuantSpec(bits=3, group_size=32), 128, 32),      # 3-bit codes held in 4 bits
    (QuantSpec(bits=2, group_size=64), 128, 64),
])
def test_int4_kernel_matches_dequantized(spec, cols, group):
    choice = check_kernel_matches_float(layer(48, cols, bias=True), spec, Int4Linear, group)
    assert not choice.fallback


@needs_native
@pytest.mark.parametrize("spec, cols, group", [
    (QuantSpec(bits=4, group_size=32), 128, 32),
    (QuantSpec(bits=4, group_size=64, symmetric=True), 128, 64),
    (QuantSpec(bits=4, group_size=128), 192, 64),     # ragged g128 over 192 runs as g64
    (QuantSpec(bits=4, group_size=-1), 96, 96),       # per-channel rows: one group per row
    (QuantSpec(bits=3, group_size=32), 128, 32),      # 3-bit codes held in 4 bits
    (QuantSpec(bits=2, group_size=64), 128, 64),
])
def test_native_int4_kernel_matches_dequantized(spec, cols, group):
    choice = check_kernel_matches_float(layer(48, cols, bias=True), spec, NativeLinear,
                                        group, kernels="native")
    assert not choice.fallback


@needs_native
def test_native_prefill_is_the_dequantized_product():
    """Many rows go through one de-quantized GEMM: the float product, but for the fp16
    rounding of scales and mins (relative 5e-4 at most per weight), and where the CPU
    multiplies bf16 in hardware (PREFILL_DTYPE) the bf16 rounding of weights and inputs
    (2^-9 each: 2.9e-3 measured on an AVX512-BF16 machine)."""
    linear = layer(64, 128, bias=True)
    q = quantize_rtn(linear.weight.data, QuantSpec(bits=4, group_size=32))
    kernel, _ = kernel_for("x", linear, q, "native")
    x = torch.randn(1, 40, 128)
    expected = x @ q.dequantize().t() + linear.bias
    assert kernel.prefill_rows <= 40
    bound = 1e-3 if PREFILL_DTYPE == torch.float32 else 1e-2
    assert ((kernel(x) - expected).norm() / expected.norm()).item() < bound


def test_without_the_native_kernel_layers_stay_on_torch_and_say_why(monkeypatch):
    monkeypatch.setattr(q4_native, "unavailable", lambda: "no C compiler on this machine")
    linear = layer(48, 128)
    kernel, choice = kernel_for("x", linear, quantize_rtn(linear.weight.data,
                                                          QuantSpec(bits=4, group_size=32)))
    assert isinstance(kernel, Int4Linear) and not choice.fallback
    assert "not native: no C compiler" in choice.note


def test_the_portable_c_path_matches_the_avx2_one(tmp_path):
    """The library built without AVX2 (the path for CPUs without it) gives the same products."""
    if q4_native.compiler() is None:
        pytest.skip("no C compiler")
    portable = q4_native.build(q4_native.compiler(), tmp_path, ("-march=x86-64",))
    linear = layer(40, 192)
    q = quantize_rtn(linear.weight.data, QuantSpec(bits=4, group_size=64))
    tensors, group, _ = q4_native.pack(q)
    for x in (torch.randn(1, 192), torch.randn(7, 192)):   # one row, and tiles of rows
        fast = q4_native.matmul(tensors, group, x, None)
        slow = q4_native.matmul(tensors, group, x, None,
                                library=q4_native.open_library(portable))
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert not q4_native.open_library(portable).q4_has_avx2()


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32),
                                  QuantSpec(bits=4, group_size=64),
                                  QuantSpec(bits=4, group_size=-1),
                                  QuantSpec(bits=8, group_size=-1)])
def test_a_short_prompts_rows_each_get_their_own_product(spec):
    """Up to 31 rows run in tiles (two weight rows by up to four inputs, the weights read once
    for all of them): every row equals its own one-row product, for row counts that leave
    every remainder, over an odd number of outputs."""
    linear = layer(37, 192, bias=True)
    tensors, group, _ = q4_native.pack(quantize_rtn(linear.weight.data, spec))
    x = torch.randn(11, 192)
    one_by_one = torch.cat([q4_native.matmul(tensors, group, x[i:i + 1], linear.bias.data)
                            for i in range(11)])
    for rows in (2, 3, 4, 5, 11):
        together = q4_native.matmul(tensors, group, x[:rows], linear.bias.data)
        assert torch.allclose(together, one_by_one[:rows], rtol=1e-5, atol=1e-5), rows


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, group_size=-1, symmetric=True),
                                  QuantSpec(bits=8, group_size=-1),
                                  QuantSpec(bits=4, group_size=32),
                                  QuantSpec(bits=4, group_size=64),
                                  QuantSpec(bits=4, group_size=-1)])
@pytest.mark.parametrize("bias", [False, True])
def test_short_rows_one_input_equals_the_tiled_product(spec, bias):
    """Rows of at most 128 code bytes (a 262k-token head 128 wide) run eight at a time for one
    input; 45 outputs leave five over. Each output equals the tiled path's (another loop over
    the same codes) and the de-quantized float product within the int8 rounding of x."""
    linear = layer(45, 128, bias=bias)
    q = quantize_rtn(linear.weight.data, spec)
    tensors, group, _ = q4_native.pack(q)
    b = linear.bias.data if bias else None
    x = torch.randn(2, 128)
    one = q4_native.matmul(tensors, group, x[:1], b)
    tiled = q4_native.matmul(tensors, group, x, b)[:1]
    assert torch.allclose(one, tiled, rtol=1e-5, atol=1e-5)
    expected = x[:1] @ q.dequantize().t() + (0 if b is None else b)
    assert ((one - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, group_size=-1, symmetric=True),
                                  QuantSpec(bits=8, group_size=-1),      # asymmetric zeros
                                  QuantSpec(bits=6, group_size=-1)])
def test_int8_kernel_matches_dequantized(spec):
    choice = check_kernel_matches_float(layer(40, 96), spec, Int8Linear)
    assert choice.kernel == "int8pack" and not choice.fallback


@needs_native
@pytest.mark.parametrize("spec, cols, group", [
    (QuantSpec(bits=8, group_size=-1, symmetric=True), 96, 96),
    (QuantSpec(bits=8, group_size=-1), 96, 96),           # asymmetric zeros
    (QuantSpec(bits=6, group_size=32), 128, 32),           # 6-bit codes held in 8 bits
    (QuantSpec(bits=5, group_size=128), 192, 64),          # ragged g128 over 192 runs as g64
])
def test_native_8bit_layout_matches_dequantized(spec, cols, group):
    """Codes of 5-8 bits, in groups too (torch's int8 kernel takes per-channel only)."""
    choice = check_kernel_matches_float(layer(40, cols, bias=True), spec, NativeLinear, group,
                                        kernels="native")
    assert choice.kernel == f"q8native g{group}" and not choice.fallback


@pytest.mark.parametrize("spec, cols, why", [
    (QuantSpec(bits=8, group_size=32), 128, "one scale per output channel"),
    (QuantSpec(bits=4, group_size=32), 48, "no int4 kernel group"),
])
def test_misfits_fall_back_with_a_reason(spec, cols, why):
    linear = layer(16, cols)
    kernel, choice = kernel_for("x", linear, quantize_rtn(linear.weight.data, spec), "torch")
    assert kernel is None
    assert choice.fallback and choice.kernel == "fp32 dense" and why in choice.note


def test_native_misfits_say_why_and_take_torchs_kernel():
    linear = layer(16, 48)     # 48 columns: no multiple of 32 divides them
    kernel, choice = kernel_for("x", linear, quantize_rtn(linear.weight.data,
                                                          QuantSpec(bits=8, group_size=-1)))
    assert isinstance(kernel, Int8Linear)
    assert "not native" in choice.note or q4_native.unavailable()


@pytest.mark.parametrize("int4", [
    "torch", pytest.param("native", marks=needs_native)])
def test_kernel_model_logits_match_dequantized_float_path(tiny_llama, int4):
    native = int4 == "native"
    base = tiny_llama.model
    names = [info.name for info in tiny_llama.quantizable] + ["lm_head"]
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=8, group_size=-1)):
        qtensors = {n: quantize_rtn(base.get_submodule(n).weight.data, spec) for n in names}
        dequantized = copy.deepcopy(base)
        dequantized.lm_head.weight = nn.Parameter(base.lm_head.weight.clone(),
                                                  requires_grad=False)  # untie before writing
        for n, q in qtensors.items():
            dequantized.get_submodule(n).weight.data.copy_(q.dequantize())
        fast, choices = kernel_model(dequantized, qtensors, kernels=int4)
        kernels = {c.kernel for c in choices if c.layer in qtensors}
        if native:   # 8-bit per-channel rows: one group per row, as wide as each layer's input
            assert {k.split(" g")[0] for k in kernels} == {f"q{spec.bits}native"}
        else:
            assert kernels == ({"int4pack g32"} if spec.bits == 4 else {"int8pack"})
        assert not any(c.fallback for c in choices)
        ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = dequantized(ids).logits
            got = fast(ids).logits.float()
        rel = ((got - expected).norm() / expected.norm()).item()
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        assert rel < 0.03, (spec, rel)
        assert agree > 0.9, (spec, agree)
        assert isinstance(fast.lm_head, (Int4Linear, Int8Linear, NativeLinear))
        # The embedding the head was tied to still looks tokens up in float32.
        assert fast.get_input_embeddings().weight.dtype == torch.float32

