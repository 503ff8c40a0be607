"""COUT, counterfactual validity and proximity (metrics.counterfactual) against a plain per-image,
per-step reference, hand-computed curves on tiny linear models, and their contract details."""

import math

import pytest
import torch
from torch import nn

import saliencylab
from saliencylab import metrics
from saliencylab.core.errors import ConfigError, InputError
from saliencylab.metrics import counterfactual as cf

from conftest import make_small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


class SumModel(nn.Module):
    """Two classes on single-channel images: logits [0, scale * (sum of pixels - offset)]."""

    def __init__(self, scale=1.0, offset=0.0):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x):
        d = self.scale * (x.flatten(1).sum(1) - self.offset)
        return torch.stack([torch.zeros_like(d), d], 1)


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def reference_cout(model, x, x_cf, source, target, steps, protocol=None):
    """The definition written plainly: one image, one checkpoint, one pixel at a time."""
    B, C, H, W = x.shape
    N = H * W
    if protocol == "c3lt":  # max(1, N // steps) pixels per step, the last step takes the rest
        step = max(1, N // steps)
        counts = [0] + [min(start + step, N) for start in range(0, N, step)]
    else:
        counts = [round(k * N / steps) for k in range(steps + 1)]
    scores, curves = [], []
    for b in range(B):
        diff = (x[b] - x_cf[b]).abs().sum(0).flatten().tolist()
        order = sorted(range(N), key=lambda i: -diff[i])
        ps, pt = [], []
        for count in counts:
            image = x[b].clone()
            for i in order[:count]:
                r, c = divmod(i, W)
                image[:, r, c] = x_cf[b][:, r, c]
            with torch.no_grad():
                p = model(image[None]).softmax(1)[0]
            ps.append(float(p[source[b]]))
            pt.append(float(p[target[b]]))

        def area(curve):
            if protocol == "c3lt":
                return step / N * (curve[0] / 2 + sum(curve[1:-1]) + curve[-1] / 2)
            return sum((counts[k + 1] - counts[k]) / N * (curve[k] + curve[k + 1]) / 2 for k in range(len(counts) - 1))

        scores.append(area(pt) - area(ps))
        curves.append((ps, pt))
    return torch.tensor(scores), curves


def queries(B=3, C=3, H=7, W=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)


def sharp_cnn():
    model = make_small_cnn()
    with torch.no_grad():
        model.fc.weight.mul_(20)
    return model


@pytest.mark.parametrize("protocol,steps", [(None, 10), ("c3lt", 10), (None, 49)])
def test_cout_matches_a_plain_per_image_per_step_loop(protocol, steps):
    model = sharp_cnn()
    x, x_cf = queries()
    source, target = [0, 1, 2], [3, 4, 0]
    m = cf.cout(model, x, x_cf, source, target, steps=steps, protocol=protocol)
    want, curves = reference_cout(model, x, x_cf, source, target, steps, protocol)
    assert torch.allclose(m.scores, want, atol=1e-5), (m.scores, want)
    for b, (ps, pt) in enumerate(curves):
        assert torch.allclose(m.curves["source"][b], torch.tensor(ps), atol=1e-5)
        assert torch.allclose(m.curves["target"][b], torch.tensor(pt), atol=1e-5)
    assert m.scores.abs().max() > 0.05  # the model does move between the classes here
    # one forward pass per point of each curve: no checkpoint is scored twice
    assert m.cost.forward_images == 3 * m.curves["source"].shape[1]
    if protocol == "c3lt":  # 49 pixels, 4 per step: 0, 4, ..., 48, 49
        assert m.curves["source"].shape[1] == 14 and float(m.curves["fraction"][-2]) == pytest.approx(48 / 49)


def test_hand_computed_curve_on_a_linear_two_class_model():
    model = SumModel()
    x = torch.zeros(1, 1, 2, 2)
    x_cf = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    # pixels inserted in the order 4, 3, 2, 1: the logit of class 1 goes 0, 4, 7, 9, 10
    pt = [sigmoid(d) for d in (0, 4, 7, 9, 10)]
    m = cf.cout(model, x, x_cf, source=0, target=1, steps=4)
    assert torch.allclose(m.curves["target"][0], torch.tensor(pt), atol=1e-6)
    assert torch.allclose(m.curves["source"][0], 1 - torch.tensor(pt), atol=1e-6)
    g = [2 * p - 1 for p in pt]  # p(target) - p(source) at each checkpoint, 1/4 of the pixels apart
    assert float(m.scores[0]) == pytest.approx(0.25 * (g[0] / 2 + g[1] + g[2] + g[3] + g[4] / 2), abs=1e-6)
    # two steps: checkpoints 0, 2, 4 pixels
    m2 = cf.cout(model, x, x_cf, source=0, target=1, steps=2)
    g2 = [2 * sigmoid(d) - 1 for d in (0, 7, 10)]
    assert float(m2.scores[0]) == pytest.approx(0.5 * (g2[0] / 2 + g2[1] + g2[2] / 2), abs=1e-6)
    # one step: the query and the counterfactual only (2 passes)
    m1 = cf.cout(model, x, x_cf, source=0, target=1, steps=1)
    assert float(m1.scores[0]) == pytest.approx((2 * sigmoid(10) - 1) / 2, abs=1e-6) and m1.cost.forward_images == 2


def test_hand_computed_c3lt_protocol_with_a_short_last_step():
    model = SumModel()
    x = torch.zeros(1, 1, 1, 5)
    x_cf = torch.tensor([[[[1.0, 5.0, 3.0, 4.0, 2.0]]]])
    # 5 pixels, 5 // 2 = 2 per step: 0, 2, 4, 5 inserted (5+4, then 3+2, then 1): logits 0, 9, 14, 15
    g = [2 * sigmoid(d) - 1 for d in (0, 9, 14, 15)]
    theirs = 2 / 5 * (g[0] / 2 + g[1] + g[2] + g[3] / 2)  # every step counted as 2 pixels wide
    trapezoid = 2 / 5 * (g[0] + g[1]) / 2 + 2 / 5 * (g[1] + g[2]) / 2 + 1 / 5 * (g[2] + g[3]) / 2
    assert float(cf.cout(model, x, x_cf, 0, 1, steps=2, protocol="c3lt").scores[0]) == pytest.approx(theirs, abs=1e-6)
    assert float(cf.cout(model, x, x_cf, 0, 1, steps=2, step_rule="floor").scores[0]) == pytest.approx(trapezoid,
                                                                                                      abs=1e-6)
    assert abs(theirs - trapezoid) > 1e-3


def test_a_perfect_flip_scores_near_one_and_swapping_the_classes_flips_the_sign():
    model = SumModel(scale=1000.0, offset=0.5)  # one inserted pixel of 1 flips the decision
    x = torch.zeros(2, 1, 10, 10)
    x_cf = torch.stack([torch.ones(1, 10, 10), -torch.ones(1, 10, 10)])  # towards class 1 / away from it
    m = cf.cout(model, x, x_cf, source=0, target=1, steps=100)
    # the first interval (from the query, p(target) = 0, to one pixel, p(target) = 1) loses 1/100
    assert float(m.scores[0]) == pytest.approx(0.99, abs=1e-6)
    assert float(m.scores[1]) == pytest.approx(-1.0, abs=1e-6)
    swapped = cf.cout(model, x, x_cf, source=1, target=0, steps=100)
    assert torch.allclose(swapped.scores, -m.scores, atol=1e-7)
    # and on a real network, for any classes
    model = sharp_cnn()
    x, x_cf = queries(B=2, H=6, W=6)
    a = cf.cout(model, x, x_cf, [1, 2], [3, 0], steps=8)
    b = cf.cout(model, x, x_cf, [3, 0], [1, 2], steps=8)
    assert torch.allclose(a.scores, -b.scores, atol=1e-6) and a.scores.abs().min() > 1e-3
    assert torch.equal(a.curves["source"], b.curves["target"])


def test_cout_defaults_batching_and_the_pair_probability():
    model = sharp_cnn()
    x, x_cf = queries(B=4, H=6, W=6, seed=3)
    with torch.no_grad():
        src, tgt = model(x).argmax(1), model(x_cf).argmax(1)
    assert not torch.equal(src, tgt)
    m = cf.cout(model, x, x_cf, steps=6)  # None, None: the predictions on x and on x_cf
    explicit = cf.cout(model, x, x_cf, src, tgt, steps=6)
    assert torch.equal(m.scores, explicit.scores)
    # the curves start at the query and end at the counterfactual
    with torch.no_grad():
        p_x, p_cf = model(x).softmax(1), model(x_cf).softmax(1)
    rows = torch.arange(4)
    assert torch.allclose(m.curves["source"][:, 0], p_x[rows, src], atol=1e-6)
    assert torch.allclose(m.curves["target"][:, -1], p_cf[rows, tgt], atol=1e-6)
    # an image's score does not depend on its batch nor on the rows per pass
    parts = torch.cat([cf.cout(model, x[i:i + 1], x_cf[i:i + 1], steps=6).scores for i in range(4)])
    assert torch.allclose(m.scores, parts, atol=1e-5)
    for batch_size in (1, 5):
        assert torch.allclose(cf.cout(model, x, x_cf, steps=6, batch_size=batch_size).scores, m.scores, atol=1e-5)
    # pair: the two probabilities sum to one; for a two-class model it is the full softmax
    pair = cf.cout(model, x, x_cf, src, tgt, steps=6, probability="pair")
    total = pair.curves["source"] + pair.curves["target"]
    same = (src == tgt)[:, None]
    assert torch.allclose(torch.where(same, torch.ones_like(total), total), torch.ones_like(total), atol=1e-6)
    two = SumModel(scale=0.3)
    x1, x1_cf = queries(B=2, C=1, H=5, W=5)
    assert torch.allclose(cf.cout(two, x1, x1_cf, 0, 1, steps=5, probability="pair").scores,
                          cf.cout(two, x1, x1_cf, 0, 1, steps=5).scores, atol=1e-6)


def test_the_registered_metrics_take_the_counterfactual_where_maps_go():
    assert metrics.available("counterfactual") == ["counterfactual_proximity", "counterfactual_validity", "cout"]
    meta = metrics.describe()
    assert meta["cout"]["higher_is_better"] and meta["counterfactual_validity"]["higher_is_better"]
    assert not meta["counterfactual_proximity"]["higher_is_better"]
    model = sharp_cnn()
    x, x_cf = queries(B=2, H=6, W=6)
    scores, curves = saliencylab.evaluate(model, x, x_cf, "cout", target=[3, 0], source=[1, 2], steps=8,
                                          return_curves=True)
    assert torch.equal(scores, cf.cout(model, x, x_cf, [1, 2], [3, 0], steps=8).scores)
    assert set(curves) == {"fraction", "source", "target"} and curves["target"].shape == (2, 9)
    # a grey counterfactual (B, H, W) stands for the same values on every channel
    grey = x_cf[:, 0]
    assert torch.equal(cf.cout(model, x, grey, 1, 3, steps=4).scores,
                       cf.cout(model, x, grey[:, None].expand_as(x), 1, 3, steps=4).scores)


def test_validity_and_proximity_by_hand():
    model = SumModel()
    x = torch.zeros(3, 1, 2, 2)
    x_cf = torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1, 1).expand(3, 1, 2, 2)  # classes 1, 0, 1
    assert cf.validity(model, x_cf, 1).tolist() == [1.0, 0.0, 1.0]
    assert cf.validity(model, x_cf, [0, 0, 1]).tolist() == [0.0, 1.0, 1.0]
    # no target: valid where the decision changed from the query's (class 0 for x = 0: logits tie, argmax 0)
    assert cf.validity(model, x_cf, x=x).tolist() == [1.0, 0.0, 1.0]
    assert saliencylab.evaluate(model, x, x_cf, "counterfactual_validity").tolist() == [1.0, 0.0, 1.0]
    x3 = torch.zeros(2, 3, 2, 2)
    c3 = torch.zeros(2, 3, 2, 2)
    c3[0, 0, 0, 0] = 1.2  # one value of 12 changed by 1.2
    c3[1] = -0.5  # every value
    assert torch.allclose(cf.proximity(x3, c3), torch.tensor([0.1, 0.5]))
    assert torch.allclose(cf.proximity(x3, c3, channels="sum"), torch.tensor([0.3, 1.5]))  # C3LT's: per pixel
    assert torch.allclose(saliencylab.evaluate(None, x3, c3, "counterfactual_proximity"), torch.tensor([0.1, 0.5]))


