"""Files in and out for the command line: models with their preprocessing, images, result files.

Kept apart from `saliencylab.cli` so that scripts can reuse the same steps:

>>> loaded = load_model("efficientnet_lite0")
>>> item = prepare_image("cat.jpg", loaded)
>>> results = explain_images(loaded.model, method, item.tensor[None], target=None)
>>> write_result("out", item, results[0], loaded, model_name="efficientnet_lite0")
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__
from . import models as _models
from .api import explain
from .core.errors import ConfigError, InputError
from .core.explanation import Explanation
from .features import ImageFolder
from .report.render import denormalize, overlay, save_png

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "PreparedImage", "ImageResult", "load_model", "read_labels",
    "parse_param", "parse_floats", "resolve_target_arg", "label_of", "prepare_image", "explain_images",
    "explain_prepared", "split_explanation", "write_result", "unique_stems", "image_files", "read_image",
    "parse_background", "ImageNotes", "ImageDataFolder", "DEFAULT_BACKGROUND", "DEFAULT_MAX_PIXELS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- arguments ------------------------------------------------------------------------------------
def parse_param(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value); the value is a Python literal if it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--param expects key=value, got {text!r}")
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return key, value


def parse_floats(text: str, name: str) -> tuple[float, float, float]:
    """'0.5' or '0.485,0.456,0.406' -> three floats (one value is used for every channel)."""
    try:
        values = [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--{name} expects one or three numbers separated by commas, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ConfigError(f"--{name} expects one or three numbers separated by commas, got {text!r}")
    if name == "std" and any(v <= 0 for v in values):
        raise ConfigError(f"--std values must be positive, got {text!r}")
    return tuple(values)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank trailing lines ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read labels file '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read labels file '{path}': not UTF-8 text") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ConfigError(f"labels file '{path}' is empty")
    return labels


def label_of(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) and labels[index] else f"class {index}"


def resolve_target_arg(text: str | None, labels: Sequence[str]) -> int | None:
    """--target: None (predicted class), a class index, or a unique part of a class name."""
    if text is None:
        return None
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    wanted = text.lower()
    exact = [i for i, name in enumerate(labels) if name.lower() == wanted]
    if len(exact) == 1:
        return exact[0]
    found = [i for i, name in enumerate(labels) if wanted and wanted in name.lower()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"--target {text!r} is neither a class index nor part of a class name")
    shown = ", ".join(f"{i} {labels[i]!r}" for i in found[:6]) + (", ..." if len(found) > 6 else "")
    raise ConfigError(f"--target {text!r} matches {len(found)} classes ({shown}); give the class index")


# -- models ---------------------------------------------------------------------------------------
def load_model(spec: str = "efficientnet_lite0", weights: str | None = None, *, size: int | None = None,
               mean=None, std=None, labels: str | Sequence[str] | None = None) -> "_models.LoadedModel":
    """A model with its preprocessing and labels.

    Embedded names keep their own preprocessing and ImageNet labels. Anything else goes through
    `models.from_spec` and gets resize-256 / centre-crop-224 with ImageNet mean/std and labels
    "class N", unless `size`, `mean`, `std` or `labels` (a file or a list) say otherwise.
    """
    if isinstance(mean, str):
        mean = parse_floats(mean, "mean")
    if isinstance(std, str):
        std = parse_floats(std, "std")
    if size is not None and (not isinstance(size, int) or size < 8):
        raise ConfigError(f"--size must be an int of at least 8, got {size!r}")
    if is_embedded(spec):
        spec = spec.strip()
        loaded = _models.load(spec)
        if weights is not None:
            loaded = dataclasses.replace(loaded, model=_models.from_spec(spec, weights))
    else:
        model = _models.from_spec(spec, weights)
        loaded = _models.LoadedModel(name=spec, model=model, labels=[], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                     input_size=224, resize_size=256, interpolation="bilinear")
    changes = {}
    if size is not None:
        changes.update(input_size=size, resize_size=max(size, round(size * 256 / 224)))
    if mean is not None:
        changes["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        changes["std"] = tuple(float(v) for v in std)
    if labels is not None:
        changes["labels"] = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else list(labels)
    return dataclasses.replace(loaded, **changes) if changes else loaded


def is_embedded(spec) -> bool:
    """Whether a --model spec names an embedded model (which keeps its own preprocessing and labels)."""
    return isinstance(spec, str) and spec.strip() in _models.available()


# -- images ---------------------------------------------------------------------------------------
# Transparent pixels are composited on this colour: white, as browsers and image viewers show them on
# a page, and as torchvision users get from `Image.alpha_composite` on white (PIL's plain
# convert("RGB") instead drops alpha and shows whatever colour the transparent pixels hold).
DEFAULT_BACKGROUND = "white"
# Larger images are downscaled on reading (JPEG decodes at a reduced scale): Pillow's own
# decompression-bomb threshold, so an image Pillow would warn about or refuse is read, smaller.
DEFAULT_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS


def image_files(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand command-line inputs: a folder becomes every image file below it (recursively, image
    extensions only, sorted, as `--feature-data` and `features.ImageFolder` read folders); files stay as given.

    Returns (files, problems): problems are (folder, message) for folders with no image file.
    """
    from .features import IMAGE_SUFFIXES

    files, problems = [], []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((os.fspath(p), f"folder '{p}' contains no image files ({', '.join(IMAGE_SUFFIXES)})"))
            files += [os.fspath(f) for f in found]
        else:
            files.append(os.fspath(p))
    return files, problems


