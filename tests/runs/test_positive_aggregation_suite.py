"""The positive-aggregation suite's comparison: paired differences, Holm, and the claim's verdict."""

from saliencylab.runs import leaderboard
from saliencylab.runs.leaderboard import GroupResult
from saliencylab.runs.positive_aggregation import STUDY, compare, comparison_markdown, study_methods
from saliencylab.runs.stats import Record


def record(method, metric, scores):
    m = sum(scores) / len(scores)
    return Record(method=method, metric=metric, scores=scores, mean=m, low=m, high=m, higher_is_better=False,
                  category="sanity", image_ids=[f"i{k}" for k in range(len(scores))])


def test_claim_is_reproduced_only_where_positive_is_significantly_more_similar():
    n = 8
    families = STUDY[:2]  # Grad-CAM (gradcam vs gradcam), Grad-CAM++ (same name on both sides)
    pos = GroupResult("positive", [record("gradcam", "random_logit", [0.9] * n),
                                   record("gradcam_plus_plus", "random_logit", [0.5 + 0.01 * k for k in range(n)])],
                      {}, [])
    neg = GroupResult("signed", [record("gradcam", "random_logit", [0.2 + 0.01 * k for k in range(n)]),
                                 record("gradcam_plus_plus", "random_logit", [0.5 + 0.01 * k for k in range(n)])],
                      {}, [])
    rows = compare([pos, neg], families, mirrored=False)
    assert [r["family"] for r in rows] == [f[0] for f in families]
    big, none = rows
    assert big["reproduced"] and big["difference"] > 0.6 and big["p_holm"] < 0.05
    assert not none["reproduced"] and none["difference"] == 0
    assert "not reproduced" in comparison_markdown(rows) and "| reproduced |" in comparison_markdown(rows)


def test_a_photo_and_its_mirror_are_one_unit_and_five_photos_cannot_reach_five_percent():
    families = STUDY[:1]
    # 5 photos then their 5 mirrors: the positive variant always more similar
    pos = GroupResult("positive", [record("gradcam", "random_logit", [0.9] * 10)], {}, [])
    neg = GroupResult("signed", [record("gradcam", "random_logit", [0.1 * k for k in range(10)])], {}, [])
    (row,) = compare([pos, neg], families)
    assert row["n"] == 5 and row["consistent"] == 5
    assert abs(row["signed_mean"] - sum((0.1 * k + 0.1 * (k + 5)) / 2 for k in range(5)) / 5) < 1e-12
    assert row["p"] >= 0.0625 and not row["reproduced"]
    assert row["verdict"] == "direction in 5/5 photos; too few photos for 5%"


def test_suite_is_registered_with_the_study_methods():
    assert "positive-aggregation" in leaderboard.SUITES
    names = leaderboard.resolve_methods(None, "positive-aggregation")
    assert names == study_methods()
    assert {"gradcam_plus_plus", "layercam", "fullgrad", "lrp", "guided_backprop", "deconvnet", "rectgrad",
            "gradient"} <= set(names)
