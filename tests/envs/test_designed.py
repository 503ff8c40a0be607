"""Designed environments: the ground truth is proven against the network by perturbation (and, for
pattern_at_location, by brute-force Shapley values over every coalition)."""

import math

import pytest
import torch

import saliencylab
from saliencylab import envs
from saliencylab.envs.designed import PATTERNS
from saliencylab.core.errors import ConfigError

NAMES = ("dominant_colour", "pattern_at_location", "null_player")
COLOUR_ENVS = ("dominant_colour", "null_player")
N = 64


def logits(env, x):
    with torch.no_grad():
        return env.model(x)


def target_logit(env, x, target):
    return logits(env, x).gather(1, target[:, None])[:, 0]


def one_pixel_per_image(mask, seed=0):
    """A random (row, col) inside each image's mask (every image needs one)."""
    assert bool(mask.flatten(1).any(1).all())
    g = torch.Generator().manual_seed(seed)
    flat = torch.multinomial(mask.flatten(1).to(torch.float64), 1, generator=g)[:, 0]
    return flat // mask.shape[-1], flat % mask.shape[-1]


def set_pixels(x, rows, cols, value):
    x = x.clone()
    b = torch.arange(x.shape[0])
    x[b, :, rows, cols] = value
    return x


@pytest.fixture(scope="module", params=NAMES)
def env(request):
    return envs.load(request.param)


def test_registry_and_unknown_name():
    assert set(NAMES) <= set(envs.available())
    with pytest.raises(ConfigError, match="did you mean dominant_colour"):
        envs.load("dominant_color")


def test_metadata(env):
    assert env.name in NAMES and env.trained is False and env.accuracy == 1.0
    assert env.description and "\n" not in env.description and isinstance(env.note, str)
    assert env.image_size == 32 and env.num_classes == len(env.class_names) >= 2
    assert not env.model.training
    x = env.sample(2).x
    assert logits(env, x).shape == (2, env.num_classes)


def test_batch_contract(env):
    b = env.sample(N, seed=3)
    s = env.image_size
    assert b.x.shape == (N, 3, s, s) and b.x.dtype == torch.float32
    assert b.x.min() >= 0 and b.x.max() <= 1
    assert b.labels.shape == (N,) and b.labels.dtype == torch.long and torch.equal(b.target, b.labels)
    assert b.truth.shape == (N, s, s) and b.truth.dtype == torch.float32
    assert torch.equal(b.relevant, b.truth > 0) and torch.equal(b.negative, b.truth < 0)
    assert b.null.shape == (N, s, s) and b.null.dtype == torch.bool
    assert not bool((b.truth[b.null] != 0).any())          # null pixels have no truth
    assert bool(b.relevant.flatten(1).any(1).all())          # every image has something to find
    assert len(b) == N and set(b.labels.tolist()) == set(range(env.num_classes))


def test_seeded(env):
    a, b, c = env.sample(N, seed=7), env.sample(N, seed=7), env.sample(N, seed=8)
    for field in ("x", "labels", "truth", "null"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.x, c.x)


def test_designed_model_is_always_right_and_complete(env):
    b = env.sample(256, seed=1)
    out = logits(env, b.x)
    assert torch.equal(out.argmax(1), b.labels)
    # completeness: the target logit is the sum of the truth (Shapley values, black = absent)
    torch.testing.assert_close(out.gather(1, b.target[:, None])[:, 0], b.truth.sum((1, 2)), atol=1e-6, rtol=0)


