"""Display helpers and the demo page: normalization for display only, symmetric signed colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from saliencylab.report import (DemoCell, DemoMethod, DemoRow, denormalize, display_values, overlay, save_png,
                                to_display, write_demo_page)
from saliencylab.report.render import POSITIVE_CMAP, SIGNED_CMAP


def _signed_map():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(32, 48, generator=g)
    m[0, 0] = 0.0
    return m


def test_signed_map_is_symmetric_around_zero():
    m = _signed_map()
    values, signed = display_values(m)
    assert signed
    neg_values, _ = display_values(-m)
    np.testing.assert_allclose(neg_values, -values)  # +x and -x get the same magnitude
    assert values[0, 0] == 0.0
    assert values.min() >= -1 and values.max() <= 1

    rgb = to_display(m)
    assert rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8
    centre = np.array(colormaps[SIGNED_CMAP](0.5, bytes=True)[:3])
    np.testing.assert_array_equal(rgb[0, 0], centre)  # 0 -> the diverging colormap's centre
    # Saturated extremes land on the colormap's two ends.
    lo = np.array(colormaps[SIGNED_CMAP](0.0, bytes=True)[:3])
    hi = np.array(colormaps[SIGNED_CMAP](1.0, bytes=True)[:3])
    np.testing.assert_array_equal(rgb.reshape(-1, 3)[int(m.argmin())], lo)
    np.testing.assert_array_equal(rgb.reshape(-1, 3)[int(m.argmax())], hi)


def test_display_scale_uses_percentiles():
    m = np.linspace(0.0, 1.0, 10_000).reshape(100, 100)
    m[0, 0] = 1e6  # one outlier must not wash out everything else
    values, signed = display_values(m)
    assert not signed
    assert values[99, 99] == pytest.approx(1.0)
    assert values[50, 50] == pytest.approx(0.5, abs=0.01)
    # A constant offset does not hide the structure of a non-negative map.
    offset, _ = display_values(m + 100.0)
    np.testing.assert_allclose(offset, values, atol=1e-6)
    # Signed maps are not stretched: zero stays zero.
    signed_values, signed = display_values(m - 0.25)
    assert signed and signed_values[25, 0] == pytest.approx(0.0, abs=1e-3)


def test_non_negative_map_uses_sequential_colormap():
    m = np.zeros((8, 8))
    m[2:4, 2:4] = 3.0
    rgb = to_display(m)
    np.testing.assert_array_equal(rgb[0, 0], colormaps[POSITIVE_CMAP](0.0, bytes=True)[:3])
    np.testing.assert_array_equal(rgb[2, 2], colormaps[POSITIVE_CMAP](1.0, bytes=True)[:3])
    assert to_display(np.zeros((4, 4))).shape == (4, 4, 3)  # an all-zero map is fine


def test_channel_maps_are_summed():
    m = torch.randn(3, 16, 16)
    np.testing.assert_array_equal(to_display(m), to_display(m.sum(0)))


def test_overlay_shape_dtype_and_resize():
    photo = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = overlay(photo, torch.randn(40, 60))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    small = overlay(photo, np.abs(np.random.default_rng(1).normal(size=(5, 7))))
    assert small.shape == (40, 60, 3) and small.dtype == np.uint8
    # Where the map is zero, only the (muted) photo shows: no heatmap colour is added.
    zero = overlay(photo, np.zeros((40, 60)), mute=0.0)
    np.testing.assert_array_equal(zero, photo)


def test_denormalize_round_trip():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (torch.from_numpy(photo).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    back = denormalize(x, mean, std)
    assert back.dtype == np.uint8 and back.shape == photo.shape
    np.testing.assert_array_equal(back, photo)


def test_save_png(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path = save_png(tmp_path / "sub" / "a.png", arr)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)


def test_demo_page(tmp_path):
    rows = [DemoRow("cat", "tabby", 0.5, "cat.png",
                    cells={"gradient": DemoCell(image="cat.gradient.png"),
                           "broken": DemoCell(error="bad <thing> happened")})]
    methods = [DemoMethod("gradient", "plain gradient", 0.0123), DemoMethod("broken", "", None)]
    meta = {"model": "tiny", "command": "saliencylab demo --quick", "date": "2024-01-01",
            "versions": {"saliencylab": "0.1.0", "torch": torch.__version__}}
    index = write_demo_page(tmp_path, rows, methods, meta)
    html = index.read_text()
    assert index == tmp_path / "index.html"
    assert 'src="cat.gradient.png"' in html and 'src="cat.png"' in html
    assert "bad &lt;thing&gt; happened" in html  # escaped
    assert "tabby" in html and "0.500" in html and "0.012 s / image" in html
    assert "saliencylab demo --quick" in html and torch.__version__ in html
    assert "http://" not in html and "https://" not in html  # self-contained
