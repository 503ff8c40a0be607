"""Localization metrics: hand-computed 4x4 cases, region parsing, edge cases, the authors' EHR code,
and a model whose relevant pixels are known."""

import numpy as np
import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab import InputError, metrics

# Row i, column j. The box (x0, y0, x1, y1) = (1, 1, 3, 3) holds rows 1-2, columns 1-2: 8, 4, 6, 2.
MAP = torch.tensor([
    [0.0, 1.0, 0.0, -1.0],
    [2.0, 8.0, 4.0, 0.0],
    [0.0, 6.0, 2.0, 0.0],
    [-2.0, 0.0, 0.0, 1.0],
])
BOX = [1, 1, 3, 3]


def score(name, maps, *, x=None, **kwargs):
    maps = maps if maps.dim() == 3 else maps[None]
    x = torch.zeros(maps.shape[0], 1, *maps.shape[-2:]) if x is None else x
    return sl.evaluate(None, x, maps, name, **kwargs)


def test_registered_metadata():
    names = ["effective_heat_ratio", "energy_pointing_game", "iou", "pointing_game", "relevance_mass",
             "relevance_rank"]
    assert metrics.available("localization") == names
    for n in names:
        cls = metrics.get(n)
        assert cls.higher_is_better and not cls.needs_model


def test_pointing_game_by_hand():
    assert float(score("pointing_game", MAP, boxes=[BOX])) == 1.0            # max 8 at row 1, col 1
    assert float(score("pointing_game", MAP, boxes=[[3, 0, 4, 1]])) == 0.0   # the -1 corner
    # tolerance: the max is sqrt(8) = 2.83 px from pixel (3, 3)
    assert float(score("pointing_game", MAP, boxes=[[3, 3, 4, 4]], tolerance=2)) == 0.0
    assert float(score("pointing_game", MAP, boxes=[[3, 3, 4, 4]], tolerance=2.9)) == 1.0
    assert float(score("pointing_game", MAP, boxes=[[3, 3, 4, 4]], tolerance=15)) == 1.0
    # ties: the first maximum in row-major order, as np.argmax
    flat = torch.zeros(4, 4)
    assert float(score("pointing_game", flat, boxes=[[0, 0, 1, 1]])) == 1.0
    assert float(score("pointing_game", flat, boxes=[[1, 1, 4, 4]])) == 0.0


def test_energy_pointing_game_by_hand():
    # positive energy: 1 + 2 + 8 + 4 + 6 + 2 + 1 = 24, inside 8 + 4 + 6 + 2 = 20
    assert float(score("energy_pointing_game", MAP, boxes=[BOX])) == pytest.approx(20 / 24)
    # zero positive energy scores 0 (as Model-Guidance's metrics.py)
    assert float(score("energy_pointing_game", -MAP.abs(), boxes=[BOX])) == 0.0
    assert float(score("energy_pointing_game", torch.zeros(4, 4), boxes=[BOX])) == 0.0


def test_iou_by_hand():
    # positive / max 8: 1, 0.75 (the 6) strictly above 0.5; the 4 is exactly 0.5 -> out.
    assert float(score("iou", MAP, boxes=[BOX])) == pytest.approx(2 / 4)
    assert float(score("iou", MAP, boxes=[BOX], threshold=0.4)) == pytest.approx(3 / 4)
    # threshold 0.1: 8, 6, 4, 2, 2 (the 2 outside the box too); the 1s are 0.125 -> in: 7 on, 4 inside
    assert float(score("iou", MAP, boxes=[BOX], threshold=0.1)) == pytest.approx(4 / 7)
    assert float(score("iou", -MAP.abs(), boxes=[BOX])) == 0.0


def test_relevance_mass_by_hand():
    assert float(score("relevance_mass", MAP, boxes=[BOX])) == pytest.approx(20 / 24)
    assert float(score("relevance_mass", MAP, boxes=[BOX], relevance="absolute")) == pytest.approx(20 / 27)
    assert float(score("relevance_mass", MAP, boxes=[BOX], relevance="signed")) == pytest.approx(20 / 21)
    nonneg = MAP.clamp(min=0)
    values = {float(score("relevance_mass", nonneg, boxes=[BOX], relevance=r)) for r in ("positive", "absolute",
                                                                                       "signed")}
    assert len(values) == 1


