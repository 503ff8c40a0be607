"""The "bcos" method: contributions W(x) * x that sum to the logit, batched, differentiable, B-cos only."""

import pytest
import torch

import saliencylab as sl
from saliencylab import methods
from saliencylab.models.bcos import AddInverse, BcosCNN, BcosConv2d, LogitLayer
from conftest import make_small_cnn
from core.test_model_untouched import assert_same_state, state

pytestmark = pytest.mark.usefixtures("one_thread")


def bcos_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return BcosCNN(**{"num_classes": 3, "width": 4, **kwargs}).double().eval()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(5)
    return torch.rand(4, 3, 12, 12, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kwargs", [{}, {"b": 2.5, "max_out": 1, "logit_temperature": 0.01},
                                    {"b": 1.5, "max_out": 3, "logit_bias": 0.7}])
def test_contributions_sum_to_the_logit(images, kwargs):
    model = bcos_model(**kwargs)
    target = torch.tensor([0, 2, 1, 2])
    e = sl.explain(model, images, "bcos", target=target, return_weights=True)
    logits = model(images).gather(1, target[:, None])[:, 0]
    explained = logits - model.logit.bias  # the constant logit bias is not a contribution
    contributions = e.extras["weights"] * e.extras["encoded"]  # (B, 6, H, W), before folding
    assert contributions.shape == (4, 6, 12, 12)
    assert torch.allclose(e.extras["encoded"], AddInverse()(images))
    assert torch.allclose(contributions.sum((1, 2, 3)), explained, rtol=1e-5, atol=0)
    assert torch.allclose(e.maps.sum((1, 2)), explained, rtol=1e-5, atol=0)  # the folded map too
    assert explained.abs().min() > 1e-8  # not a vacuous 0 == 0
    # channels=True folds each colour with its inverse: x_c W_c + (1 - x_c) W_c+3
    folded = sl.explain(model, images, "bcos", target=target, channels=True).maps
    assert folded.shape == (4, 3, 12, 12)
    assert torch.allclose(folded, contributions[:, :3] + contributions[:, 3:], rtol=1e-9, atol=1e-15)
    assert torch.equal(e.targets, target) and torch.allclose(e.outputs, model(images))


def test_weights_are_the_authors_explanation_mode_gradient(images):
    """Independently: the authors' recipe (every layer's explanation mode switched on, gradient of the
    logit w.r.t. the encoded input) gives the same W(x); plain input x gradient does not."""
    model = bcos_model(1)
    e = sl.explain(model, images, "bcos", return_weights=True)
    enc = AddInverse()(images).requires_grad_(True)
    for m in model.modules():
        if isinstance(m, BcosConv2d):
            m.set_explanation_mode(True)
    rest = torch.nn.Sequential(model.conv1, model.conv2, model.conv3, model.features, model.classifier,
                               model.pool, torch.nn.Flatten(), model.logit)
    out = rest(enc)
    w = torch.autograd.grad(out.gather(1, e.targets[:, None]).sum(), enc)[0]
    assert torch.allclose(e.extras["weights"], w, rtol=1e-9, atol=1e-15)
    ixg = sl.explain(bcos_model(1), images, "input_x_gradient").maps
    assert not torch.allclose(ixg, e.maps, rtol=1e-3)


def test_equals_one_image_at_a_time_and_does_not_depend_on_batching(images):
    model = bcos_model(2)
    whole = sl.explain(model, images, "bcos").maps
    alone = torch.cat([sl.explain(model, images[i:i + 1], "bcos").maps for i in range(4)])
    assert torch.allclose(whole, alone, rtol=1e-9, atol=1e-15)
    for batch_size in (1, 3):
        assert torch.allclose(sl.explain(model, images, "bcos", batch_size=batch_size).maps, whole,
                              rtol=1e-9, atol=1e-15)
    assert torch.allclose(sl.explain(model, images[[3, 1]], "bcos").maps, whole[[3, 1]], rtol=1e-9, atol=1e-15)


def test_create_graph_gradient_matches_finite_differences(images):
    """A loss on the maps: its double-backprop gradient w.r.t. weights of the first, a middle and the
    last layer equals central finite differences of the same loss (the dynamic scales included)."""
    model = bcos_model(3, num_classes=2, width=2).train()
    x = images[:2, :, :8, :8]
    g = torch.Generator().manual_seed(0)
    R = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)

    def loss(create_graph):
        return (sl.explain(model, x, "bcos", target=[0, 1], create_graph=create_graph).maps * R).sum()

    params = dict(model.named_parameters())
    names = ["conv1.linear.weight", "features.linear.weight", "classifier.linear.weight"]
    grads = torch.autograd.grad(loss(True), [params[n] for n in names])
    assert model.training
    for name, grad in zip(names, grads):
        p = params[name]
        flat = torch.randperm(p.numel(), generator=g)[:3]
        for i in flat.tolist():
            idx = torch.unravel_index(torch.tensor(i), p.shape)
            old = float(p.data[idx])
            h = 1e-6
            p.data[idx] = old + h
            up = float(loss(False))
            p.data[idx] = old - h
            down = float(loss(False))
            p.data[idx] = old
            fd = (up - down) / (2 * h)
            assert abs(float(grad[idx]) - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, i, float(grad[idx]), fd)


def test_create_graph_maps_equal_the_plain_maps(images):
    model = bcos_model(4).train()
    plain = sl.explain(model, images, "bcos").maps
    e = sl.explain(model, images, "bcos", create_graph=True, batch_size=3)
    assert e.maps.requires_grad and model.training
    assert torch.allclose(e.maps.detach(), plain, rtol=1e-9, atol=1e-15)
    (e.maps ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_refuses_a_model_without_bcos_layers(images):
    with pytest.raises(sl.ConfigError, match="needs a B-cos network.*SmallCNN has none"):
        sl.explain(make_small_cnn(), images.float(), "bcos")
    with pytest.raises(sl.ConfigError, match="return_weights"):
        methods.build("bcos", bcos_model(), return_weights="yes")


def test_model_untouched(images):
    model = bcos_model(5).train()
    before = state(model)
    sl.explain(model, images, "bcos", return_weights=True)
    sl.explain(model, images, "bcos", create_graph=True)
    assert_same_state(before, state(model))
    assert not any(m.detach for m in model.modules() if isinstance(m, BcosConv2d))
    assert all("forward" not in vars(m) for m in model.modules())


def test_works_under_no_grad_and_on_a_pre_encoded_model(images):
    """The authors feed 6-channel encoded images to models without AddInverse: explained w.r.t. that input."""
    model = bcos_model(6)
    with torch.no_grad():
        e = sl.explain(model, images, "bcos")
    assert torch.allclose(e.maps, sl.explain(model, images, "bcos").maps)
    encoded_model = torch.nn.Sequential(model.conv1, model.conv2, model.conv3, model.features,
                                        model.classifier, model.pool, torch.nn.Flatten(), LogitLayer())
    enc = AddInverse()(images)
    m6 = sl.explain(encoded_model, enc, "bcos", channels=True).maps
    assert m6.shape == (4, 6, 12, 12)
    assert torch.allclose(m6.sum(1), e.maps, rtol=1e-9, atol=1e-15)


def test_registered_and_listed():
    assert "bcos" in methods.available(differentiable=True)
    cls = methods.get("bcos")
    assert cls.requires == "bcos_model" and set(methods.parameters("bcos")) == {"batch_size", "return_weights"}
