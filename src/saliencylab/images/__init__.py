"""Bundled sample photos and a forgiving image reader.

The photos are public-domain / CC0 images from scikit-image's data directory
(see data/LICENSE.md), so examples and tests work without a network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps

from saliencylab.core.errors import ConfigError, InputError

DATA_DIR = Path(__file__).resolve().parent / "data"

__all__ = ["SamplePhoto", "samples", "sample_names", "open_image", "DATA_DIR"]


@dataclass(frozen=True)
class SamplePhoto:
    name: str
    path: Path
    # ImageNet indices that are a correct answer for this photo; empty when
    # ImageNet has no class for what the photo shows.
    expected: tuple[int, ...]
    credit: str

    @property
    def image(self) -> Image.Image:
        """The photo as a PIL RGB image (read fresh each time, so callers may mutate it)."""
        return open_image(self.path)


# Ordered: the first entries are the ones a demo should show first.
_SAMPLES = (
    SamplePhoto(
        "chelsea", DATA_DIR / "chelsea.jpg",
        # ImageNet splits striped domestic cats over these three near-synonyms.
        (281, 282, 285),  # tabby, tiger cat, Egyptian cat
        "Chelsea the cat. Photo: Stefan van der Walt, CC0 (via scikit-image).",
    ),
    SamplePhoto(
        "coffee", DATA_DIR / "coffee.jpg",
        (967, 968),  # espresso, cup
        "Espresso cup, courtesy of Pikolo Espresso Bar. Photo: Rachel Michetti, CC0 (via scikit-image).",
    ),
    SamplePhoto(
        "rocket", DATA_DIR / "rocket.jpg",
        # ImageNet has no 'rocket'; these two are the classes for the same shape.
        (657, 744),  # missile, projectile
        "Falcon 9 carrying DSCOVR at Cape Canaveral. Photo: SpaceX, public domain (via scikit-image).",
    ),
    SamplePhoto(
        "astronaut", DATA_DIR / "astronaut.jpg",
        # ImageNet has no astronaut or space-suit class: this is the out-of-label-set example.
        (),
        "Astronaut Eileen Collins. Photo: NASA, public domain (via scikit-image).",
    ),
    SamplePhoto(
        "camera", DATA_DIR / "camera.jpg",
        (872, 759),  # tripod, reflex camera
        "Photographer with a camera on a tripod (grayscale). Photo: Lav Varshney, CC0 (via scikit-image).",
    ),
)
_BY_NAME = {photo.name: photo for photo in _SAMPLES}


def sample_names() -> list[str]:
    return [photo.name for photo in _SAMPLES]


def samples(names: Iterable[str] | str | None = None) -> dict[str, SamplePhoto]:
    """The bundled photos by name, in the bundled order (or in the order asked for)."""
    if names is None:
        return dict(_BY_NAME)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ConfigError(
            f"unknown sample photo {', '.join(repr(n) for n in unknown)}; "
            f"available: {', '.join(sample_names())}")
    return {n: _BY_NAME[n] for n in names}


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as a PIL RGB image, or raise InputError saying why not."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read image '{path}': no such file")
    if path.is_dir():
        raise InputError(f"cannot read image '{path}': it is a directory")
    try:
        with Image.open(path) as im:
            # Phone photos store rotation in EXIF; without this they come out sideways.
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except Image.UnidentifiedImageError:
        raise InputError(f"cannot read image '{path}': not a recognised image format") from None
    except Exception as exc:  # truncated files, decompression bombs, permission errors ...
        reason = str(exc) or type(exc).__name__
        raise InputError(f"cannot read image '{path}': {reason}") from exc
