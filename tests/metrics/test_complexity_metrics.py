"""Sparseness (Gini) and complexity (entropy): hand-computed cases and a Quantus-formula port."""

import math

import numpy as np
import pytest
import torch

import saliencylab as sl
from saliencylab import metrics


def score(name, maps, **params):
    x = torch.zeros(maps.shape[0], 1, *maps.shape[-2:])
    return sl.evaluate(None, x, maps, name, **params)


def quantus_gini(a):
    """Quantus Sparseness.evaluate_instance after abs and normalise_by_max."""
    a = np.abs(a).astype(np.float64).flatten()
    a = a / np.abs(a).max() if np.abs(a).max() > 0 else a
    a = np.sort(a + 1e-7)
    n = a.shape[0]
    return np.sum((2 * np.arange(1, n + 1) - n - 1) * a) / (n * np.sum(a))


def quantus_entropy(a):
    a = np.abs(a).astype(np.float64).flatten()
    p = a / a.sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def test_registered_metadata():
    assert metrics.available("complexity") == ["complexity", "sparseness"]
    assert metrics.get("sparseness").higher_is_better is True
    assert metrics.get("complexity").higher_is_better is False
    assert not metrics.get("sparseness").needs_model and not metrics.get("complexity").needs_model


def test_gini_by_hand():
    maps = torch.tensor([
        [[0.0, 0.0], [0.0, 4.0]],      # one-hot: (n - 1) / n = 0.75
        [[1.0, 1.0], [1.0, 1.0]],      # uniform: 0
        [[1.0, -2.0], [3.0, 4.0]],     # |a|/4 = .25 .5 .75 1: (-3*.25 - .5 + .75 + 3) / (4 * 2.5) = 0.25
        [[0.0, 0.0], [0.0, 0.0]],      # all zero counts as uniform: 0
    ])
    got = score("sparseness", maps)
    assert torch.allclose(got, torch.tensor([0.75, 0.0, 0.25, 0.0]), atol=1e-6)


def test_entropy_by_hand():
    maps = torch.tensor([
        [[1.0, -1.0], [2.0, 0.0]],     # p = .25 .25 .5 0: 1.5 ln 2
        [[0.0, 0.0], [0.0, 7.0]],      # 0
        [[2.0, 2.0], [2.0, 2.0]],      # ln 4
        [[0.0, 0.0], [0.0, 0.0]],      # all zero -> uniform: ln 4
    ])
    got = score("complexity", maps)
    assert torch.allclose(got, torch.tensor([1.5 * math.log(2), 0.0, math.log(4), math.log(4)]), atol=1e-6)


def test_matches_quantus_formulas_on_random_maps():
    torch.manual_seed(0)
    maps = torch.randn(5, 10, 12) * torch.rand(5, 1, 1) * 10
    maps[2] = maps[2].clamp(min=0) ** 3
    gini = score("sparseness", maps)
    ent = score("complexity", maps)
    for i in range(5):
        assert float(gini[i]) == pytest.approx(quantus_gini(maps[i].numpy()), abs=1e-6)
        assert float(ent[i]) == pytest.approx(quantus_entropy(maps[i].numpy()), abs=1e-5)


def test_concentrated_map_is_sparser_and_simpler():
    torch.manual_seed(0)
    spread = torch.rand(2, 16, 16)
    peaked = torch.zeros(2, 16, 16)
    peaked[:, 4:6, 4:6] = 1
    assert (score("sparseness", peaked) > score("sparseness", spread)).all()
    assert (score("complexity", peaked) < score("complexity", spread)).all()
    # scale invariant, sign blind
    assert torch.allclose(score("sparseness", spread), score("sparseness", -3 * spread), atol=1e-6)
    assert torch.allclose(score("complexity", spread), score("complexity", -3 * spread), atol=1e-5)
