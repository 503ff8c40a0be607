"""`saliencylab leaderboard`: the paired test and Holm correction against references, and the suite run end to
end on the ground-truth environments (leaderboard, HTML, resume, per-method isolation)."""

import json
import math

import numpy as np
import pytest
import torch

from saliencylab.runs import leaderboard as bench
from saliencylab.cli import main
from saliencylab.core.errors import ConfigError
from saliencylab.core.session import model_fingerprint
from saliencylab.evaluation import Record, holm, paired_permutation_test


def test_paired_permutation_test_matches_scipy_exact():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 10), rng.normal(0, 1, 10)
    ref = stats.permutation_test((a, b), lambda u, v: np.mean(u - v), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided").pvalue
    assert paired_permutation_test(a, b) == pytest.approx(ref, abs=1e-12)


def test_paired_permutation_test_hand_cases():
    assert paired_permutation_test([1, 2, 3], [0, 0, 0]) == 0.25  # 2 of 8 sign flips reach |mean| 2
    assert paired_permutation_test([1, 2], [1, 2]) == 1.0
    assert math.isnan(paired_permutation_test([math.nan], [1.0]))
    big = paired_permutation_test(np.arange(40) + 1.0, np.zeros(40))  # Monte Carlo branch: never 0
    assert 0 < big < 1e-3
    with pytest.raises(ConfigError):
        paired_permutation_test([1, 2], [1])


def test_holm_hand_case():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan])[0] == 0.5 and math.isnan(holm([0.5, math.nan])[1])


def _record(method, scores, higher=True, ids=None):
    return Record(method=method, metric="m", scores=scores, mean=float(np.mean(scores)), low=0, high=0,
                  higher_is_better=higher, category="faithfulness", image_ids=ids or [])


def test_significance_against_best_picks_the_best_by_direction():
    good, bad, tie = [1.0] * 8, [0.0] * 8, [1.0, 0.9, 1.1, 1.0, 1.0, 0.95, 1.05, 1.0]
    rows = bench.significance_against_best([_record("good", good), _record("bad", bad), _record("tie", tie)])
    by = {r["method"]: r for r in rows}
    assert {r["best"] for r in rows} == {"good"}
    assert by["bad"]["different"] and not by["tie"]["different"]
    rows = bench.significance_against_best([_record("good", good, False), _record("bad", bad, False)])
    assert rows[0]["best"] == "bad"  # lower is better


def test_significance_pairs_scores_by_image_id():
    ids = [f"img{i}" for i in range(8)]
    best = [1.0 + 0.1 * i for i in range(8)]
    # the same scores listed in another image order: paired by id they are equal, by position they are not
    shuffled = _record("same", best[::-1], ids=ids[::-1])
    rows = bench.significance_against_best([_record("best", best, ids=ids), shuffled])
    assert rows[0]["p"] == 1.0
    # a method that missed some images is compared on the images both have
    partial = _record("partial", [0.0] * 4, ids=ids[:4])
    rows = bench.significance_against_best([_record("best", best, ids=ids), partial])
    assert rows[0]["p"] == pytest.approx(2 / 16)


def test_unknown_suite_and_method():
    with pytest.raises(ConfigError, match="did you mean groundtruth"):
        bench.run_bench("groundtruht", ["gradient"], "unused")
    with pytest.raises(ConfigError, match="unknown method"):
        bench.resolve_methods("gradient,nope")


def test_groundtruth_suite_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    argv = ["leaderboard", "--suite", "groundtruth", "--methods", "gradient,integrated_gradients",
            "--images", "4", "--out", str(out)]
    assert main(argv) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    from saliencylab import envs

    assert [g["name"] for g in board["groups"]] == [n + t for n in envs.available() for t in ("", " (trained)")]
    first = board["groups"][0]
    assert {(r["method"], r["metric"]) for r in first["rows"]} == {
        (m, k) for m in ("gradient", "integrated_gradients") for k in bench.GROUNDTRUTH_METRICS}
    assert all(r["n"] == 4 or r["metric"] == "gt_mass_negative" for r in first["rows"])
    # IG from a black baseline recovers the signed truth of the additive colour-count environment
    ig = {r["metric"]: r["mean"] for r in first["rows"] if r["method"] == "integrated_gradients"}
    assert ig["gt_rank_correlation"] > 0.99 and ig["gt_mass_positive"] > 0.99
    assert {c["method"] for c in first["costs"]} == {"gradient", "integrated_gradients"}
    html = (out / "index.html").read_text()
    assert "saliencylab leaderboard: groundtruth" in html and "examples.png" in html
    assert "integrated_gradients" in (out / "leaderboard.md").read_text()

    # one row per image x method x metric in each group's rows.jsonl
    lines = (out / bench.slug(board["groups"][0]["name"]) / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 2 * len(bench.GROUNDTRUTH_METRICS)

    # a rerun reuses every row: no method is explained again
    calls = []
    monkeypatch.setattr(bench, "run_evaluation", _counting(bench.run_evaluation, calls))
    import saliencylab.runs.local as local

    explained = []
    monkeypatch.setattr(local, "explain", lambda *a, **k: explained.append(a) or pytest.fail("re-explained"))
    assert main(argv) == 0
    assert calls and not explained
    assert json.loads((out / "leaderboard.json").read_text())["groups"][0]["rows"] == first["rows"]


def _counting(fn, calls):
    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)
    return wrapped


