"""Bundled sample photos, the image reader, and the embedded model's answers on them."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from saliencylab.core.errors import ConfigError, InputError
from saliencylab.images import DATA_DIR, SamplePhoto, open_image, sample_names, samples
from saliencylab.models import load

REQUIRED = ["chelsea", "coffee", "rocket", "astronaut"]


def test_samples_are_bundled_and_small():
    photos = samples()
    assert list(photos)[:4] == REQUIRED and list(photos) == sample_names()
    total = 0
    for name, photo in photos.items():
        assert isinstance(photo, SamplePhoto) and photo.name == name
        assert photo.path.is_file() and photo.path.parent == DATA_DIR
        assert photo.credit and all(0 <= i < 1000 for i in photo.expected)
        im = photo.image
        assert im.mode == "RGB" and min(im.size) >= 224
        total += photo.path.stat().st_size
    assert total < 1.5e6
    licence = (DATA_DIR / "LICENSE.md").read_text()
    assert all(photo.path.name in licence for photo in photos.values())
    # Only the astronaut lacks an ImageNet class; everything else must be checkable.
    assert [n for n, p in photos.items() if not p.expected] == ["astronaut"]


def test_samples_subset_and_order():
    assert list(samples(["rocket", "chelsea"])) == ["rocket", "chelsea"]
    assert list(samples("coffee")) == ["coffee"]
    with pytest.raises(AttributeError):
        samples(["coffee"])["coffee"].name = "tea"  # frozen


def test_unknown_sample_lists_available():
    with pytest.raises(ConfigError, match="unknown sample photo 'nope'; available: chelsea, coffee, rocket"):
        samples(["nope"])


def test_embedded_model_gets_every_photo_right():
    lm = load()
    photos = [p for p in samples().values() if p.expected]
    with torch.no_grad():
        probs = lm.model(lm.preprocess_batch([p.path for p in photos])).softmax(-1)
    for photo, p in zip(photos, probs):
        top1 = int(p.argmax())
        assert top1 in photo.expected, f"{photo.name}: got {lm.labels[top1]} ({top1}) p={p[top1]:.2f}"
        # The expected classes together must carry a clear share of the probability.
        assert p[list(photo.expected)].sum() > 0.4, photo.name


def test_open_image_converts_to_rgb(tmp_path):
    gray = open_image(samples(["camera"])["camera"].path)
    assert gray.mode == "RGB"
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (5, 4), (10, 20, 30, 40)).save(path)
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (5, 4) and im.getpixel((0, 0)) == (10, 20, 30)


def test_open_image_errors(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InputError, match=r"cannot read image '.*missing\.jpg': no such file"):
        open_image(missing)
    with pytest.raises(InputError, match="it is a directory"):
        open_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(InputError, match=r"cannot read image '.*notes\.txt': not a recognised image format"):
        open_image(text)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(samples(["coffee"])["coffee"].path.read_bytes()[:2000])
    with pytest.raises(InputError, match=r"cannot read image '.*truncated\.jpg': "):
        open_image(str(truncated))
