"""Completeness and soundness (Li et al. 2023, sandylaker/soco): against slow one-image loops that
follow the authors' code step by step, on a model whose relevant pixels are known, and batch-free."""

import pytest
import torch

import saliencylab
from saliencylab.core.errors import ConfigError
from saliencylab.metrics.soundness import COMPLETENESS_RATIOS, SOUNDNESS_RATIOS, false_attribution
from saliencylab.core.randomness import KeyedRandom
from saliencylab.metrics.road import ROAD_NOISE, KeyedImputer

from conftest import PatchModel, make_small_cnn


# -- slow references: one image, one step at a time ----------------------------------------------
def one_score(model, img, cls, score):
    with torch.no_grad():
        out = model(img[None])[0]
    if score == "accuracy":
        return float(out.argmax() == cls)
    if score == "softmax":
        return float(out.softmax(0)[cls])
    return float(out[cls])


def normalized(m):
    m = m.double().flatten()
    return (m - m.min()) / (m.max() - m.min())


def mean_height(curve, ratios):
    area = sum((curve[j] + curve[j + 1]) / 2 * (ratios[j + 1] - ratios[j]) for j in range(len(ratios) - 1))
    return area / (ratios[-1] - ratios[0])


def reference_completeness(model, x, maps, classes, ratios, score, noise=0.01, seed=0):
    """vision_completeness.py + get_road_mask_by_value('morf'), per image and with the target's score."""
    imputer = KeyedImputer(noise, 50, 1e-6, KeyedRandom(seed, ROAD_NOISE), n=len(ratios) + 1)
    H, W = x.shape[-2:]
    out, drops = [], []
    for i in range(len(x)):
        v = normalized(maps[i])
        clean = one_score(model, x[i], classes[i], score)
        drop = []
        for k, r in enumerate(ratios, start=1):
            threshold = v.max() * (1 - r)  # the authors' rule: pixels above max * (1 - r) are removed
            keep = (v <= threshold).view(1, 1, H, W).to(x.dtype)
            img = imputer.impute_rows(x[i:i + 1], keep, images=[i], draws=[k])[0]  # draw 0: the clean image
            drop.append(clean - one_score(model, img, classes[i], score))
        drops.append(drop)
        out.append(mean_height(drop, ratios))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(drops, dtype=torch.float64)


def reference_soundness(model, x, maps, classes, ratios, score, threshold=0.01, min_score=0.04, noise=0.01,
                        seed=0):
    """vision_soundness.py (PredScore branch, i.e. per image), get_road_mask_by_area('lerf')."""
    imputer = KeyedImputer(noise, 50, 1e-6, KeyedRandom(seed, ROAD_NOISE), n=len(ratios))
    H, W = x.shape[-2:]
    U = H * W
    out, curves = [], []
    for i in range(len(x)):
        v = normalized(maps[i])
        ascending = v[torch.argsort(v)]  # the test maps have no ties
        order = torch.argsort(v, descending=True)
        prev_ratio, prev_cls, accum = 1.0, 0.0, 0.0
        attr_ratios = []
        for t, r in enumerate(ratios):
            curr_masked, prev_masked = int(U * r), int(U * prev_ratio)
            assert curr_masked <= prev_masked
            new_added = float(ascending[curr_masked:prev_masked].sum())
            remaining = float(ascending[curr_masked:].sum())
            attr_ratios.append((remaining - accum) / (remaining + 1e-6))
            keep = torch.zeros(U, dtype=x.dtype)
            keep[order[:U - curr_masked]] = 1  # the least attributed curr_masked pixels are imputed
            img = imputer.impute_rows(x[i:i + 1], keep.view(1, 1, H, W), images=[i], draws=[t])[0]
            cls = one_score(model, img, classes[i], score)
            if (min_score is None or cls > min_score) and cls - prev_cls <= threshold:
                accum += new_added
            prev_cls, prev_ratio = cls, r
        curves.append(attr_ratios)
        out.append(mean_height(attr_ratios, ratios))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(curves, dtype=torch.float64)


def sharp_cnn():
    """The small CNN with a scaled head, so that its scores move visibly when pixels are imputed."""
    model = make_small_cnn(seed=3)
    with torch.no_grad():
        model.fc.weight.mul_(25)
    return model


def cnn_setup():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16)
    maps = torch.randn(2, 16, 16)  # signed, continuous: no ties, min-max normalization matters
    return sharp_cnn(), x, maps