def test_failing_method_is_reported_and_others_go_on(tmp_path, capsys, monkeypatch):
    real = bench.run_evaluation

    def flaky(model, x, methods, *a, **k):
        if methods == ["integrated_gradients"]:
            raise RuntimeError("boom in the middle")
        return real(model, x, methods, *a, **k)

    monkeypatch.setattr(bench, "run_evaluation", flaky)
    out = tmp_path / "bench"
    code = main(["leaderboard", "--suite", "groundtruth", "--methods", "integrated_gradients,gradient", "--images", "2",
                 "--out", str(out)])
    assert code == 1
    board = json.loads((out / "leaderboard.json").read_text())
    for g in board["groups"]:
        assert {r["method"] for r in g["rows"]} == {"gradient"}
        assert g["errors"] == {"integrated_gradients": "boom in the middle"}
    assert "integrated_gradients failed: boom in the middle" in (out / "leaderboard.md").read_text()


def test_knows_best_group_on_a_small_model_and_resume(tmp_path, monkeypatch):
    from conftest import ColourNet

    model = ColourNet().eval()
    kw = dict(full=False, seed=0, images=3, model=model, classes=(0, 1, 2, 3), model_name="ColourNet",
              generation={"image_size": 32, "patch_size": 12, "steps": 200, "cache": False}, method_params={})
    result = bench.knows_best_group(["gradient", "integrated_gradients"], tmp_path, **kw)
    assert not result.errors
    assert {(r.method, r.metric) for r in result.records} == {
        (m, a) for m in ("gradient", "integrated_gradients") for a in ("class_sensitivity", "null_player", "symmetry")}
    for r in result.records:
        assert len(r.scores) == 3 and all(0 <= s <= 1 for s in r.scores)
    cost = {c["method"]: c for c in bench.cost_rows(result.records)}
    # 3 images per axiom = 9 images; the 3 class-sensitivity images are explained for both classes
    assert cost["gradient"]["forward_per_image"] == pytest.approx(12 / 9)
    assert (tmp_path / result.examples).is_file()
    assert "ColourNet" in result.note and "independence" in result.note

    import saliencylab.envs.knows_best as kb

    # rows: one per suite image and method, keyed by the model, the method's settings and the image's target(s)
    rows = [json.loads(line) for line in (tmp_path / "knows-best" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 9 and len({r["key"] for r in rows}) == 18
    cs = [r for r in rows if r["metric"] == "class_sensitivity"]
    assert all(isinstance(r["target"], list) and len(r["target"]) == 2 for r in cs)
    assert all(isinstance(r["target"], int) for r in rows if r["metric"] != "class_sensitivity")
    assert {r["model"] for r in rows} == {model_fingerprint(model)}

    monkeypatch.setattr(kb, "evaluate_method", lambda *a, **k: pytest.fail("re-explained"))
    again = bench.knows_best_group(["gradient", "integrated_gradients"], tmp_path, **kw)
    assert [r.scores for r in again.records] == [r.scores for r in result.records]
    assert again.significance == result.significance
    # another setting of a method is another row: computed, appended, the old rows kept
    monkeypatch.undo()
    other = bench.knows_best_group(["integrated_gradients"], tmp_path,
                                   **{**kw, "method_params": {"integrated_gradients": {"steps": 3}}})
    assert not other.errors and len(other.records) == 3
    assert len((tmp_path / "knows-best" / "rows.jsonl").read_text().splitlines()) == 27


def test_run_group_with_predicted_classes_names_them_in_rows(tmp_path):
    from conftest import make_small_cnn

    model = make_small_cnn()
    x = torch.randn(3, 3, 12, 12)
    group = bench.Group("photos", model, x, None, ["sparseness", "deletion"], {},
                        metric_params={"deletion": {"steps": 4}}, display=lambda t: bench._unit_rgb(t))
    result = bench.run_group(group, ["gradient", "input_x_gradient"], tmp_path, seed=0, examples=2)
    assert not result.errors and len(result.records) == 4
    rows = [json.loads(line) for line in (tmp_path / "photos" / "rows.jsonl").read_text().splitlines()]
    predicted = model(x).argmax(1).tolist()
    assert len(rows) == 12
    assert all(r["target"] == predicted[int(r["image_id"].split(":")[-1])] for r in rows)
    assert {s["method"] for s in result.significance} <= {"gradient", "input_x_gradient"}