def parse_background(text) -> tuple[int, int, int]:
    """--background: a colour name ('white', 'black', 'gray'), '#rrggbb', or 'R,G,B' (0-255)."""
    from PIL import ImageColor

    if isinstance(text, (tuple, list)):
        values = list(text)
    elif "," in str(text):
        try:
            values = [int(v) for v in str(text).split(",")]
        except ValueError:
            values = []
    else:
        try:
            values = list(ImageColor.getrgb(str(text).strip()))[:3]
        except ValueError:
            values = []
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise ConfigError(f"--background expects a colour name (white, black, gray), #rrggbb or R,G,B with "
                          f"values 0-255, got {text!r}")
    return tuple(values)


@dataclass
class ImageNotes:
    """What reading an image changed, for the command's warnings."""

    composited: bool = False  # it had transparent pixels, composited on the background
    downscaled: tuple | None = None  # ((w, h) in the file, (w, h) read) when it had more than max_pixels


def read_image(path: str | os.PathLike, *, background=DEFAULT_BACKGROUND,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, notes: ImageNotes | None = None):
    """Read an image file as a PIL RGB image, or raise InputError saying why not.

    Unlike `images.open_image` (PIL's convert("RGB"), which drops alpha): an image with transparency
    (RGBA, LA, PA, or P/L/RGB with a transparent colour) is composited on `background`; an image with
    more than `max_pixels` pixels (None: no limit) is downscaled while it is decoded (Pillow's
    `thumbnail`: JPEG draft mode, then `reduce`) instead of failing Pillow's decompression-bomb check.
    `notes` (an ImageNotes) records what was done. EXIF rotation is applied, as in `open_image`.
    """
    import warnings

    from PIL import Image, ImageOps

    notes = notes if notes is not None else ImageNotes()
    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read image '{path}': no such file")
    if path.is_dir():
        raise InputError(f"cannot read image '{path}': it is a directory")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 64):
        raise ConfigError(f"--max-pixels must be an int of at least 64, got {max_pixels!r}")
    colour = parse_background(background)
    try:
        with warnings.catch_warnings():
            # the size is checked below against max_pixels, which replaces Pillow's limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            with im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    scale = (max_pixels / (w * h)) ** 0.5
                    target = (max(1, int(w * scale)), max(1, int(h * scale)))
                    im.thumbnail(target, Image.BICUBIC)
                    notes.downscaled = ((w, h), im.size)
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                    rgba = im.convert("RGBA")
                    if rgba.getchannel("A").getextrema()[0] < 255:  # some pixel is not opaque
                        notes.composited = True
                        base = Image.new("RGBA", rgba.size, (*colour, 255))
                        return Image.alpha_composite(base, rgba).convert("RGB")
                    return rgba.convert("RGB")
                return im.convert("RGB")
    except Image.UnidentifiedImageError:
        raise InputError(f"cannot read image '{path}': not a recognised image format") from None
    except InputError:
        raise
    except Exception as exc:  # truncated files, permission errors, out of memory ...
        reason = str(exc) or type(exc).__name__
        raise InputError(f"cannot read image '{path}': {' '.join(reason.split())}") from exc


