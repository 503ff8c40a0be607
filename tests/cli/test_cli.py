"""The `saliencylab` command, run in-process through main() (plus one real console-script run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from saliencylab import __version__, images, methods, models, presets
from saliencylab.cli import evaluate as evaluate_cli, leaderboard as leaderboard_cli
from saliencylab.cli import COMMANDS, main
from saliencylab.report import demo as demo_module

CHELSEA = str(images.samples()["chelsea"].path)
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_version_and_methods(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["methods"]) == 0
    listed, _, composites = capsys.readouterr().out.strip().partition("\n\n")
    lines = listed.splitlines()
    assert [line.split()[0] for line in lines] == methods.available()
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # name and description
    from saliencylab.methods.propagation import COMPOSITES
    assert composites.startswith("lrp composites") and all(name in composites for name in COMPOSITES)


def test_demo_quick_end_to_end(tmp_path, capsys):
    # every method on every photo, at the smoke-run settings
    out = tmp_path / "demo"
    assert main(["demo", "--full", "--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert _errors(captured.err) == []
    assert "warning:" not in captured.err  # the IBA family gets crops to estimate statistics from
    index = out / "index.html"
    assert captured.out.strip().splitlines()[-1] == str(index.resolve())
    html = index.read_text()
    sources = set(re.findall(r'src="([^"]+)"', html))
    for name in images.samples():
        assert f"{name}.png" in sources
        for method in methods.available(requires=None):
            assert f"{name}.{method}.png" in sources
    for src in sources:
        assert (out / src).is_file(), src
    assert "efficientnet_lite0" in html and "saliencylab demo --full --quick" in html
    assert "sample_crops(n=64, seed=0)" in html and "&#9888; note" not in html
    # the faithfulness table: one row per method, deletion and insertion with intervals, and the curves
    table = (out / "metrics.md").read_text().splitlines()
    assert table[0] == "| method | deletion ↓ | insertion ↑ |"
    assert [line.split("|")[1].strip() for line in table[2:]] == methods.available(requires=None)
    assert all(re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", line) for line in table[2:])
    assert {"curves_deletion.png", "curves_insertion.png"} <= sources
    assert "Faithfulness of each method" in html


@pytest.fixture
def demo_calls(monkeypatch, tmp_path):
    """Records what `saliencylab demo` asks of run_demo, without running it."""
    calls = []

    def fake(out_dir, **kwargs):
        calls.append(kwargs)
        return demo_module.DemoResult(index=tmp_path / "index.html")

    monkeypatch.setattr(demo_module, "run_demo", fake)
    return calls


def test_demo_default_method_list(demo_calls, tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    call = demo_calls[-1]
    assert call["methods"] == list(presets.DEMO_METHODS) and call["preset"] == "demo"
    assert call["photos"] == list(presets.DEMO_PHOTOS) and len(call["photos"]) == 3
    assert call["metrics"] == ["deletion", "insertion"]
    # a representative handful: the gradient family, a CAM, a perturbation method, IBA and a short I-GOS
    assert {"gradient", "integrated_gradients", "smoothgrad", "gradcam", "iba", "igos"} <= set(call["methods"])
    assert {"occlusion", "rise"} & set(call["methods"])
    assert presets.params("demo", "igos")["iterations"] < presets.params("full", "igos")["iterations"]

    assert main(["demo", "--full", "--out", str(tmp_path)]) == 0
    call = demo_calls[-1]
    assert call["methods"] == methods.available(requires=None) and call["preset"] == "full"
    assert call["photos"] == images.sample_names() and len(call["photos"]) == 5
    assert main(["demo", "--quick", "--methods", "gradcam, gradient", "--metrics", "", "--out", str(tmp_path)]) == 0
    call = demo_calls[-1]
    assert call["methods"] == ["gradcam", "gradient"] and call["preset"] == "quick" and call["metrics"] == []
    assert main(["demo", "--methods", "all", "--preset", "photo", "--out", str(tmp_path)]) == 0
    assert demo_calls[-1]["methods"] == methods.available(requires=None) and demo_calls[-1]["preset"] == "photo"


@pytest.mark.parametrize("args, message", [
    (["--preset", "quik"], "did you mean quick"),
    (["--quick", "--preset", "full"], "contradict"),
    (["--metrics", "deletion,nope"], "unknown metric"),
])
def test_demo_bad_arguments(demo_calls, tmp_path, capsys, args, message):
    assert main(["demo", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err and not demo_calls


def test_demo_gives_iba_feature_data(tmp_path, recwarn):
    """The IBA family estimates statistics on the bundled crops: no 'no data' warning of the demo's making."""
    assert demo_module.takes_data("iba") and not demo_module.takes_data("gradient")
    result = demo_module.run_demo(tmp_path, methods=["iba"], preset="quick", photos=["chelsea"], metrics=(),
                                  data_size=4)
    assert result.errors == {}
    html = result.index.read_text()
    assert "data=sample_crops(n=4, seed=0)" in html and "&#9888; note" not in html
    assert not [w for w in recwarn if "statistics" in str(w.message)]
    assert (tmp_path / "chelsea.iba.png").is_file()


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS), ["bench"]])
def test_every_subcommand_has_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: saliencylab" + "".join(f" {c}" for c in command))
    assert "%%" not in out, "a literal '%%' in the help (argparse formats only help= strings)"


