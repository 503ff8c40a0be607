"""`saliencylab evaluate` end to end on bundled photos: table, curves, resume, errors."""

import json

from saliencylab import images
from saliencylab.cli import main


def photo(name):
    return str(images.samples()[name].path)


def test_evaluate_writes_table_curves_and_resumes(tmp_path, capsys):
    out = tmp_path / "ev"
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    argv = ["evaluate", photo("chelsea"), photo("coffee"), str(bad), "--methods", "gradient,gradcam",
            "--metrics", "deletion,insertion,sparseness", "--metric-param", "deletion.steps=4",
            "--metric-param", "insertion.steps=4", "--out", str(out)]
    assert main(argv) == 1  # the broken file fails alone
    err = capsys.readouterr().err
    assert "broken.jpg" in err and err.count("error:") == 1
    data = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["metric"]): r for r in data["rows"]}
    assert set(rows) == {(m, k) for m in ("gradient", "gradcam") for k in ("deletion", "insertion", "sparseness")}
    for r in rows.values():
        assert r["n"] == 2 and r["ci_low"] <= r["mean"] <= r["ci_high"]
    assert rows[("gradient", "deletion")]["higher_is_better"] is False
    assert (out / "curves_deletion.png").stat().st_size > 0 and (out / "results.csv").exists()
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # a rerun resumes: nothing is appended
    assert main(argv) == 1
    assert len((out / "records.jsonl").read_text().splitlines()) == 6


def test_evaluate_argument_errors(tmp_path, capsys):
    assert main(["evaluate", photo("chelsea"), "--metrics", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err
    assert main(["evaluate", photo("chelsea"), "--metric-param", "deletion.stepz=1", "--out", str(tmp_path)]) == 2
    assert "unknown parameter 'stepz'" in capsys.readouterr().err
    assert main(["evaluate", photo("chelsea"), "--method-param", "gradcam.layer", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
