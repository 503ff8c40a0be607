"""`saliencylab evaluate --data DIR [--shard i/N]` and `saliencylab report OUT` end to end on a tiny folder."""

import argparse
import csv
import json

import pytest
from torch import nn

from saliencylab.cli import COMMANDS, main
from saliencylab.cli import report as report_cli
from saliencylab.cli._common import Fail
from zoo import make_small_cnn, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")



def pooled_small_cnn():
    """The zoo's SmallCNN behind a 7x7 average pool: the CLI's 224 px inputs cost what 32 px ones do."""
    return nn.Sequential(nn.AvgPool2d(7), make_small_cnn())


MODEL = ["--model", f"{__name__}:pooled_small_cnn"]  # this module, importable while the tests run


def report(argv):
    """`saliencylab report ...`, also before the command is registered in saliencylab.cli."""
    if "report" in COMMANDS:
        return main(["report", *argv])
    parser = argparse.ArgumentParser()
    report_cli.add_parser(parser.add_subparsers(dest="command"))
    try:
        return report_cli.run(parser.parse_args(["report", *argv]))
    except Fail as exc:
        print(f"error: {exc}")
        return 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"), 12, broken="broken.png", prefix="im")


def evaluate(data, out, *extra):
    return main(["evaluate", "--data", str(data), *MODEL, "--methods", "gradient,input_x_gradient",
                 "--metrics", "sparseness,deletion",
                 "--metric-param", "deletion.steps=4", "--target", "label", "--chunk-size", "4", "--out", str(out),
                 *extra])


def test_sharded_runs_merge_into_the_unsharded_leaderboard(data, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert evaluate(data, whole) == 1  # the broken file is skipped, the rest evaluated
    err = capsys.readouterr().err
    assert "skipped 1 file" in err and "skipped.csv" in err
    with (whole / "skipped.csv").open() as f:
        assert [r[0] for r in csv.reader(f)] == ["image_id", "1/broken.png"]
    reference = json.loads((whole / "leaderboard.json").read_text())

    out = tmp_path / "sharded"
    codes = [evaluate(data, out, "--shard", f"{i}/2") for i in range(2)]
    assert sorted(codes) == [0, 1]  # the broken file belongs to one shard
    assert "saliencylab report" in capsys.readouterr().out
    assert not (out / "leaderboard.json").exists()
    assert report([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "saliencylab report" in printed and "index.html" in printed
    merged = json.loads((out / "leaderboard.json").read_text())
    assert (out / "index.html").stat().st_size > 0 and (out / "leaderboard.md").exists()
    (g,), (ref,) = merged["groups"], reference["groups"]
    # equal up to float rounding: batched kernels may round differently for another mix of images in a chunk
    assert [(r["method"], r["metric"], r["n"]) for r in g["rows"]] == [(r["method"], r["metric"], r["n"])
                                                                       for r in ref["rows"]]
    for a, b in zip(g["rows"], ref["rows"]):
        assert [a[k] for k in ("mean", "ci_low", "ci_high")] == pytest.approx([b[k] for k in ("mean", "ci_low",
                                                                                              "ci_high")], rel=1e-6)
    assert g["image_ids"] == ref["image_ids"]
    for k in ref["scores"]:
        assert g["scores"][k] == pytest.approx(ref["scores"][k], rel=1e-6, abs=1e-9)
    assert {r["n"] for r in g["rows"]} == {12} and len(g["rows"]) == 4
    assert [(s["metric"], s["method"], s["different"]) for s in g["significance"]] == [
        (s["metric"], s["method"], s["different"]) for s in ref["significance"]] and len(g["significance"]) == 2
    # a rerun of a shard computes nothing
    assert evaluate(data, out, "--shard", "1/2") in (0, 1)
    assert "0 new rows" in capsys.readouterr().out


def test_folder_argument_errors(data, tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path)]) == 2
    assert "give IMAGE files, or --data DIR" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(data), "--shard", "3/3", *MODEL, "--out", str(tmp_path)]) == 2
    assert "index run from 0 to N-1" in capsys.readouterr().err
    assert main(["evaluate", str(data / "0" / "im00.png"), "--labels", "x.csv", "--out", str(tmp_path)]) == 2
    assert "--labels and --shard go with --data" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path / "none"), *MODEL, "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(data), *MODEL, "--metrics", "pointing_game", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pointing_game" in err and "boxes" in err
    assert report([str(tmp_path / "empty")]) == 2
    assert main(["evaluate", "--data", str(data), *MODEL, "--actors", "4", "--out", str(tmp_path)]) == 2
    assert "go with --engine ray" in capsys.readouterr().err
    assert not list(tmp_path.glob("rows*.jsonl"))
