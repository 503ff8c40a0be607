"""Ground-truth metrics: hand-computed cases, the truth beats random maps, scipy agreement."""

import math

import pytest
import scipy.stats
import torch

import saliencylab
from saliencylab import envs, metrics
from saliencylab.core.errors import ConfigError, InputError

NAMES = ("gt_precision", "gt_recall", "gt_mass_positive", "gt_mass_negative", "gt_rank_correlation")

# one 2x2 image: truth has two positive pixels (1, 0.5), one negative (-1), one inert (0)
TRUTH = torch.tensor([[[1.0, 0.5], [0.0, -1.0]]])
MAP = torch.tensor([[[3.0, -1.0], [2.0, -2.0]]])
X = torch.zeros(1, 3, 2, 2)


def score(name, maps=MAP, truth=TRUTH, x=None, **params):
    x = torch.zeros(maps.shape[0], 3, *maps.shape[-2:]) if x is None else x
    return saliencylab.evaluate(None, x, maps, name, truth=truth, **params)


def test_registered():
    assert set(metrics.available("groundtruth")) == set(NAMES)
    for name in NAMES:
        cls = metrics.get(name)
        assert cls.category == "groundtruth" and not cls.needs_model and cls.higher_is_better


@pytest.mark.parametrize("name, params, expected", [
    # top-2 (k = 2 positive truth pixels) are 3 (relevant) and 2 (inert)
    ("gt_precision", {}, 0.5),
    ("gt_precision", {"k": 1}, 1.0),
    ("gt_precision", {"k": 0.75}, 2 / 3),       # top-3: 3, 2, -1 -> two relevant
    # positive attribution on 3 (relevant) and 2 (inert): one of the two relevant pixels found
    ("gt_recall", {}, 0.5),
    ("gt_recall", {"k": 3}, 1.0),
    ("gt_recall", {"k": 1}, 0.5),
    ("gt_mass_positive", {}, 3 / 5),             # positive mass 3 + 2, of which 3 on relevant pixels
    ("gt_mass_negative", {}, 2 / 3),             # negative mass 1 + 2, of which 2 on the negative pixel
    # ranks map (4, 2, 3, 1), truth (4, 3, 2, 1): sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15)
    ("gt_rank_correlation", {}, 0.8),
])
def test_hand_computed(name, params, expected):
    assert float(score(name, **params)) == pytest.approx(expected)


def test_ties_at_the_kth_value_share_the_slots():
    maps = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    truth = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(score("gt_precision", maps, truth)) == pytest.approx(1 / 3)
    assert float(score("gt_recall", maps, truth, k=1)) == pytest.approx(1 / 3)
    assert float(score("gt_recall", maps, truth)) == 1.0


def test_channels_are_summed_and_batches_are_independent():
    maps = torch.cat([MAP, -MAP])
    truth = torch.cat([TRUTH, TRUTH])
    per_channel = maps[:, None].expand(-1, 3, -1, -1) / 3
    a = score("gt_mass_positive", maps, truth)
    b = score("gt_mass_positive", per_channel, truth)
    torch.testing.assert_close(a, b)
    # -MAP is positive on (0, 1) (1, relevant) and (1, 1) (2, the negative pixel)
    assert a[0] == pytest.approx(0.6) and a[1] == pytest.approx(1 / 3)


def test_degenerate_cases():
    zero = torch.zeros_like(MAP)
    assert float(score("gt_mass_positive", zero)) == 0.0
    assert float(score("gt_mass_negative", zero)) == 0.0
    assert float(score("gt_recall", zero)) == 0.0
    assert float(score("gt_rank_correlation", zero)) == 0.0            # a constant map ranks nothing
    positive_only = TRUTH.clamp(min=0)
    assert math.isnan(float(score("gt_mass_negative", truth=positive_only)))
    assert math.isnan(float(score("gt_rank_correlation", truth=torch.ones_like(TRUTH))))
    no_positive = -TRUTH.abs()
    for name in ("gt_precision", "gt_recall", "gt_mass_positive"):
        with pytest.warns(UserWarning, match="no positive pixel"):
            assert math.isnan(float(score(name, truth=no_positive)))


def test_truth_itself_scores_perfectly_and_beats_random_maps():
    b = envs.load("dominant_colour").sample(16, seed=0)
    noise = torch.randn(b.truth.shape, generator=torch.Generator().manual_seed(0))
    for name in NAMES:
        perfect = score(name, b.truth, b.truth)
        random = score(name, noise, b.truth)
        torch.testing.assert_close(perfect, torch.ones(16))
        assert float(random.mean()) < 0.7, name
        assert bool((random < perfect).all()), name


def test_rank_correlation_matches_scipy():
    g = torch.Generator().manual_seed(1)
    maps = (torch.randn(5, 6, 7, generator=g) * 2).round()                       # with ties
    truth = torch.randint(-2, 3, (5, 6, 7), generator=g).float()
    got = score("gt_rank_correlation", maps, truth)
    expected = [scipy.stats.spearmanr(m.flatten().numpy(), t.flatten().numpy()).statistic
                for m, t in zip(maps, truth)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=1e-6, rtol=0)


def test_works_with_a_model_and_an_explanation():
    env = envs.load("null_player")
    b = env.sample(4, seed=1)
    ex = saliencylab.explain(env.model, b.x, "input_x_gradient", target=b.target)
    scores = saliencylab.evaluate(env.model, b.x, ex, "gt_mass_positive", truth=b.truth)
    torch.testing.assert_close(scores, torch.ones(4))
    assert float(score("gt_precision", MAP, TRUTH[:, None])) == 0.5   # (B, 1, H, W) truth accepted


def test_errors():
    with pytest.raises(InputError, match=r"truth must have shape \(1, 2, 2\)"):
        score("gt_precision", truth=torch.zeros(1, 3, 3))
    with pytest.raises(InputError, match=r"metric .gt_precision. needs truth="):
        saliencylab.evaluate(None, X, MAP, "gt_precision")
    with pytest.raises(InputError, match="NaN"):
        score("gt_recall", truth=torch.full_like(TRUTH, math.nan))
    with pytest.raises(InputError, match="exceeds"):
        score("gt_precision", k=5)
    for bad in (0, -1, 1.5, 0.0, "3", True):
        with pytest.raises(ConfigError):
            metrics.build("gt_precision", k=bad)
    with pytest.raises(ConfigError, match="unknown parameter"):
        metrics.build("gt_mass_positive", k=3)
