"""`saliencylab concepts` writes its page (small settings), resumes the SAE, and rejects bad arguments."""

import json

import pytest

from saliencylab.cli import main

SMALL = ["--train-images", "48", "--epochs", "1", "--sae-epochs", "2", "--probe", "12", "--concepts", "8", "--k", "2",
         "--images", "2", "--top", "2", "--show", "2"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SALIENCYLAB_PROGRESS", "0")
    return tmp_path / "cache"


def test_concepts_writes_the_page_and_resumes(tmp_path, cache, capsys):
    out = tmp_path / "out"
    assert main(["--threads", "1", "concepts", "--out", str(out), *SMALL]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    facts = json.loads((out / "concepts.json").read_text(encoding="utf-8"))
    assert "Concept " in page and "Decisions in concepts" in page and "B-cos explanation of the logit" in page
    # every referenced picture exists
    import re
    pictures = re.findall(r'src="(img/[^"]+\.png)"', page)
    assert pictures and all((out / p).is_file() for p in pictures)
    assert facts["sae"]["max_completeness_gap"] < 1e-5
    assert len(facts["images"]) == 2 and all(1 <= len(r["concepts"]) <= 3 for r in facts["images"])
    # the per-image numbers add up: concepts + error + bias = logit
    for r in facts["images"]:
        assert abs(r["logit"] - r["bias"] - r["error"]
                   - sum(c["contribution"] for c in r["concepts"]) - r["others"]) < 1e-5
    assert (out / "sae" / "checkpoints" / "epoch_002.pt").is_file()
    assert list(cache.glob("concepts/bcos-*.pt")), "the trained network is cached"
    assert "with the SAE" in capsys.readouterr().out
    # a second run resumes the finished SAE instead of training again
    assert main(["--threads", "1", "concepts", "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "concepts.json").read_text(encoding="utf-8"))["sae"]["resumed_from"] == 2


def test_concepts_bad_arguments(tmp_path, cache, capsys):
    assert main(["concepts", "--out", str(tmp_path / "o"), "--concepts", "4", "--k", "5"]) == 2
    assert "--k" in capsys.readouterr().err
    assert main(["concepts", "--out", str(tmp_path / "o"), "--layer", "nope", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    assert main(["concepts", "--concepts", "0"]) == 2
    assert not list(cache.glob("concepts/*.pt"))  # nothing was trained for bad arguments
