"""Faithfulness correlation as Quantus defines it (random values of the (C, H, W) image set to the image's
minimum, attribution broadcast over the channels): against Quantus itself with matched draws, and against
a one-image port of its semantics (quantus/metrics/faithfulness/faithfulness_correlation.py, MIT)."""

import copy

import numpy as np
import pytest
import torch

import saliencylab
from saliencylab.core.errors import ConfigError
from saliencylab.core.randomness import KeyedRandom
from saliencylab.metrics.sensitivity import SUBSETS, draw_subsets

from conftest import SmallCNN


def setup(channels=3, size=12, B=3, classes=4):
    torch.manual_seed(1)
    model = SmallCNN(classes=classes, channels=channels).eval()
    x = torch.randn(B, channels, size, size)
    maps = torch.randn(B, size, size)
    y = torch.tensor([2, 0, 1])[:B]
    return model, x, maps, y


def our_draws(seed, B, samples, units, size):
    """Our subsets (B, samples, units) bool: image i, sample k keyed by (i, k)."""
    images, draws = torch.arange(B).repeat_interleave(samples), torch.arange(samples).repeat(B)
    removed = draw_subsets(KeyedRandom(seed, SUBSETS), images, draws, units, torch.full((B * samples,), size))
    return removed.view(B, samples, units)


def reference(model, x, maps, y, removed, baseline="black"):
    """Quantus's evaluate_batch for one image at a time: the chosen values of the flattened (C, H, W)
    image set to the image's minimum ("black"), the logit drop, the attribution (the map broadcast
    over the channels) summed over the chosen values, and Pearson's r over the runs."""
    out = []
    for i in range(len(x)):
        flat = x[i].flatten()
        a = maps[i].expand_as(x[i]).flatten()
        fill = flat.min() if baseline == "black" else torch.tensor(0.0)
        with torch.no_grad():
            clean = model(x[i:i + 1])[0, y[i]]
            drops, sums = [], []
            for chosen in removed[i]:
                perturbed = torch.where(chosen, fill, flat).view_as(x[i])
                drops.append(float(clean - model(perturbed[None])[0, y[i]]))
                sums.append(float(a[chosen].sum()))
        out.append(np.corrcoef(sums, drops)[0, 1])
    return torch.tensor(out)


def test_faithfulness_correlation_agrees_with_quantus_on_three_channels(monkeypatch):
    quantus = pytest.importorskip("quantus")
    model, x, maps, y = setup()
    B, size, samples, seed = 3, 20, 12, 2
    U = x[0].numel()  # 3 * 12 * 12 values
    ours = saliencylab.evaluate(model, x, maps, "faithfulness_correlation", target=y, subset_size=size,
                                samples=samples, seed=seed)
    removed = our_draws(seed, B, samples, U, size)
    calls = []

    def choice(a, k, replace=True):  # Quantus draws np.random.choice(C*H*W, size, replace=False) per run, per image
        assert (a, k, replace) == (U, size, False)
        run, image = divmod(len(calls), B)
        calls.append(1)
        return np.random.permutation(np.flatnonzero(removed[image, run].numpy()))

    monkeypatch.setattr(np.random, "choice", choice)
    # Quantus's defaults: perturb_baseline="black", normalise=True, abs=False, logits (softmax=False)
    metric = quantus.FaithfulnessCorrelation(nr_runs=samples, subset_size=size, return_aggregate=False,
                                             disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(),
                    device="cpu", channel_first=True)
    assert len(calls) == B * samples
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), atol=1e-5)


def test_faithfulness_correlation_follows_quantus_semantics_by_hand():
    # the same comparison without Quantus: a port of its evaluate_batch, one image and one run at a time
    model, x, maps, y = setup(size=8)
    size, samples, seed = 30, 10, 5
    s, curves = saliencylab.evaluate(model, x, maps, "faithfulness_correlation", target=y, subset_size=size,
                                     samples=samples, seed=seed, return_curves=True)
    removed = our_draws(seed, 3, samples, x[0].numel(), size)
    assert torch.allclose(s.double(), reference(model, x, maps, y, removed).double(), atol=1e-5)
    # values, not pixels: the removed values of one pixel may be some of its channels only
    per_pixel = removed.view(3, samples, 3, 64).sum(2)
    assert ((per_pixel > 0) & (per_pixel < 3)).any()
    # a pixel's attribution counts once per removed channel
    assert torch.allclose(curves["attribution_sum"],
                          (removed.float().view(3, samples, 3, 64) * maps.view(3, 1, 1, 64)).sum((2, 3)), atol=1e-5)


