"""LRP: rules against a slow matrix-form reference, Captum, conservation, canonizers, model structures."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliencylab as sl
from saliencylab.methods.propagation import AlphaBeta, Composite, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus
from saliencylab.methods.propagation.canonizers import folded
from zoo import ResNetLike, VGGLike, make_small_cnn

torch.set_default_dtype(torch.float32)


def stab(d, eps=1e-6):
    return d + ((d == 0).to(d) + d.sign()) * eps


def layer_matrix(module, in_shape, weight=None):
    """(out, in) matrix of a conv/linear/avg-pool layer's linear part, and its bias vector (out,)."""
    def f(v, w):
        v = v.view(1, *in_shape)
        if isinstance(module, nn.Conv2d):
            return F.conv2d(v, w, None, module.stride, module.padding, module.dilation, module.groups).flatten()
        if isinstance(module, nn.Linear):
            return F.linear(v, w).flatten()
        return module(v).flatten()  # average pooling
    w = None if isinstance(module, nn.AvgPool2d) else (module.weight if weight is None else weight)
    n_in = int(torch.tensor(in_shape).prod())
    M = torch.autograd.functional.jacobian(lambda v: f(v, w), torch.zeros(n_in, dtype=torch.float64), vectorize=True)
    out_shape = f(torch.zeros(n_in, dtype=torch.float64), w).shape
    if getattr(module, "bias", None) is None:
        bias = torch.zeros(out_shape, dtype=torch.float64)
    else:
        spatial = M.shape[0] // module.bias.numel()
        bias = module.bias.detach().repeat_interleave(spatial)
    return M.detach(), bias


def reference_rule(rule, module, in_shape, x, R, low=None, high=None):
    """R_in from the rule's formula, over explicit (out, in) contribution matrices (float64)."""
    W, b = layer_matrix(module, in_shape)
    Wp, Wn, xp, xn = W.clamp(min=0), W.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    bp, bn = b.clamp(min=0), b.clamp(max=0)
    if rule == "lrp0":  # average pooling, and layers without a rule
        Z = W * x
        return (Z * (R / torch.where(Z.sum(1) == 0, torch.ones_like(R), Z.sum(1)))[:, None]).sum(0)
    if isinstance(rule, Epsilon):
        z = W @ x + b
        return (W * x * (R / stab(z, rule.epsilon))[:, None]).sum(0)
    if isinstance(rule, ZPlus):
        P = Wp * xp + Wn * xn
        return (P * (R / stab(P.sum(1) + bp))[:, None]).sum(0)
    if rule.name == "alpha_beta":
        P, N = Wp * xp + Wn * xn, Wn * xp + Wp * xn
        return (rule.alpha * (P * (R / stab(P.sum(1) + bp))[:, None]).sum(0)
                - rule.beta * (N * (R / stab(N.sum(1) + bn))[:, None]).sum(0))
    if rule.name == "gamma":
        g, z = rule.gamma, W @ x + b
        Wa, Wb = W + g * Wp, W + g * Wn
        P, N = Wa * xp + Wb * xn, Wb * xp + Wa * xn
        sp = (z > 0) * R / stab(P.sum(1) + b + g * bp)
        sn = (z < 0) * R / stab(N.sum(1) + b + g * bn)
        return (P * sp[:, None]).sum(0) + (N * sn[:, None]).sum(0)
    if isinstance(rule, Flat):
        S, _ = layer_matrix(module, in_shape, torch.ones_like(module.weight))
        return (S * (R / stab(S.sum(1)))[:, None]).sum(0)
    if isinstance(rule, WSquare):
        S, _ = layer_matrix(module, in_shape, module.weight ** 2)
        return (S * (R / stab(S.sum(1) + b ** 2))[:, None]).sum(0)
    if isinstance(rule, ZBox):
        Z = W * x - Wp * low - Wn * high
        return (Z * (R / stab(Z.sum(1) + b - bp - bn))[:, None]).sum(0)
    raise AssertionError(rule)


