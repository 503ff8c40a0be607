"""Faithfulness metrics: hand-computed cases, closed forms on linear models, agreement with Captum
and Quantus, and a model whose relevant pixels are known."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import saliencylab
from saliencylab.core.errors import ConfigError
from saliencylab.core.randomness import KeyedRandom
from saliencylab.perturbation import random_subsets, row_normal, row_uniform
from saliencylab.metrics.sensitivity import INFIDELITY_NOISE, SUBSETS, draw_noise, draw_subsets, pearson

from conftest import SmallCNN


class Linear(nn.Module):
    """f(x) = (sum(w * x), 0): a linear model on the flattened image, two logits."""

    def __init__(self, weight, dtype=torch.float64):
        super().__init__()
        self.fc = nn.Linear(weight.numel(), 2, bias=False).to(dtype)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0] = weight.flatten().to(dtype)

    def forward(self, x):
        return self.fc(x.flatten(1))


# -- deletion / insertion by hand -------------------------------------------------------------------
def test_deletion_and_insertion_auc_on_a_3x3_image_by_hand():
    # weights 1..9 scattered over a 3x3 image of ones; the map is the input x gradient = the weights
    w = torch.tensor([[4.0, 9, 2], [3, 5, 7], [8, 1, 6]])
    model = Linear(w[None])
    x = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    maps = w[None].double()
    # deletion, most important first, logit: 45, 45-9=36, 36-8=28, 21, 15, 10, 6, 3, 1, 0
    d, curves = saliencylab.evaluate(model, x, maps, "deletion", target=0, per_step=1, baseline="zero",
                                     score="logit", return_curves=True)
    assert curves["scores"][0].tolist() == [45, 36, 28, 21, 15, 10, 6, 3, 1, 0]
    # trapezoid over 9 steps of 1/9: (45/2 + 36 + 28 + 21 + 15 + 10 + 6 + 3 + 1 + 0/2) / 9 = 142.5 / 9
    assert d.item() == pytest.approx(142.5 / 9)
    # insertion from the zero image: 0, 9, 17, 24, 30, 35, 39, 42, 44, 45
    i, curves = saliencylab.evaluate(model, x, maps, "insertion", target=0, per_step=1, baseline="zero",
                                     score="logit", return_curves=True)
    assert curves["scores"][0].tolist() == [0, 9, 17, 24, 30, 35, 39, 42, 44, 45]
    assert i.item() == pytest.approx((0 / 2 + 9 + 17 + 24 + 30 + 35 + 39 + 42 + 44 + 45 / 2) / 9)
    # right Riemann sum: the points after each step
    r = saliencylab.evaluate(model, x, maps, "deletion", target=0, per_step=1, baseline="zero", score="logit",
                             auc="right")
    assert r.item() == pytest.approx((36 + 28 + 21 + 15 + 10 + 6 + 3 + 1 + 0) / 9)


def test_deletion_auc_on_a_2x2_image_with_softmax_by_hand():
    # logits (2a + b - c + 0.5d, 0) with a = b = c = d = 1: p = sigmoid(logit)
    w = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
    model = Linear(w[None])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    # ranking 2 > 1 > 0.5 > -1: remaining logits 2.5, 0.5, -0.5, -1, 0

    def sig(v):
        return 1 / (1 + math.exp(-v))

    expected = [sig(2.5), sig(0.5), sig(-0.5), sig(-1.0), sig(0.0)]
    d, curves = saliencylab.evaluate(model, x, w[None].double(), "deletion", target=0, steps=4, baseline="zero",
                                     return_curves=True)
    assert curves["scores"][0].tolist() == pytest.approx(expected)
    assert curves["fraction"].tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert d.item() == pytest.approx(0.25 * (expected[0] / 2 + sum(expected[1:4]) + expected[4] / 2))


# -- closed forms on a linear model --------------------------------------------------------------------
def linear_setup(channels=3, size=10, B=3):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(channels, size, size, generator=g, dtype=torch.float64)
    x = torch.randn(B, channels, size, size, generator=g, dtype=torch.float64)
    model = Linear(w)
    ixg = (w * x).sum(1)  # input x gradient, channels summed
    grad = w.sum(0).expand(B, size, size)  # gradient, channels summed (noise is shared by channels)
    return model, x, w, ixg, grad


def test_sensitivity_n_is_one_for_input_x_gradient_on_a_linear_model():
    model, x, w, ixg, grad = linear_setup()
    s, curves = saliencylab.evaluate(model, x, ixg, "sensitivity_n", target=0, n=[1, 10, 50], samples=16,
                                     return_curves=True)
    assert torch.allclose(curves["correlation"], torch.ones(3, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s, torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert curves["n"].tolist() == [1, 10, 50] and curves["fraction"].tolist() == [0.01, 0.1, 0.5]
    # tiles: a tile's attribution is the sum over its pixels, still complete
    s = saliencylab.evaluate(model, x, ixg, "sensitivity_n", target=0, tile=3, fraction=[0.2, 0.5], samples=16)
    assert torch.allclose(s, torch.ones(3, dtype=torch.float64), atol=1e-12)
    # the gradient is not complete for removals: clearly below 1
    assert (saliencylab.evaluate(model, x, grad, "sensitivity_n", target=0, samples=16) < 0.9).all()
    # a constant map explains no variation: 0
    assert (saliencylab.evaluate(model, x, torch.ones_like(ixg), "sensitivity_n", target=0, n=5, samples=8) == 0).all()


def test_faithfulness_correlation_is_one_for_input_x_gradient_on_a_linear_model():
    model, x, w, ixg, grad = linear_setup()
    s, curves = saliencylab.evaluate(model, x, ixg, "faithfulness_correlation", target=0, subset_size=20,
                                     samples=16, units="pixels", baseline="zero", return_curves=True)
    assert torch.allclose(s, torch.ones(3, dtype=torch.float64), atol=1e-12)
    # the drops are the attribution sums themselves (completeness of input x gradient)
    assert torch.allclose(curves["attribution_sum"], curves["score_drop"], atol=1e-10)
    assert curves["score_drop"].shape == (3, 16)
    neg = saliencylab.evaluate(model, x, -ixg, "faithfulness_correlation", target=0, subset_size=20, samples=16,
                              units="pixels", baseline="zero")
    assert torch.allclose(neg, -torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_infidelity_closed_forms_on_a_linear_model():
    model, x, w, ixg, grad = linear_setup()
    B, C, H, W = x.shape
    # Gaussian noise I: f(x) - f(x - I) = sum(I * w) = I . gradient exactly: infidelity 0
    zero = saliencylab.evaluate(model, x, grad, "infidelity", target=0, samples=8)
    assert (zero < 1e-20).all()
    # a zero map: infidelity = mean of (I . gradient)^2, with the same noise, keyed by (image, sample)
    sigma, n = 0.3, 8
    images, draws = torch.arange(B).repeat_interleave(n), torch.arange(n).repeat(B)
    noise = sigma * draw_noise(KeyedRandom(0, INFIDELITY_NOISE), images, draws, (H, W), dtype=torch.float64)
    noise = noise.view(B, n, H, W)
    drops = (noise * grad[:, None]).sum((2, 3))
    expected = drops.pow(2).mean(1)
    got = saliencylab.evaluate(model, x, torch.zeros_like(grad), "infidelity", target=0, sigma=sigma, samples=n)
    assert torch.allclose(got, expected, rtol=1e-10)
    # removals ("subset"): input x gradient is complete: 0; twice it: the mean squared drop
    assert (saliencylab.evaluate(model, x, ixg, "infidelity", target=0, perturbation="subset") < 1e-20).all()
    size = round(0.1 * H * W)
    images, draws = torch.arange(B).repeat_interleave(32), torch.arange(32).repeat(B)
    removed = draw_subsets(KeyedRandom(0, SUBSETS), images, draws, H * W, torch.full((B * 32,), size))
    removed = removed.view(B, 32, H * W)
    drops = (removed * ixg.flatten(1)[:, None]).sum(2)
    got = saliencylab.evaluate(model, x, 2 * ixg, "infidelity", target=0, perturbation="subset")
    assert torch.allclose(got, drops.pow(2).mean(1), rtol=1e-10)
    # normalize=True rescales the map by beta: any multiple of the complete map gives 0
    for scale in (2.0, -3.0, 1e-3):
        got = saliencylab.evaluate(model, x, scale * ixg, "infidelity", target=0, perturbation="subset",
                                   normalize=True)
        assert (got < 1e-20).all()


def test_random_draws_belong_to_the_image():
    model, x, w, ixg, grad = linear_setup(B=3)
    maps = ixg + torch.randn_like(ixg)
    ids = ["a.png", "b.png", "c.png"]
    for name, params in (("sensitivity_n", {"samples": 8}), ("faithfulness_correlation", {"subset_size": 10}),
                         ("infidelity", {}), ("infidelity", {"perturbation": "subset"})):
        a = saliencylab.evaluate(model, x, maps, name, target=0, batch_size=3, **params)
        b = saliencylab.evaluate(model, x, maps, name, target=0, batch_size=64, **params)
        assert torch.allclose(a, b, rtol=1e-12, atol=0), name
        c = saliencylab.evaluate(model, x, maps, name, target=0, seed=1, **params)
        assert not torch.allclose(a, c), name
        # keyed by image id: the last image alone scores as in the batch, and its id (not its
        # position) picks its draws
        metric = saliencylab.metrics.build(name, **params)
        whole = metric(model, x, maps, 0, image_ids=ids)
        alone = metric(model, x[2:], maps[2:], 0, image_ids=ids[2:])
        assert torch.allclose(whole[2:], alone, rtol=1e-12, atol=0), name
        assert not torch.allclose(whole, metric(model, x, maps, 0, image_ids=["x", "y", "z"])), name


def test_keyed_subsets_are_uniform_with_exact_sizes():
    rng = KeyedRandom(5, SUBSETS, ["img"])
    images, draws = torch.zeros(3000, dtype=torch.long), torch.arange(3000)
    sizes = torch.randint(1, 30, (3000,), generator=torch.Generator().manual_seed(0))
    removed = draw_subsets(rng, images, draws, 30, sizes)
    assert torch.equal(removed.sum(1), sizes)
    freq = removed.double().sum(0) / sizes.sum()
    assert (freq - 1 / 30).abs().max() < 0.005
    # another draw index, image or seed gives other subsets
    assert not torch.equal(draw_subsets(rng, images, draws + 1, 30, sizes), removed)
    assert not torch.equal(draw_subsets(KeyedRandom(6, SUBSETS, ["img"]), images, draws, 30, sizes), removed)
    assert not torch.equal(draw_subsets(KeyedRandom(5, SUBSETS, ["other"]), images, draws, 30, sizes), removed)


def test_row_keyed_draws_are_uniform_and_independent():
    rows = torch.arange(4000)
    u = row_uniform(3, rows, 64, torch.float64)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    # neighbouring rows and neighbouring elements are uncorrelated
    assert abs(pearson(u[:-1].flatten(), u[1:].flatten()).item()) < 0.01
    assert abs(pearson(u[:, :-1].flatten(), u[:, 1:].flatten()).item()) < 0.01
    z = row_normal(3, rows, (64,), torch.float64)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z.abs() > 1.96).double().mean().item() - 0.05) < 0.005
    # exact subset sizes, every unit equally likely
    sizes = torch.randint(1, 30, (4000,))
    removed = random_subsets(5, rows, 30, sizes)
    assert torch.equal(removed.sum(1), sizes)
    freq = removed.double().sum(0) / sizes.sum()
    assert (freq - 1 / 30).abs().max() < 0.004
    assert not torch.equal(random_subsets(6, rows, 30, sizes), removed)


# -- Captum ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("perturbation", ["noise", "subset"])
def test_infidelity_agrees_with_captum(normalize, perturbation):
    from captum.metrics import infidelity

    torch.manual_seed(0)
    model = SmallCNN(classes=5, channels=3).double().eval()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    maps = torch.randn(3, 12, 12, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    B, C, H, W = x.shape
    n, sigma, seed, size = 6, 0.2, 4, 30

    def perturb(inputs):  # captum repeats each image n times: row = image * n + k, our (image, draw k)
        rows = torch.arange(len(inputs))
        images, draws = rows // n, rows % n
        if perturbation == "noise":
            noise = sigma * draw_noise(KeyedRandom(seed, INFIDELITY_NOISE), images, draws, (1, H, W),
                                       dtype=inputs.dtype)
            return noise.expand_as(inputs), inputs - noise
        removed = draw_subsets(KeyedRandom(seed, SUBSETS), images, draws, H * W, torch.full((len(rows),), size))
        removed = removed.view(-1, 1, H, W)
        return removed.expand_as(inputs).to(inputs.dtype), inputs * ~removed  # zero baseline

    attributions = maps[:, None].expand(B, C, H, W) / C  # per-pixel map spread over the channels
    theirs = infidelity(model, perturb, x, attributions, target=target, n_perturb_samples=n, normalize=normalize)
    ours = saliencylab.evaluate(model, x, maps, "infidelity", target=target, samples=n, sigma=sigma, seed=seed,
                                normalize=normalize, perturbation=perturbation, fraction=size / (H * W))
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


# -- Quantus ----------------------------------------------------------------------------------------------
# Quantus 0.6 metrics with our definitions: FaithfulnessCorrelation and PixelFlipping. Its SensitivityN
# (cumulative removals in attribution order, correlation across the batch) and Infidelity (square
# patches set to a baseline, one patch at a time) define different quantities, so they are not compared.
def quantus_setup():
    torch.manual_seed(1)
    model = SmallCNN(classes=4, channels=1).eval()
    x = torch.randn(3, 1, 12, 12)
    maps = torch.randn(3, 12, 12)
    y = torch.tensor([2, 0, 1])
    return model, x, maps, y


def test_faithfulness_correlation_agrees_with_quantus(monkeypatch):
    quantus = pytest.importorskip("quantus")
    model, x, maps, y = quantus_setup()
    B, U, size, samples, seed = 3, 144, 20, 12, 2
    ours = saliencylab.evaluate(model, x, maps, "faithfulness_correlation", target=y, subset_size=size,
                                samples=samples, seed=seed, baseline="zero")
    # Quantus draws np.random.choice(features, size, replace=False) per run, per image: hand it our subsets
    images, draws = torch.arange(B).repeat_interleave(samples), torch.arange(samples).repeat(B)
    removed = draw_subsets(KeyedRandom(seed, SUBSETS), images, draws, U, torch.full((B * samples,), size))
    removed = removed.view(B, samples, U)
    calls = []

    def choice(a, k, replace=True):
        assert (a, k, replace) == (U, size, False)
        run, image = divmod(len(calls), B)
        calls.append(1)
        return np.flatnonzero(removed[image, run].numpy())

    monkeypatch.setattr(np.random, "choice", choice)
    metric = quantus.FaithfulnessCorrelation(nr_runs=samples, subset_size=size, perturb_baseline=0.0,
                                             normalise=False, abs=False, return_aggregate=False,
                                             disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(),
                    device="cpu", softmax=False, channel_first=True)
    assert len(calls) == B * samples
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), atol=1e-5)


def test_deletion_curve_agrees_with_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    model, x, maps, y = quantus_setup()
    _, curves = saliencylab.evaluate(model, x, maps, "deletion", target=y, per_step=12, baseline="zero",
                                     score="softmax", return_curves=True)
    metric = quantus.PixelFlipping(features_in_step=12, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(),
                    device="cpu", softmax=True, channel_first=True)
    np.testing.assert_allclose(curves["scores"][:, 1:].numpy(), np.asarray(theirs), atol=1e-6)


# -- a model whose relevant pixels are known -------------------------------------------------------------
def patch_setup():
    """Linear (two logits) on 8x8 images, looking only at a 4x4 patch; the pixel values there carry
    the evidence (iid signs matched by the weights), so neighbours cannot restore it."""
    torch.manual_seed(4)
    x = (torch.rand(4, 1, 8, 8) * 0.5 + 0.5) * torch.sign(torch.randn(4, 1, 8, 8))
    patch = torch.zeros(8, 8, dtype=torch.bool)
    patch[2:6, 3:7] = True
    w = torch.where(patch, 0.3 * torch.sign(x[0, 0]), torch.zeros(8, 8))
    model = Linear(w[None], dtype=torch.float32).eval()
    x = torch.where(patch, x[0:1].abs() * torch.sign(w), x)
    good = (w * x[:, 0]).abs() + 1e-3 * torch.rand(4, 8, 8)  # concentrated on the patch
    random = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(9))
    return model, x, good, random


@pytest.mark.parametrize("name,params", [
    ("deletion", {}), ("insertion", {}), ("road", {}), ("sensitivity_n", {}),
    ("faithfulness_correlation", {"subset_size": 8}), ("infidelity", {"perturbation": "subset", "normalize": True}),
])
def test_a_map_on_the_relevant_patch_beats_a_random_map(name, params):
    model, x, good, random = patch_setup()
    g = saliencylab.evaluate(model, x, good, name, target=0, **params)
    r = saliencylab.evaluate(model, x, random, name, target=0, **params)
    better = torch.gt if saliencylab.metrics.get(name).higher_is_better else torch.lt
    assert better(g, r).all(), (name, g, r)


def test_parameters_are_checked():
    for name, params in (("sensitivity_n", {"n": 0}), ("sensitivity_n", {"fraction": 1.5}),
                         ("sensitivity_n", {"samples": 1}), ("faithfulness_correlation", {"subset_size": 0}),
                         ("infidelity", {"perturbation": "blur"}), ("infidelity", {"sigma": 0}),
                         ("infidelity", {"normalize": "yes"}), ("sensitivity_n", {"score": "prob"})):
        with pytest.raises(ConfigError):
            saliencylab.metrics.build(name, **params)
    model, x, _, ixg, _ = linear_setup(size=4)
    with pytest.raises(ConfigError):  # more pixels than the image has
        saliencylab.evaluate(model, x, ixg, "faithfulness_correlation", target=0)
    with pytest.raises(ConfigError):
        saliencylab.evaluate(model, x, ixg, "sensitivity_n", target=0, n=16)
    meta = saliencylab.metrics.describe()
    assert meta["infidelity"]["higher_is_better"] is False
    assert meta["sensitivity_n"]["higher_is_better"] and meta["faithfulness_correlation"]["higher_is_better"]
