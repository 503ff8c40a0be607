"""A Waterbirds-style environment with a known shortcut, generated on the fly and offline.

Waterbirds (Sagawa, Koh, Hashimoto, Liang, "Distributionally robust neural networks for group shifts",
ICLR 2020) pastes CUB birds (landbird / waterbird) onto Places backgrounds (land / water); in training
the background agrees with the bird's class for 95% of the images, so a network can classify by the
background, and the test set is balanced over the four (class, background) groups, so the worst-group
accuracy exposes the shortcut. "Waterbirds-100" (Petryk et al. 2022) raises the agreement to 100%;
the model-guidance study (Rao, Boehle, Parchami-Araghi, Schiele, "Studying how to efficiently and
effectively guide models with explanations", ICCV 2023, sukrutrao/Model-Guidance) trains on it with
bounding boxes of the birds and reports worst-group accuracy and EPG, and "Good teachers explain"
(Parchami-Araghi et al., ECCV 2024) distils on it.

Here nothing is downloaded:
- foreground: scikit-learn's bundled handwritten digits (`load_digits`, 8x8, 1797 images; classes
  `classes=(0, 1)` by default) or our own analytic shapes (`foreground="shapes"`: disc, square,
  triangle, cross, ring); drawn in a random bright colour at a random scale (`scale`, a fraction of the
  image side) and position, fully inside the image;
- background: crops of scikit-image's bundled textures (`grass`, `gravel`, `brick`), each standardised
  to the same mean and contrast and tinted (grass green, gravel grey, brick red), randomly flipped;
- exact ground truth: the object is pasted with a hard alpha (the 8x8 digit is bilinearly resampled
  and thresholded at half ink), so `objects` is exactly the set of object pixels and `boxes` is their
  tight bounding box (x0, y0, x1, y1), exclusive ends.

Groups: in "train" and "val" the label is uniform over the classes and the background is the label's
own background (class k -> background k mod n_backgrounds) with probability `bias`, otherwise uniform
over the other backgrounds; in "test" image i belongs to group i mod (classes x backgrounds), so the
test set is balanced over all (class, background) groups (exactly when n is a multiple of the group
count). `group = label * n_backgrounds + background`.

Determinism: every number of image i comes from a generator keyed by (seed, split, i) (core.randomness),
so `shortcut_data(n=10)` is the first 10 images of `shortcut_data(n=1000)`, and changing `bias` or
`box_fraction` changes only the background choice or the withheld boxes, never the object, its
position or colour. Splits never share images: the digit instances are partitioned among the splits
(3:1:1), and so are the texture rows (top 60% of each texture for train, the next 20% for val, the rest
for test).

`box_fraction` < 1 withholds the annotation of a random share of the images (keyed per image, so a
binomial count): `has_box` is False there, and `boxes` is (0, 0, 0, 0) and `objects` empty, so a loss
that skips images without box pixels skips them (as the authors' code does); `true_boxes` and
`true_objects` keep the ground truth of every image for evaluation.

Learnable object, easier shortcut (docs/training-claims.md): `training.nets.small_cnn` trained on
bias-0.5 data (32 px, 512 images, 30 epochs) reaches 0.98 balanced test accuracy (worst group 0.96);
trained on bias-1.0 data it classifies by the background alone (worst group 0).

Differences from Waterbirds: synthetic 8x8 digits and textures instead of photographs, so the object
is small and simple and the shortcut is colour and texture; classes are balanced (Waterbirds' are
not); the images are small (32-64 px) so that a CPU trains on them in seconds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, InputError
from ..core.randomness import KeyedRandom

SPLITS = ("train", "val", "test")
# Tints multiply the standardised grey texture (mean 0.5): the shortcut is colour plus texture, as
# land vs water is in Waterbirds.
BACKGROUNDS = {"grass": (0.55, 0.95, 0.45), "gravel": (0.8, 0.8, 0.8), "brick": (1.0, 0.55, 0.45)}
SHAPES = ("disc", "square", "triangle", "cross", "ring")
FOREGROUNDS = ("digits", "shapes")
DEFAULT_CLASSES = {"digits": (0, 1), "shapes": ("disc", "cross")}
# Share of digit instances / texture rows per split.
_SPLIT_RANGES = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
_DIGIT_SPLIT = {"train": (0, 1, 2), "val": (3,), "test": (4,)}  # digit instance i goes to split by i % 5
_CROP = 128   # texture pixels per crop side (then resampled to the image size)
_TEX_MEAN, _TEX_STD = 0.5, 0.15
# Uniform numbers drawn per image (columns of the keyed draw).
_U_LABEL, _U_ALIGN, _U_OTHER, _U_INST, _U_CX, _U_CY, _U_FLIP, _U_SCALE, _U_X, _U_Y, _U_BOX = range(11)
_U_COLOUR = 11   # three columns
_N_U = 14

def _import_error(what: str) -> ImportError:
    if what == "sklearn":
        return ImportError("the shortcut environment's digits need scikit-learn (sklearn.datasets.load_digits): "
                           "pip install scikit-learn, or use foreground='shapes'")
    return ImportError("the shortcut environment needs scikit-image for its background textures "
                       "(skimage.data.grass/gravel/brick): pip install scikit-image")


@functools.lru_cache(maxsize=None)
def _texture(name: str, size: int) -> torch.Tensor:
    """(3, H', W') texture at the scale where a _CROP-pixel crop becomes `size` pixels: grey standardised to
    mean 0.5, std 0.15, times the tint, in [0, 1]. Resampled once, so each image's background is a slice."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise _import_error("skimage") from None
    grey = torch.as_tensor(getattr(skdata, name)(), dtype=torch.float32) / 255.0
    grey = ((grey - grey.mean()) / grey.std() * _TEX_STD + _TEX_MEAN).clamp(0, 1)
    tint = torch.tensor(BACKGROUNDS[name], dtype=torch.float32)
    tex = (grey[None] * tint[:, None, None]).clamp(0, 1)
    H, W = tex.shape[1:]
    out = (round(H * size / _CROP), round(W * size / _CROP))
    return F.interpolate(tex[None], size=out, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 8, 8) ink in [0, 1] and (1797,) digit labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _import_error("sklearn") from None
    d = load_digits()
    return torch.as_tensor(d.images, dtype=torch.float32) / 16.0, torch.as_tensor(d.target, dtype=torch.long)


