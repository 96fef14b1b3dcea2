import pytest
import torch

from studio.core.plan import QuantSpec
from studio.core.quant.gptq import HessianAccumulator, relative_output_error
from studio.core.quant.rtn import quantize_weight
from studio.core.quant.seqmse import (_dequantize_choice, _group_spans, _search_each_group,
                                      seqmse_quantize)


def _data(seed=0, cols=96, rows=48, tokens=1024):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.3
    x = torch.randn(tokens, cols, generator=gen) @ mix + torch.randn(tokens, cols, generator=gen)
    x[:, :3] *= 8  # a few loud input channels, as in real activations
    w = torch.randn(rows, cols, generator=gen)
    acc = HessianAccumulator(cols)
    acc.add(x[None])
    return x, w, acc.hessian()


@pytest.mark.parametrize("spec", [QuantSpec(4, -1, False, "seqmse"),
                                  QuantSpec(3, 64, True, "seqmse"),
                                  QuantSpec(4, 32, False, "seqmse", scale_dtype="fp16")])
def test_every_row_is_at_or_below_rtn_and_the_layer_well_below(spec):
    x, w, h = _data()
    q = seqmse_quantize(w, h, spec).dequantize()
    rtn = quantize_weight(w, spec.with_(method="rtn"), mse_clip=False).dequantize()
    per_row = lambda m: (((w - m) @ h) * (w - m)).sum(dim=1)  # noqa: E731
    assert torch.all(per_row(q) <= per_row(rtn) * (1 + 1e-5))
    assert relative_output_error(w, q, h) < 0.85 * relative_output_error(w, rtn, h)
    # ... and the error is the output error on the inputs themselves
    direct = ((x @ q.T - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert abs(relative_output_error(w, q, h) - direct) < 1e-3 * direct


def test_codes_are_the_affine_grid_with_a_searched_range():
    _, w, h = _data()
    spec = QuantSpec(4, 32, False, "seqmse")
    qt = seqmse_quantize(w, h, spec)
    assert qt.codes.shape == w.shape and int(qt.codes.max()) <= 15
    assert qt.scale.shape == (48, 3)
    rtn = quantize_weight(w, spec.with_(method="rtn"), mse_clip=False)
    assert torch.all(qt.scale <= rtn.scale * (1 + 1e-6))  # only ever clipped, never widened


def test_the_joint_sweep_never_loses_to_the_per_group_search():
    _, w, h = _data(cols=64, rows=24)
    spec = QuantSpec(3, 32, False, "seqmse")
    spans = _group_spans(64, 32)
    factors = [(i + 1) / 20 for i in range(20)]
    alone = _dequantize_choice(w, spec, spans, factors, _search_each_group(w, h, spec, spans,
                                                                           factors))
    assert relative_output_error(w, seqmse_quantize(w, h, spec).dequantize(), h) <= \
        relative_output_error(w, alone, h) * (1 + 1e-6)


def test_below_rtn_on_every_layer_of_a_tiny_model(tiny_llama):
    """Through the driver: each layer's Hessian from inputs of the already-quantized layers,
    its error and RTN's measured on those same inputs (Progress.detail / layer_errors)."""
    from studio.core.jobs import run
    from studio.core.plan import Plan
    from studio.core.quantize import quantize_job
    from studio.core.text import text_windows

    windows, label = text_windows(tiny_llama.tokenizer, None, 64, 8, seed=0)
    for spec in (QuantSpec(3, 32, False, "seqmse"),):
        variant = run(quantize_job(tiny_llama, Plan(spec), windows, label, spec.label))
        assert len(variant.layer_errors) == 14
        for entry in variant.layer_errors:
            assert entry["method"] == "seqmse"
            assert entry["error"] < entry["rtn_error"], entry
