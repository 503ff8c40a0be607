"""Keyed randomness: a draw depends on (seed, purpose, image key, draw index) only."""

import torch

from saliencylab.core.randomness import KeyedRandom, derive_seed


def test_rows_depend_on_their_key_only():
    rng = KeyedRandom(0, "test", ["a", "b", "c"])
    whole = rng.normal(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 0]), (5,))
    again = rng.normal(torch.tensor([2, 0]), torch.tensor([0, 1]), (5,))
    assert torch.equal(whole[3], again[0]) and torch.equal(whole[1], again[1])
    # the same image under another position keeps its numbers when keyed by id
    subset = rng.for_images([2])
    assert torch.equal(subset.normal(torch.tensor([0]), torch.tensor([0]), (5,))[0], whole[3])


def test_purposes_and_seeds_are_independent_streams():
    a = KeyedRandom(0, "noise").normal([0], [0], (100,))
    b = KeyedRandom(0, "baseline").normal([0], [0], (100,))
    c = KeyedRandom(1, "noise").normal([0], [0], (100,))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert derive_seed(0, "x", 3, 4) == derive_seed(0, "x", 3, 4)
    assert derive_seed(0, "x", 3, 4) != derive_seed(0, "x", 4, 3)


def test_distribution_is_standard_normal_and_uniform():
    rng = KeyedRandom(3, "stats")
    n = rng.normal(torch.arange(50), torch.zeros(50), (2000,))
    u = rng.uniform(torch.arange(50), torch.zeros(50), (2000,))
    assert abs(float(n.mean())) < 0.01 and abs(float(n.std()) - 1) < 0.01
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
