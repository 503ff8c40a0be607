"""Tables and tests computed from rows: grouping by method x metric, pairing by image id, costs per image."""

import pytest

from saliencylab.runs.stats import cost_rows, significance, summarize
from saliencylab.runs.store import Row


def row(method, metric, image, score, explain=None, curves=None, higher=True):
    return Row(image_id=image, image_digest="", model="m", method=method, method_params={}, metric=metric,
               metric_params={}, target=0, score=score, cost={"explain": explain or {}}, curves=curves,
               higher_is_better=higher, category="faithfulness")


def test_summarize_groups_by_method_and_metric_in_order():
    rows = [row("a", "m1", "i0", 1.0), row("a", "m2", "i0", 2.0), row("b", "m1", "i1", 5.0),
            row("a", "m1", "i1", 3.0), row("b", "m1", "i0", 4.0)]
    recs = summarize(rows)
    assert [(r.method, r.metric) for r in recs] == [("a", "m1"), ("a", "m2"), ("b", "m1")]
    a1 = recs[0]
    assert a1.scores == [1.0, 3.0] and a1.image_ids == ["i0", "i1"] and a1.mean == 2.0
    assert a1.low <= a1.mean <= a1.high
    assert recs[2].by_image() == {"i1": 5.0, "i0": 4.0}


def test_curves_are_stacked_per_image_and_costs_summed():
    shared = {"fraction": [0.0, 0.5, 1.0]}
    rows = [row("a", "del", f"i{k}", 0.1 * k, explain={"forward_images": 2.0, "seconds": 0.5},
                curves={"image": {"scores": [1.0, 0.5, 0.1 * k]}, "shared": shared}) for k in range(3)]
    rec = summarize(rows)[0]
    assert rec.curves["fraction"] == [0.0, 0.5, 1.0]
    assert rec.curves["scores"] == [[1.0, 0.5, 0.0], [1.0, 0.5, 0.1], [1.0, 0.5, 0.2]]
    assert rec.cost["explain"] == {"forward_images": 6.0, "seconds": 1.5, "images": 3}
    # one image without curves: no curves for the record rather than a ragged stack
    assert summarize(rows + [row("a", "del", "i9", 0.0)])[0].curves is None


def test_significance_from_rows_pairs_by_image_id():
    ids = [f"i{k}" for k in range(6)]
    best = [row("best", "m", i, 1.0 + k) for k, i in enumerate(ids)]
    # listed in reverse order, same scores per image: a paired test sees no difference
    same = [row("same", "m", i, 1.0 + k) for k, i in reversed(list(enumerate(ids)))]
    worse = [row("worse", "m", i, k - 1.0) for k, i in enumerate(ids)]
    rows = {r["method"]: r for r in significance(best + same + worse)}
    assert rows["same"]["p"] == 1.0 and not rows["same"]["different"]
    assert rows["worse"]["p"] == pytest.approx(2 / 64)  # exact: all 6 differences are 2
    assert rows["worse"]["best"] == "best"


def test_cost_rows_count_each_image_once():
    # evaluate: two metrics over the same images share one explanation per image
    rows = [row("a", m, f"i{k}", 0.0, explain={"forward_images": 1.0, "backward_images": 1.0, "seconds": 0.1})
            for m in ("m1", "m2") for k in range(4)]
    # knows-best: each axiom covers other images; some images cost twice
    rows += [row("b", "x", "j0", 0.0, explain={"forward_images": 2.0, "seconds": 0.2}),
             row("b", "y", "j1", 0.0, explain={"forward_images": 1.0, "seconds": 0.1})]
    by = {c["method"]: c for c in cost_rows(summarize(rows))}
    assert by["a"]["forward_per_image"] == 1.0 and by["a"]["backward_per_image"] == 1.0
    assert by["a"]["seconds_per_image"] == pytest.approx(0.1)
    assert by["b"]["forward_per_image"] == 1.5