def test_leaderboard_replaces_bench(monkeypatch, capsys):
    main(["--help"])
    listing = capsys.readouterr().out
    assert re.search(r"^\s+leaderboard\b", listing, re.M) and not re.search(r"^\s+bench\b", listing, re.M)
    seen = []
    monkeypatch.setattr(leaderboard_cli, "_run", lambda args: seen.append(args) or 0)
    assert main(["leaderboard", "--suite", "knows-best", "--images", "2"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["bench", "--suite", "knows-best", "--images", "2"]) == 0  # the deprecated alias still runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saliencylab leaderboard" in err[0]
    assert [(a.suite, a.images) for a in seen] == [("knows-best", 2), ("knows-best", 2)]


def test_demo_unknown_method(tmp_path, capsys):
    assert main(["demo", "--quick", "--methods", "gradient,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_explain_chelsea_gradient(tmp_path, capsys):
    assert main(["explain", CHELSEA, "--method", "gradient", "--out", str(tmp_path)]) == 0
    assert _errors(capsys.readouterr().err) == []
    record = json.loads((tmp_path / "chelsea.gradient.json").read_text())
    assert record["method"] == "gradient" and record["model"] == "efficientnet_lite0"
    assert record["target"] in CAT_CLASSES
    assert record["label"] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert 0 < record["probability"] <= 1
    assert record["image"] == CHELSEA
    assert record["cost"]["backward_images"] >= 1
    m = np.load(tmp_path / "chelsea.gradient.npy")
    assert m.shape == (224, 224) and m.dtype == np.float32 and np.abs(m).max() > 0
    assert (tmp_path / "chelsea.gradient.png").stat().st_size > 0


def test_bad_image_does_not_lose_the_good_one(tmp_path, capsys):
    bad = tmp_path / "x.jpg"
    bad.write_text("this is not an image")
    out = tmp_path / "out"
    assert main(["explain", str(bad), CHELSEA, "--method", "gradient", "--out", str(out)]) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.gradient.json", "chelsea.gradient.npy",
                                                     "chelsea.gradient.png"]


def test_target_out_of_range(tmp_path, capsys):
    assert main(["explain", CHELSEA, "--method", "gradient", "--target", "5000", "--out", str(tmp_path)]) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "out of range" in errors[0]
    assert not list(tmp_path.glob("*.npy"))


def test_target_by_name(tmp_path, capsys):
    assert main(["explain", CHELSEA, "--method", "gradient", "--target", "Egyptian", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "chelsea.gradient.json").read_text())["target"] == 285
    assert main(["explain", CHELSEA, "--method", "gradient", "--target", "cat", "--out", str(tmp_path)]) == 2
    assert "matches" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method"),
    (["--method", "gradient", "--param", "nope=1"], "unknown parameter"),
    (["--method", "gradient", "--param", "nope"], "key=value"),
    (["--method", "gradcam", "--param", "layer='blocks.99'"], "no layer named"),
    (["--method", "gradient", "--model", "no_such_module_xyz:factory"], "no_such_module_xyz"),
    (["--method", "gradient", "--batch-size", "0"], "batch-size"),
])
def test_configuration_errors_exit_2(tmp_path, capsys, args, message):
    assert main(["explain", CHELSEA, *args, "--out", str(tmp_path / "out")]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_param_reaches_the_method(tmp_path):
    args = ["explain", CHELSEA, "--method", "integrated_gradients", "--param", "steps=2",
            "--param", "baseline=blur", "--out", str(tmp_path)]
    assert main(args) == 0
    record = json.loads((tmp_path / "chelsea.integrated_gradients.json").read_text())
    assert record["params"]["steps"] == 2 and record["params"]["baseline"] == "blur"
    assert record["cost"]["backward_images"] == 2


def test_explain_preset_and_param_override(tmp_path):
    args = ["explain", CHELSEA, "--method", "integrated_gradients", "--preset", "quick", "--out", str(tmp_path)]
    assert main(args) == 0
    record = json.loads((tmp_path / "chelsea.integrated_gradients.json").read_text())
    assert record["params"]["steps"] == presets.params("quick", "integrated_gradients")["steps"] == 4
    assert main(args + ["--param", "steps=3"]) == 0
    record = json.loads((tmp_path / "chelsea.integrated_gradients.json").read_text())
    assert record["params"]["steps"] == 3 and record["cost"]["backward_images"] == 3


def test_evaluate_preset_becomes_method_params(monkeypatch, tmp_path, capsys):
    seen = []
    import saliencylab.runs.files as files

    def fake(paths, methods, metrics, *, method_params, **kw):
        seen.append(method_params)
        return 0

    monkeypatch.setattr(files, "evaluate_files", fake)
    monkeypatch.setattr(evaluate_cli, "preset_method_params",
                        lambda *a, real=evaluate_cli.preset_method_params: seen.append(real(*a)) or real(*a))
    argv = ["evaluate", CHELSEA, "--methods", "gradient,integrated_gradients,occlusion", "--preset", "photo",
            "--method-param", "occlusion.stride=8", "--out", str(tmp_path)]
    assert main(argv) == 0
    preset, scoped = seen[-2], seen[-1]
    assert preset == ["integrated_gradients.steps=16", "occlusion.window=32", "occlusion.stride=32"]
    assert scoped == {"integrated_gradients": {"steps": 16}, "occlusion": {"window": 32, "stride": 8}}  # given wins
    assert main(argv[:4] + ["--preset", "fulll", "--out", str(tmp_path)]) == 2
    assert "did you mean full" in capsys.readouterr().err


def test_user_model_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "tests_module.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def factory():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tests_module", raising=False)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    coffee = str(images.samples()["coffee"].path)
    out = tmp_path / "out"
    args = ["explain", CHELSEA, coffee, "--model", "tests_module:factory", "--method", "gradient",
            "--target", "3", "--batch-size", "1", "--size", "64", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "chelsea.gradient.json").read_text())
    assert record["model"] == "tests_module:factory"
    assert record["target"] == 3 and record["label"] == "class 3"
    assert np.load(out / "coffee.gradient.npy").shape == (64, 64)

    assert main(args[:-2] + ["--labels", str(labels), "--out", str(out)]) == 0
    assert json.loads((out / "chelsea.gradient.json").read_text())["label"] == "thing 3"
    # Out of range for a 10-class model: per-image errors, exit 1.
    args[args.index("3")] = "10"
    assert main(args) == 1
    assert len(_errors(capsys.readouterr().err)) == 2


