"""`saliencylab guide` / `saliencylab distill` (cli/guide.py, cli/distill.py), called through their own
`add_parser` / `run` with a parser built here: tiny runs write a metrics row per epoch and the report,
a rerun resumes without duplicating rows, a guided model serves as the distillation teacher, a folder
with a boxes file trains, and bad input is one `error:` line with exit code 2."""

import argparse
import csv

import numpy as np
import pytest
from PIL import Image

from saliencylab.cli import distill, guide
from saliencylab.cli._common import Fail, error

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--size", "16", "--n", "24", "--n-eval", "8", "--width", "4", "--batch-size", "8", "--examples", "2"]


def cli(argv):
    """What `saliencylab.cli.main` does for these two commands."""
    parser = argparse.ArgumentParser(prog="saliencylab")
    sub = parser.add_subparsers(dest="command")
    guide.add_parser(sub)
    distill.add_parser(sub)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return {"guide": guide, "distill": distill}[args.command].run(args)
    except Fail as exc:
        error(exc)
        return 2


def epochs_in(path):
    with open(path / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_guide_writes_rows_and_report_and_a_rerun_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["guide", "--env", "shortcut", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "EPG" in printed and f"report: {out / 'report.html'}" in printed
    assert epochs_in(out) == [0, 1]
    html = (out / "report.html").read_text()
    assert all(name in html for name in ("accuracy", "worst-group accuracy", "EPG", "IoU"))
    assert "saliencylab guide --env shortcut" in html  # the command that made it
    # the same command with more epochs continues the run: one new row, none repeated
    assert cli(["guide", "--env", "shortcut", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out
    assert epochs_in(out) == [0, 1, 2]
    assert cli(["guide", *TINY, "--epochs", "1", "--lr", "0.01", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli(["guide", *TINY, "--epochs", "1", "--lr", "0.01", "--no-resume", "--out", str(out)]) == 0
    assert epochs_in(out) == [0, 1]


def test_distill_from_a_guided_teacher_file(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert cli(["guide", *TINY, "--epochs", "1", "--method", "gradcam", "--out", str(teacher)]) == 0
    out = tmp_path / "student"
    assert cli(["distill", "--teacher", str(teacher / "model.pt"), *TINY, "--epochs", "1", "--weights", "0.5,1,2",
                "--temperature", "2", "--out", str(out)]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    gt, kd, exp = (float(rows[1][f"distill_{k}"]) for k in ("gt", "kd", "explanation"))
    assert float(rows[1]["loss"]) == pytest.approx(0.5 * gt + kd + 2 * exp, rel=1e-5)
    assert (out / "report.html").is_file()


def test_guide_on_a_folder_with_a_boxes_file(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = ["file,label,x0,y0,x1,y1"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{'ab'[i % 2]},2,2,12,12")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert cli(["guide", "--data", str(root), "--boxes", str(root / "labels.csv"), "--size", "16", "--width", "4",
                "--epochs", "1", "--batch-size", "4", "--method", "integrated_gradients", "--method-param", "steps=2",
                "--loss", "l1", "--out", str(out)]) == 0
    assert epochs_in(out) == [0, 1]


@pytest.mark.parametrize("argv, text", [
    (["guide", "--env", "shortcut", "--data", "x"], "not both"),
    (["guide", "--loss", "energi"], "unknown guidance loss"),
    (["guide", "--method", "gradcam", "--layer", "nolayer", *TINY, "--epochs", "1"], "nolayer"),
    (["guide", "--method", "integrated_gradients", "--method-param", "stepz=4"], "unknown parameter 'stepz'"),
    (["guide", "--model", "no_such_module:net"], "cannot import module 'no_such_module'"),
    (["guide", "--model", "saliencylab.training.nets"], "module:factory"),
    (["guide", "--data", "/no/such/folder"], "does not exist"),
    (["guide", "--n", "0"], "--n must be at least 1"),
    (["distill", "--teacher", "nothing.pt"], "does not exist"),
    (["distill", "--teacher", "nothing"], "model file or module:factory"),
    (["distill", "--teacher", "saliencylab.training.nets:small_cnn", "--weights", "1,2"], "three numbers"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, text):
    assert cli([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and text in err, err


def test_boxes_outside_the_image_are_refused(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "a.png")
    (root / "boxes.csv").write_text("file,label,x0,y0,x1,y1\na.png,0,2,2,11,8\n")
    assert cli(["guide", "--data", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "outside the 10x10 image" in err and err.count("\n") == 1
    # resized with --size: the error still quotes the file's own coordinates
    assert cli(["guide", "--data", str(root), "--size", "16", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "[2.0, 2.0, 11.0, 8.0]" in err and "a.png" in err and "10x10" in err
