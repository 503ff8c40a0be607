"""Methods x metrics tables from per-image rows: bootstrap intervals, complete keys (model, target, settings),
resume, failing early on missing data."""

import json
import math

import pytest
import torch

from conftest import make_small_cnn
from saliencylab.core.errors import ConfigError
from saliencylab.evaluation import bootstrap_interval, markdown_table, run_evaluation, write_tables


def test_bootstrap_interval_properties():
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    mean, lo, hi = bootstrap_interval([0.0, 1.0] * 50)
    assert mean == 0.5 and lo < 0.5 < hi
    # the percentile interval of a mean of 100 fair coin flips is about +-1.96 * 0.05
    assert abs((hi - lo) - 2 * 1.96 * 0.05) < 0.03
    assert math.isnan(bootstrap_interval([float("nan")])[0])
    assert bootstrap_interval([1.0, float("nan"), 3.0])[0] == 2.0


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _lines(path):
    return [json.loads(line) for line in (path / "rows.jsonl").read_text().splitlines()]


METHODS, METRICS = ["gradient", "input_x_gradient"], ["deletion", "sparseness"]
KW = dict(metric_params={"deletion": {"steps": 4}})


def test_rows_are_written_as_computed_and_a_rerun_computes_nothing(tmp_path):
    torch.manual_seed(0)
    model = Counting(make_small_cnn())
    x = torch.randn(3, 3, 12, 12)
    seen = []
    first = run_evaluation(model, x, METHODS, METRICS, out_dir=tmp_path, on_record=seen.append, **KW)
    assert len(first) == 4 and [len(r.scores) for r in first] == [3] * 4 and len(seen) == 4
    rows = _lines(tmp_path)
    assert len(rows) == 2 * 2 * 3  # one row per image x method x metric
    predicted = make_small_cnn()(x).argmax(1).tolist()
    for row in rows:
        assert set(row) >= {"image_id", "model", "method", "method_params", "metric", "metric_params", "target",
                            "score", "cost", "key"}
        assert row["target"] == predicted[int(row["image_id"])]  # the resolved class, not "None"
    assert len({r["key"] for r in rows}) == 12
    assert {r["metric_params"].get("steps") for r in rows if r["metric"] == "deletion"} == {4}
    by = {(r["method"], r["metric"], r["image_id"]): r["score"] for r in rows}
    assert first[0].scores == [by[("gradient", "deletion", str(i))] for i in range(3)]

    calls, seen = model.calls, []
    again = run_evaluation(model, x, METHODS, METRICS, out_dir=tmp_path, on_record=seen.append, **KW)
    assert model.calls == calls + 1  # only the forward pass that resolves the predicted classes
    assert [r.scores for r in again] == [r.scores for r in first] and not seen
    assert len(_lines(tmp_path)) == 12  # nothing appended
    # a changed setting is a different row
    run_evaluation(model, x, ["gradient"], ["deletion"], metric_params={"deletion": {"steps": 5}}, out_dir=tmp_path)
    assert len(_lines(tmp_path)) == 15


def test_another_model_or_target_in_the_same_folder_is_not_reused(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    target = [1, 2]
    a, b = Counting(make_small_cnn(0)), Counting(make_small_cnn(1))  # same architecture, other weights
    first = run_evaluation(a, x, ["gradient"], ["sparseness"], target=target, out_dir=tmp_path)
    assert len(_lines(tmp_path)) == 2
    calls = a.calls
    run_evaluation(a, x, ["gradient"], ["sparseness"], target=target, out_dir=tmp_path)
    assert a.calls == calls  # same everything, explicit target: the model is not called at all
    other = run_evaluation(b, x, ["gradient"], ["sparseness"], target=target, out_dir=tmp_path)
    assert b.calls > 0 and len(_lines(tmp_path)) == 4
    assert other[0].scores != first[0].scores
    assert len({r["model"] for r in _lines(tmp_path)}) == 2
    calls = a.calls
    run_evaluation(a, x, ["gradient"], ["sparseness"], target=[3, 3], out_dir=tmp_path)
    assert a.calls > calls and len(_lines(tmp_path)) == 6
    assert [r["target"] for r in _lines(tmp_path)[-2:]] == [3, 3]
    # the same pixels under another id, or other pixels under the same id, are other rows too
    run_evaluation(a, x.flip(0), ["gradient"], ["sparseness"], target=target, out_dir=tmp_path)
    assert len(_lines(tmp_path)) == 8


def test_partial_rows_resume_per_image_and_cut_lines_are_dropped(tmp_path):
    torch.manual_seed(0)
    model = make_small_cnn()
    x = torch.randn(3, 3, 12, 12)
    first = run_evaluation(model, x, ["gradient"], ["sparseness"], target=0, out_dir=tmp_path)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    # an interrupted run: the last row written halfway
    (tmp_path / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    explained = []
    again = run_evaluation(model, x, ["gradient"], ["sparseness"], target=0, out_dir=tmp_path,
                           on_explanation=lambda m, e: explained.append(len(e)))
    assert explained == [1]  # only the image whose row was cut is explained again
    assert again[0].scores == pytest.approx(first[0].scores, rel=1e-5)
    rows = _lines(tmp_path)
    assert len(rows) == 3 and len({r["key"] for r in rows}) == 3


def test_missing_boxes_or_truth_fail_before_running(tmp_path):
    model = Counting(make_small_cnn())
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ConfigError, match="pointing_game.*boxes"):
        run_evaluation(model, x, ["gradient"], ["sparseness", "pointing_game"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="gt_precision.*truth"):
        run_evaluation(model, x, ["gradient"], ["gt_precision"], out_dir=tmp_path)
    assert model.calls == 0 and not (tmp_path / "rows.jsonl").exists()


def test_localization_with_boxes_and_tables(tmp_path):
    model = make_small_cnn()
    x = torch.randn(2, 3, 12, 12)
    boxes = torch.tensor([[0, 0, 6, 6], [6, 6, 12, 12]])
    recs = run_evaluation(model, x, ["gradient"], ["pointing_game", "sparseness", "deletion"], boxes=boxes,
                          metric_params={"deletion": {"steps": 4}})
    assert [r.metric for r in recs] == ["pointing_game", "sparseness", "deletion"]
    deletion = recs[2]
    assert len(deletion.curves["scores"]) == 2 and len(deletion.curves["fraction"]) == 5
    paths = write_tables(recs, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert {row["metric"] for row in data["rows"]} == {"pointing_game", "sparseness", "deletion"}
    assert "pointing_game ↑" in markdown_table(recs)
    assert paths["csv"].read_text().startswith("method,metric,mean,ci_low,ci_high")
