"""The XNN claim runner (saliencylab.runs.xnn_claims): the verdict logic on synthetic results, and a quick
end-to-end run (tiny data; a test of the plumbing, not a result)."""

import json
import math

import pytest

from saliencylab.runs import xnn_claims as C

pytestmark = pytest.mark.usefixtures("one_thread")


def result(corr, agree, positive, seed=0):
    n = len(agree)
    return {"seed": seed, "cnn_accuracy": 0.9, "correlations": corr, "agreement": agree, "active": [5.0] * n,
            "positive": positive, "accepted": [True] * len(corr), "positive_mean_contributions": [3] * len(corr),
            "n_test": n, "seconds": 0.0}


def test_verdict_follows_the_thresholds_fixed_in_advance():
    good = [result([0.97] * 10, [1.0] * 50, [3.0] * 50, s) for s in range(3)]
    assert C.evaluate(good)["verdict"] == "reproduced"
    weak_agreement = [result([0.97] * 10, [1.0] * 40 + [0.0] * 10, [3.0] * 50, s) for s in range(3)]
    assert C.evaluate(weak_agreement)["verdict"] == "not reproduced"
    too_few_concepts = [result([0.97] * 10, [1.0] * 50, [1.0] * 50, s) for s in range(3)]
    assert C.evaluate(too_few_concepts)["verdict"] == "not reproduced"
    # a dead XNN (constant prediction, NaN correlation) counts as 0, not as missing
    dead = [result([0.97] * 9 + [math.nan], [1.0] * 50, [3.0] * 50, s) for s in range(3)]
    s = C.evaluate(dead)
    assert s["correlation"][0] == pytest.approx(0.97 * 9 / 10)
    assert s["verdict"] == "not reproduced"


def test_quick_run_writes_the_report(tmp_path):
    out = C.run_claims(tmp_path, seeds=[0], quick=True, log=lambda *a: None)
    r = out["results"][0]
    assert len(r["correlations"]) == 10 and len(r["agreement"]) == r["n_test"] == 100
    assert all(v in (0.0, 1.0) for v in r["agreement"])
    assert all(0 <= v <= C.CONCEPTS for v in r["active"] + r["positive"])
    assert out["summary"]["verdict"] in ("reproduced", "not reproduced")
    md = (tmp_path / "claims.md").read_text()
    assert "logit correlation" in md and out["summary"]["verdict"] in md
    assert json.loads((tmp_path / "claims.json").read_text(), parse_constant=float)["summary"]["concepts"] == 5