def test_console_script_subprocess(tmp_path):
    script = shutil.which("saliencylab")
    cmd = [script] if script else [sys.executable, "-m", "saliencylab"]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    proc = subprocess.run(
        cmd + ["explain", CHELSEA, str(bad), "--method", "gradient", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "chelsea.gradient.npy").is_file()
    assert json.loads((tmp_path / "out" / "chelsea.gradient.json").read_text())["target"] in CAT_CLASSES


def test_explain_record_names_the_layer_chosen_automatically(tmp_path, capsys):
    assert main(["explain", CHELSEA, "--method", "gradcam", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "chelsea.gradcam.json").read_text())
    names = {n for n, _ in models.load("efficientnet_lite0").model.named_modules()}
    assert record["layer"] in names and record["params"] == {}  # chosen per call, recorded, not a parameter
    assert main(["explain", CHELSEA, "--method", "gradcam", "--param", "layer=blocks.15", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "chelsea.gradcam.json").read_text())["layer"] == "blocks.15"


@pytest.mark.parametrize("command", ["explain", "evaluate", "leaderboard"])
def test_every_option_has_help(command):
    from saliencylab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    undocumented = [a.option_strings[0] if a.option_strings else a.dest for a in sub._actions if not a.help]
    assert undocumented == []


def test_leaderboard_lines_name_the_group_and_resume_counts(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from saliencylab.runs import leaderboard as runs_leaderboard
    from saliencylab.runs.store import Row, RunStore

    def rows(n, start=0):
        return [Row(image_id=f"env a:0:{i}", model="m", method="gradient", method_params={}, metric="auc",
                    metric_params={}, target=1, score=0.5) for i in range(start, start + n)]

    out = tmp_path / "lb"
    RunStore(out / "env_a").append(rows(4))  # an interrupted earlier run left 4 rows
    said_before_running = []

    def fake_run_bench(suite, methods, out_dir, *, on_record, **kw):
        said_before_running.append(capsys.readouterr().out)
        RunStore(out / "env_a").append(rows(2, start=4))
        record = SimpleNamespace(method="gradient", metric="auc", mean=0.5, low=0.4, high=0.6,
                                 image_ids=[f"env a:0:{i}" for i in range(6)], scores=[0.5] * 6)
        on_record(record)
        (out / "leaderboard.md").write_text("table\n")
        (out / "index.html").write_text("<html></html>")
        return [runs_leaderboard.GroupResult("env a", [record], {}, [])]

    monkeypatch.setattr(runs_leaderboard, "run_bench", fake_run_bench)
    assert main(["leaderboard", "--out", str(out)]) == 0
    assert said_before_running[0].startswith("resuming: 4 rows found")  # not silent while it skips
    lines = capsys.readouterr().out.splitlines()
    assert "[env a] gradient / auc: 0.5000 [0.4000, 0.6000]" in lines
    assert "resumed: 4 of 6 rows were already done, 2 computed" in lines
    assert "[env a] 1 methods, 6 rows" in lines


def test_threads_option_applies_to_the_command_and_is_restored(monkeypatch, capsys):
    import torch

    from saliencylab.cli import methods as methods_cmd

    seen = []
    monkeypatch.setattr(methods_cmd, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["--threads", "1", "methods"]) == 0
    assert seen == [1] and torch.get_num_threads() == before
    monkeypatch.setenv("SALIENCYLAB_THREADS", "1")
    assert main(["methods"]) == 0 and seen[-1] == 1
    monkeypatch.setenv("SALIENCYLAB_THREADS", "many")
    assert main(["methods"]) == 2
    assert "SALIENCYLAB_THREADS" in capsys.readouterr().err
    assert main(["--threads", "0", "methods"]) == 2  # a usage error, before anything runs
