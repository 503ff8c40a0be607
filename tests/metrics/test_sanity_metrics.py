"""Sanity metrics: cascading model randomization and random logit."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab import ConfigError, InputError, methods, metrics
from conftest import make_small_cnn


def snapshot(model):
    """Everything about a model that a metric could disturb, for bitwise comparison."""
    return {
        "tensors": {n: (t.detach().clone(), t.dtype, t.device) for n, t in model.state_dict(keep_vars=True).items()},
        "param_ids": [id(p) for p in model.parameters()],
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "hooks": {n: {d: list(getattr(m, d).keys()) for d in ("_forward_hooks", "_forward_pre_hooks",
                                                               "_backward_hooks", "_backward_pre_hooks")}
                  for n, m in model.named_modules()},
    }


def assert_untouched(before, model):
    after = snapshot(model)
    assert before["param_ids"] == after["param_ids"]
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for n, (t, dtype, device) in before["tensors"].items():
        u, udtype, udevice = after["tensors"][n]
        assert (dtype, device) == (udtype, udevice) and torch.equal(t, u), f"{n} changed"
    for n, g in before["grads"].items():
        assert (g is None and after["grads"][n] is None) or torch.equal(g, after["grads"][n]), f".grad of {n}"


def user_model():
    """Train mode, a frozen parameter, a stale .grad and a hook of the user's own."""
    model = make_small_cnn().train()
    model.conv1.bias.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    calls = []
    model.conv2.register_forward_hook(lambda m, i, o: calls.append(1))
    return model


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12)


def test_registered_metadata():
    assert metrics.available("sanity") == ["model_randomization", "random_logit"]
    for name in ("model_randomization", "random_logit"):
        assert metrics.get(name).higher_is_better is False and metrics.get(name).needs_model


def test_model_randomization_leaves_the_user_model_bitwise_identical(x):
    model = user_model()
    maps = sl.explain(model, x, "gradient")
    before = snapshot(model)
    rng = torch.get_rng_state()
    for similarity in ("spearman", "ssim"):
        sl.evaluate(model, x, maps, "model_randomization", similarity=similarity)
    assert_untouched(before, model)
    assert torch.equal(rng, torch.get_rng_state())             # re-initialization ran in a forked RNG


