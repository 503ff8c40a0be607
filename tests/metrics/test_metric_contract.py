"""The metric contract, generated over `metrics.registry`: every registered metric, on small inputs and a
tiny model, with the data its `requires` names.

- (B,) finite scores, through `measure()` (with its cost) and `__call__` (with curves);
- the user's model is untouched: the same tensor objects with the same values, train/eval flags,
  requires_grad flags and .grad, no hooks left, and the global RNG not consumed;
- nothing is stored on the metric instance by a call, and `type(m)(**m.params)` rebuilds it;
- stochastic metrics: with image ids, scoring the batch equals scoring its parts, for every batch_size;
  the draws follow the seed and (for per-image draws) the image ids;
- `requirements` / `missing_requirements` agree with the class metadata, and a metric with missing data
  fails before any forward pass.
"""

import pytest
import torch

from saliencylab import metrics
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.core.session import _HOOK_DICTS
from saliencylab.metrics.base import REQUIREMENTS

from conftest import make_small_cnn

NAMES = metrics.available()
B, H, W = 4, 16, 16
IDS = ["cat.png", "dog.png", "owl.png", "yak.png"]
# Smaller settings where the defaults would only make the test slower (the defaults run in test_runs_*).
FAST = {"soundness": {"ratios": [0.9, 0.7, 0.5, 0.3, 0.1]}, "sensitivity_n": {"samples": 6},
        "faithfulness_correlation": {"samples": 6}, "infidelity": {"samples": 6}, "morf": {"steps": 10},
        "lerf": {"steps": 10}, "morf_lerf": {"steps": 10}, "deletion": {"steps": 10}, "insertion": {"steps": 10}}
# Metrics whose draws are random but the same for every image (the randomized weights of a layer).
SHARED_DRAWS = {"model_randomization"}


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, H, W, generator=g)
    maps = torch.randn(B, H, W, generator=g)
    return x, maps


def data_for(name):
    """The data each requirement asks for: boxes (non-empty), truth (positive and negative pixels)."""
    g = torch.Generator().manual_seed(1)
    data = {}
    for r in metrics.requirements(name):
        if r == "boxes_or_masks":
            data["boxes"] = torch.tensor([[2, 3, 9, 12], [0, 0, 16, 5], [5, 5, 6, 6], [8, 1, 15, 15]])
        elif r == "truth":
            truth = torch.randn(B, H, W, generator=g)
            truth[:, 0, 0], truth[:, 0, 1] = 1.0, -1.0
            data["truth"] = truth
    return data


def params_for(name, **extra):
    params = dict(FAST.get(name, {}))
    if "method" in metrics.requirements(name):
        params["method"] = "gradient"  # the runners pass the method under evaluation
    params.update(extra)
    return params


def user_model():
    """Train mode, a frozen parameter, a stale .grad and a hook of the user's own."""
    model = make_small_cnn().train()
    model.conv1.bias.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv2.register_forward_hook(lambda m, i, o: None)
    return model


