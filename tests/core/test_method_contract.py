"""The method contract, generated over the registry: a new method gets these tests for free.

- `explain` returns one record (maps at the input's size, targets, outputs, cost) and stores nothing on
  the instance;
- stochastic methods are batch- and shard-invariant: explaining x at once equals explaining its halves
  (with image ids), and `batch_size` None, 1 and 7 give the same maps;
- differentiable methods return maps whose gradient reaches the model's parameters; the others refuse
  `create_graph=True` with one clear error.
"""

import pytest
import torch

import saliencylab as sl
from saliencylab import methods
from conftest import make_small_cnn
from core.test_model_untouched import cheap_params, model_for

IDS = ["cat.jpg", "dog.jpg", "car.jpg", "cup.jpg"]


@pytest.fixture
def four_images():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 12, 12, generator=g)


def assert_close_maps(a, b, what):
    scale = max(float(a.abs().max()), 1e-12)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale), f"{what}: max diff {float((a - b).abs().max())}"


@pytest.mark.parametrize("name", methods.available())
def test_explain_returns_one_record_and_keeps_nothing(name, four_images):
    model = model_for(name)
    method = methods.build(name, model, **cheap_params(name))
    before = set(vars(method))
    e = method.explain(four_images)
    assert e.maps.shape == (4, 12, 12) and not e.maps.requires_grad
    assert e.method == name and e.targets is not None and e.targets.shape == (4,)
    assert e.outputs is not None and e.outputs.shape == (4, 5)
    assert e.cost.forward_images > 0
    assert set(vars(method)) == before, f"{name} stored {set(vars(method)) - before} on the instance"
    assert torch.equal(e.targets, model(four_images).argmax(1))
    # explicit per-image targets are honoured
    t = torch.tensor([0, 1, 2, 3])
    assert torch.equal(method.explain(four_images, t).targets.cpu(), t)


@pytest.mark.parametrize("name", methods.available(stochastic=True))
def test_stochastic_methods_are_shard_invariant(name, four_images):
    model = make_small_cnn()
    method = methods.build(name, model, **cheap_params(name))
    whole = method.explain(four_images, image_ids=IDS).maps
    halves = torch.cat([method.explain(four_images[:1], image_ids=IDS[:1]).maps,
                        method.explain(four_images[1:], image_ids=IDS[1:]).maps])
    assert_close_maps(whole, halves, f"{name}: whole batch vs shards")
    again = method.explain(four_images[[2, 0]], image_ids=[IDS[2], IDS[0]]).maps
    assert_close_maps(whole[[2, 0]], again, f"{name}: reordered images")


@pytest.mark.parametrize("name", [n for n in methods.available(stochastic=True) if "batch_size" in methods.parameters(n)])
def test_stochastic_methods_do_not_depend_on_batch_size(name, four_images):
    model = make_small_cnn()
    maps = {bs: methods.build(name, model, **cheap_params(name, batch_size=bs)).attribute(four_images, image_ids=IDS)
            for bs in (None, 1, 7)}
    assert_close_maps(maps[None], maps[1], f"{name}: batch_size None vs 1")
    assert_close_maps(maps[None], maps[7], f"{name}: batch_size None vs 7")


def test_some_methods_are_declared_stochastic_and_differentiable():
    assert {"smoothgrad", "igos", "iba"} <= set(methods.available(stochastic=True))
    assert {"gradient", "input_x_gradient", "integrated_gradients", "gradcam", "gradcam_plus_plus",
            "layercam"} <= set(methods.available(differentiable=True))


@pytest.mark.parametrize("name", methods.available(differentiable=True))
def test_differentiable_maps_reach_the_parameters(name, four_images):
    model = model_for(name).to(torch.float64).train()
    e = sl.explain(model, four_images.double(), name, create_graph=True, **cheap_params(name))
    (e.maps ** 2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(grads[n] is not None for n in grads if n.split(".")[0] in ("conv1", "conv2"))
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads.values())
    assert model.training, "the caller's train mode is kept"


@pytest.mark.parametrize("name", [n for n in methods.available() if not methods.get(n).differentiable])
def test_other_methods_refuse_create_graph(name, four_images):
    with pytest.raises(sl.ConfigError, match="not differentiable"):
        sl.explain(model_for(name), four_images, name, create_graph=True, **cheap_params(name))


@pytest.mark.parametrize("name", [n for n in methods.available() if "baseline" in methods.parameters(n)])
def test_a_per_image_baseline_follows_its_image(name, four_images):
    """A (B, C, H, W) baseline gives each image its own baseline, however the method chunks its images:
    explaining the batch equals explaining each image alone with its own baseline."""
    model = make_small_cnn()
    g = torch.Generator().manual_seed(11)
    baselines = torch.randn(4, 3, 12, 12, generator=g)
    extra = {"batch_size": 1} if "batch_size" in methods.parameters(name) else {}
    method = methods.build(name, model, **cheap_params(name, baseline=baselines, **extra))
    whole = method.explain(four_images, image_ids=IDS).maps
    alone = torch.cat([methods.build(name, model, **cheap_params(name, baseline=baselines[i:i + 1], **extra))
                       .explain(four_images[i:i + 1], image_ids=IDS[i:i + 1]).maps for i in range(4)])
    assert_close_maps(whole, alone, f"{name}: per-image baseline vs one image at a time")
    # and the baselines matter (a shared baseline gives other maps), where this tiny untrained model
    # gives the method anything to find (the optimisation methods' masks stay near zero on it)
    if name in ("integrated_gradients", "occlusion", "rise", "structured_attention_graph"):
        shared = methods.build(name, model, **cheap_params(name, baseline=baselines[:1], **extra))
        assert not torch.allclose(whole[1:], shared.explain(four_images, image_ids=IDS).maps[1:])
