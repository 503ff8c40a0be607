"""Batched similarities against slow per-image references (numpy, scipy, scikit-image)."""

import numpy as np
import pytest
import torch

from saliencylab import ConfigError
from saliencylab.metrics import similarity as sim


def slow_rank(v):
    """Average ranks with ties, one image at a time, in numpy."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def slow_spearman(a, b):
    return np.corrcoef(slow_rank(a), slow_rank(b))[0, 1]


def tied_maps(seed=0, shape=(4, 9, 7)):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-3, 4, shape, generator=g).float()      # many ties
    b = a + torch.randint(-2, 3, shape, generator=g).float()
    return a, b


def test_rank_by_hand():
    r = sim.rank(torch.tensor([[3.0, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]]))
    assert torch.equal(r, torch.tensor([[3.5, 1.0, 3.5, 2.0], [2.5, 2.5, 2.5, 2.5]], dtype=r.dtype))


def test_spearman_matches_slow_reference_with_ties():
    a, b = tied_maps()
    got = sim.spearman(a, b)
    want = [slow_spearman(a[i].flatten().numpy(), b[i].flatten().numpy()) for i in range(len(a))]
    assert got.shape == (4,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor(want), atol=1e-6)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = tied_maps(1, (3, 16, 16))
    a[1] = torch.randn(16, 16)                                 # one image without ties
    got = sim.spearman(a, b)
    want = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(3)]
    assert torch.allclose(got.double(), torch.tensor(want), atol=1e-6)
    got_abs = sim.spearman_abs(a, b)
    want_abs = [stats.spearmanr(a[i].abs().flatten().numpy(), b[i].abs().flatten().numpy())[0] for i in range(3)]
    assert torch.allclose(got_abs.double(), torch.tensor(want_abs), atol=1e-6)


def test_rank_correlation_edge_cases():
    a = torch.randn(2, 5, 5)
    assert torch.allclose(sim.spearman(a, a), torch.ones(2))
    assert torch.allclose(sim.spearman(a, -a), -torch.ones(2))
    assert torch.allclose(sim.spearman(a, a.exp()), torch.ones(2))           # monotone transform
    constant = torch.zeros(2, 5, 5)
    assert torch.equal(sim.spearman(a, constant), torch.zeros(2))            # undefined -> 0
    assert torch.equal(sim.pearson(constant, constant), torch.zeros(2))


def test_gaussian_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(2, 13, 9, dtype=torch.float64)
    got = sim.gaussian_filter(x, 1.5)
    for i in range(2):
        want = ndimage.gaussian_filter(x[i].numpy(), 1.5, truncate=3.5, mode="reflect")
        assert np.allclose(got[i].numpy(), want, atol=1e-12)
    small = torch.randn(1, 3, 4, dtype=torch.float64)                       # smaller than the radius
    want = ndimage.gaussian_filter(small[0].numpy(), 1.5, truncate=3.5, mode="reflect")
    assert np.allclose(sim.gaussian_filter(small, 1.5)[0].numpy(), want, atol=1e-12)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    a = torch.randn(3, 24, 20)
    b = a + 0.8 * torch.randn(3, 24, 20)
    b[2] = torch.rand(24, 20) * 5 - 1                          # unrelated, other range
    got = sim.ssim(a, b)
    an, bn = sim.minmax(a.double()), sim.minmax(b.double())
    for i in range(3):
        want = metrics.structural_similarity(an[i].numpy(), bn[i].numpy(), gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0)
        assert abs(float(got[i]) - want) < 1e-5


def test_ssim_properties():
    a = torch.randn(2, 16, 16)
    assert torch.allclose(sim.ssim(a, a), torch.ones(2))
    assert torch.allclose(sim.ssim(a, 3 * a + 1), torch.ones(2), atol=1e-6)  # min-max normalized first
    assert (sim.ssim(a, torch.randn(2, 16, 16)) < 0.5).all()
    assert sim.ssim(torch.randn(2, 6, 6), torch.randn(2, 6, 6)).shape == (2,)  # smaller than the window


def test_hog_similarity():
    torch.manual_seed(0)
    a = torch.randn(3, 32, 32)
    assert torch.allclose(sim.hog(a, a), torch.ones(3), atol=1e-6)
    assert torch.allclose(sim.hog(a, 2 * a + 5), torch.ones(3), atol=1e-5)
    assert (sim.hog(a, torch.randn(3, 32, 32)).abs() < 0.5).all()
    # a vertical edge and a horizontal edge have different orientation histograms
    v = torch.zeros(1, 16, 16)
    v[:, :, 8:] = 1
    assert float(sim.hog(v, v.transpose(1, 2))) < 0.5
    f = sim.hog_features(a, cell=8, bins=9, block=2)
    assert f.shape == (3, 9 * 4 * 9)                           # 4x4 cells -> 3x3 blocks of 2x2 cells


def test_get_similarity():
    assert sim.get_similarity("ssim") is sim.ssim
    fn = lambda a, b: a.flatten(1).sum(1)  # noqa: E731
    assert sim.get_similarity(fn) is fn
    with pytest.raises(ConfigError, match="unknown similarity"):
        sim.get_similarity("cosine")
