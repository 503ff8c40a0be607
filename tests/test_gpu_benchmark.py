"""benchmarks/gpu.py (run by benchmarks/gpu.sh on a GPU) in its tiny CPU mode: every part runs and the
report has every section, so the script cannot rot between the sessions that have a GPU."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_section(tmp_path):
    script = load_script()
    assert script.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert "errors" not in result, result.get("errors")
    md = (tmp_path / "gpu.md").read_text()
    for heading in ("## 1. Device agreement", "## 2. Per-image cost", "## 3. Occlusion", "## 4. I-GOS",
                    "## 4b. I-GOS profile", "## 5. IBA", "## 6. Leaderboard", "## 7. LRP", "## 8. ViT methods"):
        assert heading in md
    # the same device on both sides: identical maps, whatever the method's randomness
    assert all(r["max_relative_difference"] == 0 for r in result["agreement"].values())
    occlusion = result["occlusion"]
    assert occlusion["windows_per_image"] == 4  # 32x32 images, 16-pixel windows at stride 16
    if occlusion["captum"] is not None:  # same windows, same baseline: the same maps
        assert occlusion["captum"]["max_abs_difference"] < 1e-4


def test_gpu_sh_refuses_a_missing_cuda_device(tmp_path, monkeypatch):
    import torch

    script = load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "gpu.json").exists()


def test_vit_precision_script_tiny(capsys):
    """benchmarks/vit_precision.py (float32 against float64 maps of the ViT methods) in its tiny mode: every
    method and dtype pair is compared, and on a 2-block model float32 stays close to float64."""
    spec = importlib.util.spec_from_file_location("vit_precision", ROOT / "benchmarks" / "vit_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tiny"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "vs cpu float64" in line]
    assert len(lines) >= len(module.METHODS)
    assert all(float(line.split("min corr")[1]) > 0.999 for line in lines)
