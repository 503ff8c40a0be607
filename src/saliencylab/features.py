"""Feature statistics at a named layer: what the information-bottleneck (IBA) methods compare against.

IBA replaces a layer's output R by Z = lambda * R + (1 - lambda) * eps with eps ~ N(mean, std^2), where
mean and std are per-element statistics of R over a data set. This module estimates them once and keeps
them on disk, so that every later explanation of the same model at the same layer reuses them.

- Estimation is batched: each batch runs the model only up to the layer (a session hook captures the
  output and raises an exception that stops the forward pass), and sums of values, of squares (float64)
  and of non-zero counts are accumulated per element. Nothing runs per sample in Python.
- Statistics are saved under the cache folder ($SALIENCYLAB_CACHE, default ~/.cache/saliencylab) in
  `features/<model fingerprint>/<layer>--<data key>.pt`, a small file (three tensors of the layer's
  shape). The model fingerprint hashes the model's class and parameter values; the data key names the
  data source (folder listing, tensor content, crop settings), so different data never collide.
- Data sources: a folder of images (str or Path: every image file below it, resized and centre-cropped),
  a tensor of images (N, C, H, W), an iterable of batches (tensors, or tuples/lists/dicts whose first
  entry / "input" / "image" is the image tensor), or `sample_crops(n, seed)`.

`sample_crops` draws augmented crops of the five bundled photos, preprocessed for the embedded model.
It is a stand-in, documented as such: five photos are not ImageNet, and statistics from their crops
are narrower than statistics over the model's training distribution. Use a folder of real images from
your domain whenever you have one.

>>> from saliencylab import features
>>> stats = features.feature_stats(model, "blocks.4", features.sample_crops(1000, seed=0))
>>> stats.mean.shape, stats.n          # (torch.Size([40, 28, 28]), 1000)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .core.progress import progress
from .core.errors import ConfigError, InputError
from .core.layers import get_layer
from .core.session import ModelSession, model_device

__all__ = [
    "FeatureStats", "feature_stats", "estimate", "capture", "sample_crops", "SampleCrops", "ImageFolder",
    "batches", "model_fingerprint", "cache_dir", "OUTPUT", "module_for",
]

# The model's own output, usable wherever a layer name is expected (the readout bottleneck reads it).
OUTPUT = "<output>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_FORMAT = 1  # bump when the saved statistics change meaning


class _StopForward(Exception):
    """Raised from a session hook once every requested layer has produced its output."""


# -- statistics ---------------------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """Per-element statistics of one layer's output over a data source.

    mean, std: tensors of the layer's output shape without the batch dimension (std is the sample
    standard deviation, not floored; see `floored_std`). nonzero: the fraction of samples in which each
    element was non-zero (IBA's active neurons are those above 1%).
    """

    layer: str
    mean: torch.Tensor
    std: torch.Tensor
    nonzero: torch.Tensor
    n: int
    model_key: str = ""
    data_key: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def active(self, threshold: float = 0.01) -> torch.Tensor:
        """Boolean mask of active elements: non-zero in more than `threshold` of the samples."""
        return self.nonzero > threshold

    def floored_std(self, min_std: float = 0.01) -> torch.Tensor:
        """The standard deviation floored at `min_std` (IBA's default 0.01), never zero."""
        return self.std.clamp_min(min_std)

    def to(self, device) -> "FeatureStats":
        return FeatureStats(self.layer, self.mean.to(device), self.std.to(device), self.nonzero.to(device),
                            self.n, self.model_key, self.data_key, dict(self.meta))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        torch.save({"format": _FORMAT, "layer": self.layer, "mean": self.mean.cpu(), "std": self.std.cpu(),
                    "nonzero": self.nonzero.cpu(), "n": int(self.n), "model_key": self.model_key,
                    "data_key": self.data_key}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        try:
            d = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file is reported, not trusted
            raise InputError(f"cannot read feature statistics '{path}': {type(exc).__name__}: {exc}") from exc
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise InputError(f"'{path}' is not a saliencylab feature-statistics file (format {_FORMAT})")
        return cls(d["layer"], d["mean"], d["std"], d["nonzero"], int(d["n"]), d.get("model_key", ""),
                   d.get("data_key", ""))


class _Accumulator:
    """Sums of x, x^2 (float64) and non-zero counts per element; one vectorized update per batch."""

    def __init__(self):
        self.n = 0
        self.s1 = self.s2 = self.nz = None

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()
        if self.s1 is None:
            shape = t.shape[1:]
            self.s1 = torch.zeros(shape, dtype=torch.float64, device=t.device)
            self.s2 = torch.zeros(shape, dtype=torch.float64, device=t.device)
            self.nz = torch.zeros(shape, dtype=torch.float64, device=t.device)
        elif t.shape[1:] != self.s1.shape:
            raise InputError(f"layer output changed shape from {tuple(self.s1.shape)} to {tuple(t.shape[1:])} "
                             "between batches; feature statistics need images of one size")
        d = t.to(torch.float64)
        self.s1 += d.sum(0)
        self.s2 += (d * d).sum(0)
        self.nz += (t != 0).sum(0, dtype=torch.float64)
        self.n += int(t.shape[0])

    def result(self, layer: str, dtype: torch.dtype) -> FeatureStats:
        if self.n == 0:
            raise ConfigError("the data source yielded no images; feature statistics need at least one batch")
        mean = self.s1 / self.n
        if self.n > 1:
            var = ((self.s2 - self.n * mean * mean) / (self.n - 1)).clamp_min(0.0)
        else:
            var = torch.zeros_like(mean)
        return FeatureStats(layer, mean.to(dtype), var.sqrt().to(dtype), (self.nz / self.n).to(dtype), self.n)


# -- running the model up to a layer ------------------------------------------------------------------
def module_for(model: nn.Module, name: str) -> nn.Module:
    """The module a layer name refers to; `OUTPUT` is the model itself (its output)."""
    return model if name == OUTPUT else get_layer(model, name)


def capture(session: ModelSession, x: torch.Tensor, names: Sequence[str], *, grad: bool = False) -> dict:
    """Outputs of the named layers for a batch, running the model only as far as the last of them.

    One counted forward pass (stopped early unless `OUTPUT` is asked for). Returns {name: tensor}.
    """
    names = list(dict.fromkeys(names))
    store: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"layer '{name}' returns a {type(output).__name__}, not a tensor; "
                                  "choose a layer whose output is a feature map")
            if name in store:
                raise ConfigError(f"layer '{name}' runs more than once per forward pass; choose a layer "
                                  "that runs once (a module reused in several places cannot be hooked by name)")
            store[name] = output
            if len(store) == len(names):
                raise _StopForward

        return hook

    with session.scope():  # the capturing hooks are session edits, gone when this returns or raises
        for name in names:
            session.hook(module_for(session.model, name), make(name), "forward")
        with torch.set_grad_enabled(grad):
            try:
                session.forward(x)
            except _StopForward:
                pass
    missing = [n for n in names if n not in store]
    if missing:
        raise ConfigError(f"layer {', '.join(map(repr, missing))} did not run during the forward pass; "
                          "choose a layer the model uses")
    return store


def estimate(session_or_model, layers: str | Sequence[str], data, *, n_samples: int | None = None,
             batch_size: int = 32, size=None, desc: str = "feature statistics"):
    """Estimate statistics of one or several layers over a data source (no caching; see feature_stats).

    Returns a FeatureStats for a single layer name, or {name: FeatureStats} for a list.
    """
    single = isinstance(layers, str)
    names = [layers] if single else list(layers)
    if isinstance(session_or_model, ModelSession):
        result = _estimate(session_or_model, names, data, n_samples, batch_size, size, desc)
    else:
        with ModelSession(session_or_model) as session:
            result = _estimate(session, names, data, n_samples, batch_size, size, desc)
    return result[names[0]] if single else result


def _estimate(session, names, data, n_samples, batch_size, size, desc) -> dict[str, FeatureStats]:
    source = batches(data, size=size, model=session.model, batch_size=batch_size)
    accs = {n: _Accumulator() for n in names}
    dtype = torch.float32
    seen = 0
    for batch in progress(source, desc=desc, unit="batch"):
        if n_samples is not None and seen >= n_samples:
            break
        if n_samples is not None:
            batch = batch[: n_samples - seen]
        batch = batch.to(session.device)
        dtype = batch.dtype if batch.is_floating_point() else dtype
        for start in range(0, len(batch), batch_size):
            chunk = batch[start:start + batch_size]
            outs = capture(session, chunk, names)
            for n in names:
                accs[n].add(outs[n])
        seen += len(batch)
    return {n: accs[n].result(n, dtype) for n in names}


def feature_stats(model: nn.Module, layers: str | Sequence[str], data, *, session: ModelSession | None = None,
                  cache: bool = True, n_samples: int | None = None, batch_size: int = 32, size=None):
    """Statistics of one or several layers over `data`, loaded from the cache or estimated once and saved.

    `data`: a folder path, a tensor (N, C, H, W), `sample_crops(...)`, an iterable of batches, or
    FeatureStats (returned as they are). Sources without a stable identity (plain generators, data
    loaders without a `cache_key` attribute) are estimated every time and not saved. `size` is the
    (H, W) to which folder images are cropped (default 224).
    """
    single = isinstance(layers, str)
    names = [layers] if single else list(layers)
    if isinstance(data, FeatureStats) or (isinstance(data, dict) and data and
                                          all(isinstance(v, FeatureStats) for v in data.values())):
        found = {data.layer: data} if isinstance(data, FeatureStats) else dict(data)
        missing = [n for n in names if n not in found]
        if missing:
            raise ConfigError(f"the feature statistics given are for layer(s) {', '.join(found)}, "
                              f"not {', '.join(missing)}")
        return found[names[0]] if single else {n: found[n] for n in names}

    with (ModelSession(model) if session is None else contextlib.nullcontext(session)) as session:
        key = data_key(data, size=size, model=model) if cache else None
        result: dict[str, FeatureStats] = {}
        paths = {}
        if key is not None:
            mkey = model_fingerprint(model)
            for n in names:
                paths[n] = _stats_path(mkey, n, key, n_samples)
                if paths[n].exists():
                    try:
                        result[n] = FeatureStats.load(paths[n])
                    except InputError:
                        pass  # unreadable cache entries are recomputed and overwritten
        todo = [n for n in names if n not in result]
        if todo:
            fresh = _estimate(session, todo, data, n_samples, batch_size, size, "feature statistics")
            for n, st in fresh.items():
                if key is not None:
                    st.model_key, st.data_key = model_fingerprint(model), key
                    try:
                        st.save(paths[n])
                    except OSError:
                        pass  # a read-only cache only costs a re-estimation next time
                result[n] = st
        device = model_device(model)
        result = {n: result[n].to(device) for n in names}
    return result[names[0]] if single else result


# -- cache --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """$SALIENCYLAB_CACHE, or ~/.cache/saliencylab."""
    env = os.environ.get("SALIENCYLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saliencylab"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "layer"


def _stats_path(model_key: str, layer: str, data_key_: str, n_samples) -> Path:
    dk = hashlib.sha1(f"{data_key_}|n={n_samples}".encode()).hexdigest()[:16]
    return cache_dir() / "features" / model_key[:20] / f"{_safe(layer)}--{dk}.pt"


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and parameter/buffer values (a strided sample of each tensor)."""
    h = hashlib.sha1(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // 2048)
            sample = flat[::step].to("cpu", torch.float64 if t.is_floating_point() else torch.int64)
            h.update(sample.numpy().tobytes())
            if t.is_floating_point():
                h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()


def _tensor_key(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{tuple(t.shape)}:{t.dtype}".encode())
    flat = t.reshape(-1)
    if flat.numel() * flat.element_size() <= 64 * 2**20:
        h.update(flat.numpy().tobytes() if flat.dtype != torch.bfloat16 else flat.float().numpy().tobytes())
    else:  # large tensors: a strided sample plus exact sums
        h.update(flat[:: max(1, flat.numel() // 2**20)].float().numpy().tobytes())
        h.update(np.float64(flat.double().sum().item()).tobytes())
        h.update(np.float64((flat.double() ** 2).sum().item()).tobytes())
    return "tensor:" + h.hexdigest()


def data_key(data, *, size=None, model=None) -> str | None:
    """A stable identity for a data source, or None when it has none (then nothing is cached)."""
    if isinstance(data, torch.Tensor):
        return _tensor_key(data)
    if isinstance(data, (str, os.PathLike)):
        return ImageFolder(data, **_folder_defaults(size, model)).cache_key
    key = getattr(data, "cache_key", None)
    return str(key) if key is not None else None


# -- data sources -------------------------------------------------------------------------------------
def _folder_defaults(size, model) -> dict:
    """Preprocessing for a plain folder path: the explained images' size, the model's normalization."""
    from .models import LITE_MEAN, LITE_STD
    from .models.efficientnet_lite import EfficientNetLite

    lite = model is not None and any(isinstance(m, EfficientNetLite) for m in model.modules())
    return {"size": size if size is not None else 224,
            "mean": LITE_MEAN if lite else IMAGENET_MEAN, "std": LITE_STD if lite else IMAGENET_STD}


def _normalize(arr: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


class ImageFolder:
    """Every image file below `path` (sorted), resized so the crop covers 87.5% of the shorter side,
    centre-cropped to `size` and normalized with `mean`/`std`; iterates batches of `batch_size`."""

    def __init__(self, path, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 32):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ConfigError(f"data folder '{self.path}' does not exist")
        if not self.path.is_dir():
            raise ConfigError(f"data '{self.path}' is a file; pass a folder of images, a tensor or batches")
        self.files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"data folder '{self.path}' contains no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.size, self.mean, self.std, self.batch_size = _hw(size), tuple(mean), tuple(std), int(batch_size)

    @property
    def cache_key(self) -> str:
        h = hashlib.sha1(str(self.path.resolve()).encode())
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"folder:{h.hexdigest()}:{self.size}:{self.mean}:{self.std}"

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.path)!r}, size={self.size}, {len(self.files)} images)"

    def _load(self, path) -> torch.Tensor:
        from PIL import Image

        from .images import open_image

        im = open_image(path)
        H, W = self.size
        w, h = im.size
        scale = max(H, W) / 0.875 / min(w, h)
        im = im.resize((max(W, round(w * scale)), max(H, round(h * scale))), Image.BICUBIC)
        left, top = (im.size[0] - W) // 2, (im.size[1] - H) // 2
        return _normalize(np.asarray(im.crop((left, top, left + W, top + H))), self.mean, self.std)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.files), self.batch_size):
            yield torch.stack([self._load(p) for p in self.files[start:start + self.batch_size]])


class SampleCrops:
    """Augmented random crops of the bundled photos; see `sample_crops`. Re-iterable and deterministic."""

    def __init__(self, n: int = 1000, seed: int = 0, *, size=224, batch_size: int = 32,
                 scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), jitter: float = 0.3, mean=None, std=None):
        from .models import LITE_MEAN, LITE_STD

        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be a positive int, got {n!r}")
        self.n, self.seed, self.size, self.batch_size = n, int(seed), _hw(size), int(batch_size)
        self.scale, self.ratio, self.jitter = tuple(scale), tuple(ratio), float(jitter)
        self.mean = tuple(mean) if mean is not None else LITE_MEAN
        self.std = tuple(std) if std is not None else LITE_STD

    @property
    def cache_key(self) -> str:
        return (f"sample_crops:v1:n={self.n}:seed={self.seed}:size={self.size}:scale={self.scale}:"
                f"ratio={self.ratio}:jitter={self.jitter}:mean={self.mean}:std={self.std}")

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"sample_crops(n={self.n}, seed={self.seed})"

    def __iter__(self) -> Iterator[torch.Tensor]:
        from PIL import Image, ImageEnhance

        from .images import samples

        photos = [p.image for p in samples().values()]
        rng = np.random.default_rng(self.seed)
        H, W = self.size
        batch = []
        for _ in range(self.n):
            im = photos[int(rng.integers(len(photos)))]
            w, h = im.size
            area = w * h * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw = int(min(w, round(math.sqrt(area * aspect))))
            ch = int(min(h, round(math.sqrt(area / aspect))))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = im.crop((left, top, left + cw, top + ch)).resize((W, H), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                crop = enhancer(crop).enhance(float(rng.uniform(1 - self.jitter, 1 + self.jitter)))
            batch.append(_normalize(np.asarray(crop), self.mean, self.std))
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)


def sample_crops(n: int = 1000, seed: int = 0, **kwargs) -> SampleCrops:
    """`n` augmented crops of the five bundled photos (random resized crop covering 25-100% of a photo,
    horizontal flip, brightness/contrast/saturation jitter of +-30%), 224x224, normalized for the embedded
    EfficientNet-Lite0. Deterministic for a seed; generated lazily in batches of 32.

    A stand-in so that the embedded demo works without a data set: for real use, estimate feature
    statistics on a folder of images from the distribution you explain.
    """
    return SampleCrops(n, seed, **kwargs)


def batches(data, *, size=None, model: nn.Module | None = None, batch_size: int = 32) -> Iterable[torch.Tensor]:
    """Turn a data source into an iterable of image tensors (B, C, H, W)."""
    if data is None:
        raise ConfigError("no data source given")
    if isinstance(data, (str, os.PathLike)):
        return ImageFolder(data, batch_size=batch_size, **_folder_defaults(size, model))
    if isinstance(data, torch.Tensor):
        if data.dim() == 3:
            data = data.unsqueeze(0)
        if data.dim() != 4 or not data.is_floating_point():
            raise InputError(f"data tensor must be float images (N, C, H, W), got {tuple(data.shape)} {data.dtype}")
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    if isinstance(data, (ImageFolder, SampleCrops)):
        return data
    try:
        iter(data)
    except TypeError:
        raise ConfigError(
            f"data must be a folder path, a tensor of images, sample_crops(...) or an iterable of batches, "
            f"got {type(data).__name__}") from None
    return _TensorBatches(data)


class _TensorBatches:
    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        for item in self.inner:
            if isinstance(item, (tuple, list)) and item:
                item = item[0]
            elif isinstance(item, dict):
                item = next((item[k] for k in ("input", "image", "images", "pixel_values") if k in item), None)
            if not isinstance(item, torch.Tensor) or item.dim() not in (3, 4) or not item.is_floating_point():
                raise InputError("each batch must be a float image tensor (B, C, H, W), a tuple/list whose first "
                                 "entry is one, or a dict with an 'input' or 'image' entry")
            yield item.unsqueeze(0) if item.dim() == 3 else item


def is_one_shot(data) -> bool:
    """True for iterators that can be consumed only once (generators)."""
    if isinstance(data, (str, os.PathLike, torch.Tensor, ImageFolder, SampleCrops, FeatureStats)):
        return False
    try:
        return iter(data) is data
    except TypeError:
        return False