def quantus_rank_accuracy(a, s):
    """Quantus RelevanceRankAccuracy.evaluate_instance (maps without ties)."""
    a, s = a.flatten(), np.where(s.flatten().astype(bool))[0]
    k = len(s)
    top = np.argsort(a)[-int(k):]
    return len(np.intersect1d(s, top)) / float(k)


def test_relevance_rank_by_hand():
    # k = 4; top values 8, 6, 4 inside, then a tie at 2: one inside (row 2, col 2), one outside
    # (row 1, col 0) share the last slot -> 3 + 1/2 hits.
    assert float(score("relevance_rank", MAP, boxes=[BOX])) == pytest.approx(3.5 / 4)
    no_tie = MAP.clone()
    no_tie[1, 0] = 3.0                                         # now the 4th largest is outside
    assert float(score("relevance_rank", no_tie, boxes=[BOX])) == pytest.approx(3 / 4)
    torch.manual_seed(0)
    maps = torch.randn(3, 8, 8)
    masks = torch.rand(3, 8, 8) > 0.6
    got = score("relevance_rank", maps, masks=masks)
    for i in range(3):
        assert float(got[i]) == pytest.approx(quantus_rank_accuracy(maps[i].numpy(), masks[i].numpy()))
    # a constant map: every pixel tied -> the expected share |region| / N
    assert float(score("relevance_rank", torch.ones(4, 4), boxes=[BOX])) == pytest.approx(4 / 16)


def authors_ehr(heatmap, roi_mask, base_threshold=0.1, weight_by_heat=True):
    """CAMP-eXplain-AI/InputIBA iba/evaluation/effective_heat_ratios.py, for a heat map in [0, 1]."""
    heatmap = heatmap.astype(float).copy()
    quantiles = np.linspace(0, 1.0, 11)
    poi_mask = heatmap >= base_threshold
    heatmap[~poi_mask] = 0.0
    poi = heatmap[poi_mask]
    ratios = np.zeros(len(quantiles))
    max_heat = heatmap.max()
    for i, q in enumerate(quantiles):
        t = min(np.quantile(poi, q), max_heat * 0.99)
        bin_mask = heatmap >= t
        total_points = bin_mask.sum()
        heat_in_roi = heatmap[bin_mask * roi_mask].sum() if weight_by_heat else (bin_mask * roi_mask).sum()
        ratios[i] = heat_in_roi / (total_points + 1e-8)
    return np.trapezoid(ratios, quantiles) if hasattr(np, "trapezoid") else np.trapz(ratios, quantiles)


def test_effective_heat_ratio_by_hand():
    heat = torch.tensor([[1.0, 0.5, 0.05, 0.0], [0.25, 0.0, 0.0, 0.0]])
    box = [[0, 0, 1, 2]]                                       # column 0: heats 1.0 and 0.25
    # pixels of interest (>= 0.1): 0.25, 0.5, 1.0; quantiles 0, .5, 1 -> t = 0.25, 0.5, min(1, 0.99)
    # ratios: (1 + .25) / 3, 1 / 2, 1 / 1 -> trapezoid = (5/12 + 1/2) / 4 + (1/2 + 1) / 4 = 29/48
    got, curves = score("effective_heat_ratio", heat, boxes=box, quantiles=3, return_curves=True)
    assert float(got) == pytest.approx(29 / 48, abs=1e-6)
    assert torch.allclose(curves["ratio"][0], torch.tensor([5 / 12, 1 / 2, 1.0]), atol=1e-6)
    # counting region pixels instead of their heat: 2/3, 1/2, 1 -> 2/3
    assert float(score("effective_heat_ratio", heat, boxes=box, quantiles=3, weight_by_heat=False)) == \
        pytest.approx(2 / 3, abs=1e-6)
    # no heat at all scores 0
    assert float(score("effective_heat_ratio", torch.zeros(2, 4), boxes=box)) == 0.0