def test_model_randomization_restores_the_model_on_failure(x):
    model = user_model()
    maps = sl.explain(model, x, "gradient")
    before = snapshot(model)

    def failing(a, b):
        raise RuntimeError("similarity failed on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        sl.evaluate(model, x, maps, "model_randomization", similarity=failing)
    assert_untouched(before, model)


def test_randomizing_changes_gradient_maps(x):
    model = make_small_cnn()
    maps = sl.explain(model, x, "gradient")
    scores, curves = sl.evaluate(model, x, maps, "model_randomization", return_curves=True)
    assert curves["layers"] == ["fc", "conv2", "bn1", "conv1"]         # output layer first
    sims = curves["similarity"]
    assert sims.shape == (3, 4)
    assert torch.allclose(scores, sims.mean(1))
    assert (sims[:, -1] < 0.9).all() and sims[:, -1].mean() < 0.6   # everything randomized: clearly below 1
    assert (sims[:, -1] < sims[:, 0] + 0.1).all()                     # more randomization, less similar
    again = sl.evaluate(model, x, maps, "model_randomization")
    assert torch.equal(scores, again)                                 # seeded
    other = sl.evaluate(model, x, maps, "model_randomization", seed=5)
    assert not torch.equal(scores, other)


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_small_cnn()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.net(x)


def test_randomizing_a_layer_the_model_does_not_use_keeps_maps(x):
    model = WithUnusedLayer().eval()
    maps = sl.explain(model, x, "gradient")
    scores = sl.evaluate(model, x, maps, "model_randomization", layers=["unused"])
    assert torch.allclose(scores, torch.ones(3))
    # a block name randomizes every parameterized module inside it
    scores, curves = sl.evaluate(model, x, maps, "model_randomization", layers=["unused", "net"],
                                 similarity="spearman_abs", return_curves=True)
    assert curves["layers"] == ["unused", "net"]
    assert torch.allclose(curves["similarity"][:, 0], torch.ones(3)) and (curves["similarity"][:, 1] < 0.9).all()


def test_model_randomization_with_a_method_instance_and_params(x):
    model = make_small_cnn()
    instance = methods.build("smoothgrad", model, samples=2, noise_level=0.1)
    torch.manual_seed(0)
    maps = instance.attribute(x)
    metric = metrics.build("model_randomization", method=instance, similarity="hog")
    measured = metric.measure(model, x, maps)
    scores = measured.scores
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # the re-explanations are charged to the metric: B x samples backward images per layer (4 layers)
    assert measured.cost.backward_images == 3 * 2 * 4
    assert torch.equal(metric(model, x, maps), scores)
    assert not hasattr(metric, "last_cost") and not hasattr(metric, "last_curves")
    by_name = sl.evaluate(model, x, sl.explain(model, x, "input_x_gradient"), "model_randomization",
                          method="input_x_gradient", method_params={"batch_size": 2})
    assert by_name.shape == (3,)


def test_model_randomization_configuration_errors(x):
    model = make_small_cnn()
    maps = sl.explain(model, x, "gradient")
    with pytest.raises(ConfigError, match="did you mean conv2, conv1"):
        sl.evaluate(model, x, maps, "model_randomization", layers=["conv"])
    with pytest.raises(ConfigError, match="no parameters"):
        sl.evaluate(model, x, maps, "model_randomization", layers=["relu1"])
    with pytest.raises(ConfigError, match="unknown similarity"):
        metrics.build("model_randomization", similarity="cosine")
    with pytest.raises(ConfigError, match="unknown method_params"):
        metrics.build("model_randomization", method_params={"steps": 3})
    with pytest.raises(ConfigError, match="unknown method"):
        metrics.build("model_randomization", method="nope")


class TwoPatchModel(nn.Module):
    """Class 0 reads the top-left patch, class 1 the bottom-right one, class 2 the same as class 0."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(3, 1, 12, 12)
        w[0, :, 1:5, 1:5] = 1.0
        w[1, :, 7:11, 7:11] = 1.0
        w[2] = w[0]
        self.weight = nn.Parameter(w)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight)


def test_random_logit_by_construction():
    model = TwoPatchModel()
    x = torch.randn(4, 1, 12, 12)
    maps = sl.explain(model, x, "gradient", target=0)
    scores, curves = sl.evaluate(model, x, maps, "random_logit", target=0, similarity="spearman",
                                 return_curves=True)
    other = curves["other_class"]
    assert ((other == 1) | (other == 2)).all()
    # another class with the same evidence gives the same map (similarity 1); class 1 does not
    want = torch.where(other == 2, torch.ones(4), torch.full((4,), -1 / 8))
    # spearman of two disjoint 16-pixel indicator maps on 144 pixels: ranks are two-valued, so
    # it is their Pearson correlation: (0 - p^2) / (p (1 - p)) with p = 16/144 = 1/9 -> -1/8
    assert torch.allclose(scores, want, atol=1e-6)
    assert sl.evaluate(model, x, maps, "random_logit", target=0, seed=3).shape == (4,)
    # the other class is drawn per image: an image keeps its class in any batch (with its id)
    metric = metrics.build("random_logit", similarity="spearman")
    ids = ["a", "b", "c", "d"]
    _, whole = metric(model, x, maps, 0, image_ids=ids, return_curves=True)
    _, part = metric(model, x[1:3], maps.maps[1:3], 0, image_ids=ids[1:3], return_curves=True)
    assert torch.equal(whole["other_class"][1:3], part["other_class"])
    many = metric(model, x.repeat(8, 1, 1, 1), maps.maps.repeat(8, 1, 1), 0, return_curves=True)[1]["other_class"]
    assert set(many.tolist()) == {1, 2}                               # both other classes come up


def test_random_logit_is_seeded_and_leaves_the_model_untouched(x):
    model = user_model()
    maps = sl.explain(model, x, "gradient")
    before = snapshot(model)
    a, ca = sl.evaluate(model, x, maps, "random_logit", return_curves=True)
    b, cb = sl.evaluate(model, x, maps, "random_logit", return_curves=True)
    assert torch.equal(a, b) and torch.equal(ca["other_class"], cb["other_class"])
    predicted = model.eval()(x).argmax(1)
    model.train()
    assert (ca["other_class"] != predicted).all()
    assert_untouched(before, model)
    with pytest.raises(InputError, match="class targets"):
        sl.evaluate(model, x, maps, "random_logit", target=lambda out: out[:, 0])
    assert_untouched(before, model)