@functools.lru_cache(maxsize=None)
def _digit_pool(digit: int, split: str) -> torch.Tensor:
    """Indices of the instances of `digit` that belong to `split`."""
    _, labels = _digits()
    idx = torch.nonzero(labels == digit).flatten()
    keep = torch.isin(idx % 5, torch.tensor(_DIGIT_SPLIT[split]))
    return idx[keep]


def _shape_ink(names: Sequence[str], u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Ink (0/1) of each image's shape at object coordinates u, v in [-1, 1] (N, S, S)."""
    r = torch.sqrt(u * u + v * v)
    out = torch.zeros_like(u)
    for k, name in enumerate(SHAPES):
        rows = torch.tensor([n == name for n in names])
        if not rows.any():
            continue
        uu, vv, rr = u[rows], v[rows], r[rows]
        if name == "disc":
            ink = rr <= 0.95
        elif name == "square":
            ink = (uu.abs() <= 0.8) & (vv.abs() <= 0.8)
        elif name == "triangle":   # apex up, base at v = 0.85
            ink = (vv <= 0.85) & (vv >= -0.95) & (uu.abs() <= (vv + 0.95) / 1.8 * 0.95)
        elif name == "cross":
            ink = ((uu.abs() <= 0.3) | (vv.abs() <= 0.3)) & (uu.abs() <= 0.95) & (vv.abs() <= 0.95)
        else:  # ring
            ink = (rr <= 0.95) & (rr >= 0.55)
        out[rows] = ink.to(out.dtype)
    return out


@dataclass
class ShortcutData:
    """Images with labels, backgrounds, groups and exact object boxes and masks (see the module docstring).

    `boxes` (N, 4) float (x0, y0, x1, y1) pixels, exclusive ends; (0, 0, 0, 0) where `has_box` is False.
    `objects` (N, S, S) bool, empty where `has_box` is False; `true_boxes` / `true_objects` always hold
    the ground truth. `index` (N,) the keys the images were generated from. `bias` is the argument given
    (the test split ignores it: it is balanced).
    """

    images: torch.Tensor
    labels: torch.Tensor
    backgrounds: torch.Tensor
    groups: torch.Tensor
    boxes: torch.Tensor
    has_box: torch.Tensor
    objects: torch.Tensor
    true_boxes: torch.Tensor
    true_objects: torch.Tensor
    index: torch.Tensor
    num_classes: int = 2
    class_names: tuple = ()
    background_names: tuple = ()
    split: str = "train"
    bias: float = 0.0
    seed: int = 0

    _ROWS = ("images", "labels", "backgrounds", "groups", "boxes", "has_box", "objects", "true_boxes",
             "true_objects", "index")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_backgrounds(self) -> int:
        return len(self.background_names)

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.num_backgrounds

    def subset(self, idx) -> "ShortcutData":
        """The rows `idx` (indices, a slice or a boolean mask) as a new ShortcutData."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx)
            if idx.dtype == torch.bool:
                if idx.shape != (len(self),):
                    raise InputError(f"a boolean subset needs {len(self)} entries, got {tuple(idx.shape)}")
                idx = torch.nonzero(idx).flatten()
            idx = idx.long().flatten()
            if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
                raise InputError(f"subset indices must lie in [0, {len(self)}), got {int(idx.min())}..{int(idx.max())}")
        rows = {f: getattr(self, f)[idx] for f in self._ROWS}
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in rows}
        return ShortcutData(**rows, **rest)

    def to(self, device) -> "ShortcutData":
        rows = {f: getattr(self, f).to(device) for f in self._ROWS}
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in rows}
        return ShortcutData(**rows, **rest)


def _check(split, n, size, bias, foreground, backgrounds, box_fraction, classes, scale):
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ConfigError(f"size must be an integer >= 16 pixels, got {size!r}")
    if isinstance(bias, bool) or not (isinstance(bias, (int, float)) and 0.0 <= bias <= 1.0):
        raise ConfigError(f"bias must lie in [0, 1], got {bias!r}")
    if isinstance(box_fraction, bool) or not (isinstance(box_fraction, (int, float)) and 0.0 <= box_fraction <= 1.0):
        raise ConfigError(f"box_fraction must lie in [0, 1], got {box_fraction!r}")
    if foreground not in FOREGROUNDS:
        raise ConfigError(f"foreground must be one of {', '.join(FOREGROUNDS)}, got '{foreground}'")
    backgrounds = (backgrounds,) if isinstance(backgrounds, str) else tuple(backgrounds)
    bad = [b for b in backgrounds if b not in BACKGROUNDS]
    if bad or len(backgrounds) < 2 or len(set(backgrounds)) != len(backgrounds):
        raise ConfigError(f"backgrounds must be at least two distinct names of {', '.join(BACKGROUNDS)}, "
                          f"got {backgrounds!r}")
    classes = DEFAULT_CLASSES[foreground] if classes is None else tuple(classes)
    valid = tuple(range(10)) if foreground == "digits" else SHAPES
    if len(classes) < 2 or len(set(classes)) != len(classes) or any(c not in valid for c in classes):
        raise ConfigError(f"classes must be at least two distinct {'digits 0-9' if foreground == 'digits' else 'shapes of ' + ', '.join(SHAPES)}, "
                          f"got {classes!r}")
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        lo, hi = math.nan, math.nan
    if not 0.1 <= lo <= hi <= 0.9:
        raise ConfigError(f"scale must be (low, high) with 0.1 <= low <= high <= 0.9 of the image side, got {scale!r}")
    return backgrounds, classes, (lo, hi)


def shortcut_data(split: str = "train", n: int = 512, size: int = 64, bias: float = 0.95, seed: int = 0,
                  foreground: str = "digits", backgrounds: Sequence[str] = ("grass", "brick"),
                  box_fraction: float = 1.0, *, classes: Sequence | None = None,
                  scale: tuple[float, float] = (0.45, 0.7), start: int = 0) -> ShortcutData:
    """`n` images of `split` (keys `start` .. `start + n - 1`); see the module docstring.

    `classes`: digits (default (0, 1)) or shape names (default ("disc", "cross")); `scale`: the object's
    side as a fraction of the image side (uniform in the range).
    """
    backgrounds, classes, (s_lo, s_hi) = _check(split, n, size, bias, foreground, backgrounds, box_fraction,
                                                classes, scale)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"start must be a non-negative integer, got {start!r}")
    C, B, S = len(classes), len(backgrounds), size
    index = torch.arange(start, start + n)
    u = KeyedRandom(seed, f"envs.shortcut/{split}").uniform(index, torch.zeros_like(index), (_N_U,))
    u = u.to(torch.float64)

    # labels, backgrounds, groups
    if split == "test":
        group = index % (C * B)
        labels, bg = group // B, group % B
    else:
        labels = (u[:, _U_LABEL] * C).long().clamp_max(C - 1)
        own = labels % B
        other = (u[:, _U_OTHER] * (B - 1)).long().clamp_max(B - 2)
        other = other + (other >= own).long()          # uniform over the backgrounds except its own
        bg = torch.where(u[:, _U_ALIGN] < bias, own, other)
    groups = labels * B + bg

    # backgrounds: an S x S slice of the split's rows of each (resampled) texture, random flips
    lo, hi = _SPLIT_RANGES[split]
    back = torch.empty(n, 3, S, S)
    for name_i, name in enumerate(backgrounds):
        rows = torch.nonzero(bg == name_i).flatten()
        if rows.numel() == 0:
            continue
        tex = _texture(name, S)
        H, W = tex.shape[1:]
        y_lo, y_hi = int(lo * H), int(hi * H) - S
        ys = (y_lo + u[rows, _U_CY] * (y_hi - y_lo + 1)).long().clamp_max(y_hi)
        xs = (u[rows, _U_CX] * (W - S + 1)).long().clamp_max(W - S)
        for r, y, x in zip(rows.tolist(), ys.tolist(), xs.tolist()):   # per-image slicing only
            back[r] = tex[:, y:y + S, x:x + S]
    flips = (u[:, _U_FLIP] * 4).long()
    back = torch.where((flips % 2 == 1)[:, None, None, None], back.flip(-1), back)
    back = torch.where((flips // 2 == 1)[:, None, None, None], back.flip(-2), back)

    # object placement: side in pixels, top-left so that it lies inside the image
    side = (s_lo + (s_hi - s_lo) * u[:, _U_SCALE]) * S
    x0 = u[:, _U_X] * (S - side)
    y0 = u[:, _U_Y] * (S - side)
    centre = torch.arange(S, dtype=torch.float64) + 0.5                 # pixel centres
    # object coordinates in [-1, 1] over the object's square (align_corners=False convention)
    ou = ((centre[None, None, :] - x0[:, None, None]) / side[:, None, None]) * 2 - 1   # (N, 1, S)
    ov = ((centre[None, :, None] - y0[:, None, None]) / side[:, None, None]) * 2 - 1   # (N, S, 1)
    ou, ov = ou.expand(n, S, S), ov.expand(n, S, S)
    if foreground == "digits":
        ink8, _ = _digits()
        inst = torch.empty(n, dtype=torch.long)
        for k, digit in enumerate(classes):
            rows = torch.nonzero(labels == k).flatten()
            pool = _digit_pool(int(digit), split)
            inst[rows] = pool[(u[rows, _U_INST] * len(pool)).long().clamp_max(len(pool) - 1)]
        grid = torch.stack([ou, ov], -1).to(torch.float32)
        ink = F.grid_sample(ink8[inst][:, None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[:, 0]
    else:
        ink = _shape_ink([classes[k] for k in labels.tolist()], ou, ov)
    objects = ink >= 0.5

    colour = (0.75 + 0.25 * u[:, _U_COLOUR:_U_COLOUR + 3]).to(torch.float32)   # bright, any hue
    images = torch.where(objects[:, None], colour[:, :, None, None], back).contiguous()

    # tight boxes of the object pixels, exclusive ends
    rows_any, cols_any = objects.any(2), objects.any(1)                  # (N, S) over y, over x
    ar = torch.arange(S)
    big = torch.full_like(ar, S)
    y0b = torch.where(rows_any, ar, big).amin(1)
    y1b = torch.where(rows_any, ar + 1, torch.zeros_like(ar)).amax(1)
    x0b = torch.where(cols_any, ar, big).amin(1)
    x1b = torch.where(cols_any, ar + 1, torch.zeros_like(ar)).amax(1)
    if not bool(objects.flatten(1).any(1).all()):   # cannot happen for scale >= 0.1 and size >= 16
        raise InputError("an object vanished at this size and scale; use a larger size or scale")
    true_boxes = torch.stack([x0b, y0b, x1b, y1b], 1).to(torch.float32)
    has_box = u[:, _U_BOX] < box_fraction
    boxes = torch.where(has_box[:, None], true_boxes, torch.zeros_like(true_boxes))
    masked_objects = objects & has_box[:, None, None]

    return ShortcutData(images=images, labels=labels, backgrounds=bg, groups=groups, boxes=boxes, has_box=has_box,
                        objects=masked_objects, true_boxes=true_boxes, true_objects=objects, index=index,
                        num_classes=C, class_names=tuple(str(c) for c in classes), background_names=backgrounds,
                        split=split, bias=float(bias), seed=int(seed))


def _predicted(predictions, n: int) -> torch.Tensor:
    p = torch.as_tensor(predictions)
    if p.dim() == 2:
        p = p.argmax(1)
    if p.dim() != 1 or p.shape[0] != n:
        raise InputError(f"predictions must be (N,) classes or (N, C) scores for N={n} labels, got {tuple(p.shape)}")
    return p.long()


def group_accuracies(predictions, labels, groups) -> dict:
    """{group: accuracy} over the groups present; `predictions` are (N,) classes or (N, C) scores."""
    labels = torch.as_tensor(labels).long().flatten().cpu()
    groups = torch.as_tensor(groups).long().flatten().cpu()
    if labels.shape != groups.shape:
        raise InputError(f"labels and groups must have the same length, got {labels.numel()} and {groups.numel()}")
    if labels.numel() == 0:
        raise InputError("no predictions to score")
    correct = (_predicted(predictions, labels.numel()).cpu() == labels).to(torch.float64)
    present = torch.unique(groups)
    total = torch.zeros(int(present.max()) + 1, dtype=torch.float64).index_add_(0, groups, correct)
    count = torch.zeros_like(total).index_add_(0, groups, torch.ones_like(correct))
    return {int(g): float(total[g] / count[g]) for g in present.tolist()}


def worst_group_accuracy(predictions, labels, groups) -> float:
    """The lowest accuracy over the groups present (Sagawa et al.'s worst-group accuracy)."""
    return min(group_accuracies(predictions, labels, groups).values())
