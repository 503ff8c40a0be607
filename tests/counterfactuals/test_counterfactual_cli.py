"""`saliencylab counterfactual` (quick settings) writes the page and the summary, resumes, and fails in
one line; the page itself with curves built here (COUT's curves come from helper cout's metric)."""

import json
import re

import pytest
import torch

from saliencylab.cli import main
from saliencylab.report.counterfactual import write_counterfactual_page

pytestmark = pytest.mark.usefixtures("one_thread")


def test_command_writes_the_page_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cf"
    assert main(["--threads", "1", "counterfactual", "--out", str(out), "--quick", "--images", "3"]) == 0
    page = (out / "index.html").read_text()
    assert page.count('alt="counterfactual') == 3 and page.count('alt="change mask') == 3
    assert "4 &rarr; 9" in page
    try:  # COUT comes from helper cout's metric when it is installed
        import saliencylab.metrics.counterfactual  # noqa: F401
        assert page.count("<polyline") == 2 * (3 + 1) and "COUT" in page
    except ImportError:
        assert "<polyline" not in page and "not installed" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["epochs"] == 2 and 0 <= summary["validity"] <= 1
    assert len(list((out / "c3lt" / "checkpoints").glob("epoch_*.pt"))) == 2
    printed = capsys.readouterr().out
    assert "page:" in printed and "validity" in printed
    # rerun with more epochs: continues from epoch 2
    assert main(["--threads", "1", "counterfactual", "--out", str(out), "--quick", "--images", "2", "--epochs", "3"]) == 0
    history = json.loads((out / "c3lt" / "history.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    assert main(["counterfactual", "--out", str(tmp_path), "--source", "4", "--target", "4", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ" in err[0]
    assert main(["counterfactual", "--out", str(tmp_path), "--source", "12", "--quick"]) == 2
    assert "digit" in capsys.readouterr().err


def test_page_with_curves(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    cf = torch.rand(2, 1, 8, 8) * 2 - 1
    masks = torch.rand(2, 8, 8)
    probs = torch.softmax(torch.randn(2, 10), 1)
    probs[0] = torch.nn.functional.one_hot(torch.tensor(9), 10).float()
    steps = torch.linspace(0, 1, 6)
    curves = {"source": torch.stack([1 - steps, 1 - steps ** 2]), "target": torch.stack([steps, steps ** 2])}
    path = write_counterfactual_page(tmp_path / "page", x, cf, masks, probabilities=probs, query_probabilities=probs,
                                     source=4, target=9, curves=curves, scores=torch.tensor([0.5, 0.25]),
                                     summary={"validity": 0.5, "COUT (mean)": float("nan")})
    text = path.read_text()
    assert path.name == "index.html"
    assert text.count("<polyline") == 2 * (2 + 1)  # each image's curve and the mean, per class
    assert "COUT 0.500" in text and "COUT 0.250" in text
    assert text.count('class="ok"') == 1  # image 0 reaches the target
    assert "n/a" in text  # a NaN summary number
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 6