def test_null_pixels_are_ignored(env):
    b = env.sample(N, seed=2)
    if env.name == "dominant_colour":
        assert not bool(b.null.any())
        return
    assert bool(b.null.any())
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(b.x.shape, generator=g)
    colour = torch.nn.functional.one_hot(torch.randint(0, 3, b.x.shape[:1] + b.x.shape[2:], generator=g), 3)
    colour = colour.permute(0, 3, 1, 2).float()
    before = logits(env, b.x)
    for fill in (noise, colour, torch.zeros_like(b.x)):
        x = torch.where(b.null[:, None], fill, b.x)
        assert not torch.equal(x, b.x)
        torch.testing.assert_close(logits(env, x), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", COLOUR_ENVS)
def test_colour_pixels_contribute_exactly_their_truth(name):
    env = envs.load(name)
    b = env.sample(N, seed=4)
    before = target_logit(env, b.x, b.target)
    for mask in (b.relevant, b.negative):   # a target-colour pixel, then a competing-colour pixel
        rows, cols = one_pixel_per_image(mask)
        after = target_logit(env, set_pixels(b.x, rows, cols, 0.0), b.target)
        contribution = b.truth[torch.arange(N), rows, cols]
        assert bool((contribution != 0).all())
        torch.testing.assert_close(before - after, contribution, atol=1e-6, rtol=0)


def test_dominant_colour_labels_are_the_most_frequent_colour():
    b = envs.load("dominant_colour").sample(256, seed=5)
    counts = b.x.sum((2, 3))                                   # (n, 3) pixels per colour
    top2 = counts.topk(2, dim=1).values
    assert torch.equal(counts.argmax(1), b.labels) and bool((top2[:, 0] > top2[:, 1]).all())
    background = b.x.sum(1) == 0
    assert bool((b.truth[background] == 0).all())


def test_null_player_decoys_look_like_data():
    b = envs.load("null_player").sample(256, seed=6)
    half = b.x.shape[-1] // 2
    left, right = b.x[..., :half].sum((2, 3)), b.x[..., half:].sum((2, 3))
    assert torch.equal(left.argmax(1), b.labels)
    assert torch.equal(b.null[0], torch.arange(2 * half).expand(2 * half, -1) >= half)
    decoy_label = right.argmax(1)
    assert 0.2 < float((decoy_label != b.labels).float().mean()) < 0.9   # decoys are independent of the label
    assert float(right.sum(1).mean()) == pytest.approx(float(left.sum(1).mean()), rel=0.15)


def test_pattern_pixels_are_each_necessary():
    env = envs.load("pattern_at_location")
    b = env.sample(N, seed=7)
    out = logits(env, b.x)
    others = torch.ones_like(out, dtype=torch.bool).scatter_(1, b.target[:, None], False)
    assert bool((out[others] == 0).all()) and bool((out.gather(1, b.target[:, None]) == 1).all())
    rows, cols = one_pixel_per_image(b.relevant)
    after = logits(env, set_pixels(b.x, rows, cols, 0.0))
    assert bool((after == 0).all())                          # removing any one pattern pixel kills the detection
    sizes = PATTERNS.flatten(1).sum(1).float()
    torch.testing.assert_close(b.truth.sum((1, 2)), torch.ones(N))
    torch.testing.assert_close(b.truth[torch.arange(N), rows, cols], 1 / sizes[b.labels])
    # the same shapes appear outside the region as distractors
    assert float((b.x.sum(1) * b.null).flatten(1).sum(1).gt(0).float().mean()) > 0.8


def test_patterns_are_unambiguous():
    """No shape equals the crop of a shifted shape (other than itself unshifted): the exact
    detectors fire only on the shape they were designed for."""
    p = PATTERNS.shape[-1]
    padded = torch.nn.functional.pad(PATTERNS.float(), (p - 1, p - 1, p - 1, p - 1))
    crops = padded.unfold(1, p, 1).unfold(2, p, 1)             # (K, 2p-1, 2p-1, p, p) all shifts
    equal = (crops[:, :, :, None] == PATTERNS.float()[None, None, None]).flatten(-2).all(-1)
    hits = equal.nonzero().tolist()                           # (shape, dy, dx, matched shape)
    assert sorted(hits) == [[k, p - 1, p - 1, k] for k in range(PATTERNS.shape[0])]


@pytest.mark.parametrize("name", COLOUR_ENVS)
@pytest.mark.parametrize("method", ["integrated_gradients", "input_x_gradient"])
def test_additive_envs_recover_truth_with_ig_and_input_x_gradient(name, method):
    env = envs.load(name)
    b = env.sample(8, seed=9)
    maps = saliencylab.explain(env.model, b.x, method, target=b.target).maps
    scale = float(b.truth.abs().max())
    torch.testing.assert_close(maps, b.truth, atol=1e-4 * scale, rtol=0)
    precision = saliencylab.evaluate(None, b.x, maps, "gt_precision", truth=b.truth)
    assert bool((precision == 1).all())


# -- pattern_at_location: the truth is the Shapley value, not the drop of one removal --------------------------
def shapley_brute_force(values, n):
    """Exact Shapley values of an n-player game given f on every coalition (values[mask], bit i = player i):
    phi_i = sum over S without i of |S|! (n - |S| - 1)! / n! [f(S + i) - f(S)]."""
    masks = torch.arange(2 ** n)
    bits = (masks[:, None] >> torch.arange(n)) & 1                      # (2^n, n)
    size = bits.sum(1)
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                           for s in range(n + 1)], dtype=torch.float64)
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = bits[:, i] == 0
        phi[i] = (weight[size[without]] * (values[masks[without] | (1 << i)] - values[without])).sum()
    return phi