def reference_lrp(model: nn.Sequential, x, target, composite, low=None, high=None):
    """Layer by layer, one image: forward storing inputs, then the rules backwards from R = logit."""
    inputs, h = [], x.unsqueeze(0)
    for layer in model:
        inputs.append(h)
        h = layer(h)
    R = torch.zeros(h.numel(), dtype=torch.float64)
    R[target] = h.flatten()[target]
    first = min(i for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear)))
    for i in reversed(range(len(model))):
        layer, inp = model[i], inputs[i]
        shape = tuple(inp.shape[1:])
        if isinstance(layer, (nn.ReLU, nn.Flatten)):
            continue  # pass rule / reshape
        if isinstance(layer, nn.AvgPool2d):
            R = reference_rule("lrp0", layer, shape, inp.flatten(), R)
            continue
        name = str(i)
        rule = composite.first if (i == first and composite.first is not None) else composite.rule_for(name, layer)
        lo = None if low is None else torch.as_tensor(low).expand(inp.shape).flatten().double()
        hi = None if high is None else torch.as_tensor(high).expand(inp.shape).flatten().double()
        R = reference_rule(rule, layer, shape, inp.flatten(), R, lo, hi)
    return R.view(x.shape)


def small_sequential(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3),
    ).double().eval()


LOW, HIGH = -2.5, 2.5
COMPOSITES = {
    "epsilon_plus": {},
    "epsilon_plus_flat": {},
    "epsilon_gamma_box": {"low": LOW, "high": HIGH},
    "epsilon_alpha2_beta1": {},
    "epsilon_alpha2_beta1_flat": {},
    "epsilon": {"epsilon": 0.25},
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_named_composites_match_the_layer_by_layer_reference(name):
    from saliencylab.methods.propagation import make_composite
    model = small_sequential()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).clamp(LOW, HIGH)
    settings = COMPOSITES[name]
    e = sl.explain(model, x, "lrp", composite=name, channels=True, **settings)
    composite = make_composite(name, **{"epsilon": 1e-6, "gamma": 0.25, **settings})
    for i in range(3):
        ref = reference_lrp(model, x[i], int(e.targets[i]), composite, settings.get("low"), settings.get("high"))
        assert torch.allclose(e.maps[i], ref, rtol=1e-6, atol=1e-9), f"{name}: image {i} differs from the reference"


def test_user_composite_by_type_and_name_matches_the_reference():
    model = small_sequential()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rules = {"first": WSquare(), nn.Conv2d: "zplus", "6": Epsilon(0.5), nn.Linear: Epsilon(0.01)}
    e = sl.explain(model, x, "lrp", composite=rules, channels=True)
    composite = Composite(rules)
    for i in range(2):
        ref = reference_lrp(model, x[i], int(e.targets[i]), composite)
        assert torch.allclose(e.maps[i], ref, rtol=1e-6, atol=1e-9)
    # and the name entry really was used: a different epsilon there changes the map
    other = sl.explain(model, x, "lrp", composite={**rules, "6": Epsilon(0.01)}, channels=True).maps
    assert not torch.allclose(other, e.maps)


def test_matches_captum_lrp_on_a_relu_network():
    from captum.attr import LRP as CaptumLRP
    class Net(nn.Module):  # Captum's LRP has no rule for nn.Flatten: flatten functionally
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(6 * 4 * 4, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))

    model = Net().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    targets = model(x).argmax(1)
    theirs = CaptumLRP(model).attribute(x.clone().requires_grad_(True), target=targets).detach()
    ours = sl.explain(model, x, "lrp", composite="epsilon", epsilon=1e-9, channels=True).maps
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def bias_free(model, gain=1.0):
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(gain)  # logits of order 1, far above the 1e-6 stabiliser
    return model


# alpha2-beta1 conserves only where an output has both positive and negative contributions
@pytest.mark.parametrize("name", [n for n in sorted(COMPOSITES) if "alpha2" not in n])
def test_relevance_is_conserved_without_biases(name):
    """Bias-free network: the input relevance sums to the target logit, for every composite."""
    model = bias_free(small_sequential(seed=3), gain=3.0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).clamp(LOW, HIGH)
    settings = {k: v for k, v in COMPOSITES[name].items() if k != "epsilon"}
    e = sl.explain(model, x, "lrp", composite=name, epsilon=0.0, **settings)
    logits = model(x).gather(1, e.targets.view(-1, 1)).squeeze(1).detach()
    # up to the rules' 1e-6 denominator stabiliser (epsilon itself is 0 here)
    assert torch.allclose(e.maps.sum((1, 2)), logits, rtol=1e-4, atol=1e-6)


