"""Reports leave matplotlib's global state alone: no backend switch, no pyplot, no open figures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

SCRIPT = textwrap.dedent("""
    import sys
    from types import SimpleNamespace

    import matplotlib
    matplotlib.use("svg")  # a user's choice that is not Agg
    import numpy as np

    import saliencylab
    from saliencylab import report
    from saliencylab.report.bench_figures import example_grid
    from saliencylab.report.plots import plot_metric_curves

    out = sys.argv[1]
    curves = {"fraction": np.linspace(0, 1, 5), "scores": np.random.default_rng(0).random((3, 5))}
    records = [SimpleNamespace(metric="deletion", method="gradient", mean=0.25, curves=curves)]
    assert plot_metric_curves(records, "deletion", out + "/curves.png") is not None
    photos = [np.zeros((16, 16, 3), np.uint8)] * 2
    example_grid(photos, [np.random.default_rng(1).normal(size=(2, 16, 16))], ["gradient"], out + "/grid.png",
                 truth=np.ones((2, 16, 16)), title="t")
    report.save_png(out + "/overlay.png", report.overlay(photos[0], np.arange(256.0).reshape(16, 16)))
    print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
""")


def test_reports_keep_the_users_backend(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False"]
    for name in ("curves.png", "grid.png", "overlay.png"):
        image = np.asarray(Image.open(tmp_path / name))
        assert image.ndim == 3 and image.std() > 0, name  # drawn, not blank
