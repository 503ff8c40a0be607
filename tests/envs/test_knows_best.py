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
    assert abs(authors["class_sensitivity_overlap"] - (1 - float(scores["class_sensitivity"].mean()))) < 1e-6
    assert -1 <= authors["symmetry_spearman"] <= 1 and authors["null_player_ratio"] >= 0
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
