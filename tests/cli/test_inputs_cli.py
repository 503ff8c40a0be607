"""What a new user feeds the command line: folders, transparent and huge images, a model module in the
working directory, IBA from the command line with --feature-data (issue 19, items 4-6)."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from saliencylab import images, io
from saliencylab.cli import main

CHELSEA = images.samples()["chelsea"]

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
""")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """`mynets.py` in the working directory, which is not on sys.path (as for the `saliencylab` script)."""
    (tmp_path / "mynets.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd, str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    return ["--model", "mynets:factory", "--size", "32"]


def _photo(path, size=(80, 60), mode="RGB"):
    im = CHELSEA.image.resize(size).convert(mode)
    im.save(path)
    return str(path)


# -- item 4: --model module:factory -------------------------------------------------------------------
def test_model_module_in_the_working_directory(user_model, tmp_path, capsys):
    path_before = list(sys.path)
    assert main(["explain", CHELSEA.path.as_posix(), "-m", "gradient", *user_model, "-o", "out"]) == 0, \
        capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "chelsea.gradient.json").read_text())["model"] == "mynets:factory"
    assert sys.path == path_before  # the working directory was on sys.path only for the import


def test_model_module_not_found_says_how_to_fix_it(user_model, capsys):
    assert main(["explain", CHELSEA.path.as_posix(), "-m", "gradient", "--model", "othernets:factory",
                 "-o", "out"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "othernets" in errors[0] and "PYTHONPATH" in errors[0]
    assert main(["explain", CHELSEA.path.as_posix(), "-m", "gradient", "--model", "mynets.py:factory",
                 "-o", "out"]) == 2
    assert "'mynets:factory'" in _errors(capsys.readouterr().err)[0]  # a module name, not a file name


# -- item 6: folders, transparency, huge images -------------------------------------------------------
def test_explain_a_folder_recursively(tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "b").mkdir(parents=True)
    first = _photo(folder / "b" / "x.png")
    second = _photo(folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image, and not an image extension")
    (tmp_path / "empty").mkdir()
    assert io.image_files([folder])[0] == [second, first]  # sorted, recursive, image extensions only
    out = tmp_path / "out"
    assert main(["explain", str(folder), "-m", "gradient", "--preset", "quick", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [second, first]
    assert {p.name for p in out.glob("*.json")} == {"a.gradient.json", "x.gradient.json"}
    # a folder without images fails alone (exit 1); nothing readable at all is a usage error (exit 2)
    assert main(["explain", str(tmp_path / "empty"), first, "-m", "gradient", "-o", str(out)]) == 1
    assert "contains no image files" in _errors(capsys.readouterr().err)[0]
    assert main(["explain", str(tmp_path / "empty"), "-m", "gradient", "-o", str(out)]) == 2


def test_transparent_pixels_are_composited_on_the_stated_background(tmp_path, capsys):
    rgba = np.array(CHELSEA.image.resize((64, 64)).convert("RGBA"))
    rgba[:, :32, 3] = 0  # left half fully transparent, its colour channels keep the photo
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    pal.info["transparency"] = pal.getpixel((0, 0))
    pal.save(tmp_path / "pal.png", transparency=pal.getpixel((0, 0)))
    white = np.asarray(io.read_image(tmp_path / "clear.png"))
    assert (white[:, :32] == 255).all() and (white[:, 32:] == rgba[:, 32:, :3]).all()
    black = np.asarray(io.read_image(tmp_path / "clear.png", background="0,0,0"))
    assert (black[:, :32] == 0).all()
    notes = io.ImageNotes()
    red = np.asarray(io.read_image(tmp_path / "pal.png", background="#ff0000", notes=notes))
    assert red[0, 0].tolist() == [255, 0, 0]
    assert notes.composited

    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "clear.png"), str(tmp_path / "pal.png"), "-m", "gradient", "-o", str(out)]
    assert main(args) == 0
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and "2 images have transparent pixels" in warned[0] and "white background" in warned[0]
    white_map = np.load(out / "clear.gradient.npy")
    assert main(args + ["--background", "black"]) == 0
    assert "black background" in capsys.readouterr().err
    assert not np.allclose(np.load(out / "clear.gradient.npy"), white_map)  # the model saw another image
    assert main(args + ["--background", "nocolour"]) == 2
    assert "--background" in _errors(capsys.readouterr().err)[0]


def test_a_decompression_bomb_is_downscaled_not_fatal(tmp_path, monkeypatch, capsys):
    # Pillow refuses images of more than twice MAX_IMAGE_PIXELS; a small limit makes a small file one
    big = _photo(tmp_path / "big.png", size=(400, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # the 224 px crop stays under twice the limit
    out = tmp_path / "out"
    assert main(["explain", big, "-m", "gradient", "-o", str(out)]) == 0, capsys.readouterr().err
    assert (out / "big.gradient.npy").is_file()
    assert main(["explain", big, "-m", "gradient", "--max-pixels", "30000", "-o", str(out)]) == 0
    # (Pillow itself warns about the 224 px crop at this tiny limit: only our line is counted)
    warned = [w for w in _warnings(capsys.readouterr().err) if "--max-pixels" in w]
    assert len(warned) == 1 and "120,000 pixels" in warned[0] and "downscaled to 200x150" in warned[0]
    assert Image.MAX_IMAGE_PIXELS == 30_000  # Pillow's setting is left as it was


# -- item 5: IBA from the command line -----------------------------------------------------------------
def test_iba_on_one_image_with_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", CHELSEA.path.as_posix(), "-m", "iba", "--preset", "quick", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert _errors(err) == [] and _warnings(err) == []  # no "rough stand-in", no "needs at least two images"
    assert "sample_crops(n=64, seed=0)" in err  # the note says what the statistics come from
    record = json.loads((out / "chelsea.iba.json").read_text())
    assert record["params"]["data"] == "sample_crops(n=64, seed=0)" and record["layer"]


def test_iba_data_folder_skips_a_corrupt_file(user_model, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    for i in range(3):
        _photo(data / "more" / f"p{i}.jpg", size=(40 + 8 * i, 40))
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = ["explain", CHELSEA.path.as_posix(), "-m", "iba", "-p", "steps=2", "-p", "samples=2", "-p", "cache=False",
            *user_model]
    # a user model has no default data: say so before anything runs
    assert main(args + ["-o", "none"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "--feature-data DIR" in errors[0]
    assert not (tmp_path / "none").exists()
    assert main(args + ["--feature-data", str(data), "-o", "out"]) == 0
    err = capsys.readouterr().err
    assert _errors(err) == []
    assert [w for w in _warnings(err) if "corrupt.jpg" in w and "skipped" in w]
    record = json.loads((tmp_path / "out" / "chelsea.iba.json").read_text())
    assert "data" in record["params"] and record["layer"]
    assert main(args + ["--feature-data", str(data), "-p", "data='x'", "-o", "out"]) == 2  # two sources of data
    assert main(args + ["--feature-data", str(tmp_path / "nowhere"), "-o", "out"]) == 2
    assert "does not exist" in _errors(capsys.readouterr().err)[-1]


@pytest.mark.parametrize("args, message", [
    (["--feature-data", "."], "--feature-data is feature data for the methods that take data="),
    (["--max-pixels", "10"], "--max-pixels"),
    (["--background", "1,2"], "--background"),
])
def test_input_option_errors_exit_2(tmp_path, capsys, args, message):
    for command in (["explain", "-m", "gradient"], ["evaluate", "--methods", "gradient", "--metrics", "sparseness"]):
        assert main([*command, CHELSEA.path.as_posix(), *args, "-o" if command[0] == "explain" else "--out",
                     str(tmp_path / "out")]) == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and message in errors[0]
        assert not (tmp_path / "out").exists()
