"""PruneGrad / PruneInt against a one-image port of the authors' procedure, and by construction."""

import numpy as np
import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.methods.pathway import alphas, percentile_threshold
from zoo import ResNetLike, VGGLike


def authors_masks(model, x, percentile, scores="taylor", steps=10, schedule="linear"):
    """The authors' procedure for one image (nn.ReLU modules; numpy percentile; score <= threshold
    pruned; PruneInt layer by layer), written from its semantics. Returns (masks, input gradient)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    state = {"acts": [], "masks": None, "scale": None}

    def hook(module, args, output):
        i = len(state["acts"])
        out = output if state["masks"] is None else output * state["masks"][i]
        if state["scale"] is not None and state["scale"][0] == i:
            out = out * state["scale"][1]
        state["acts"].append(out)
        return out

    handles = [m.register_forward_hook(hook) for m in relus]
    saved = [(m, m.inplace) for m in relus]
    for m in relus:
        m.inplace = False
    try:
        def run(inp):
            state["acts"] = []
            out = model(inp)
            target = int(out.argmax(1))
            return out[0, target], list(state["acts"])

        y, acts = run(x)
        if scores == "taylor":
            grads = torch.autograd.grad(y, acts)
            layer_scores = [(a * g).abs().detach() for a, g in zip(acts, grads)]
        else:
            acts = [a.detach() for a in acts]
            layer_scores = []
            for i, a in enumerate(acts):
                total = torch.zeros_like(a)
                for alpha in alphas(steps, schedule).tolist():
                    state["scale"] = (i, alpha)
                    y, hs = run(x)
                    total += torch.autograd.grad(y, hs[i])[0]
                state["scale"] = None
                layer_scores.append((total / (steps + 1) * a).abs())
        flat = np.concatenate([s.numpy().ravel() for s in layer_scores])
        threshold = np.percentile(flat, percentile)
        masks = [(s > torch.as_tensor(threshold, dtype=s.dtype)).to(s.dtype) for s in layer_scores]
        state["masks"] = masks
        inp = x.clone().requires_grad_(True)
        y, _ = run(inp)
        grad = torch.autograd.grad(y, inp)[0]
    finally:
        for h in handles:
            h.remove()
        for m, flag in saved:
            m.inplace = flag
    return masks, grad


@pytest.fixture
def vgg_and_images():
    model = VGGLike().double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x


def test_prune_grad_matches_the_authors_procedure(vgg_and_images):
    model, x = vgg_and_images
    e = sl.explain(model, x, "prune_grad", percentile=70, activations=(nn.ReLU,), channels=True)
    for i in range(3):
        masks, grad = authors_masks(model, x[i:i + 1], 70)
        assert len(masks) == len(e.extras["masks"])
        for ours, theirs in zip(e.extras["masks"], masks):
            assert torch.equal(ours[i:i + 1].to(theirs.dtype), theirs)
        assert torch.allclose(e.maps[i], grad[0], rtol=1e-9, atol=1e-12)
    # at most 30% kept: ties at the threshold are pruned, and here more than 70% of the scores are 0
    assert ((e.extras["kept"] > 0.15) & (e.extras["kept"] <= 0.3)).all()


@pytest.mark.parametrize("schedule", ["linear", "authors"])
def test_prune_int_matches_the_authors_procedure(vgg_and_images, schedule):
    model, x = vgg_and_images
    e = sl.explain(model, x[:2], "prune_int", percentile=80, steps=4, alpha_schedule=schedule,
                   activations=(nn.ReLU,), channels=True, batch_size=7)
    for i in range(2):
        masks, grad = authors_masks(model, x[i:i + 1], 80, scores="integrated", steps=4, schedule=schedule)
        for ours, theirs in zip(e.extras["masks"], masks):
            assert torch.equal(ours[i:i + 1].to(theirs.dtype), theirs)
        assert torch.allclose(e.maps[i], grad[0], rtol=1e-9, atol=1e-12)


def test_the_authors_alphas_are_cumulative():
    assert torch.allclose(alphas(10, "authors"), torch.tensor([0, .1, .3, .6, 1., 1.5, 2.1, 2.8, 3.6, 4.5, 5.5],
                                                                 dtype=torch.float64))
    assert torch.allclose(alphas(4, "linear"), torch.tensor([0, .25, .5, .75, 1.], dtype=torch.float64))


def test_percentile_is_numpys_on_rows_with_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (4, 1001), generator=g).double() * torch.rand(4, 1001, generator=g, dtype=torch.float64).round(decimals=1)
    for p in (0.0, 12.5, 70.0, 90.0, 99.9):
        ours = percentile_threshold(scores, p)
        theirs = torch.tensor([np.percentile(r.numpy(), p) for r in scores], dtype=torch.float64)
        assert torch.allclose(ours, theirs, atol=1e-12), p


class Hand(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU()
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x, masks=None):
        m = masks or [1.0, 1.0]
        h = self.relu1(self.conv1(x)) * m[0]
        h = self.relu2(self.conv2(h)) * m[1]
        return self.fc(h.flatten(1))


def test_a_hand_masked_network_gives_the_same_map():
    model = Hand().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    e = sl.explain(model, x, "prune_grad", percentile=60, channels=True)
    masks = [m.double() for m in e.extras["masks"]]
    assert 0.3 < float(e.extras["kept"].mean()) < 0.45
    inp = x.clone().requires_grad_(True)
    out = model(inp, masks)
    grad = torch.autograd.grad(out.gather(1, e.targets.view(-1, 1)).sum(), inp)[0]
    assert torch.allclose(e.maps, grad, rtol=1e-10, atol=1e-12)


def test_percentile_zero_prunes_only_zero_scores_and_keeps_the_gradient(vgg_and_images):
    model, x = vgg_and_images
    e = sl.explain(model, x, "prune_grad", percentile=0, channels=True)
    plain = sl.explain(model, x, "gradient", channels=True).maps
    assert torch.allclose(e.maps, plain, rtol=1e-9, atol=1e-12)
    assert (e.extras["kept"] < 1).all()  # zero activations were pruned, and it did not matter


def test_masks_belong_to_calls_not_modules():
    """torchvision's BasicBlock calls self.relu twice: two layers of neurons, each with its own mask."""
    model = ResNetLike().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    e = sl.explain(model, x, "prune_int", steps=2, percentile=50)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    assert len(e.extras["masks"]) == 5  # the stem's relu and two calls per block
    assert [tuple(m.shape[1:]) for m in e.extras["masks"]] == [(6, 16, 16)] + [(6, 8, 8)] * 4
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))  # switched back after the call


def test_embedded_model_prunes_its_relu6_and_authors_relu_only_fails_clearly():
    from saliencylab.models import load
    lite = load().model
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    e = sl.explain(lite, x, "prune_grad")
    assert torch.isfinite(e.maps).all() and e.maps.abs().sum() > 0
    assert abs(float(e.extras["kept"][0]) - 0.1) < 0.01
    assert e.cost.forward_images == 2 and e.cost.backward_images == 2
    with pytest.raises(sl.ConfigError, match="no activation modules"):
        sl.explain(lite, x, "prune_grad", activations=(nn.ReLU,))
