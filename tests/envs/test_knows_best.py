"""Knows-best suite (Khakzar et al. 2022): patch generation, caching, suites and axiom scores.

A four-class colour CNN at 32 x 32 keeps every generation to a second or two: class k fires on one
corner of the RGB cube (1x1 "colour detector" conv, BN, ReLU, 3x3 conv, global average pool).
"""

import pytest
import torch

from saliencylab.core.explanation import Explanation
from torch import nn

from conftest import ColourNet
from saliencylab.envs import knows_best as kb
from saliencylab.core.errors import ConfigError
from saliencylab.methods import Method

SIZE, PATCH = 32, 12
CLASSES = [0, 1, 2, 3]


def generate(model, **kw):
    kw = {"image_size": SIZE, "patch_size": PATCH, "steps": 200, "cache": False, **kw}
    return kb.generate_patches(model, CLASSES, **kw)


@pytest.fixture(scope="module")
def model():
    return ColourNet().eval()


@pytest.fixture(scope="module")
def patches(model):
    return generate(model)


@pytest.fixture(scope="module")
def suite(model, patches):
    return kb.make_suite(model, patches, n=4, seed=0)


class Oracle(Method):
    """Maps read off the suite: the explained class's own patch region(s), or another region."""

    input_space = False

    def __init__(self, model, suite, mode="target"):
        super().__init__(model)
        self.suite, self.mode, self.calls = suite, mode, 0

    def compute(self, session, x, target):
        self.calls += 1  # the test's own instrumentation, not a result
        target = torch.as_tensor(target).expand(x.shape[0])
        flat = self.suite.x.flatten(1)
        maps = []
        for img, t in zip(x.cpu(), target.tolist()):
            k = int((flat - img.flatten()).abs().amax(dim=1).argmin())
            regions, classes = self.suite.regions[k], self.suite.region_classes[k]
            if self.mode == "target":
                m = regions[classes == t].any(dim=0)
            elif self.mode == "other":
                m = regions[classes != t].any(dim=0)  # all False when both regions are the target's
            elif self.mode == "first_only":
                m = regions[0]
            else:  # uniform
                m = torch.ones_like(regions[0])
            maps.append(m.float())
        return Explanation(maps=torch.stack(maps).to(x.device), targets=target.clone())


def test_generation_reaches_threshold_and_reports_honestly(patches):
    assert patches.patches.shape == (4, 3, PATCH, PATCH)
    assert float(patches.patches.min()) >= 0.0 and float(patches.patches.max()) <= 1.0
    assert patches.classes.tolist() == CLASSES
    assert int(patches.converged.sum()) >= 3
    expected = (patches.probabilities > 0.94) & (patches.interaction < 0.14)
    assert torch.equal(patches.converged, expected)
    assert bool((patches.probabilities_mean >= patches.probabilities - 1e-6).all())
    assert 0 < patches.steps <= 200 and patches.cost.backward_images > 0 and not patches.from_cache


def test_no_steps_reports_not_converged(model):
    p = generate(model, steps=0)
    assert p.steps == 0 and not bool(p.converged.any())
    assert bool((p.probabilities < 0.94).all())


def test_generation_is_seeded(model, patches):
    again = generate(model)
    assert torch.equal(again.patches, patches.patches)
    assert torch.equal(again.probabilities, patches.probabilities)
    other = generate(model, seed=1, steps=3)
    assert not torch.equal(other.patches, generate(model, steps=3).patches)


def test_cache_round_trip_without_forward_passes(tmp_path):
    model = ColourNet().eval()
    first = generate(model, cache=True, cache_dir=tmp_path, steps=40)
    files = list((tmp_path / "knows_best").glob("*.pt"))
    assert len(files) == 1 and files[0].stem == first.key
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        second = generate(model, cache=True, cache_dir=tmp_path, steps=40)
    finally:
        handle.remove()
    assert calls == [] and second.from_cache
    assert torch.equal(second.patches, first.patches) and torch.equal(second.converged, first.converged)
    assert second.steps == first.steps and second.cost.forward_images == first.cost.forward_images
    # a different parameter, or a different model, is a different entry
    assert generate(model, cache=True, cache_dir=tmp_path, steps=41).key != first.key
    changed = ColourNet(scale=31.0).eval()
    assert generate(changed, cache=True, cache_dir=tmp_path, steps=1).key != generate(
        model, cache=True, cache_dir=tmp_path, steps=1).key
    assert generate(model, cache=True, cache_dir=tmp_path, steps=1, model_key="mine").key != first.key


def test_model_untouched(patches):
    model = ColourNet()
    model.train()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    p = generate(model, steps=20)
    s = kb.make_suite(model, patches, n=2)
    kb.evaluate_method(model, "gradient", s)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [q.requires_grad for q in model.parameters()] == flags
    assert all(m.training for m in model.modules())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert p.patches.shape[0] == 4