def test_residual_blocks_conserve_relevance_through_functional_adds():
    """A ResNet-like network (in-place `out += identity`, in-place ReLU, BatchNorm merged): with biases
    and BatchNorm shifts removed, relevance is conserved through the residual blocks, not duplicated."""
    model = ResNetLike().double().eval()
    bias_free(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    e = sl.explain(model, x, "lrp", composite="epsilon", epsilon=0.0)
    logits = model(x).gather(1, e.targets.view(-1, 1)).squeeze(1).detach()
    assert len(e.extras["merged"]) == 5  # stem + two convs per block x 2 blocks
    assert torch.allclose(e.maps.sum((1, 2)), logits, rtol=1e-6, atol=1e-9)


def test_batchnorm_merge_equals_a_hand_folded_copy_and_is_undone():
    model = make_small_cnn(dtype=torch.float64)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    weight, bias = model.conv1.weight, model.conv1.bias
    before = {k: v.clone() for k, v in model.state_dict().items()}
    e = sl.explain(model, x, "lrp", composite="epsilon_plus", channels=True)
    assert e.extras["merged"] == [("conv1", "bn1")]
    assert model.conv1.weight is weight and model.conv1.bias is bias and "forward" not in vars(model.bn1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    folded_model = make_small_cnn(dtype=torch.float64)
    w, b = folded(folded_model.conv1, folded_model.bn1)
    folded_model.conv1.weight, folded_model.conv1.bias = nn.Parameter(w), nn.Parameter(b)
    folded_model.bn1 = nn.Identity()
    assert torch.allclose(folded_model(x), model(x), atol=1e-10)  # the fold is exact
    hand = sl.explain(folded_model, x, "lrp", composite="epsilon_plus", canonize=False, channels=True).maps
    assert torch.allclose(e.maps, hand, rtol=1e-8, atol=1e-12)
    # without merging, BatchNorm is an affine map with LRP-0 and the maps differ
    unmerged = sl.explain(model, x, "lrp", composite="epsilon_plus", canonize=False, channels=True).maps
    assert not torch.allclose(unmerged, e.maps, atol=1e-6)


def test_vgg_like_model_and_the_embedded_model_run():
    model = VGGLike().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    e = sl.explain(model, x, "lrp", composite="epsilon_gamma_box", low=-3.0, high=3.0)
    assert e.maps.shape == (2, 32, 32) and torch.isfinite(e.maps).all() and e.maps.abs().sum() > 0
    assert len(e.extras["merged"]) == 4

    from saliencylab.models import load
    lite = load().model
    xl = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    el = sl.explain(lite, xl, "lrp", composite="epsilon_plus_flat")
    assert torch.isfinite(el.maps).all() and el.maps.abs().sum() > 0
    convs_with_bn = sum(isinstance(m, nn.BatchNorm2d) for m in lite.modules())
    assert len(el.extras["merged"]) == convs_with_bn  # every BatchNorm follows a ("same"-padded) conv
    assert el.cost.backward_images == 1 and el.cost.forward_images == 1  # one forward, one modified backward


def test_bad_settings_fail_with_one_clear_line():
    model = small_sequential()
    with pytest.raises(sl.ConfigError, match="low= and high="):
        sl.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), "lrp", composite="epsilon_gamma_box")
    with pytest.raises(sl.ConfigError, match="unknown composite"):
        sl.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), "lrp", composite="epsilon_pluss")
    with pytest.raises(sl.ConfigError, match="first layer"):
        sl.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), "lrp", composite={nn.Linear: Flat()})
    with pytest.raises(sl.ConfigError, match="does not have: 99"):
        sl.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), "lrp", composite={"99": "zplus"})


