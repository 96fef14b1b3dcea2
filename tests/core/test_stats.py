"""Weight statistics and outlier detection on tensors with known answers."""
import numpy as np
import pytest
import torch

from studio.core.errors import StudioError
from studio.core.jobs import run
from studio.core.layers import LayerInfo
from studio.core.outliers import outlier_channels, smoothing_preview, weight_columns
from studio.core.stats import block_max, histogram, layer_weight_stats, weight_stats_job


def _info(shape, name="x.0.q_proj"):
    return LayerInfo(name=name, block=0, role="q", kind="linear", shape=shape,
                     params=shape[0] * shape[1], dtype="float32", bytes=0, quantizable=True)


def test_gaussian_kurtosis_is_three_and_std_is_known():
    w = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0)) * 0.02
    stats = layer_weight_stats(w, _info((1000, 1000)))
    assert stats.kurtosis == pytest.approx(3.0, abs=0.05)
    assert stats.std == pytest.approx(0.02, rel=0.01)
    # max/median of |N(0,1)| over 1e6 samples: max ~ 4.9, median 0.674
    assert 6.0 < stats.max_median < 8.5


def test_laplace_tails_are_heavier():
    w = torch.distributions.Laplace(0.0, 1.0).sample((500, 1000))
    stats = layer_weight_stats(w, _info((500, 1000)))
    assert stats.kurtosis == pytest.approx(6.0, rel=0.1)


def test_planted_outlier_column_is_found_at_its_index():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=g)
    w[:, 137] *= 40.0
    stats = layer_weight_stats(w, _info((256, 512)))
    assert int(np.argmax(stats.col_absmax)) == 137
    assert stats.col_ratio > 20
    np.testing.assert_allclose(stats.row_absmax, w.abs().amax(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.col_absmax, w.abs().amax(0).numpy(), rtol=1e-6)
    assert outlier_channels(stats.col_absmax, 10.0).tolist() == [137]


def test_outlier_channels_are_sorted_largest_first_and_k_must_be_positive():
    absmax = np.ones(64, np.float32)
    absmax[[5, 40, 9]] = [30.0, 80.0, 2.0]
    assert outlier_channels(absmax, 10).tolist() == [40, 5]
    assert outlier_channels(absmax, 1.5).tolist() == [40, 5, 9]
    for bad in (0, -1, float("nan")):
        with pytest.raises(StudioError, match="positive"):
            outlier_channels(absmax, bad)


def test_histogram_counts_every_value_symmetric_bins():
    values = torch.tensor([-2.0, -1.0, 0.0, 0.5, 2.0])
    edges, counts = histogram(values, bins=4)
    np.testing.assert_allclose(edges, [-2, -1, 0, 1, 2])
    assert counts.tolist() == [1, 1, 2, 1]  # 2.0 (the max) lands in the last bin
    assert counts.dtype == np.float32 and counts.sum() == values.numel()


def test_block_max_keeps_a_single_spike_visible():
    a = np.zeros((2000, 600), np.float32)
    a[1003, 301] = 7.0
    heat, (rb, cb) = block_max(a)
    assert heat.shape[0] <= 256 and heat.shape[1] <= 256
    assert heat.max() == 7.0
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert r * rb <= 1003 < (r + 1) * rb and c * cb <= 301 < (c + 1) * cb
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(block_max(small)[0], small)  # small matrices are kept as they are


def test_weight_stats_job_covers_the_model(tiny_llama):
    progress = []
    stats = run(weight_stats_job(tiny_llama), progress.append)
    names = [info.name for info in tiny_llama.quantizable]
    assert [s.name for s in stats.quantizable] == names
    assert len(progress) >= len(names)
    kinds = {s.kind for s in stats.layers.values() if not s.quantizable}
    assert {"embedding", "lm_head"} <= kinds
    lm_head = stats.layers[tiny_llama.layers[-1].name]
    assert lm_head.tied_to == "model.embed_tokens"  # tied: shares the embedding's numbers
    first = names[0]
    w = tiny_llama.weight(first)
    np.testing.assert_allclose(stats.layers[first].col_absmax, w.abs().amax(0).numpy())
    assert stats.layers[first].hist_counts.sum() == w.numel()
    assert stats.column("kurtosis").shape == (len(names),)
    ranked = stats.ranked("kurtosis")
    assert ranked[0].kurtosis == max(s.kurtosis for s in stats.quantizable)


def test_smoothing_preview_keeps_the_product_and_balances_at_half():
    act = np.array([1.0, 50.0, 2.0, 0.5], np.float32)
    wcol = np.array([0.2, 0.1, 0.4, 0.3], np.float32)
    preview = smoothing_preview(act, wcol, 0.5)
    np.testing.assert_allclose(preview.act_after * preview.weight_after, act * wcol, rtol=1e-5)
    np.testing.assert_allclose(preview.act_after, preview.weight_after, rtol=1e-5)
    ranges = preview.ranges()
    assert ranges["act_after"] < ranges["act_before"]
    # alpha 0 pushes everything into the activations: every weight column ends at 1
    np.testing.assert_allclose(smoothing_preview(act, wcol, 0.0).weight_after, 1.0, rtol=1e-5)
    with pytest.raises(StudioError):
        smoothing_preview(act, wcol[:3], 0.5)


def test_weight_columns_take_the_max_over_layers_that_share_an_input(tiny_llama):
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    expected = torch.stack([tiny_llama.weight(n).abs().amax(0) for n in names]).amax(0)
    np.testing.assert_allclose(weight_columns(tiny_llama, names), expected.numpy())


def test_cancelled_weight_stats_return_nothing(tiny_llama):
    from studio.core.errors import Cancelled
    from studio.core.jobs import CancelToken

    token = CancelToken()
    seen = []

    def on_progress(p):
        seen.append(p)
        if len(seen) == 3:
            token.cancel()
    with pytest.raises(Cancelled):
        run(weight_stats_job(tiny_llama), on_progress, token)
    assert len(seen) == 3
