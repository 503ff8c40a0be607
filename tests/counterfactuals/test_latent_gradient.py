"""The latent-gradient counterfactual baseline: it raises p(target) on a toy generator/classifier, keeps
each image independent of its batch, honours the proximity term, and leaves both models untouched."""

import pytest
import torch
from torch import nn

from saliencylab.core.errors import ConfigError, InputError
from saliencylab.counterfactuals.latent_gradient import latent_gradient_counterfactual
from saliencylab.metrics import counterfactual as cf

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyGenerator(nn.Module):
    """z (B, 4) -> single-channel 6x6 images."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 36)
        self.bn = nn.BatchNorm1d(36)

    def forward(self, z):
        return torch.tanh(self.bn(self.fc(z))).view(-1, 1, 6, 6)


class ToyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 36, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).flatten(1)))


def toys():
    torch.manual_seed(0)
    generator, classifier = ToyGenerator(), ToyClassifier()
    with torch.no_grad():  # non-trivial running statistics: eval and train modes differ
        for bn in (generator.bn, classifier.bn):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
        classifier.fc.weight.mul_(10)  # confident enough that the classes are far apart
    # the user's state: train mode, a frozen parameter, a stale .grad
    generator.train()
    classifier.train()
    classifier.conv.bias.requires_grad_(False)
    classifier.fc.weight.grad = torch.ones_like(classifier.fc.weight)
    return generator, classifier


def snapshot(model):
    return ({n: t.detach().clone() for n, t in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})


def assert_same(before, after):
    tensors, modes, flags, grads = before
    assert modes == after[1] and flags == after[2]
    assert all(torch.equal(tensors[n], after[0][n]) for n in tensors)
    assert all((g is None and after[3][n] is None) or torch.equal(g, after[3][n]) for n, g in grads.items())


def probabilities(generator, classifier, z, target):
    modes = generator.training, classifier.training
    generator.eval(), classifier.eval()
    with torch.no_grad():
        p = classifier(generator(z)).softmax(1)[torch.arange(len(z)), torch.as_tensor(target)]
    generator.train(modes[0]), classifier.train(modes[1])
    return p


def test_raises_the_target_probability_and_leaves_the_models_untouched():
    generator, classifier = toys()
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    target = [0, 1, 2, 1]
    before = snapshot(generator), snapshot(classifier)
    rng = torch.get_rng_state()
    start = probabilities(generator, classifier, z, target)
    x_cf, z_cf = latent_gradient_counterfactual(generator, classifier, z, target, steps=60, lr=0.1)
    assert_same(before[0], snapshot(generator))
    assert_same(before[1], snapshot(classifier))
    assert torch.equal(rng, torch.get_rng_state())
    assert not x_cf.requires_grad and not z_cf.requires_grad and z_cf.shape == z.shape
    end = probabilities(generator, classifier, z_cf, target)
    assert (end > start + 0.05).all(), (start, end)
    # x_cf is the generator's image of z_cf (eval mode), and the counterfactuals are valid
    generator.eval()
    with torch.no_grad():
        assert torch.allclose(x_cf, generator(z_cf), atol=1e-6)
    generator.train()
    assert cf.validity(classifier.eval(), x_cf, target).mean() >= 0.75
    classifier.train()
    # the input codes are not modified in place
    assert torch.equal(z, torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("weight", [0.0, 5.0])
def test_each_code_is_optimised_on_its_own_and_zero_steps_is_the_start(weight):
    generator, classifier = toys()
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    x_all, z_all = latent_gradient_counterfactual(generator, classifier, z, 2, steps=15, lr=0.05,
                                                  proximity_weight=weight)
    parts = [latent_gradient_counterfactual(generator, classifier, z[i:i + 1], 2, steps=15, lr=0.05,
                                            proximity_weight=weight)[1] for i in range(3)]
    assert torch.allclose(z_all, torch.cat(parts), atol=1e-5)
    assert not torch.allclose(z_all, z, atol=1e-3)
    x0, z0 = latent_gradient_counterfactual(generator, classifier, z, 2, steps=0)
    assert torch.equal(z0, z)


def test_the_proximity_weight_keeps_the_image_near_the_start():
    generator, classifier = toys()
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    x_start, _ = latent_gradient_counterfactual(generator, classifier, z, 0, steps=0)
    free, _ = latent_gradient_counterfactual(generator, classifier, z, 0, steps=40, lr=0.1)
    held, _ = latent_gradient_counterfactual(generator, classifier, z, 0, steps=40, lr=0.1, proximity_weight=50.0)
    assert cf.proximity(x_start, held).mean() < 0.5 * cf.proximity(x_start, free).mean()


def test_bad_arguments_fail_in_one_line():
    generator, classifier = toys()
    z = torch.randn(2, 4)
    with pytest.raises(InputError, match="out of range"):
        latent_gradient_counterfactual(generator, classifier, z, 5, steps=1)
    with pytest.raises(InputError, match="targets for 2"):
        latent_gradient_counterfactual(generator, classifier, z, [0, 1, 2], steps=1)
    with pytest.raises(InputError, match="z must be"):
        latent_gradient_counterfactual(generator, classifier, torch.zeros(2, 4, dtype=torch.long), 0)
    for kwargs in ({"steps": -1}, {"lr": 0}, {"proximity_weight": -1.0}):
        with pytest.raises(ConfigError):
            latent_gradient_counterfactual(generator, classifier, z, 0, **kwargs)
