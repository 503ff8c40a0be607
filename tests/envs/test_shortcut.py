"""The Waterbirds-style shortcut environment: exact boxes and masks, keyed determinism, bias and balance."""

import math
import sys

import pytest
import torch
from torch import nn

from saliencylab.core.errors import ConfigError, InputError
from saliencylab.envs import shortcut
from saliencylab.envs.shortcut import ShortcutData, group_accuracies, shortcut_data, worst_group_accuracy
from saliencylab.metrics.localization import boxes_to_masks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("foreground,classes,backgrounds", [
    ("digits", None, ("grass", "brick")),
    ("shapes", ("disc", "square", "triangle"), ("grass", "gravel", "brick")),
])
def test_shapes_dtypes_and_ranges(foreground, classes, backgrounds):
    d = shortcut_data("train", n=24, size=32, foreground=foreground, classes=classes, backgrounds=backgrounds)
    C, B = len(classes or (0, 1)), len(backgrounds)
    assert isinstance(d, ShortcutData) and len(d) == 24
    assert d.images.shape == (24, 3, 32, 32) and d.images.dtype == torch.float32
    assert 0 <= float(d.images.min()) and float(d.images.max()) <= 1
    for t in (d.labels, d.backgrounds, d.groups, d.index):
        assert t.shape == (24,) and t.dtype == torch.long
    assert d.boxes.shape == (24, 4) and d.boxes.dtype == torch.float32
    assert d.has_box.dtype == torch.bool and d.objects.shape == (24, 32, 32) and d.objects.dtype == torch.bool
    assert d.num_classes == C and d.num_backgrounds == B and d.num_groups == C * B
    assert torch.equal(d.groups, d.labels * B + d.backgrounds)
    assert int(d.labels.max()) < C and int(d.backgrounds.max()) < B


def test_boxes_are_the_tight_boxes_of_the_exact_object_masks():
    for fg in ("digits", "shapes"):
        d = shortcut_data("test", n=40, size=40, foreground=fg, seed=3)
        inside = boxes_to_masks(d.boxes, d.objects.shape)
        assert d.objects.flatten(1).any(1).all()
        assert not (d.objects & ~inside).any()                  # the box contains the whole object
        x0, y0, x1, y1 = d.boxes.long().unbind(1)
        r = torch.arange(len(d))
        # tight: every edge row / column of the box holds object pixels
        assert d.objects[r, y0, :].any(1).all() and d.objects[r, y1 - 1, :].any(1).all()
        assert d.objects[r, :, x0].any(1).all() and d.objects[r, :, x1 - 1].any(1).all()
        # exact: the object pixels are one colour, and no pixel outside the mask has it
        pix = d.images.permute(0, 2, 3, 1)                        # (N, S, S, 3)
        colour = torch.stack([pix[i][d.objects[i]][0] for i in range(len(d))])
        same = (pix == colour[:, None, None, :]).all(-1)
        assert torch.equal(same & d.objects, d.objects)
        assert (same & ~d.objects).flatten(1).sum(1).le(0).float().mean() > 0.95   # textures almost never hit it