def grouped_sequential(seed=11):
    """Depthwise and grouped convolutions, one of them reading signed values (no activation in front)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 5),
        nn.ReLU(), nn.Linear(5, 3),
    ).double().eval()


@pytest.mark.parametrize("rule", [ZPlus(), AlphaBeta(2.0, 1.0), AlphaBeta(1.5, 0.5), Gamma(0.25)], ids=repr)
def test_sign_split_rules_on_grouped_convolutions_and_dense_layers_match_the_reference(rule):
    """The parts of alpha-beta and gamma run as one stacked layer (a depthwise layer on its input repeated),
    on signed and on non-negative inputs, and on dense layers (signed input of the last layer)."""
    model = grouped_sequential()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    composite = Composite({nn.Module: rule})
    e = sl.explain(model, x, "lrp", composite=composite, channels=True)
    for i in range(3):
        ref = reference_lrp(model, x[i], int(e.targets[i]), composite)
        assert torch.allclose(e.maps[i], ref, rtol=1e-6, atol=1e-9), f"{rule!r}: image {i} differs"


class ShiftedInPlace(nn.Module):
    """A convolution without BatchNorm whose output the forward changes in place (`h += 0.5`)."""

    def __init__(self, in_place=True):
        super().__init__()
        torch.manual_seed(13)
        self.in_place = in_place
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.in_place:
            h += 0.5
        else:
            h = h + 0.5
        return self.fc(torch.flatten(self.act(h), 1))


@pytest.mark.parametrize("name", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon"])
def test_a_layer_output_changed_in_place_is_prepared_from_its_value_before_the_change(name):
    """Layers without BatchNorm prepare their rule in the backward pass; when the forward changes their
    output in place, the batch runs again preparing in the forward pass: same maps, one extra forward."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    inplace, plain = ShiftedInPlace().double().eval(), ShiftedInPlace(in_place=False).double().eval()
    a = sl.explain(inplace, x, "lrp", composite=name, channels=True)
    b = sl.explain(plain, x, "lrp", composite=name, channels=True)
    assert torch.equal(a.outputs, plain(x).detach())
    assert torch.allclose(a.maps, b.maps, rtol=1e-12, atol=1e-15)
    assert a.cost.forward_images == 2 * len(x) and b.cost.forward_images == len(x)


def test_a_rule_written_against_the_one_step_interface_still_works():
    """A user rule that only defines ratio(layer, x, z, R) (the interface before prepare/backward) gives
    the built-in rule's maps, on a layer merged with BatchNorm and on layers without."""
    from saliencylab.methods.propagation import Rule
    from saliencylab.methods.propagation.rules import stabilize

    class MyEpsilon(Rule):
        name = "my_epsilon"

        def ratio(self, layer, x, z, R):
            return layer.vjp(layer.weight, R / stabilize(z, 0.1))

    for model, shape in ((make_small_cnn(dtype=torch.float64), (2, 3, 12, 12)), (small_sequential(), (2, 3, 8, 8))):
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
        mine = sl.explain(model, x, "lrp", composite={nn.Module: MyEpsilon()}, channels=True).maps
        ours = sl.explain(model, x, "lrp", composite="epsilon", epsilon=0.1, channels=True).maps
        assert torch.allclose(mine, ours, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon"])
def test_conv1d_equals_the_same_layers_as_conv2d(name):
    """Conv1d layers (their own transposed-convolution path, grouped too) give the maps of the same
    weights as Conv2d with a 1 x k kernel on a height-1 input."""
    torch.manual_seed(16)
    one = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.Conv1d(6, 6, 3, padding=1, groups=3), nn.ReLU(),
                        nn.Conv1d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 7, 3)).double().eval()
    two = nn.Sequential(*[nn.Conv2d(m.in_channels, m.out_channels, (1, m.kernel_size[0]), stride=(1, m.stride[0]),
                                    padding=(0, m.padding[0]), groups=m.groups)
                          if isinstance(m, nn.Conv1d) else m for m in one]).double().eval()
    with torch.no_grad():
        for a, b in zip(one, two):
            if isinstance(a, nn.Conv1d):
                b.weight.copy_(a.weight.unsqueeze(2)), b.bias.copy_(a.bias)
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    from saliencylab.core.session import ModelSession  # explain() takes images; the method runs on any input
    from saliencylab.methods.propagation import LRP
    with ModelSession(one) as s1:
        e1 = LRP(one, composite=name).compute(s1, x, None)
    with ModelSession(two) as s2:
        e2 = LRP(two, composite=name).compute(s2, x.unsqueeze(2), None)
    assert torch.equal(e1.targets, e2.targets)
    assert torch.allclose(e1.maps, e2.maps.squeeze(2), rtol=1e-10, atol=1e-13)