def test_the_former_pixel_subsets_remain_an_option():
    model, x, maps, y = setup(size=8)
    size, samples, seed = 12, 10, 3
    s = saliencylab.evaluate(model, x, maps, "faithfulness_correlation", target=y, subset_size=size,
                             samples=samples, seed=seed, units="pixels", baseline="zero")
    pixels = our_draws(seed, 3, samples, 64, size)  # whole pixels, all channels set to 0
    removed = pixels[:, :, None].expand(3, samples, 3, 64).reshape(3, samples, 192)
    ref = reference(model, x, maps, y, removed, baseline="zero")
    # a removed pixel's attribution counts once, not once per channel: r is invariant to that factor 3
    assert torch.allclose(s.double(), ref.double(), atol=1e-5)
    # and it differs from the default
    default = saliencylab.evaluate(model, x, maps, "faithfulness_correlation", target=y, subset_size=size,
                                   samples=samples, seed=seed)
    assert not torch.allclose(s, default)


def test_black_is_each_images_minimum_and_units_are_checked():
    model, x, maps, y = setup(size=4)
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("faithfulness_correlation", units="channels")
    # 224 values: more than 3 * 4 * 4 = 48
    with pytest.raises(ConfigError):
        saliencylab.evaluate(model, x, maps, "faithfulness_correlation", target=y)
    from saliencylab.metrics.sensitivity import ImageMinimum

    b = ImageMinimum()(x)
    assert b.shape == x.shape and torch.equal(b[:, 0, 0, 0], x.flatten(1).min(1).values)
    assert (b == b[:, :1, :1, :1]).all()


def test_subset_selection_without_a_sort_is_the_sorts_bit_for_bit():
    from saliencylab.metrics.sensitivity import _smallest, _smallest_by_sort

    rng = KeyedRandom(0, SUBSETS)
    keys = rng.uniform(torch.zeros(6, dtype=torch.long), torch.arange(6), (5000,), dtype=torch.float64)
    # coarse keys: many ties, some of them at the cut (those rows take the sort's order)
    coarse = (keys * 300).floor()
    for k in (keys, coarse):
        for sizes in (torch.tensor([1, 50, 2500, 4999, 5000, 0]), torch.full((6,), 17)):
            assert torch.equal(_smallest(k, sizes), _smallest_by_sort(k, sizes))
    assert (_smallest(coarse, torch.full((6,), 17)).sum(1) == 17).all()


def test_score_drops_are_shared_between_maps_of_the_same_images(monkeypatch):
    # the random subsets do not depend on the map: a second map on the same images and model reuses
    # the drops (no forward pass) and scores exactly as a fresh run would
    from saliencylab import perturbation

    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 16, 16)
    first, second = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    metric = saliencylab.metrics.build("sensitivity_n", samples=4, fraction=(0.1, 0.5))
    with perturbation.shared_passes():
        metric.measure(model, x, first)
        shared = metric.measure(model, x, second)
        assert shared.cost.forward_images == 0
        changed = metric.measure(model, x + 1, second)  # other images: nothing reused
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.conv1.weight.add_(0.1)  # other weights: nothing reused
        assert metric.measure(other, x, second).cost.forward_images == 2 + 2 * 2 * 4
    assert changed.cost.forward_images == 2 + 2 * 2 * 4  # resolve and subsets; the clean rows are shared
    assert not perturbation.SHARED.items  # emptied at the end of the scope
    # outside the scope nothing is reused across calls, and the scores are the same bit for bit
    fresh = metric.measure(model, x, second)
    assert fresh.cost.forward_images == 2 + 2 * 2 * 4
    assert torch.equal(shared.scores, fresh.scores)
    monkeypatch.setattr(perturbation, "FAST", False)
    before = metric.measure(model, x, second)  # the code before issue 16: the clean rows forwarded again
    assert before.cost.forward_images == 2 + 2 + 2 * 2 * 4  # resolve, clean, subsets
    torch.testing.assert_close(shared.scores, before.scores, rtol=0, atol=1e-6)