@pytest.mark.parametrize("setup, score", [("cnn", "softmax"), ("patch", "accuracy")])
def test_completeness_matches_the_one_image_loop(setup, score):
    if setup == "cnn":
        model, x, maps = cnn_setup()
        target = None
    else:  # the CNN's top class survives every ratio; the patch model's flips on some images
        model, x, maps, _, _ = patch_setup()
        target = 0
    classes = model(x).argmax(1) if target is None else torch.zeros(len(x), dtype=torch.long)
    s, curves = saliencylab.evaluate(model, x, maps, "completeness", target=target, score=score, return_curves=True)
    ref, ref_drops = reference_completeness(model, x, maps, classes, COMPLETENESS_RATIOS, score)
    assert torch.allclose(curves["drop"].double(), ref_drops, atol=1e-5)
    assert torch.allclose(s.double(), ref, atol=1e-5)
    assert curves["drop"].abs().max() > 0.05  # the test sees real drops, not a flat model
    assert torch.allclose(curves["ratio"], torch.tensor(COMPLETENESS_RATIOS))
    clean = model(x).softmax(1).gather(1, classes[:, None])[:, 0]
    assert torch.allclose(curves["clean"], clean if score == "softmax" else (clean > 0.5).float())


@pytest.mark.parametrize("min_score", [0.04, 0.5])
def test_soundness_matches_the_one_image_loop(min_score):
    model, x, maps = cnn_setup()
    classes = model(x).argmax(1)
    s, curves = saliencylab.evaluate(model, x, maps, "soundness", min_score=min_score, return_curves=True)
    ref, ref_curves = reference_soundness(model, x, maps, classes, SOUNDNESS_RATIOS, "softmax", min_score=min_score)
    assert torch.allclose(curves["attr_ratio"].double(), ref_curves, atol=1e-5)
    assert torch.allclose(s.double(), ref, atol=1e-5)
    # both branches of the update happened: some steps added false attribution, some did not
    added = curves["false_attribution"].diff(dim=1) > 0
    grew = curves["attribution"].diff(dim=1) > 0
    assert added.any() and (grew & ~added).any()
    assert len(curves["ratio"]) == 96 and curves["ratio"][0] == pytest.approx(0.98)
    assert curves["ratio"][-1] == pytest.approx(0.03)
    assert curves["revealed"][0] == pytest.approx((256 - int(256 * 0.98)) / 256)


def test_soundness_accuracy_matches_the_one_image_loop_on_a_few_ratios():
    model, x, _, random, _ = patch_setup()  # the random map's images are misclassified at some steps
    classes = torch.zeros(len(x), dtype=torch.long)
    ratios = [0.9, 0.7, 0.57, 0.4, 0.29, 0.1]  # int(256 * 0.57) and int(256 * 0.29) truncate
    s, curves = saliencylab.evaluate(model, x, random, "soundness", target=0, ratios=ratios, score="accuracy",
                                     return_curves=True)
    ref, ref_curves = reference_soundness(model, x, random, classes, ratios, "accuracy")
    assert torch.allclose(curves["attr_ratio"].double(), ref_curves, atol=1e-6)
    assert torch.allclose(s.double(), ref, atol=1e-6)
    assert (curves["scores"] == 0).any() and (curves["scores"] == 1).any()
    assert curves["revealed"].tolist() == pytest.approx([(256 - int(256 * r)) / 256 for r in ratios])


def test_false_attribution_by_hand():
    scores = torch.tensor([[0.5, 0.505, 0.6, 0.02, 0.021]])
    attribution = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    accumulated, ratio = false_attribution(scores, attribution, 0.01, 0.04)
    # step 1 rises from c_0 = 0; step 2 rises by 0.005 <= 0.01: its new attribution (1) is false;
    # step 3 rises by 0.095; steps 4-5 are at or below 0.04: not updated although they do not rise
    assert accumulated.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0]]
    # attr_ratio_t subtracts the false attribution accumulated before step t
    expected = torch.tensor([[1 / (1 + 1e-6), 2 / (2 + 1e-6), 2 / (3 + 1e-6), 3 / (4 + 1e-6), 4 / (5 + 1e-6)]])
    assert torch.allclose(ratio, expected.double(), atol=1e-12)
    # without the gate, steps 4 and 5 (falls and a 0.001 rise) are false too
    accumulated, _ = false_attribution(scores, attribution, 0.01, None)
    assert accumulated.tolist() == [[0.0, 1.0, 1.0, 2.0, 3.0]]


