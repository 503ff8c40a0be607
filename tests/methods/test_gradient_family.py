"""Gradient, input x gradient, integrated gradients and SmoothGrad against Captum (independent reference)."""

import warnings

import pytest
import torch

import saliencylab as sl
from saliencylab.core.randomness import KeyedRandom

captum_attr = pytest.importorskip("captum.attr")
warnings.filterwarnings("ignore", module="captum")

TARGETS = [0, 1, 2]


def test_gradient_matches_captum(model64, x64):
    ref = captum_attr.Saliency(model64).attribute(x64, target=TARGETS, abs=False)
    ours = sl.explain(model64, x64, "gradient", target=TARGETS, channels=True)
    torch.testing.assert_close(ours.maps, ref, atol=1e-10, rtol=0)
    assert ours.cost.forward_images == 3 and ours.cost.backward_images == 3  # one pass, target resolved in it
    absolute = sl.explain(model64, x64, "gradient", target=TARGETS, absolute=True, channels=True).maps
    torch.testing.assert_close(absolute, ref.abs(), atol=1e-10, rtol=0)


def test_input_x_gradient_matches_captum(model64, x64):
    ref = captum_attr.InputXGradient(model64).attribute(x64, target=TARGETS)
    ours = sl.explain(model64, x64, "input_x_gradient", target=TARGETS, batch_size=2)
    torch.testing.assert_close(ours.maps, ref.sum(1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
@pytest.mark.parametrize("batch_size", [4, 64])
def test_integrated_gradients_matches_captum(model64, x64, rule, batch_size):
    ref = captum_attr.IntegratedGradients(model64).attribute(x64, target=TARGETS, n_steps=7, method=rule)
    ours = sl.explain(model64, x64, "integrated_gradients", target=TARGETS, steps=7, rule=rule,
                      batch_size=batch_size, channels=True)
    # Captum builds its path points in float32 (relative error ~1e-8); everything else is float64.
    torch.testing.assert_close(ours.maps, ref, atol=1e-9, rtol=1e-6)
    assert ours.cost.backward_images == 3 * 7


def test_trapezoid_is_the_true_trapezoid_rule(model64, x64):
    # Captum's trapezoid weights sum to (n-1)/n; ours sum to 1, so ours = Captum's * n/(n-1).
    n = 7
    ref = captum_attr.IntegratedGradients(model64).attribute(x64, target=TARGETS, n_steps=n,
                                                             method="riemann_trapezoid")
    ours = sl.explain(model64, x64, "integrated_gradients", target=TARGETS, steps=n, rule="riemann_trapezoid",
                      channels=True).maps
    torch.testing.assert_close(ours, ref * n / (n - 1), atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("baseline", ["zero", "blur", "uniform", "mean", 0.5, "tensor"])
def test_integrated_gradients_completeness(model64, x64, baseline):
    """Sum of attributions = f(x) - f(baseline), up to quadrature error, for every baseline kind."""
    if baseline == "tensor":
        baseline = torch.full((1, 3, 1, 1), -0.3, dtype=torch.float64)
    e = sl.explain(model64, x64, "integrated_gradients", target=TARGETS, steps=64, baseline=baseline, channels=True)
    base = e.extras["baseline"]
    assert base.shape == x64.shape
    with torch.no_grad():
        f = model64(x64)[range(3), TARGETS] - model64(base)[range(3), TARGETS]
    torch.testing.assert_close(e.maps.sum((1, 2, 3)), f, atol=1e-3, rtol=1e-3)


def test_integrated_gradients_with_baseline_matches_captum(model64, x64):
    b = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    ref = captum_attr.IntegratedGradients(model64).attribute(x64, baselines=b, target=TARGETS, n_steps=5)
    ours = sl.explain(model64, x64, "integrated_gradients", target=TARGETS, steps=5, baseline=b, channels=True)
    torch.testing.assert_close(ours.maps, ref, atol=1e-9, rtol=1e-6)


def keyed_noise(seed, n_images, samples, shape):
    """SmoothGrad's noise, image-major (Captum's row order): row (i, s) keyed by (seed, image i, sample s)."""
    images = torch.arange(n_images).repeat_interleave(samples)
    draws = torch.arange(samples).repeat(n_images)
    return KeyedRandom(seed, "smoothgrad").normal(images, draws, shape, dtype=torch.float64)


@pytest.mark.parametrize("aggregate,nt_type", [("mean", "smoothgrad"), ("square", "smoothgrad_sq"),
                                               ("variance", "vargrad")])
def test_smoothgrad_family_matches_captum_noise_tunnel(model64, x64, aggregate, nt_type, monkeypatch):
    # Captum draws its noise with one torch.normal(0, stdevs) call over the image-major rows; we give it
    # our keyed noise there, so the two must agree to rounding (aggregation, scaling, row order).
    noise = keyed_noise(7, 3, 5, x64.shape[1:])
    normal = torch.normal
    monkeypatch.setattr(torch, "normal", lambda mean, std, *a, **k: mean + std * noise if not a and not k
                        and isinstance(std, torch.Tensor) and std.shape == noise.shape else normal(mean, std, *a, **k))
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(model64)).attribute(
        x64, nt_type=nt_type, nt_samples=5, stdevs=0.3, target=TARGETS, abs=False)
    monkeypatch.undo()
    for batch_size in (None, 4, 100):
        ours = sl.explain(model64, x64, "smoothgrad", target=TARGETS, samples=5, stdev=0.3, seed=7,
                          aggregate=aggregate, batch_size=batch_size, channels=True).maps
        torch.testing.assert_close(ours, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)


def test_stochastic_gradients_do_not_depend_on_batching(model64):
    """SmoothGrad's noise and IG's uniform baseline are keyed by image (and sample): batch_size None, 1
    and 7 and explaining a split data set with image ids give the same maps as the whole batch."""
    torch.manual_seed(4)
    x = torch.randn(5, 3, 10, 10, dtype=torch.float64)
    ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    for name, params in [("smoothgrad", {"samples": 4, "seed": 2}), ("vargrad", {"samples": 3}),
                         ("integrated_gradients", {"steps": 3, "baseline": "uniform"})]:
        maps = {bs: sl.explain(model64, x, name, batch_size=bs, **params).maps for bs in (None, 1, 7)}
        torch.testing.assert_close(maps[1], maps[None], atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(maps[7], maps[None], atol=1e-12, rtol=1e-9)
        whole = sl.explain(model64, x, name, image_ids=ids, **params).maps
        split = torch.cat([sl.explain(model64, x[:2], name, image_ids=ids[:2], batch_size=1, **params).maps,
                           sl.explain(model64, x[2:], name, image_ids=ids[2:], **params).maps])
        torch.testing.assert_close(split, whole, atol=1e-12, rtol=1e-9)
        shuffled = sl.explain(model64, x[[4, 0]], name, image_ids=[ids[4], ids[0]], **params).maps
        torch.testing.assert_close(shuffled, whole[[4, 0]], atol=1e-12, rtol=1e-9)
        # keyed by the id, not the position: the same image under another id gets other numbers
        other = sl.explain(model64, x, name, image_ids=[i + "!" for i in ids], **params).maps
        assert not torch.allclose(other, whole)


def test_uniform_baseline_is_drawn_per_image():
    from saliencylab.baselines import UniformNoise, baseline_images, make_baseline, registry

    x = torch.randn(3, 3, 6, 6)
    b = make_baseline("uniform")
    assert isinstance(b, UniformNoise) and set(registry.available()) == {"zero", "mean", "blur", "uniform"}
    whole = b(x)
    keyed = KeyedRandom(0, "baseline", ["p", "q", "r"])
    torch.testing.assert_close(b(x[2:], keyed.for_images([2])), b(x, keyed)[2:])
    assert not torch.allclose(b(x[2:]), whole[2:])  # by position, image 2 alone is key 0
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    assert bool(((whole >= lo) & (whole <= hi)).all())
    with pytest.raises(sl.ConfigError, match="did you mean"):
        make_baseline("unifrom")

    class Session:  # what baseline_images needs of a session
        image_ids = ["p", "q", "r"]

        def random(self, seed, purpose):
            return KeyedRandom(seed, purpose, self.image_ids)

    torch.testing.assert_close(baseline_images(b, x, Session()), b(x, keyed))
    torch.testing.assert_close(baseline_images(b, x[1:], Session(), images=torch.tensor([1, 2])), b(x, keyed)[1:])
    with pytest.raises(sl.InputError, match="images="):
        baseline_images(b, x[1:], Session())


def test_smoothgrad_variants_are_registered_aliases(model64, x64):
    a = sl.explain(model64, x64, "vargrad", samples=4, stdev=0.2, seed=3).maps
    b = sl.explain(model64, x64, "smoothgrad", samples=4, stdev=0.2, seed=3, aggregate="variance").maps
    torch.testing.assert_close(a, b)
    a = sl.explain(model64, x64, "squaregrad", samples=4, stdev=0.2, seed=3).maps
    b = sl.explain(model64, x64, "smoothgrad", samples=4, stdev=0.2, seed=3, aggregate="square").maps
    torch.testing.assert_close(a, b)


def test_smoothgrad_seeded_and_noise_level(model64, x64):
    a = sl.explain(model64, x64, "smoothgrad", samples=6, seed=1, batch_size=4).maps
    b = sl.explain(model64, x64, "smoothgrad", samples=6, seed=1, batch_size=4).maps
    c = sl.explain(model64, x64, "smoothgrad", samples=6, seed=2, batch_size=4).maps
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # zero noise collapses to the plain gradient
    zero = sl.explain(model64, x64, "smoothgrad", samples=3, noise_level=0.0, target=TARGETS).maps
    grad = sl.explain(model64, x64, "gradient", target=TARGETS).maps
    torch.testing.assert_close(zero, grad, atol=1e-10, rtol=0)


def test_batching_does_not_change_results(model64, x64):
    for name, params in [("integrated_gradients", {"steps": 5}), ("gradient", {}), ("input_x_gradient", {})]:
        a = sl.explain(model64, x64, name, batch_size=1, **params).maps
        b = sl.explain(model64, x64, name, batch_size=1000, **params).maps
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_callable_target_and_predicted_default(model64, x64):
    with torch.no_grad():
        predicted = model64(x64).argmax(1)
    e = sl.explain(model64, x64, "gradient")
    assert torch.equal(e.targets, predicted)
    by_list = sl.explain(model64, x64, "gradient", target=predicted.tolist()).maps
    torch.testing.assert_close(e.maps, by_list)
    # a callable: difference of two logits, explained by IG -> completeness holds for it too
    fn = lambda out: out[:, 0] - out[:, 1]  # noqa: E731
    e2 = sl.explain(model64, x64, "integrated_gradients", target=fn, steps=64)
    assert e2.targets is None
    with torch.no_grad():
        expected = fn(model64(x64)) - fn(model64(torch.zeros_like(x64)))
    torch.testing.assert_close(e2.maps.sum((1, 2)), expected, atol=1e-3, rtol=1e-3)


def test_explanation_record(model64, x64):
    e = sl.explain(model64, x64, "integrated_gradients", steps=4)
    assert e.method == "integrated_gradients" and e.params["steps"] == 4
    assert e.maps.shape == (3, 12, 12)
    assert e.cost.forward_images == 3 + 3 * 4 and e.cost.backward_images == 3 * 4
    assert e.probabilities.shape == (3,) and bool(((e.probabilities > 0) & (e.probabilities <= 1)).all())
    d = e.to_dict()
    assert d["method"] == "integrated_gradients" and d["targets"] == e.targets.tolist()