def test_pattern_truth_is_the_brute_force_shapley_value():
    """On images reduced to the target shape (9 pixels: plus or x) and 3 distractor pixels outside the
    quadrant, every other pixel black (black = absent), f is evaluated on all 2^12 coalitions. Blackening
    the other distractor pixels changes no logit (they are null players, which leaves every other
    player's Shapley value unchanged), so these are the Shapley values of the full image."""
    env = envs.load("pattern_at_location")
    b = env.sample(64, seed=11)
    picks = [int((b.labels == 0).nonzero()[0]), int((b.labels == 1).nonzero()[0])]   # plus, x: 9 pixels each
    g = torch.Generator().manual_seed(0)
    for i in picks:
        coloured = b.x[i].sum(0) > 0
        pattern = b.relevant[i]
        assert int(pattern.sum()) == 9 and bool(coloured[pattern].all())
        others = (coloured & b.null[i]).nonzero()
        others = others[torch.randperm(len(others), generator=g)[:3]]
        players = torch.cat([pattern.nonzero(), others])                  # (12, 2) rows, cols
        rows, cols = players[:, 0], players[:, 1]
        n = len(players)
        reduced = torch.zeros_like(b.x[i])
        reduced[:, rows, cols] = b.x[i][:, rows, cols]
        torch.testing.assert_close(logits(env, reduced[None]), logits(env, b.x[i:i + 1]), atol=0, rtol=0)
        present = ((torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1).to(torch.float32)   # (2^n, n)
        x = torch.zeros(2 ** n, 3, *b.x.shape[-2:])
        x[:, :, rows, cols] = present[:, None, :] * b.x[i][:, rows, cols][None]
        f = torch.cat([target_logit(env, c, b.target[i].expand(len(c))) for c in x.split(1024)]).double()
        phi = shapley_brute_force(f, n)
        torch.testing.assert_close(phi, b.truth[i, rows, cols].double(), atol=1e-7, rtol=0)   # truth is float32
        assert torch.allclose(phi[:9], torch.full((9,), 1 / 9, dtype=torch.float64)) and bool((phi[9:] == 0).all())


def test_removing_any_pattern_pixel_drops_the_logit_by_one_not_by_its_truth():
    """The README's "removing a truth pixel changes the target logit by exactly its value" holds for the
    additive colour environments only: here the detection is all or nothing, so every removal drops the
    logit from 1 to 0, while the pixel's truth (its Shapley value) is 1 / |shape|."""
    env = envs.load("pattern_at_location")
    b = env.sample(16, seed=12)
    for i in range(len(b)):
        rows, cols = b.relevant[i].nonzero(as_tuple=True)
        x = b.x[i].expand(len(rows), -1, -1, -1).clone()
        x[torch.arange(len(rows)), :, rows, cols] = 0.0                    # copy k lacks pattern pixel k
        before = target_logit(env, b.x[i:i + 1], b.target[i:i + 1])
        after = target_logit(env, x, b.target[i].expand(len(rows)))
        assert float(before) == 1.0 and bool((before - after == 1).all())
        size = len(rows)
        assert size in (9, 15, 16) and bool((b.truth[i, rows, cols] == 1 / size).all())   # truth: 1 / |shape| < 1