def test_deterministic_keyed_by_seed_split_and_index():
    a = shortcut_data("train", n=30, size=24, seed=5)
    b = shortcut_data("train", n=30, size=24, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    head = shortcut_data("train", n=10, size=24, seed=5)
    tail = shortcut_data("train", n=20, size=24, seed=5, start=10)
    for f in ("images", "labels", "backgrounds", "boxes", "objects", "index"):
        assert torch.equal(torch.cat([getattr(head, f), getattr(tail, f)]), getattr(a, f)), f
    sub = a.subset(torch.tensor([3, 7, 29]))
    assert torch.equal(sub.images, a.images[[3, 7, 29]]) and sub.index.tolist() == [3, 7, 29]
    assert torch.equal(a.subset(a.labels == 1).labels, a.labels[a.labels == 1])
    assert not torch.equal(shortcut_data("train", n=30, size=24, seed=6).images, a.images)
    assert not torch.equal(shortcut_data("val", n=30, size=24, seed=5).images, a.images)
    # bias and box_fraction change only the background choice and the withheld boxes
    c = shortcut_data("train", n=30, size=24, seed=5, bias=0.3, box_fraction=0.5)
    assert torch.equal(c.true_objects, a.true_objects) and torch.equal(c.labels, a.labels)
    assert not torch.equal(c.backgrounds, a.backgrounds)


def test_splits_never_share_digits_or_texture_rows():
    pools = {s: set(shortcut._digit_pool(d, s).tolist()) for s in shortcut.SPLITS for d in (0,)}
    assert all(pools[s] for s in pools)
    assert not (pools["train"] & pools["val"]) and not (pools["train"] & pools["test"]) \
        and not (pools["val"] & pools["test"])
    ranges = sorted(shortcut._SPLIT_RANGES.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("bias", [0.0, 0.8, 1.0])
def test_bias_fraction_within_binomial_tolerance(bias):
    n = 1200
    d = shortcut_data("train", n=n, size=16, bias=bias, seed=1)
    aligned = float((d.backgrounds == d.labels % d.num_backgrounds).double().mean())
    assert abs(aligned - bias) <= 4 * math.sqrt(bias * (1 - bias) / n) + 1e-12
    assert abs(float(d.labels.double().mean()) - 0.5) <= 4 * math.sqrt(0.25 / n)


def test_three_backgrounds_off_diagonal_uniform():
    d = shortcut_data("val", n=900, size=16, bias=0.4, seed=2, backgrounds=("grass", "gravel", "brick"))
    off = d.backgrounds[d.backgrounds != d.labels % 3]
    own = d.labels[d.backgrounds != d.labels % 3] % 3
    # the other backgrounds are equally likely: for label 0 the others are 1 and 2
    counts = torch.bincount(off[own == 0], minlength=3)
    assert counts[0] == 0 and abs(int(counts[1]) - int(counts[2])) < 4 * math.sqrt(int(counts.sum()))


def test_test_split_is_balanced_over_groups():
    d = shortcut_data("test", n=120, size=16, bias=1.0, backgrounds=("grass", "gravel", "brick"))
    assert torch.bincount(d.groups, minlength=6).tolist() == [20] * 6


def test_box_fraction_withholds_boxes_and_masks():
    full = shortcut_data("train", n=600, size=16, seed=4)
    part = shortcut_data("train", n=600, size=16, seed=4, box_fraction=0.1)
    assert full.has_box.all() and torch.equal(full.boxes, full.true_boxes)
    frac = float(part.has_box.double().mean())
    assert abs(frac - 0.1) <= 4 * math.sqrt(0.09 / 600) and part.has_box.any()
    assert torch.equal(part.true_boxes, full.true_boxes) and torch.equal(part.true_objects, full.true_objects)
    assert (part.boxes[~part.has_box] == 0).all() and not part.objects[~part.has_box].any()
    assert torch.equal(part.boxes[part.has_box], full.boxes[part.has_box])
    assert torch.equal(part.objects[part.has_box], full.objects[part.has_box])
    assert not shortcut_data("train", n=50, size=16, box_fraction=0.0).has_box.any()


def test_group_accuracies_and_worst_group():
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    groups = torch.tensor([0, 0, 3, 3, 2, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    assert group_accuracies(pred, labels, groups) == {0: 0.5, 1: 1.0, 2: 0.0, 3: 1.0}
    assert worst_group_accuracy(pred, labels, groups) == 0.0
    logits = nn.functional.one_hot(pred, 2).float()
    assert worst_group_accuracy(logits, labels, groups[[0, 1, 2, 3, 3, 5]]) == 0.5   # group 2 absent
    with pytest.raises(InputError, match="predictions must be"):
        worst_group_accuracy(pred[:3], labels, groups)
    with pytest.raises(InputError, match="same length"):
        group_accuracies(pred, labels, groups[:2])


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="training"), "split must be one of"),
    (dict(bias=1.5), "bias must lie in"),
    (dict(box_fraction=-0.1), "box_fraction must lie in"),
    (dict(n=0), "n must be a positive integer"),
    (dict(size=8), "size must be an integer >= 16"),
    (dict(backgrounds=("grass", "sand")), "backgrounds must be at least two distinct"),
    (dict(backgrounds=("grass",)), "backgrounds must be at least two distinct"),
    (dict(foreground="birds"), "foreground must be one of"),
    (dict(classes=(0, 0)), "classes must be at least two distinct digits"),
    (dict(foreground="shapes", classes=("disc", "star")), "classes must be at least two distinct shapes"),
    (dict(scale=(0.5, 0.95)), "scale must be"),
    (dict(scale=0.5), "scale must be"),
    (dict(bias=True), "bias must lie in"),
])
def test_bad_arguments_give_one_clear_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        shortcut_data(**{"n": 4, "size": 16, **kwargs})
    assert "\n" not in str(info.value)


def test_missing_scikit_learn_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    shortcut._digits.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            shortcut_data(n=2, size=16)
        assert len(shortcut_data(n=2, size=16, foreground="shapes")) == 2   # shapes need no scikit-learn
    finally:
        shortcut._digits.cache_clear()


def test_a_cnn_trained_on_the_shortcut_fails_the_minority_groups():
    """With bias 1.0 the background is the easier cue: worst-group accuracy falls far below the mean."""
    torch.manual_seed(0)
    train = shortcut_data("train", n=256, size=24, bias=1.0, seed=0)
    test = shortcut_data("test", n=200, size=24, seed=0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(4):
        for i in range(0, 256, 32):
            loss = nn.functional.cross_entropy(net(train.images[i:i + 32]), train.labels[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = net(test.images).argmax(1)
    accuracy = float((pred == test.labels).float().mean())
    assert accuracy > 0.45                      # it learned something: the majority groups
    assert worst_group_accuracy(pred, test.labels, test.groups) < accuracy - 0.3
