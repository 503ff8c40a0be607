"""The opt-in ViT column of the ground-truth leaderboard (`--suite groundtruth-vit`): a trained small ViT
per environment beside the designed and trained-CNN groups; ViT methods on the ViT only, methods that
cannot apply listed as skipped (not failed), CAM methods on the ViT's last `norm1` tokens, resume."""

import json

import pytest
import torch

from saliencylab import envs
from saliencylab.cli import main
from saliencylab.runs import leaderboard as bench

METHODS = ("gradient", "gradcam", "guided_backprop", "attention_rollout", "gradient_rollout")
VIT_IN_TEST = ("attention_rollout", "gradient_rollout")  # the ViT methods of METHODS
NAME = "dominant_colour"
GROUPS = [NAME, f"{NAME} (trained)", f"{NAME} (trained ViT)"]


@pytest.fixture
def one_environment(tmp_path_factory, monkeypatch):
    # the session's cache folder (tests/envs/test_trained_vit.py trains the same ViT into it) and one
    # environment: the suite's three trainings would take most of a minute
    monkeypatch.setenv("SALIENCYLAB_CACHE", str(tmp_path_factory.getbasetemp() / "saliencylab-cache"))
    monkeypatch.setattr(envs, "available", lambda: [NAME])


def test_default_suites_are_unchanged():
    assert bench.resolve_methods("default", "groundtruth") == list(bench.DEFAULT_METHODS)
    assert not set(bench.VIT_METHODS) & set(bench.resolve_methods(None, "groundtruth"))
    assert bench.resolve_methods("default", "groundtruth-vit") == list(bench.DEFAULT_METHODS + bench.VIT_METHODS)
    from saliencylab import methods

    assert set(methods.available(requires="vit")) >= set(bench.VIT_METHODS)
    assert set(methods.available(requires="vit")) <= set(bench.resolve_methods("all", "groundtruth-vit"))
    assert not set(bench.VIT_METHODS) & set(bench.resolve_methods("all", "groundtruth"))
    assert "groundtruth-vit" in bench.SUITES


def test_skipped_methods_and_vit_params():
    from conftest import make_small_cnn
    from saliencylab.models.vit import small_vit

    vit, cnn = small_vit(3, dim=16, depth=3, heads=2), make_small_cnn()
    assert bench.skipped_methods(METHODS, cnn) == {
        m: "needs a vision transformer (timm-style attention modules)" for m in VIT_IN_TEST}
    assert set(bench.skipped_methods(METHODS, vit)) == {"guided_backprop"}
    assert set(bench.skipped_methods(["deconvnet", "rectgrad", "bcos", "gradient"], vit)) == {
        "deconvnet", "rectgrad", "bcos"}
    params = bench.vit_method_params(["gradcam", "layercam", "score_cam", "iba", "gradient"], vit)
    for cam in ("gradcam", "layercam", "score_cam"):
        assert params[cam]["layer"] == "blocks.2.norm1" and params[cam]["layout"] == "tokens"
    assert "layer" not in params["iba"] and params["gradient"] == {}


def test_vit_column_end_to_end_and_resume(tmp_path, one_environment, monkeypatch):
    out = tmp_path / "bench"
    argv = ["leaderboard", "--suite", "groundtruth-vit", "--methods", ",".join(METHODS), "--images", "4",
            "--out", str(out)]
    assert main(argv) == 0                      # skipped methods are not failures
    board = json.loads((out / "leaderboard.json").read_text())
    groups = {g["name"]: g for g in board["groups"]}
    assert list(groups) == GROUPS
    for name in GROUPS[:2]:                     # designed and CNN: no ViT methods, nothing failed
        assert {r["method"] for r in groups[name]["rows"]} == {"gradient", "gradcam", "guided_backprop"}
        assert set(groups[name]["skipped"]) == set(VIT_IN_TEST) and not groups[name]["errors"]
    vit = groups[GROUPS[2]]
    assert {r["method"] for r in vit["rows"]} == {"gradient", "gradcam", *VIT_IN_TEST}
    assert set(vit["skipped"]) == {"guided_backprop"} and not vit["errors"]
    assert {(r["method"], r["metric"]) for r in vit["rows"]} == {
        (m, k) for m in ("gradient", "gradcam", *VIT_IN_TEST) for k in bench.GROUNDTRUTH_METRICS}
    assert "Trained ViT" in vit["note"] and "accuracy" in vit["note"]
    # the rows name the token layer the CAM explained on the ViT, and the CNN's default layer elsewhere
    rows = [json.loads(line) for line in (out / bench.slug(GROUPS[2]) / "rows.jsonl").read_text().splitlines()]
    assert {r["method_params"].get("layer") for r in rows if r["method"] == "gradcam"} == {"blocks.1.norm1"}
    rows = [json.loads(line) for line in (out / bench.slug(GROUPS[1]) / "rows.jsonl").read_text().splitlines()]
    assert all("layer" not in r["method_params"] for r in rows)
    # rollout maps: non-negative rollout mass upsampled to the 32x32 images (3 example maps kept)
    maps = torch.load(out / bench.slug(GROUPS[2]) / "maps.attention_rollout.pt", weights_only=True)
    assert maps.shape == (3, 32, 32) and (maps >= 0).all()
    summary = (out / "summary.md").read_text()
    assert f"| {GROUPS[2]} |" in summary.splitlines()[0] and "| attention_rollout |" in summary
    text = (out / "leaderboard.md").read_text()
    assert "guided_backprop skipped: rewrites the backward pass of nn.ReLU modules" in text
    assert "--suite groundtruth-vit" in text

    # a rerun reuses every row: nothing is explained again
    import saliencylab.runs.local as local

    monkeypatch.setattr(local, "explain", lambda *a, **k: pytest.fail("re-explained"))
    assert main(argv) == 0
    assert json.loads((out / "leaderboard.json").read_text())["groups"][2]["rows"] == vit["rows"]
