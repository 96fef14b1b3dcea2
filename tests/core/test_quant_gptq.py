import pytest
import torch

from studio.core.plan import QuantSpec
from studio.core.quant.gptq import (HessianAccumulator, gptq_quantize, gptq_quantize_layers,
                                     relative_output_error)
from studio.core.quant.grid import compute_qparams
from studio.core.quant.rtn import quantize_weight


def _data(seed=0, cols=96, rows=48, tokens=1024):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.3
    x = torch.randn(tokens, cols, generator=gen) @ mix + torch.randn(tokens, cols, generator=gen)
    x[:, :3] *= 8  # a few loud input channels, as in real activations
    w = torch.randn(rows, cols, generator=gen)
    acc = HessianAccumulator(cols)
    for chunk in x.split(100):
        acc.add(chunk[None])
    return x, w, acc.hessian()


@pytest.mark.parametrize("cols", [96, 800])  # one strip of the upper triangle; several
def test_hessian_is_two_over_n_xtx_and_error_matches_direct(cols):
    x, w, h = _data(cols=cols)
    assert torch.allclose(h, h.T)
    assert torch.allclose(h, 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-3)
    q = quantize_weight(w, QuantSpec(3, 32, False, "rtn")).dequantize()
    direct = ((x @ q.T - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert abs(relative_output_error(w, q, h) - direct) < 1e-3 * direct


def test_gptq_beats_rtn_on_the_same_data():
    x, w, h = _data()
    for spec in (QuantSpec(3, 32, False, "gptq"), QuantSpec(4, -1, True, "gptq"),
                 QuantSpec(3, 32, False, "gptq", {"act_order": True}),
                 QuantSpec(3, 64, False, "gptq", {"block_size": 32})):
        qt, note = gptq_quantize(w, h, spec)
        rtn = quantize_weight(w, spec.with_(method="rtn", options={}))
        assert note == ""
        assert qt.codes.shape == w.shape and int(qt.codes.max()) < 2 ** spec.bits
        assert relative_output_error(w, qt.dequantize(), h) < \
            0.9 * relative_output_error(w, rtn.dequantize(), h)


def test_ragged_groups_and_dead_columns():
    x, w, h = _data(cols=80)           # 80 = 1.25 x 64
    h[5, :] = 0
    h[:, 5] = 0                          # an input that never fires
    qt, _ = gptq_quantize(w, h, QuantSpec(4, 64, False, "gptq"))
    assert qt.scale.shape == (48, 2)
    assert torch.all(qt.dequantize()[:, 5] == 0)


def test_indefinite_hessian_is_damped_never_a_crash():
    _, w, _ = _data()
    bad = -torch.eye(96)                  # not positive definite at any small damping
    qt, note = gptq_quantize(w, bad, QuantSpec(4, 32, False, "gptq"))
    assert note and qt.codes.shape == w.shape
    rank_deficient = torch.zeros(96, 96)
    rank_deficient[:4, :4] = 1.0          # singular, but damping makes it positive definite
    qt, note = gptq_quantize(w, rank_deficient, QuantSpec(4, 32, False, "gptq"))
    assert qt.codes.shape == w.shape


def test_stacked_layers_sharing_a_hessian_match_one_at_a_time():
    x, w, h = _data(rows=48)
    _, w2, _ = _data(seed=1, rows=24)
    spec = QuantSpec(3, 32, False, "gptq")
    other = QuantSpec(4, 32, True, "gptq")
    together = gptq_quantize_layers([w, w2, w2], h, [spec, spec, other])
    alone = [gptq_quantize(m, h, s)[0] for m, s in ((w, spec), (w2, spec), (w2, other))]
    for (qt, _), ref in zip(together, alone):
        assert qt.codes.shape == ref.codes.shape
        assert torch.allclose(qt.scale, ref.scale) and torch.allclose(qt.zero, ref.zero)
        # Same arithmetic per row; only the batched update's summation order may differ.
        assert (qt.codes != ref.codes).float().mean() < 1e-3


def _reference_gptq(w, h, bits, group, damp=0.01):
    """The paper's loop, column by column with no batching at all (dynamic groups, natural
    order): what the fast loop must reproduce."""
    w = w.clone()
    cols = w.shape[1]
    H = h.clone()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    for i in range(cols):
        if i % group == 0:
            scale, zero = compute_qparams(w[:, i: i + group], bits, group, False)
        codes[:, i] = torch.clamp(torch.round(w[:, i] / scale[:, 0]) + zero[:, 0], 0,
                                  2 ** bits - 1)
        q[:, i] = scale[:, 0] * (codes[:, i] - zero[:, 0])
        e = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= e[:, None] * hinv[i, i:][None, :]
    return codes, q


@pytest.mark.parametrize("cols, group", [(96, 32), (300, 64)])  # 300: blocks and ragged groups
def test_fast_column_loop_matches_the_plain_algorithm(cols, group):
    x, w, h = _data(cols=cols)
    spec = QuantSpec(3, group, False, "gptq", {"act_order": False})
    qt, _ = gptq_quantize(w, h, spec)
    codes, plain = _reference_gptq(w, h, 3, group)
    fast = qt.dequantize()
    # Same arithmetic up to summation order in the batched updates: a rare code may flip at a
    # rounding tie; the layer's output error is the same.
    assert (qt.codes.float() != codes).float().mean() < 2e-3
    assert torch.allclose(fast, plain, atol=1e-5) or (fast != plain).float().mean() < 2e-3
    assert relative_output_error(w, fast, h) == pytest.approx(relative_output_error(w, plain, h),
                                                              rel=1e-3)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    from studio.core.quant.gptq import _inverse_cholesky

    _, _, h = _data(cols=200)
    u, note = _inverse_cholesky(h.double(), 0.01)
    damped = h.double() + 0.01 * torch.mean(torch.diag(h.double())) * torch.eye(200).double()
    assert note == "" and torch.equal(u, torch.triu(u)) and bool((torch.diag(u) > 0).all())
    assert torch.allclose(u.T @ u @ damped, torch.eye(200).double(), atol=1e-8)
