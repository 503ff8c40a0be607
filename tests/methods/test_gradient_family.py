"""Gradient, input x gradient, integrated gradients and SmoothGrad against Captum (independent reference)."""

import warnings

import pytest
import torch

import saliencylab as sl
from conftest import make_small_cnn

captum_attr = pytest.importorskip("captum.attr")
warnings.filterwarnings("ignore", module="captum")

TARGETS = [0, 1, 2]


@pytest.fixture
def model64():
    return make_small_cnn(dtype=torch.float64)


@pytest.fixture
def x64():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


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
    method = sl.methods.build("integrated_gradients", model64, steps=64, baseline=baseline)
    maps = method.attribute(x64, TARGETS, channels=True)
    base = method._baseline(x64)
    with torch.no_grad():
        f = model64(x64)[range(3), TARGETS] - model64(base)[range(3), TARGETS]
    torch.testing.assert_close(maps.sum((1, 2, 3)), f, atol=1e-3, rtol=1e-3)


def test_integrated_gradients_with_baseline_matches_captum(model64, x64):
    b = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    ref = captum_attr.IntegratedGradients(model64).attribute(x64, baselines=b, target=TARGETS, n_steps=5)
    ours = sl.explain(model64, x64, "integrated_gradients", target=TARGETS, steps=5, baseline=b, channels=True)
    torch.testing.assert_close(ours.maps, ref, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("aggregate,nt_type", [("mean", "smoothgrad"), ("square", "smoothgrad_sq"),
                                               ("variance", "vargrad")])
def test_smoothgrad_family_matches_captum_noise_tunnel(aggregate, nt_type):
    # Captum draws float32 noise from the global generator in one call; with one chunk and the same
    # seed our generator draws the same numbers, so the two must agree to rounding.
    model = make_small_cnn()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 12, 12)
    torch.manual_seed(7)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type=nt_type, nt_samples=5, stdevs=0.3, target=TARGETS, abs=False)
    ours = sl.explain(model, x, "smoothgrad", target=TARGETS, samples=5, stdev=0.3, seed=7,
                      aggregate=aggregate, batch_size=100, channels=True).maps
    scale = ref.abs().max()
    torch.testing.assert_close(ours / scale, ref / scale, atol=1e-5, rtol=0)


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
