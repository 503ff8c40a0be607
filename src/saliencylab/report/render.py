"""Display helpers: turn raw attribution maps into pictures.

Normalization happens here and only here, for display. Maps everywhere else keep their raw sign and
scale. Signed maps (with negative values) are shown with a diverging colormap centred on zero and
scaled by a high percentile of |map|; non-negative maps with a sequential colormap, stretched between
a low and a high percentile. Percentiles rather than min/max, so a few extreme pixels do not wash out
the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps  # colormaps only: no pyplot, so the user's backend is left alone
from PIL import Image

__all__ = ["display_values", "to_display", "overlay", "save_png", "denormalize", "to_numpy_map",
           "SIGNED_CMAP", "POSITIVE_CMAP"]

SIGNED_CMAP = "RdBu_r"  # blue = negative, white = 0, red = positive
POSITIVE_CMAP = "inferno"
PERCENTILE = 99.5


def to_numpy_map(map) -> np.ndarray:
    """A (H, W) float64 array from a tensor or array; (C, H, W) is summed over channels."""
    if hasattr(map, "detach"):  # torch tensor, without importing torch here
        map = map.detach().cpu().numpy()
    arr = np.asarray(map, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr.sum(axis=0)
    if arr.ndim != 2:
        raise ValueError(f"a map to display must have shape (H, W) or (C, H, W), got {arr.shape}")
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)


def display_values(map, percentile: float = PERCENTILE, signed: bool | None = None) -> tuple[np.ndarray, bool]:
    """Scale a map for display: values in [-1, 1] (signed) or [0, 1] (non-negative), and which.

    Signed maps are divided by the `percentile` of |map|, so 0 stays exactly 0 and +x / -x get the
    same magnitude. Non-negative maps are stretched between their (100 - `percentile`) and
    `percentile` percentiles, so a constant offset (RISE, bottleneck capacities) does not hide the
    structure. `signed=None` decides from the data (any negative value means signed).
    """
    arr = to_numpy_map(map)
    if signed is None:
        signed = bool((arr < 0).any())
    if arr.size == 0:
        return arr, signed
    if signed:
        magnitude = np.abs(arr)
        scale = float(np.percentile(magnitude, percentile))
        if scale <= 0.0:  # sparse maps: fall back to the largest value
            scale = float(magnitude.max())
        if scale <= 0.0:
            return np.zeros_like(arr), signed
        return np.clip(arr / scale, -1.0, 1.0), signed
    low, high = (float(v) for v in np.percentile(arr, [100.0 - percentile, percentile]))
    low = max(low, 0.0)
    if high <= low:  # sparse maps: fall back to the largest value
        high = float(arr.max())
    if high <= low:  # constant: nothing to show
        return np.zeros_like(arr), signed
    return np.clip((arr - low) / (high - low), 0.0, 1.0), signed


def to_display(map, percentile: float = PERCENTILE, signed: bool | None = None,
               cmap: str | None = None) -> np.ndarray:
    """A map as a uint8 RGB picture (H, W, 3): diverging colormap around 0 if signed, else sequential."""
    values, signed = display_values(map, percentile, signed)
    return _colorize(values, signed, cmap)


def _colorize(values: np.ndarray, signed: bool, cmap: str | None) -> np.ndarray:
    colormap = colormaps[cmap or (SIGNED_CMAP if signed else POSITIVE_CMAP)]
    unit = (values + 1.0) / 2.0 if signed else values  # signed: 0 -> 0.5, the colormap centre
    rgba = colormap(unit, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def overlay(image, map, alpha: float = 0.85, percentile: float = PERCENTILE,
            signed: bool | None = None, cmap: str | None = None, mute: float = 0.6) -> np.ndarray:
    """The map's heatmap blended over a photo (H, W, 3) uint8; returns uint8 RGB at the photo's size.

    Blending is per pixel: strong attributions cover the photo with up to `alpha` of their colour,
    weak ones let the photo show through. The photo is muted (`mute` = 0: as is, 1: flat grey
    luminance at half contrast) so that fine-grained maps stay visible over a colourful photo.
    """
    photo = _as_rgb_uint8(image)
    values, signed = display_values(map, percentile, signed)
    heat = _colorize(values, signed, cmap).astype(np.float32)
    strength = np.abs(values).astype(np.float32)
    if heat.shape[:2] != photo.shape[:2]:
        size = (photo.shape[1], photo.shape[0])
        heat = np.asarray(Image.fromarray(heat.astype(np.uint8)).resize(size, Image.BILINEAR), np.float32)
        strength = np.asarray(Image.fromarray(strength, mode="F").resize(size, Image.BILINEAR), np.float32)
    weight = (alpha * np.sqrt(np.clip(strength, 0.0, 1.0)))[..., None]
    out = _muted(photo, mute) * (1.0 - weight) + heat * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _muted(photo: np.ndarray, mute: float) -> np.ndarray:
    """The photo blended towards a low-contrast grey version of itself."""
    rgb = photo.astype(np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    flat = (0.5 * grey + 0.25 * 255.0)[..., None]  # half contrast around mid-grey
    return rgb * (1.0 - mute) + flat * mute


def save_png(path: str | os.PathLike, array) -> Path:
    """Write an (H, W, 3) / (H, W) uint8 array (or floats in [0, 1]) as a PNG; creates the folder."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")
    return path


def denormalize(x, mean, std) -> np.ndarray:
    """A normalized image tensor/array (3, H, W) back to an (H, W, 3) uint8 photo."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"denormalize expects a (3, H, W) image, got shape {arr.shape}")
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    unit = arr * std + mean
    if unit.shape[0] == 1:
        unit = np.repeat(unit, 3, axis=0)
    return np.clip(np.rint(unit.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def _as_rgb_uint8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"the photo must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"the photo must have shape (H, W, 3), got {arr.shape}")
    return arr