def test_suite_structure(patches, suite):
    n = 4
    assert suite.x.shape == (3 * n, 3, SIZE, SIZE) and len(suite) == 3 * n
    assert suite.kind == [k for k in kb.AXIOMS for _ in range(n)]
    assert set(kb.DESCRIPTIONS) == set(kb.AXIOMS)
    assert suite.regions.shape == (3 * n, 2, SIZE, SIZE) and suite.regions.dtype == torch.bool
    assert bool((suite.regions.flatten(2).sum(2) == PATCH * PATCH).all())
    assert not bool((suite.regions[:, 0] & suite.regions[:, 1]).any())  # the two regions never overlap
    assert torch.equal(suite.targets, suite.region_classes[:, 0])
    cs, npl, sym = (suite.indices(k) for k in kb.AXIOMS)
    assert bool((suite.region_classes[cs, 0] != suite.region_classes[cs, 1]).all())
    assert bool((suite.region_classes[npl, 1] == -1).all())
    assert bool((suite.region_classes[sym, 0] == suite.region_classes[sym, 1]).all())
    assert float(suite.pixels.min()) >= 0 and float(suite.pixels.max()) <= 1
    # the patch pixels sit in their region
    y0, x0, y1, x1 = suite.boxes[cs[0], 0].tolist()
    pid = patches.classes.tolist().index(int(suite.region_classes[cs[0], 0]))
    assert torch.equal(suite.pixels[cs[0], :, y0:y1, x0:x1], patches.patches[pid])
    ind = suite.independence
    for kind in kb.AXIOMS:
        assert ind[f"{kind}_max_logit_change"] >= 0 and ind[f"{kind}_max_relative_change"] >= 0
    assert ind["class_sensitivity_max_relative_change"] < 0.5  # the patches do act independently here
    assert ind["min_target_probability_alone"] > 0.9
    assert suite.interaction.shape == (3 * n,)


def test_oracle_scores_perfect_and_wrong_patch_scores_low(model, suite):
    oracle = Oracle(model, suite)
    scores = kb.evaluate_method(model, oracle, suite)
    assert oracle.calls == 2  # one batched call per target set
    assert set(scores) == set(kb.AXIOMS)
    for axiom in kb.AXIOMS:
        assert scores[axiom].shape == (4,)
        assert torch.allclose(scores[axiom], torch.ones(4)), axiom
    wrong = kb.evaluate_method(model, Oracle(model, suite, "other"), suite)
    assert float(wrong["class_sensitivity"].max()) == 0.0
    assert float(wrong["null_player"].max()) == 0.0
    one_copy = kb.evaluate_method(model, Oracle(model, suite, "first_only"), suite)
    assert float(one_copy["symmetry"].max()) == 0.0
    assert torch.allclose(one_copy["null_player"], torch.ones(4))
    uniform = kb.evaluate_method(model, Oracle(model, suite, "uniform"), suite)
    assert torch.allclose(uniform["class_sensitivity"], torch.zeros(4))
    assert torch.allclose(uniform["null_player"], torch.zeros(4))
    assert torch.allclose(uniform["symmetry"], torch.ones(4))


def test_registered_method_and_authors_numbers(model, suite):
    scores, (maps, second) = kb.evaluate_method(model, "integrated_gradients", suite, steps=4,
                                                return_maps=True)
    assert maps.shape == (12, SIZE, SIZE) and second.shape == (4, SIZE, SIZE)
    for v in scores.values():
        assert bool(((v >= 0) & (v <= 1)).all())
    authors = kb.authors_scores(suite, maps, second)
    assert 0 <= authors["class_sensitivity_overlap"] <= 1 and -1 <= authors["symmetry_spearman"] <= 1
    assert authors["class_sensitivity_overlap"] == pytest.approx(
        reference_class_sensitivity(suite, maps, second), rel=1e-5)
    with pytest.raises(ConfigError):
        kb.evaluate_method(model, Oracle(model, suite), suite, steps=4)


def test_normalized_input_space():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

    class Denormalize(nn.Module):  # the model expects normalized input; patches stay in [0, 1]
        def forward(self, x):
            return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)

    wrapped = nn.Sequential(Denormalize(), ColourNet()).eval()
    p = kb.generate_patches(wrapped, CLASSES, image_size=SIZE, patch_size=PATCH, steps=200, cache=False,
                            normalize=(mean, std))
    assert int(p.converged.sum()) >= 3
    assert float(p.patches.min()) >= 0 and float(p.patches.max()) <= 1
    s = kb.make_suite(wrapped, p, n=2)
    assert torch.allclose(s.x, kb.Normalize(mean, std)(s.pixels))


def test_bad_arguments(model, patches):
    with pytest.raises(ConfigError):
        kb.generate_patches(model, [0, 0], image_size=SIZE, patch_size=PATCH, cache=False)
    with pytest.raises(ConfigError):
        kb.generate_patches(model, [0, 9], image_size=SIZE, patch_size=PATCH, steps=1, cache=False)
    with pytest.raises(ConfigError):
        kb.generate_patches(model, [0, 1], image_size=SIZE, patch_size=20, cache=False)
    failed = generate(model, steps=0)
    with pytest.raises(ConfigError, match="converged"):
        kb.make_suite(model, failed)