def test_bad_counterfactual_inputs_fail_in_one_line():
    model = sharp_cnn()
    x, x_cf = queries(B=2, H=6, W=6)
    with pytest.raises(InputError, match="shape"):
        cf.cout(model, x, x_cf[:, :, :5], 0, 1)
    with pytest.raises(InputError, match="shape"):
        cf.cout(model, x, x_cf[:1], 0, 1)
    with pytest.raises(InputError, match="NaN"):
        cf.cout(model, x, x_cf.clone().fill_(float("nan")), 0, 1)
    with pytest.raises(InputError, match="callable"):
        cf.cout(model, x, x_cf, 0, lambda out: out[:, 0])
    with pytest.raises(InputError, match="out of range"):
        cf.cout(model, x, x_cf, 0, 9)
    with pytest.raises(InputError, match="^source: got 3 targets for 2 images"):  # names the argument at fault
        cf.cout(model, x, x_cf, [0, 1, 2], 1)
    with pytest.raises(InputError, match="x="):
        cf.validity(model, x_cf)
    explanation = saliencylab.explain(model, x, "gradient", target=0)
    with pytest.raises(InputError, match="not an explanation"):
        saliencylab.evaluate(model, x, explanation, "cout")
    for params in ({"protocol": "igos"}, {"auc": "simpson"}, {"probability": "logit"}, {"steps": 0},
                   {"step_rule": "odd"}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            metrics.build("cout", **params)
    with pytest.raises(ConfigError):
        metrics.build("counterfactual_proximity", channels="max")


def test_explanation_runs_refuse_counterfactual_metrics():
    """`evaluate --metrics cout` would score saliency maps as if they were counterfactual images."""
    from saliencylab.core.errors import ConfigError
    from saliencylab.runs.local import check_requirements

    check_requirements(["deletion", "sparseness"])
    with pytest.raises(ConfigError, match="cout scores counterfactual images"):
        check_requirements(["deletion", "cout"])
