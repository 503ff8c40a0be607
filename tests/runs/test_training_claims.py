"""The training-claims study: the quick variant runs, writes claims.md / claims.json, and resumes."""

import json
import math

import pytest

from saliencylab.core.errors import ConfigError
from saliencylab.runs import training_claims as tc

pytestmark = pytest.mark.usefixtures("one_thread")


def test_t_interval_by_hand():
    mean, lo, hi = tc.t_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)               # sd 1, df 2
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert math.isnan(tc.t_interval([0.5])[1]) and math.isnan(tc.t_interval([])[0])


def _rows(values: dict, seeds):
    """Minimal rows: values[run] = per-seed (test wga, test epg, test iou, val accuracy, agreement)."""
    out = {}
    for run, per_seed in values.items():
        out[run] = {s: {"test": {"worst_group_accuracy": v[0], "epg": v[1], "iou": v[2]}, "val": {"accuracy": v[3]},
                        "agreement": v[4]} for s, v in zip(seeds, per_seed)}
    return out


def test_verdict_rules():
    seeds = [0, 1, 2]
    base = [(0.1, 0.3, 0.2, 1.0, 0.6)] * 3
    better = [(0.8, 0.5, 0.3, 0.99, 0.9), (0.85, 0.55, 0.32, 0.98, 0.8), (0.9, 0.45, 0.31, 1.0, 0.85)]
    rows = _rows({"unguided": base, "energy": better, "l1": base, "energy_limited": base, "teacher": better,
                  "kd": base, "e2kd": better}, seeds)
    claims = {c["id"]: c for c in tc.evaluate_claims(rows, seeds, dict(tc.FULL))}
    assert claims[1]["verdict"] == "reproduced"
    assert [p["verdict"] for p in claims[2]["parts"]] == ["reproduced", "not reproduced"]   # l1's IoU (0.2) is below energy's
    assert claims[2]["verdict"] == "not reproduced"
    assert claims[3]["verdict"] == "not reproduced"            # identical runs: no effect, interval [0, 0]
    assert claims[4]["verdict"] == "reproduced"
    # a teacher that is not unbiased makes claim 4 inconclusive, whatever the students do
    rows["teacher"] = _rows({"t": base}, seeds)["t"]
    assert tc.evaluate_claims(rows, seeds, dict(tc.FULL))[3]["verdict"] == "inconclusive"
    # a large accuracy cost is not "small"
    rows["energy"] = _rows({"e": [(0.6, 0.5, 0.1, 0.7, 0.9), (0.5, 0.55, 0.1, 0.72, 0.9), (0.7, 0.5, 0.1, 0.71, 0.9)]},
                           seeds)["e"]
    assert tc.evaluate_claims(rows, seeds, dict(tc.FULL))[0]["verdict"] == "not reproduced"


def test_quick_study_runs_writes_and_resumes(tmp_path):
    out = tmp_path / "study"
    result = tc.run_claims(out, quick=True)
    assert len(result["computed"]) == len(tc.RUNS) * 3
    saved = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in saved["claims"]] == [1, 2, 3, 4]
    assert all(c["verdict"] in ("reproduced", "not reproduced", "inconclusive") for c in saved["claims"])
    assert saved["seeds"] == [0, 1, 2] and set(saved["runs"]) == set(tc.RUNS)
    md = (out / "claims.md").read_text()
    assert "Claim 4" in md and "95% t interval" in md and "--quick" in md
    # resume: nothing is recomputed, the same numbers come back
    again = tc.run_claims(out, quick=True)
    assert again["computed"] == []
    assert again["claims"] == json.loads(json.dumps(saved["claims"]))
    # one run removed: only it is recomputed (its weights-dependent followers are kept)
    (out / "runs" / "kd_seed1.json").unlink()
    assert tc.run_claims(out, quick=True)["computed"] == ["kd_seed1"]
    # a folder of other settings is refused before any training
    with pytest.raises(ConfigError, match="other settings"):
        tc.run_claims(out, quick=False)


def test_bad_seeds():
    with pytest.raises(ConfigError, match="at least two distinct seeds"):
        tc.run_claims("unused", seeds=(0, 0))


def test_cnn_settings_unchanged():
    # the B-cos arm must not move the CNN arm's settings: a finished CNN folder (digest a83d8229dc69) is reused
    cfg = dict(tc.FULL)
    cfg["kd_weights"], cfg["e2kd_weights"] = list(cfg["kd_weights"]), list(cfg["e2kd_weights"])
    assert tc._digest(cfg) == "a83d8229dc69" and "backbone" not in cfg


def test_quick_bcos_arm(tmp_path):
    from saliencylab.models.bcos import BcosCNN

    result = tc.run_claims(tmp_path, seeds=(0, 1), quick=True, backbone="bcos", log=lambda line: None)
    assert result["backbone"] == "bcos" and len(result["computed"]) == len(tc.RUNS) * 2
    folder = tmp_path / "bcos"
    saved = json.loads((folder / "claims.json").read_text())
    assert [c["id"] for c in saved["claims"]] == [1, 2, 3, 4] and saved["config"]["guidance_method"] == "bcos"
    assert saved["config"]["distill_method"] == "bcos" and saved["config"]["guidance_weight"] == 1e-3
    assert "--backbone bcos" in (folder / "claims.md").read_text() and "B-cos" in (folder / "claims.md").read_text()
    assert not (tmp_path / "claims.json").exists()        # the CNN arm's files are elsewhere
    # the runs trained B-cos networks: the saved weights load into a BcosCNN (and not into the small CNN)
    net = BcosCNN(2, width=tc.BCOS_QUICK["width"])
    net.load_state_dict(__import__("torch").load(folder / "runs" / "energy_seed0.pt", weights_only=True))
    row = json.loads((folder / "runs" / "energy_seed0.json").read_text())
    assert row["guided_images_last_epoch"] > 0 and 0 <= row["test"]["epg"] <= 1
    # resumable, per backbone: nothing recomputed; the CNN arm's quick study in the same folder is separate
    assert tc.run_claims(tmp_path, seeds=(0, 1), quick=True, backbone="bcos", log=lambda line: None)["computed"] == []
    with pytest.raises(ConfigError, match="backbone"):
        tc.run_claims(tmp_path, seeds=(0, 1), backbone="resnet")
    # the margin split over digit / box texture / outside adds up to the logit margin (the nets are exact)
    contrib = tc.minority_contributions(tmp_path, seeds=(0, 1), quick=True)
    for run, per_seed in contrib["per_seed"].items():
        for row in per_seed.values():
            parts = row["margin_digit"] + row["margin_box_texture"] + row["margin_outside"]
            assert parts == pytest.approx(row["margin"], rel=1e-3, abs=1e-4), run
    assert (folder / "minority_contributions.md").exists()