def snapshot(model):
    return {
        "tensors": {n: (t, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "hooks": {(n, d): list(getattr(m, d).keys()) for n, m in model.named_modules() for d in _HOOK_DICTS
                  if hasattr(m, d)},
    }


def assert_untouched(before, model):
    after = snapshot(model)
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for n, (t, values) in before["tensors"].items():
        assert after["tensors"][n][0] is t, f"{n} was replaced"
        assert torch.equal(t.detach(), values), f"{n} changed"
    for n, (g, values) in before["grads"].items():
        now = dict(model.named_parameters())[n].grad
        assert now is g and (g is None or torch.equal(g, values)), f".grad of {n} changed"


def model_for(name, model):
    return model if metrics.get(name).needs_model else None


@pytest.mark.parametrize("name", NAMES)
def test_finite_scores_per_image_and_the_model_untouched(name):
    model = user_model()
    x, maps = inputs()
    metric = metrics.build(name, **params_for(name))
    state = dict(vars(metric))
    before = snapshot(model)
    rng = torch.get_rng_state()
    measured = metric.measure(model_for(name, model), x, maps, **data_for(name))
    assert torch.equal(rng, torch.get_rng_state()), "the global RNG was used"
    assert_untouched(before, model)
    assert measured.scores.shape == (B,) and torch.isfinite(measured.scores).all(), measured.scores
    assert not measured.scores.requires_grad
    assert measured.curves is None or isinstance(measured.curves, dict)
    if metric.needs_model:
        assert measured.cost is not None and measured.cost.forward_images > 0
    # nothing is kept on the instance; the instance rebuilds from its params
    assert vars(metric).keys() == state.keys() and all(vars(metric)[k] is v for k, v in state.items())
    rebuilt = type(metric)(**metric.params)
    assert rebuilt.params == metric.params
    scores, curves = metric(model_for(name, model), x, maps, return_curves=True, **data_for(name))
    assert torch.allclose(scores, measured.scores, equal_nan=True)
    assert_untouched(before, model)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_declared_once(name):
    declared = metrics.parameters(name)
    metric = metrics.build(name)
    for key, default in declared.items():
        value = getattr(metric, key)
        # a default None may be filled in at construction (a protocol's settings)
        assert default is None or value == default, (key, value, default)
    with pytest.raises(ConfigError, match="unknown parameter"):
        metrics.build(name, no_such_parameter=1)
    with pytest.raises(ConfigError, match="unknown parameter"):
        metrics.get(name)(no_such_parameter=1)


STOCHASTIC = [n for n in NAMES if metrics.get(n).stochastic]


def test_the_stochastic_metrics_are_the_ones_that_draw():
    assert set(STOCHASTIC) == {"road", "road_morf", "road_lerf", "completeness", "soundness", "sensitivity_n",
                               "faithfulness_correlation", "infidelity", "random_logit", "model_randomization"}


def sharp_cnn():
    """The small CNN with a scaled head, so that its scores move visibly with the random draws."""
    model = make_small_cnn()
    with torch.no_grad():
        model.fc.weight.mul_(25)
    return model


def stochastic_params(name, **extra):
    # ROAD's imputation noise (0.01) barely moves a small model's scores: make the draws count
    noisy = {"noise": 0.5} if "noise" in metrics.parameters(name) else {}
    return params_for(name, **noisy, **extra)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_scores_do_not_depend_on_the_batch(name):
    model = sharp_cnn()
    x, maps = inputs()
    data = data_for(name)
    metric = metrics.build(name, **stochastic_params(name))
    whole = metric(model, x, maps, image_ids=IDS, **data)
    parts = torch.cat([metric(model, x[:1], maps[:1], image_ids=IDS[:1], **data),
                       metric(model, x[1:], maps[1:], image_ids=IDS[1:], **data)])
    assert torch.allclose(whole, parts, rtol=1e-5, atol=1e-5), (whole, parts)
    if "batch_size" in metrics.parameters(name):
        for batch_size in (1, 7):
            other = metrics.build(name, **stochastic_params(name, batch_size=batch_size))(model, x, maps,
                                                                                         image_ids=IDS, **data)
            assert torch.allclose(whole, other, rtol=1e-5, atol=1e-5), (batch_size, whole, other)
    # the draws matter: another seed, and (for per-image draws) other image ids, change the scores
    reseeded = metrics.build(name, **stochastic_params(name, seed=11))(model, x, maps, image_ids=IDS, **data)
    assert not torch.allclose(whole, reseeded, rtol=1e-5, atol=1e-5), name
    renamed = metric(model, x, maps, image_ids=[i + "~" for i in IDS], **data)
    if name in SHARED_DRAWS:
        assert torch.allclose(whole, renamed, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(whole, renamed, rtol=1e-5, atol=1e-5), name


class CountingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_small_cnn()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("name", NAMES)
def test_missing_requirements(name):
    cls = metrics.get(name)
    requires = metrics.requirements(name)
    assert isinstance(requires, tuple) and set(requires) <= set(REQUIREMENTS)
    # the category says what the metric needs
    expected = {"localization": ("boxes_or_masks",), "groundtruth": ("truth",), "sanity": ("method",)}
    assert requires == expected.get(cls.category, ())
    data = data_for(name)
    assert metrics.missing_requirements(name, **data) == []
    missing = metrics.missing_requirements(name)
    want = {"boxes_or_masks": f"metric '{name}' needs boxes= or masks=", "truth": f"metric '{name}' needs truth="}
    assert missing == [want[r] for r in requires if r in want]
    if "boxes_or_masks" in requires:
        assert metrics.missing_requirements(name, masks=torch.ones(B, H, W, dtype=torch.bool)) == []
    if missing:  # fails before the first forward pass
        model = CountingModel()
        x, maps = inputs()
        with pytest.raises(InputError, match=missing[0]):
            metrics.build(name)(model if cls.needs_model else None, x, maps)
        assert model.calls == 0