# -- known relevant pixels -------------------------------------------------------------------------
def patch_setup():
    torch.manual_seed(4)
    x = (torch.rand(4, 1, 16, 16) * 0.5 + 0.5) * torch.sign(torch.randn(4, 1, 16, 16))  # iid +-[0.5, 1]
    patch = torch.zeros(16, 16, dtype=torch.bool)
    patch[5:9, 6:10] = True
    # random weight signs: the evidence sits in the pixel values, which imputation cannot recover
    w = torch.where(patch, 0.25 * torch.sign(torch.randn(16, 16)), torch.zeros(16, 16))
    x = torch.where(patch, x.abs() * torch.sign(w), x)  # every image agrees with the weights
    model = PatchModel(w[None]).eval()
    true = (w * x[:, 0]).abs() + 1e-3 * torch.rand(4, 16, 16)
    random = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(9))
    return model, x, true, random, -true


@pytest.mark.parametrize("name", ["completeness", "soundness"])
def test_the_true_map_beats_random_and_inverted_maps(name):
    model, x, true, random, inverted = patch_setup()
    s_true = saliencylab.evaluate(model, x, true, name, target=0)
    s_random = saliencylab.evaluate(model, x, random, name, target=0)
    s_inverted = saliencylab.evaluate(model, x, inverted, name, target=0)
    assert (s_true > s_random).all(), (s_true, s_random)
    assert (s_true > s_inverted).all(), (s_true, s_inverted)
    assert saliencylab.metrics.get(name).higher_is_better


def test_known_behaviour_of_the_true_map():
    model, x, true, _, inverted = patch_setup()
    # completeness: once the threshold is below the patch's lowest attribution (~0.5 of the max), the
    # whole patch is imputed and the score falls to about 1/2 (the imputed patch carries no evidence)
    _, c = saliencylab.evaluate(model, x, true, "completeness", target=0, return_curves=True)
    assert (c["scores"][:, 5:] < 0.75).all() and (c["clean"] > 0.9).all()
    # soundness: the patch is revealed first and every later pixel carries ~1e-3 of the attribution
    s, c = saliencylab.evaluate(model, x, true, "soundness", target=0, return_curves=True)
    assert (s > 0.8).all()
    # the inverted map reveals the 240 irrelevant pixels first: most of their attribution is declared
    # false (some steps still raise the score, by changing the imputation of the patch's border)
    s_inv, c_inv = saliencylab.evaluate(model, x, inverted, "soundness", target=0, return_curves=True)
    assert (s_inv < 0.4).all()
    before_patch = int((c_inv["revealed"] * 256 <= 240).nonzero().max())
    share = c_inv["false_attribution"][:, before_patch] / c_inv["attribution"][:, before_patch]
    assert (share > 0.75).all(), share


# -- engine properties ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["completeness", "soundness"])
def test_batch_size_does_not_change_the_result(name):
    model, x, maps = cnn_setup()
    params = {"ratios": [0.9, 0.6, 0.3, 0.1]} if name == "soundness" else {}
    s1, c1 = saliencylab.evaluate(model, x, maps, name, batch_size=1, return_curves=True, **params)
    s64, c64 = saliencylab.evaluate(model, x, maps, name, batch_size=64, return_curves=True, **params)
    assert torch.allclose(s1, s64, atol=1e-6)
    for key in c1:
        assert torch.allclose(c1[key], c64[key], atol=1e-6), key


def test_model_is_untouched():
    model, x, maps = cnn_setup()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saliencylab.evaluate(model, x, maps, "soundness", ratios=[0.9, 0.5, 0.1])
    saliencylab.evaluate(model, x, maps, "completeness")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_constant_maps_and_parameters():
    model, x, _ = cnn_setup()
    flat = torch.full((2, 16, 16), 3.0)
    assert torch.equal(saliencylab.evaluate(model, x, flat, "completeness"), torch.zeros(2))  # nothing removed
    assert torch.equal(saliencylab.evaluate(model, x, flat, "soundness", ratios=[0.5, 0.1]), torch.zeros(2))
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("completeness", ratios=[0.5, 0.1])  # must increase
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("soundness", ratios=[0.1, 0.5])  # must decrease
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("soundness", score="probability")
    with pytest.raises(ConfigError):
        saliencylab.metrics.build("soundness", threshold="0.01")
    with pytest.raises(ConfigError):
        saliencylab.evaluate(model, x, flat, "completeness", score="accuracy", target=lambda out: out[:, 0])
    p = saliencylab.metrics.parameters("soundness")
    assert (p["threshold"], p["min_score"], p["noise"], p["ratios"]) == (0.01, 0.04, 0.01, None)
    assert saliencylab.metrics.get("completeness").category == "faithfulness"
    assert len(SOUNDNESS_RATIOS) == 96 and COMPLETENESS_RATIOS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
