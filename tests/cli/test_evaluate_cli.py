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
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3  # image x method x metric
    assert {r["image_id"] for r in rows} == {photo("chelsea"), photo("coffee")}
    # a rerun resumes: nothing is appended
    assert main(argv) == 1
    assert len((out / "rows.jsonl").read_text().splitlines()) == 12
    # another target into the same folder computes new rows and does not reuse the old ones
    assert main(["evaluate", photo("chelsea"), photo("coffee"), "--methods", "gradient", "--metrics", "sparseness",
                 "--target", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and [r["target"] for r in rows[-2:]] == [1, 1]


def test_evaluate_argument_errors(tmp_path, capsys):
    assert main(["evaluate", photo("chelsea"), "--metrics", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err
    assert main(["evaluate", photo("chelsea"), "--metric-param", "deletion.stepz=1", "--out", str(tmp_path)]) == 2
    assert "unknown parameter 'stepz'" in capsys.readouterr().err
    assert main(["evaluate", photo("chelsea"), "--method-param", "gradcam.layer", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    # a localization metric without --boxes fails before any model is loaded or image explained
    assert main(["evaluate", photo("chelsea"), "--metrics", "sparseness,pointing_game", "--out", str(tmp_path)]) == 2
    assert "pointing_game needs the object region: pass --boxes" in capsys.readouterr().err
    assert not (tmp_path / "rows.jsonl").exists()


def test_localization_without_region_fails_before_anything_runs(tmp_path, monkeypatch, capsys):
    import saliencylab.io as io

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(io, "load_model", no_model)
    for metrics in ("sparseness,pointing_game,iou", "iou"):
        assert main(["evaluate", photo("chelsea"), "--metrics", metrics, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")  # one line, naming the metrics and the options
        assert "iou" in err[0] and "--boxes" in err[0] and "--masks" in err[0] and "sparseness" not in err[0]
    assert main(["evaluate", photo("chelsea"), "--metrics", "pointing_game,iou", "--out", str(tmp_path)]) == 2
    assert "pointing_game, iou need the object region" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_localization_with_masks_or_boxes(tmp_path, capsys):
    import numpy as np

    masks = np.zeros((2, 224, 224), dtype=bool)
    masks[:, 40:200, 30:190] = True
    np.save(tmp_path / "masks.npy", masks)
    base = ["evaluate", photo("chelsea"), photo("coffee"), "--methods", "gradient", "--metrics", "pointing_game,iou"]
    assert main(base + ["--masks", str(tmp_path / "masks.npy"), "--out", str(tmp_path / "m")]) == 0
    by_masks = {r["metric"]: r for r in json.loads((tmp_path / "m" / "results.json").read_text())["rows"]}
    assert set(by_masks) == {"pointing_game", "iou"} and all(r["n"] == 2 for r in by_masks.values())
    # the same region as boxes, keyed by file stem (one as a list of two boxes whose union is the region)
    (tmp_path / "boxes.json").write_text(json.dumps({"chelsea": [30, 40, 190, 200],
                                                     "coffee": [[30, 40, 100, 200], [100, 40, 190, 200]]}))
    assert main(base + ["--boxes", str(tmp_path / "boxes.json"), "--out", str(tmp_path / "b")]) == 0
    by_boxes = {r["metric"]: r for r in json.loads((tmp_path / "b" / "results.json").read_text())["rows"]}
    assert {k: r["mean"] for k, r in by_boxes.items()} == {k: r["mean"] for k, r in by_masks.items()}
    capsys.readouterr()
    np.save(tmp_path / "wrong.npy", masks[:1])
    assert main(base + ["--masks", str(tmp_path / "wrong.npy"), "--out", str(tmp_path / "w")]) == 2
    assert "(2, 224, 224)" in capsys.readouterr().err
    (tmp_path / "short.json").write_text(json.dumps({"chelsea": [0, 0, 10, 10]}))
    assert main(base + ["--boxes", str(tmp_path / "short.json"), "--out", str(tmp_path / "w")]) == 2
    assert "no entry for image" in capsys.readouterr().err