# -- the authors' numbers (Do-Explanations-Explain utils.py and Attribution_Methods_Submit.ipynb) -----------
def saved(hm):
    """Their `save_data_image`: the raw map, / 255 when max |h| > 1."""
    return hm / 255 if float(hm.abs().max()) > 1 else hm


def reference_class_sensitivity(suite, maps, second):
    """`get_class_sensitivity` per image on the saved maps (patch crops), averaged as in their notebook."""
    values = []
    for k, i in enumerate(suite.indices("class_sensitivity").tolist()):
        h0, h1 = saved(maps[i].detach()).abs(), saved(second[k].detach()).abs()
        r0, r1 = suite.regions[i, 0], suite.regions[i, 1]
        term0 = torch.minimum(h0, h1)[r0].sum() + torch.minimum(h0, h1)[r1].sum()
        values.append(float(term0 / (h0[r0].sum() + h1[r1].sum())))
    return sum(values) / len(values)


def hand_suite(kinds, size=4):
    """Images with region 0 = the top-left 2 x 2 block and region 1 = the bottom-right one."""
    n = len(kinds)
    regions = torch.zeros(n, 2, size, size, dtype=torch.bool)
    regions[:, 0, :2, :2] = True
    regions[:, 1, -2:, -2:] = True
    boxes = torch.tensor([[0, 0, 2, 2], [size - 2, size - 2, size, size]]).expand(n, 2, 4).clone()
    return kb.Suite(x=torch.zeros(n, 3, size, size), pixels=torch.zeros(n, 3, size, size),
                    targets=torch.zeros(n, dtype=torch.long), region_classes=torch.tensor([[0, 1]] * n),
                    regions=regions, boxes=boxes, kind=list(kinds), interaction=torch.zeros(n), independence={},
                    patch_size=2)


def two_region_maps(values, outside=None, size=4):
    """(n, size, size) maps: values[k] = (on region 0, on region 1), `outside[k]` at pixel (0, 3)."""
    m = torch.zeros(len(values), size, size)
    for k, (a, b) in enumerate(values):
        m[k, :2, :2], m[k, -2:, -2:] = a, b
        if outside is not None:
            m[k, 0, -1] = outside[k]
    return m


def test_authors_class_sensitivity_keeps_the_two_maps_scales():
    suite = hand_suite(["class_sensitivity"] * 2)
    maps = two_region_maps([(1.0, 0.2), (51.0, 25.5)])          # h0; the second is saved / 255: (0.2, 0.1)
    second = two_region_maps([(0.1, 0.25), (0.05, -0.5)])      # h1 (|h| is taken)
    # image 0: [4 min(1, .1) + 4 min(.2, .25)] / [4 * 1 + 4 * .25] = 1.2 / 5 = 0.24
    # image 1: [4 min(.2, .05) + 4 min(.1, .5)] / [4 * .2 + 4 * .5] = 0.6 / 2.8
    expected = (0.24 + 0.6 / 2.8) / 2
    got = kb.authors_scores(suite, maps, second)["class_sensitivity_overlap"]
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(reference_class_sensitivity(suite, maps, second), rel=1e-6)
    # our per-image variant compares max-normalized maps: image 0 gives 1 - 2.4 / 8 = 0.7, not 0.76
    ours = kb.score_maps(suite, maps, second)["class_sensitivity"]
    assert float(ours[0]) == pytest.approx(0.7, rel=1e-6)


def test_authors_null_player_is_signed_and_inverted_like_theirs():
    suite = hand_suite(["null_player"] * 2)               # region 0: the target patch, region 1: the null one
    maps = two_region_maps([(0.5, -0.1), (100.0, 10.0)])
    # image 0: 1 / (2 / -0.4) = -0.2 (signed; |h| would give +0.2); image 1: 1 / (400 / 40) = 0.1
    assert kb.authors_scores(suite, maps)["null_player_ratio"] == pytest.approx((-0.2 + 0.1) / 2, rel=1e-6)


def test_authors_symmetry_uses_raw_maps_with_the_255_rule():
    suite = hand_suite(["symmetry"] * 4)
    maps = two_region_maps([(0.9, 0.3), (0.2, 0.1), (0.5, 0.45), (76.5, 51.0)], outside=[1.0, 0.25, 1.0, 0.0])
    # saved copies' means: (.9, .3), (.2, .1), (.5, .45), (.3, .2) (the last / 255): ranks (4, 1, 3, 2) and
    # (3, 1, 4, 2), rho = 1 - 6 * 2 / (4 * 15) = 0.8. Max-normalized maps would rank (.9, .3), (.8, .4),
    # (.5, .45), (1, .667) instead: rho = 0.2.
    assert kb.authors_scores(suite, maps)["symmetry_spearman"] == pytest.approx(0.8, rel=1e-9)