def test_effective_heat_ratio_matches_authors_code():
    torch.manual_seed(0)
    heat = torch.rand(4, 12, 10) ** 2
    heat[:, 3:7, 2:6] += 0.5
    heat = heat / heat.flatten(1).amax(1)[:, None, None]       # in [0, 1] with max 1, as saved by InputIBA
    heat[3] = torch.where(heat[3] > 0.5, heat[3], torch.zeros_like(heat[3]))  # many zeros
    masks = torch.zeros(4, 12, 10, dtype=torch.bool)
    masks[:, 2:8, 1:5] = True
    for weight in (True, False):
        got = score("effective_heat_ratio", heat.double(), x=torch.zeros(4, 1, 12, 10, dtype=torch.float64),
                    masks=masks, weight_by_heat=weight)
        for i in range(4):
            want = authors_ehr(heat[i].double().numpy(), masks[i].numpy(), weight_by_heat=weight)
            assert float(got[i]) == pytest.approx(want, abs=1e-9)
    # maps are scaled to max 1 first; signed maps are min-max normalized
    assert torch.allclose(score("effective_heat_ratio", 7 * heat, masks=masks),
                          score("effective_heat_ratio", heat, masks=masks), atol=1e-4)
    assert torch.allclose(score("effective_heat_ratio", 2 * heat - 1, masks=masks),
                          score("effective_heat_ratio", heat, masks=masks), atol=1e-4)


def test_regions_from_boxes_lists_and_masks_agree():
    torch.manual_seed(0)
    maps = torch.randn(3, 6, 8)
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 0:2, 0:8] = True
    masks[1, 4:6, 6:8] = True                                  # two boxes: union
    masks[2, 5:6, 7:8] = True
    lists = [[2, 1, 5, 4], [[0, 0, 8, 2], [6, 4, 8, 6]], [(7, 5, 8, 6)]]
    padded = torch.tensor([[[2, 1, 5, 4], [0, 0, 0, 0]], [[0, 0, 8, 2], [6, 4, 8, 6]], [[7, 5, 8, 6], [0, 0, 0, 0]]])
    for name in metrics.available("localization"):
        a = score(name, maps, masks=masks)
        assert torch.allclose(a, score(name, maps, boxes=lists), equal_nan=True), name
        assert torch.allclose(a, score(name, maps, boxes=padded), equal_nan=True), name
        assert torch.allclose(a, score(name, maps, masks=masks.float().numpy()), equal_nan=True), name
    single = torch.tensor([[2, 1, 5, 4]] * 3)
    assert score("energy_pointing_game", maps, boxes=single).shape == (3,)


def test_bad_regions_are_clear_input_errors():
    maps = torch.randn(2, 4, 4)
    with pytest.raises(InputError, match=r"needs boxes= or masks= \(the object region"):
        score("iou", maps)
    with pytest.raises(InputError, match="not both"):
        score("iou", maps, boxes=[BOX, BOX], masks=torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match=r"boxes must have shape \(2, 4\)"):
        score("iou", maps, boxes=torch.zeros(2, 3))
    with pytest.raises(InputError, match="2 images"):
        score("iou", maps, boxes=[BOX])
    with pytest.raises(InputError, match="x1 >= x0"):
        score("iou", maps, boxes=[[3, 0, 1, 2], BOX])
    with pytest.raises(InputError, match=r"masks must have shape \(2, 4, 4\)"):
        score("iou", maps, masks=torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="booleans"):
        score("iou", maps, masks=torch.full((2, 4, 4), 0.5))
    with pytest.raises(sl.ConfigError, match="unknown parameter"):
        score("iou", maps, regions=torch.ones(2, 4, 4))


def test_empty_region_scores_nan():
    maps = MAP[None].repeat(2, 1, 1)
    with pytest.warns(UserWarning, match="empty"):
        got = score("relevance_mass", maps, boxes=[BOX, []])
    assert float(got[0]) == pytest.approx(20 / 24) and torch.isnan(got[1])


class PatchModel(nn.Module):
    """A linear classifier that only reads pixels rows 3-6, columns 5-8: the evidence is known."""

    def __init__(self, classes=3, size=12):
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(classes, 3, size, size)
        keep = torch.zeros(1, 1, size, size)
        keep[..., 3:7, 5:9] = 1
        self.weight = nn.Parameter(w * keep)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight)


def test_known_good_map_beats_random_map():
    model = PatchModel()
    torch.manual_seed(1)
    x = torch.randn(6, 3, 12, 12)
    good = sl.explain(model, x, "gradient", absolute=True)     # |weights| of the explained class
    random_maps = torch.rand(6, 12, 12)
    boxes = torch.tensor([[5, 3, 9, 7]] * 6)
    for name in metrics.available("localization"):
        g = sl.evaluate(None, x, good, name, boxes=boxes)
        r = sl.evaluate(None, x, random_maps, name, boxes=boxes)
        assert (g >= r).all() and g.mean() > r.mean() + 0.2, (name, g, r)
    for name in ("pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank"):
        assert torch.allclose(sl.evaluate(None, x, good, name, boxes=boxes), torch.ones(6)), name