@dataclass
class PreparedImage:
    """An image as given on the command line, its model input, and the crop the model saw."""

    path: str
    stem: str
    tensor: torch.Tensor  # (3, S, S), normalized
    photo: np.ndarray  # (S, S, 3) uint8, for overlays
    notes: ImageNotes = field(default_factory=ImageNotes)


def prepare_image(path: str | os.PathLike, loaded, stem: str | None = None, *, background=DEFAULT_BACKGROUND,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Read (see `read_image`) and preprocess one image; raises InputError for unreadable files."""
    notes = ImageNotes()
    tensor = loaded.preprocess(read_image(path, background=background, max_pixels=max_pixels, notes=notes))
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"image '{path}' gives non-finite values after preprocessing (check --mean/--std)")
    photo = denormalize(tensor, loaded.mean, loaded.std)
    return PreparedImage(os.fspath(path), stem or Path(path).stem, tensor, photo, notes)


def input_warnings(items: Sequence[PreparedImage], background=DEFAULT_BACKGROUND,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[str]:
    """The warnings a run owes its user about how its images were read: one line for every downscaled
    image, one line for all images with transparency."""
    lines = []
    for it in items:
        if it.notes.downscaled:
            (w, h), (w2, h2) = it.notes.downscaled
            lines.append(f"image '{it.path}' has {w * h:,} pixels ({w}x{h}), more than --max-pixels "
                         f"{max_pixels:,}; read downscaled to {w2}x{h2}")
    clear = [it.path for it in items if it.notes.composited]
    if clear:
        shown = ", ".join(f"'{p}'" for p in clear[:3]) + (f" and {len(clear) - 3} more" if len(clear) > 3 else "")
        lines.append(f"{len(clear)} image{'s have' if len(clear) > 1 else ' has'} transparent pixels ({shown}); "
                     f"composited on a {_colour_name(background)} background (--background)")
    return lines


def _colour_name(background) -> str:
    return background if isinstance(background, str) else "rgb" + str(tuple(background))


class ImageDataFolder(ImageFolder):
    """A folder of images as feature data (`--feature-data DIR`) for the methods that take `data=` (the IBA family):
    every image file below it, sorted, as `features.ImageFolder` finds them, but read like the explained
    images (`read_image`, then `loaded.preprocess`: the model's resize, crop and normalization), and an
    unreadable file is skipped with a warning naming it (once) instead of ending the estimation."""

    def __init__(self, path, loaded, *, background=DEFAULT_BACKGROUND, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 batch_size: int = 32):
        super().__init__(path, size=loaded.input_size, mean=loaded.mean, std=loaded.std, batch_size=batch_size)
        self.loaded, self.background, self.max_pixels = loaded, parse_background(background), max_pixels
        self.skipped: dict[str, str] = {}  # file -> why, warned once

    @property
    def cache_key(self) -> str:
        # the folder's listing, plus what else decides the tensors: resize, interpolation, background, limit
        return (f"{super().cache_key}:cli-v1:{self.loaded.resize_size}:{self.loaded.interpolation}:"
                f"bg={self.background}:max={self.max_pixels}")

    def _load(self, path) -> torch.Tensor:
        return self.loaded.preprocess(read_image(path, background=self.background, max_pixels=self.max_pixels))

    def __iter__(self):
        import warnings

        yielded = 0
        for start in range(0, len(self.files), self.batch_size):
            batch = []
            for p in self.files[start:start + self.batch_size]:
                if str(p) in self.skipped:
                    continue
                try:
                    batch.append(self._load(p))
                except Exception as exc:  # noqa: BLE001 - one bad file loses only itself
                    self.skipped[str(p)] = reason = " ".join(str(exc).split()) or type(exc).__name__
                    if str(p) not in reason:
                        reason = f"'{p}': {reason}"
                    warnings.warn(f"data folder '{self.path}': skipped a file, {reason}", stacklevel=2)
            if batch:
                yielded += len(batch)
                yield torch.stack(batch)
        if not yielded:
            raise InputError(f"data folder '{self.path}' has no readable image ({len(self.skipped)} skipped)")


def unique_stems(paths: Sequence[str]) -> list[str]:
    """File stems, made unique with -2, -3 ... so that a/x.jpg and b/x.jpg do not overwrite each other."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        stems.append(stem if n == 1 else f"{stem}-{n}")
    return stems


def takes_data(name: str) -> bool:
    """Whether method `name` estimates feature statistics or trains on images (`data=`), as in the demo
    (`report.demo.takes_data`)."""
    from . import methods as _methods

    return bool(getattr(_methods.get(name), "needs_data", False)) or "data" in _methods.parameters(name)


def feature_data(loaded, folder=None, *, background=DEFAULT_BACKGROUND, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """The `data=` of the IBA-family methods: `folder` read as an ImageDataFolder, or without one the demo's
    default, `features.sample_crops(presets.DEMO_DATA_SIZE, seed=0)` (crops of the bundled photos,
    normalized for the embedded model, so only for a model with the embedded model's preprocessing)."""
    if folder is not None:
        return ImageDataFolder(folder, loaded, background=background, max_pixels=max_pixels)
    from . import features, presets

    return features.sample_crops(presets.DEMO_DATA_SIZE, seed=0, size=loaded.input_size, mean=loaded.mean,
                                 std=loaded.std)


def method_data(names: Sequence[str], loaded, folder=None, *, embedded: bool, background=DEFAULT_BACKGROUND,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[dict, str | None]:
    """({method: data} for the methods among `names` that take `data=`, a note on the default or None).

    With `folder`, every such method gets it as an ImageDataFolder; without, an embedded model gets
    `feature_data`'s default (the bundled crops, as the demo) and a user model is a ConfigError
    (crops normalized for the embedded model would not be the user's distribution)."""
    takers = [n for n in names if takes_data(n)]
    if folder is not None and not takers:
        from . import methods as _methods

        users = ", ".join(n for n in _methods.available() if takes_data(n))
        raise ConfigError(f"--feature-data is feature data for the methods that take data= ({users}); "
                          f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not")
    if not takers:
        return {}, None
    if folder is None and not embedded:
        several = len(takers) > 1
        raise ConfigError(f"method{'s' if several else ''} {', '.join(takers)} estimate{'' if several else 's'} "
                          "feature statistics from images: pass --feature-data DIR, a folder of images like the ones you "
                          "explain (the bundled crops are the default only for the embedded model)")
    data = feature_data(loaded, folder, background=background, max_pixels=max_pixels)
    note = None if folder is not None else (
        f"{', '.join(takers)}: feature statistics from {data!r}, crops of the bundled photos "
        "(--feature-data DIR gives images from your domain)")
    return {n: data for n in takers}, note


# -- explaining -----------------------------------------------------------------------------------
@dataclass
class ImageResult:
    """One image's share of an Explanation."""

    map: torch.Tensor  # (H, W) or (C, H, W), raw
    method: str
    params: dict
    target: int | None
    probability: float | None
    predicted: int | None
    predicted_probability: float | None
    cost: dict = field(default_factory=dict)
    batch_images: int = 1
    layer: object = None  # the layer a layer method used (also when it chose it automatically)


def split_explanation(expl: Explanation) -> list[ImageResult]:
    summary = expl.to_dict()
    probs = expl.probabilities
    soft = expl.outputs.softmax(dim=1) if expl.outputs is not None and expl.outputs.dim() == 2 else None
    results = []
    for i in range(len(expl)):
        pred = int(soft[i].argmax()) if soft is not None else None
        results.append(ImageResult(
            map=expl.maps[i].detach().cpu(),
            method=expl.method,
            params=summary["params"],
            target=None if expl.targets is None else int(expl.targets[i]),
            probability=None if probs is None else float(probs[i]),
            predicted=pred,
            predicted_probability=None if pred is None else float(soft[i, pred]),
            cost=summary["cost"],
            batch_images=len(expl),
            layer=summary.get("layer"),
        ))
    return results


def explain_images(model, method, x: torch.Tensor, target=None, image_ids=None) -> list[ImageResult | Exception]:
    """Explain a batch; if the batch fails, explain image by image so one bad image loses only itself.

    Returns one entry per image: an ImageResult, or the exception that image raised. `image_ids` key
    the random draws of stochastic methods (one id per image), so the retry gives the same maps.
    """
    ids = list(image_ids) if image_ids is not None else list(range(len(x)))
    try:
        return split_explanation(explain(model, x, method, target, image_ids=ids))
    except Exception as exc:  # noqa: BLE001 - isolated per image below
        if len(x) == 1:
            return [exc]
    results: list[ImageResult | Exception] = []
    for i in range(len(x)):
        try:
            results.extend(split_explanation(explain(model, x[i : i + 1], method, target, image_ids=ids[i : i + 1])))
        except Exception as exc:  # noqa: BLE001
            results.append(exc)
    return results


def explain_prepared(model, method, items: Sequence[PreparedImage], target=None, batch_size: int = 8):
    """Explain prepared images `batch_size` at a time; yields, per batch, a list of
    (item, ImageResult or the exception that image raised).

    A batch whose images preprocess to different sizes is explained image by image. Random draws are
    keyed by each image's path, so a map does not depend on the batch it was explained in.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        if len({tuple(it.tensor.shape) for it in chunk}) > 1:  # cannot stack: one at a time
            results = [r for it in chunk for r in explain_images(model, method, it.tensor[None], target, [it.path])]
        else:
            results = explain_images(model, method, torch.stack([it.tensor for it in chunk]), target,
                                     [it.path for it in chunk])
        yield list(zip(chunk, results))


# -- results --------------------------------------------------------------------------------------
def write_result(out_dir: str | os.PathLike, item: PreparedImage, result: ImageResult, loaded,
                 model_name: str | None = None) -> dict[str, Path]:
    """Write <stem>.<method>.png (overlay), .npy (raw float32 map) and .json (the record)."""
    out_dir = Path(out_dir)
    base = out_dir / f"{item.stem}.{result.method}"
    paths = {"png": base.with_name(base.name + ".png"), "npy": base.with_name(base.name + ".npy"),
             "json": base.with_name(base.name + ".json")}
    raw = result.map.numpy().astype(np.float32, copy=False)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(paths["npy"], raw)
        save_png(paths["png"], overlay(item.photo, raw))
        labels = loaded.labels
        record = {
            "image": item.path,
            "model": model_name or loaded.name,
            "method": result.method,
            "params": result.params,
            "layer": result.layer,
            "target": result.target,
            "label": None if result.target is None else label_of(labels, result.target),
            "probability": result.probability,
            "predicted": None if result.predicted is None else {
                "index": result.predicted, "label": label_of(labels, result.predicted),
                "probability": result.predicted_probability},
            "map": {"file": paths["npy"].name, "shape": list(raw.shape), "dtype": "float32",
                    "min": float(raw.min()), "max": float(raw.max())},
            "overlay": paths["png"].name,
            "cost": result.cost,
            "cost_covers_images": result.batch_images,
            "versions": {"saliencylab": __version__, "torch": torch.__version__},
        }
        paths["json"].write_text(json.dumps(record, indent=2, default=repr) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write results to '{out_dir}': {exc.strerror or exc}") from None
    return paths
