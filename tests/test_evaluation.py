"""Methods x metrics tables: bootstrap intervals, resumable runs, region-dependent metrics."""

import json
import math

import torch

from conftest import make_small_cnn
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


def test_run_evaluation_writes_as_it_goes_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = Counting(make_small_cnn())
    x = torch.randn(3, 3, 12, 12)
    kwargs = dict(metric_params={"deletion": {"steps": 4}}, out_dir=tmp_path)
    first = run_evaluation(model, x, ["gradient", "input_x_gradient"], ["deletion", "sparseness"], **kwargs)
    assert len(first) == 4 and model.calls > 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4
    calls = model.calls
    again = run_evaluation(model, x, ["gradient", "input_x_gradient"], ["deletion", "sparseness"], **kwargs)
    assert model.calls == calls  # everything reused, nothing recomputed
    assert [r.scores for r in again] == [r.scores for r in first]
    # a changed setting is a different record
    run_evaluation(model, x, ["gradient"], ["deletion"], metric_params={"deletion": {"steps": 5}}, out_dir=tmp_path)
    assert model.calls > calls
    # an interrupted write (a cut line) is ignored, not fatal
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"method": "grad')
    assert len(run_evaluation(model, x, ["gradient"], ["sparseness"], out_dir=tmp_path)) == 1


def test_localization_needs_regions_and_tables(tmp_path):
    model = make_small_cnn()
    x = torch.randn(2, 3, 12, 12)
    without = run_evaluation(model, x, ["gradient"], ["pointing_game", "sparseness"])
    assert [r.metric for r in without] == ["sparseness"]
    boxes = torch.tensor([[0, 0, 6, 6], [6, 6, 12, 12]])
    recs = run_evaluation(model, x, ["gradient"], ["pointing_game", "sparseness"], boxes=boxes)
    assert [r.metric for r in recs] == ["pointing_game", "sparseness"]
    paths = write_tables(recs, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert {row["metric"] for row in data["rows"]} == {"pointing_game", "sparseness"}
    assert "pointing_game ↑" in markdown_table(recs)
    assert paths["csv"].read_text().startswith("method,metric,mean,ci_low,ci_high")
