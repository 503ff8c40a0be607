"""runs/counterfactual_claims: the verdict rule, and the whole study in quick mode (needs helper cout's
metrics and baseline; skipped where they are not installed)."""

import json

import pytest

from saliencylab.runs import counterfactual_claims as claims

pytestmark = pytest.mark.usefixtures("one_thread")


def test_verdict_rule():
    assert claims._verdict(0.02, 0.3) == "reproduced"
    assert claims._verdict(-0.2, 0.005) == "not reproduced"
    assert claims._verdict(-0.2, 0.3) == "inconclusive"


def test_quick_study_writes_its_tables(tmp_path, monkeypatch):
    pytest.importorskip("saliencylab.metrics.counterfactual")
    pytest.importorskip("saliencylab.counterfactuals.latent_gradient")
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path / "cache"))
    r = claims.run_claims(tmp_path / "out", quick=True, progress=False)
    assert r["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert set(r["directions"]) == {"4->9", "9->4"}
    for d in r["directions"].values():
        for m in ("validity", "cout"):
            mean, lo, hi = d[m]["difference"]
            assert lo <= mean <= hi
            assert d[m]["verdict"] == claims._verdict(lo, hi)
    saved = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert saved["verdict"] == r["verdict"]
    assert "| 4->9 |" in (tmp_path / "out" / "claims.md").read_text()
