import pytest
import torch

from studio.core.plan import QuantSpec
from studio.core.quant.grid import effective_group_size, expand_groups
from studio.core.quant.rtn import quantize_weight


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 200, generator=gen)
    w[3, 17] = 9.0          # an outlier
    w[5, :] = 0.0           # an empty row
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [-1, 32, 64, 128])   # 200 = 1.5625 x 128: ragged last group
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_within_half_a_step(bits, group, symmetric):
    w = _weights()
    qt = quantize_weight(w, QuantSpec(bits, group, symmetric, "rtn"))
    gs = effective_group_size(group, w.shape[1])
    step = expand_groups(qt.scale, gs, w.shape[1])
    err = (qt.dequantize() - w).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 2 ** bits - 1
    assert qt.scale.shape == (24, -(-200 // gs))


def test_mse_clip_never_worse_than_min_max():
    w = _weights(1)
    for spec in (QuantSpec(3, 64, False, "rtn"), QuantSpec(4, -1, True, "rtn")):
        plain = quantize_weight(w, spec).dequantize()
        clipped = quantize_weight(w, spec.with_(options={"mse_clip": True})).dequantize()
        # The search minimises |err|^2.4 per group, with 1.0 among the candidates.
        per = lambda q: (q - w).abs().pow(2.4).sum()  # noqa: E731
        assert per(clipped) <= per(plain) + 1e-6
        assert per(clipped) < per(plain)   # the outlier makes clipping worth it somewhere


@pytest.mark.parametrize("group", [-1, 64, 128])   # 200 columns: ragged at 64 and 128
def test_rows_taken_in_chunks_give_the_same_grid_and_codes(group, monkeypatch):
    """Large matrices (an lm_head) are rounded a few thousand rows at a time to bound the
    temporaries: the result must be the one of a single pass."""
    from studio.core.quant import grid

    w = _weights()
    spec = QuantSpec(3, group, False, "rtn")
    whole = quantize_weight(w, spec)
    monkeypatch.setattr(grid, "ROW_CHUNK", 5)         # 24 rows: chunks of 5 and a last of 4
    chunked = quantize_weight(w, spec)
    assert torch.equal(chunked.codes, whole.codes)
    assert torch.equal(chunked.scale, whole.scale) and torch.equal(chunked.zero, whole.zero)


def test_values_without_packing_equal_the_packed_round_trip():
    # what the sensitivity sweep measures must be exactly what a variant would hold
    from studio.core.quant.rtn import quantized_values

    torch.manual_seed(0)
    w = torch.randn(33, 200) * 0.1          # a ragged last group at every group size
    for bits in (2, 3, 4, 5, 6, 8):
        for group_size in (32, 128, -1):
            for options in ({}, {"mse_clip": True}):
                spec = QuantSpec(bits, group_size, False, options=options)
                assert torch.equal(quantized_values(w, spec),
                                   quantize_weight(w, spec).dequantize())
