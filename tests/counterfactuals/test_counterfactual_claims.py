"""runs/counterfactual_claims: the verdict rule, and the whole study in quick mode (needs helper cout's
metrics and baseline; skipped where they are not installed)."""

import json

import pytest
import torch

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
    from saliencylab.counterfactuals import c3lt
    from saliencylab.counterfactuals.digits import digits_domain
    from saliencylab.report.counterfactual import QUICK_DOMAIN

    seen = []  # what C3LT is trained with and asked to explain
    fit, explain = c3lt.C3LT.fit, c3lt.C3LT.explain
    monkeypatch.setattr(c3lt.C3LT, "fit", lambda self, *a, **kw: seen.append(("fit", dict(self.config), a)) or fit(self, *a, **kw))
    monkeypatch.setattr(c3lt.C3LT, "explain", lambda self, x, **kw: seen.append(("explain", x, kw)) or explain(self, x, **kw))
    r = claims.run_claims(tmp_path / "out", quick=True, progress=False)
    # the authors' defaults (nothing tuned), trained on the training split, measured on held-out images
    domain = digits_domain(0, **QUICK_DOMAIN)
    (_, config, (xs, xt)), (_, x4, kw4), (_, x9, kw9) = seen
    assert {k: config[k] for k in c3lt.DEFAULTS if k in config} == {k: v for k, v in c3lt.DEFAULTS.items()
                                                                    if k in config and k != "epochs"}
    assert torch.equal(xs, domain.images(4, "train")) and torch.equal(xt, domain.images(9, "train"))
    assert torch.equal(x4, domain.images(4, "test")[:claims.QUICK_IMAGES]) and kw4.get("direction") == "forward"
    assert torch.equal(x9, domain.images(9, "test")[:claims.QUICK_IMAGES]) and kw9.get("direction") == "backward"
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
