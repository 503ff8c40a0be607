"""Training runs with explanation losses: `fit` (guidance, distillation), `evaluate_model`, the data adapter.

`fit(model, train, val, guidance=dict(loss="energy", ...))` trains with cross-entropy plus
`weight * saliencylab.training.guidance_loss(...)` on the images that have a box, or with
`saliencylab.training.distillation_loss(...)` when `distill=dict(teacher=...)` is given. With `out_dir`
it writes, after every epoch, a checkpoint (model, optimiser, random state, epoch, the metrics so far;
written to a temporary file, then renamed), `metrics.csv` and `metrics.json` (rewritten from the
checkpoint's history, so a row is never duplicated or lost), and at the end `model.pt` and the HTML
report `report.html` (`saliencylab.report.training`). Calling `fit` again with the same `out_dir`
resumes from the last checkpoint; the result is the same, to the bit, as an uninterrupted run,
because each epoch's shuffle and random state are keyed by (seed, epoch) alone.

Row 0 of the history is the model before training (evaluation only). Evaluation (`evaluate_model`):
accuracy, worst-group accuracy (`saliencylab.envs.shortcut.worst_group_accuracy`), the energy pointing
game and IoU of the maps of the true class (`energy_pointing_game`, `iou`) on the images with a box.

The authors' recipe (sukrutrao/Model-Guidance, train.py, `main`): Adam; a model trained without
guidance first (`--model_path`), then fine-tuned with guidance (README: lr 1e-4, batch 64, 50 epochs,
lambda 1e-3 for Energy at the input), the localisation loss summed over the images of a batch with a
box and added to the classification loss as `lambda * loss`; evaluation every epoch. Differences, all
deliberate: we default to lr 1e-3 (a small CNN trained from scratch; pass the authors' values for
theirs); `guidance["start"]` trains that many epochs without guidance first, the same model then
fine-tuned, in one run instead of two; the authors keep the best-F1 and Pareto-front checkpoints, we
keep every epoch's; they train multi-label (BCE, a random present class per image), we train
single-label (cross-entropy, the true class is explained); they evaluate on their test split at the
end, we evaluate `val` every epoch. e2KD (m-parchami/GoodTeachersExplain, experiment_parameters.py) uses
Adam lr 1e-3 with a cosine schedule and warm-up for B-cos students; we keep a constant learning rate.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, InputError

__all__ = ["TrainingData", "TrainResult", "fit", "evaluate_model", "as_training_data", "load_folder",
           "split_data", "shortcut_splits", "check_guidance", "model_from_spec", "save_model_file", "load_model_file",
           "GUIDANCE_KEYS", "DISTILL_KEYS"]

GUIDANCE_KEYS = ("loss", "method", "layer", "weight", "start", "reduction", "params")
DISTILL_KEYS = ("teacher", "method", "temperature", "weights", "student_layer", "teacher_layer", "params")
CHECKPOINTS = "checkpoints"
FORMAT = 1  # checkpoint layout version


# -- data ----------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Images with labels and object regions, in memory.

    images (N, C, H, W) float; labels (N,) long; masks (N, H, W) bool, the object region (the union of
    the image's boxes; empty where none is known); supervised (N,) bool, whether the region may be used
    for guidance (ShortcutData's `has_box`); groups (N,) long, the groups of worst-group accuracy (the
    labels when the data has no groups, which makes it the worst-class accuracy); num_classes.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    supervised: torch.Tensor
    groups: torch.Tensor
    num_classes: int
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx) -> "TrainingData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TrainingData(self.images[idx], self.labels[idx], self.masks[idx], self.supervised[idx],
                            self.groups[idx], self.num_classes, self.class_names)

    def fingerprint(self) -> dict:
        """Size, shape and a checksum: a resumed run must train on the same data."""
        digest = hashlib.sha1()
        for t in (self.images, self.labels, self.masks & self.supervised[:, None, None], self.groups):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {"n": len(self), "shape": list(self.images.shape[1:]), "sha1": digest.hexdigest()[:16]}


def _check_images(images, where: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() != 4:
        raise InputError(f"{where}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"{where}: images must be floats (e.g. in [0, 1]), got {images.dtype}")
    if images.shape[0] == 0:
        raise InputError(f"{where}: no images")
    if not bool(torch.isfinite(images).all()):
        raise InputError(f"{where}: images contain NaN or infinite values")
    return images


def _check_labels(labels, n: int, num_classes: int | None, where: str) -> tuple[torch.Tensor, int]:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise InputError(f"{where}: labels must be one class index per image ({n}), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise InputError(f"{where}: labels must be integer class indices")
    labels = labels.long()
    k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if bool((labels < 0).any()) or bool((labels >= k).any()):
        raise InputError(f"{where}: labels must be class indices in [0, {k}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    return labels, max(k, 2)


def _boxes_to_region(boxes, n: int, h: int, w: int, where: str) -> torch.Tensor:
    """(N, H, W) region masks from (N, 4) / (N, K, 4) boxes or a per-image list (None or [] = no box);
    boxes outside the image are an error (no silent clipping)."""
    from ..metrics.localization import _box_tensor, boxes_to_masks

    if isinstance(boxes, (list, tuple)):
        boxes = [[] if b is None else b for b in boxes]
    t = _box_tensor(boxes, n)
    x0, y0, x1, y1 = t.unbind(-1)
    bad = (x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h)
    if bool(bad.any()):
        i, k = (int(v) for v in bad.nonzero()[0])
        raise InputError(f"{where}: box {t[i, k].tolist()} of image {i} lies outside the {w}x{h} image "
                         "(boxes are x0, y0, x1, y1 pixels, x1/y1 exclusive)")
    return boxes_to_masks(t, (n, h, w))


def as_training_data(data, *, size: int | None = None, num_classes: int | None = None,
                     where: str = "data") -> TrainingData:
    """The adapter `fit` and `evaluate_model` use; accepts

    - a `TrainingData` (returned as is);
    - a ShortcutData (`saliencylab.envs.shortcut`) or any object with `images`, `labels`, `boxes` and
      optionally `has_box`, `groups`, `num_classes`;
    - a folder (str / Path) with a boxes file: see `load_folder`;
    - a Python dataset (a sequence, or a torch Dataset with `len`) of (x, y, boxes) or
      (x, y, boxes, group) tuples: x (C, H, W) float, y a class index, boxes None, (4,), or a list of
      (x0, y0, x1, y1) pixel boxes (their union is the region; None or [] means no box).

    Images with no box (or only empty boxes) are kept for the classification loss and skipped by the
    guidance loss, as the authors do; they do not count in EPG / IoU.
    """
    if isinstance(data, TrainingData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_folder(data, size=size)
    if all(hasattr(data, a) for a in ("images", "labels", "boxes")):
        images = _check_images(data.images, where)
        n, _, h, w = images.shape
        labels, k = _check_labels(data.labels, n, num_classes or getattr(data, "num_classes", None), where)
        # ShortcutData: `boxes` are zeroed where withheld (`has_box` False), `true_boxes` keep them all:
        # training uses the given ones, evaluation every true one.
        truth = getattr(data, "true_boxes", None)
        masks = _boxes_to_region(data.boxes if truth is None else truth, n, h, w, where)
        has = getattr(data, "has_box", None)
        supervised = torch.ones(n, dtype=torch.bool) if has is None else torch.as_tensor(has).bool().reshape(n)
        groups = getattr(data, "groups", None)
        groups = labels.clone() if groups is None else torch.as_tensor(groups).long().reshape(n)
        names = [str(c) for c in getattr(data, "class_names", ())] or None
        return TrainingData(images, labels, masks, supervised, groups, k, names)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (torch.Tensor, np.ndarray, dict)):
        return _from_items(data, num_classes, where)
    raise InputError(f"{where}: expected ShortcutData, a folder with a boxes file, or a dataset of (x, y, boxes) "
                     f"tuples; got {type(data).__name__}")


def _from_items(dataset, num_classes, where) -> TrainingData:
    n = len(dataset)
    if n == 0:
        raise InputError(f"{where}: the dataset is empty")
    xs, ys, boxes, groups = [], [], [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) not in (3, 4):
            raise InputError(f"{where}: item {i} must be an (x, y, boxes) or (x, y, boxes, group) tuple, "
                             f"got {type(item).__name__}" + (f" of length {len(item)}" if hasattr(item, '__len__') else ""))
        x = torch.as_tensor(item[0])
        if x.dim() != 3:
            raise InputError(f"{where}: item {i}: x must be a (C, H, W) image, got shape {tuple(x.shape)}")
        if xs and x.shape != xs[0].shape:
            raise InputError(f"{where}: item {i} has shape {tuple(x.shape)}, item 0 {tuple(xs[0].shape)}; "
                             "all images must have the same size")
        xs.append(x)
        ys.append(int(item[1]) if not isinstance(item[1], torch.Tensor) else int(item[1].item()))
        boxes.append(item[2])
        if len(item) == 4:
            groups.append(int(item[3]))
    images = _check_images(torch.stack(xs), where)
    _, _, h, w = images.shape
    labels, k = _check_labels(torch.tensor(ys), n, num_classes, where)
    masks = _boxes_to_region(boxes, n, h, w, where)
    if groups and len(groups) != n:
        raise InputError(f"{where}: some items give a group and some do not; give it for all or none")
    g = torch.tensor(groups, dtype=torch.long) if groups else labels.clone()
    return TrainingData(images, labels, masks, torch.ones(n, dtype=torch.bool), g, k)


def load_folder(root, boxes_file=None, *, size: int | None = None) -> TrainingData:
    """Images of a folder with a boxes file.

    boxes_file: CSV with a header `file,label,x0,y0,x1,y1` (optionally `group`), one row per box
    (several rows of one file: the union; empty coordinates: no box), or JSON: a list of
    `{"file": ..., "label": ..., "boxes": [[x0, y0, x1, y1], ...]}` (or `"box": [...]`, `null` for none,
    optionally `"group"`), or a dict from file name to such an entry. Default: `root/boxes.csv`, then
    `root/boxes.json`. Files are relative to `root`. Labels are class indices, or names (sorted names
    become indices 0, 1, ...). Boxes are in the image's own pixels; with `size`, every image is resized
    to size x size and its boxes scaled with it (without, all images must have the same size).
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder '{root}' does not exist")
    if boxes_file is None:
        found = [root / f for f in ("boxes.csv", "boxes.json") if (root / f).is_file()]
        if not found:
            raise InputError(f"no boxes file: pass one (CSV file,label,x0,y0,x1,y1 or JSON), or put boxes.csv in '{root}'")
        boxes_file = found[0]
    entries = _read_boxes_file(Path(boxes_file))
    names = [e["label"] for e in entries.values()]
    if all(isinstance(v, int) for v in names):
        class_names, to_index = None, (lambda v: v)
    else:
        class_names = sorted({str(v) for v in names})
        lookup = {c: i for i, c in enumerate(class_names)}
        to_index = (lambda v: lookup[str(v)])
    images, labels, boxes, groups = [], [], [], []
    for file, e in entries.items():
        path = root / file
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w0, h0 = im.size
                if size is not None:
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise InputError(f"'{file}' is listed in {Path(boxes_file).name} but not found in '{root}'") from None
        except OSError as exc:
            raise InputError(f"cannot read image '{path}': {exc}") from None
        b = torch.tensor(e["boxes"], dtype=torch.float64).reshape(-1, 4)
        bad = [box for box in b.tolist() if not (0 <= box[0] <= box[2] <= w0 and 0 <= box[1] <= box[3] <= h0)]
        if bad:  # named in the file's own pixels, before any resizing
            raise InputError(f"box {[round(v, 3) for v in bad[0]]} of '{file}' in {Path(boxes_file).name} lies outside "
                             f"the {w0}x{h0} image or is not (x0, y0, x1, y1) with x0 <= x1, y0 <= y1")
        if size is not None:
            b = b * torch.tensor([size / w0, size / h0, size / w0, size / h0], dtype=torch.float64)
        if images and arr.shape != images[0].shape:
            raise InputError(f"'{file}' is {arr.shape[1]}x{arr.shape[0]}, '{next(iter(entries))}' "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; pass size (--size) to resize them all")
        images.append(arr)
        labels.append(to_index(e["label"]))
        boxes.append(b)
        groups.append(e.get("group"))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    n, _, h, w = x.shape
    y, k = _check_labels(torch.tensor(labels), n, len(class_names) if class_names else None, str(boxes_file))
    masks = _boxes_to_region(boxes, n, h, w, str(boxes_file))
    if any(g is None for g in groups):
        g = y.clone()
    else:
        g = torch.tensor([int(v) for v in groups], dtype=torch.long)
    return TrainingData(x, y, masks, torch.ones(n, dtype=torch.bool), g, k, class_names)


def _label(value, where):
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise InputError(f"{where}: empty label")
        return int(text) if text.lstrip("-").isdigit() else text
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{where}: a label must be a class index or a name, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise InputError(f"{where}: a label must be a class index or a name, got {value!r}")
    return int(value)


def _read_boxes_file(path: Path) -> dict[str, dict]:
    """file -> {"label", "boxes" (list of 4-lists), "group"} in file order."""
    if not path.is_file():
        raise InputError(f"boxes file '{path}' does not exist")
    out: dict[str, dict] = {}

    def add(file, label, box, group, where):
        if not file:
            raise InputError(f"{where}: no file name")
        label = _label(label, where)
        entry = out.setdefault(str(file), {"label": label, "boxes": [], "group": group})
        if entry["label"] != label:
            raise InputError(f"{where}: '{file}' has two labels, {entry['label']!r} and {label!r}")
        if box is not None:
            try:
                values = [float(v) for v in box]
            except (TypeError, ValueError):
                raise InputError(f"{where}: a box must be 4 numbers x0, y0, x1, y1, got {box!r}") from None
            if len(values) != 4 or not all(math.isfinite(v) for v in values):
                raise InputError(f"{where}: a box must be 4 finite numbers x0, y0, x1, y1, got {box!r}")
            if values[2] < values[0] or values[3] < values[1]:
                raise InputError(f"{where}: box {values} has x1 < x0 or y1 < y0 (x0, y0, x1, y1 pixels)")
            entry["boxes"].append(values)

    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read boxes file '{path}': {exc}") from None
        items = [dict(v, file=k) if isinstance(v, dict) else v for k, v in data.items()] if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise InputError(f"{path.name}: expected a list of entries or a dict file -> entry")
        for i, e in enumerate(items):
            where = f"{path.name} entry {i}"
            if not isinstance(e, dict) or "file" not in e or "label" not in e:
                raise InputError(f"{where}: needs 'file' and 'label' (and 'boxes' or 'box')")
            boxes = e.get("boxes", [e["box"]] if e.get("box") is not None else [])
            if boxes is None:
                boxes = []
            if not isinstance(boxes, list):
                raise InputError(f"{where}: 'boxes' must be a list of [x0, y0, x1, y1]")
            add(e["file"], e["label"], None, e.get("group"), where)
            for b in boxes:
                add(e["file"], e["label"], b, e.get("group"), where)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read boxes file '{path}': {exc}") from None
        reader = csv.DictReader(io.StringIO(text))
        need = ("file", "label", "x0", "y0", "x1", "y1")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path.name}: the header must be file,label,x0,y0,x1,y1 (optionally group); "
                             f"missing {', '.join(missing)}")
        for i, row in enumerate(reader, start=2):
            coords = [(row[c] or "").strip() for c in need[2:]]
            box = None if not any(coords) else coords
            group = (row.get("group") or "").strip() or None
            add((row["file"] or "").strip(), row["label"], box, group, f"{path.name} line {i}")
    if not out:
        raise InputError(f"boxes file '{path}' lists no images")
    return out


def split_data(data: TrainingData, fraction: float = 0.2, seed: int = 0) -> tuple[TrainingData, TrainingData]:
    """(train, val): a seeded random `fraction` of the images held out for validation."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    n = len(data)
    k = int(round(n * fraction))
    if k < 1 or k >= n:
        raise InputError(f"cannot hold out {fraction:.0%} of {n} images for validation; give more images or a val set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, "split")))
    return data.subset(perm[k:].sort().values), data.subset(perm[:k].sort().values)


def shortcut_splits(n: int = 512, size: int = 48, bias: float = 0.95, seed: int = 0, eval_split: str = "test",
                    n_eval: int | None = None, **kwargs):
    """(train, evaluation) ShortcutData from `saliencylab.envs.shortcut.shortcut_data`: the biased train
    split and `eval_split` ("test": balanced over the (class, background) groups, so worst-group accuracy
    is measured on every group; "val": biased like train) of `n_eval` images (default n // 2)."""
    from ..envs.shortcut import shortcut_data

    if eval_split not in ("val", "test"):
        raise ConfigError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    train = shortcut_data("train", n=n, size=size, bias=bias, seed=seed, **kwargs)
    kwargs.pop("box_fraction", None)  # evaluation uses every box
    held = shortcut_data(eval_split, n=n_eval or max(n // 2, 8), size=size, bias=bias, seed=seed, **kwargs)
    return train, held


# -- models ------------------------------------------------------------------------------------
def model_from_spec(spec: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """`module:factory` -> `factory(num_classes=..., **kwargs)` (num_classes only if it takes it); imported
    as `--model` is everywhere (`saliencylab.models.resolve_factory`: the working directory first)."""
    from ..models import _call_factory, resolve_factory

    factory = resolve_factory(spec)
    try:
        takes = inspect.signature(factory).parameters if not isinstance(factory, nn.Module) else {}
    except (TypeError, ValueError):
        takes = {}
    if num_classes is not None and ("num_classes" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values())):
        kwargs = {"num_classes": num_classes, **kwargs}
    return _call_factory(spec, **kwargs)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_model_file(path, model: nn.Module, meta: Mapping | None = None) -> Path:
    """Weights plus how to rebuild the model (`meta["model"]`: module:factory, `meta["model_kwargs"]`)."""
    path = Path(path)
    _atomic_save({"format": FORMAT, "model": model.state_dict(), "meta": dict(meta or {})}, path)
    return path


def load_model_file(path, spec: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A model saved by `fit` (model.pt or a checkpoint): rebuilt from its factory (or `spec`), weights loaded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file '{path}' does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise InputError(f"cannot read model file '{path}': {exc}") from None
    if not isinstance(blob, dict) or "model" not in blob:
        raise InputError(f"'{path}' is not a saliencylab training file (model.pt or a checkpoint)")
    meta = blob.get("meta") or {}
    spec = spec or meta.get("model")
    if not spec:
        raise ConfigError(f"'{path}' does not say which model it holds; name the factory (module:factory)")
    model = model_from_spec(spec, num_classes if num_classes is not None else meta.get("num_classes"),
                            **dict(meta.get("model_kwargs") or {}))
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as exc:
        raise ConfigError(f"the weights in '{path}' do not fit {spec}: {str(exc).splitlines()[0]}") from None
    return model


# -- evaluation --------------------------------------------------------------------------------
def _method_params(method: str, layer, params: Mapping | None) -> dict:
    from .. import methods as _methods

    params = dict(params or {})
    if layer is not None:
        if "layer" not in _methods.parameters(method):
            raise ConfigError(f"method '{method}' has no layer; use a CAM method (gradcam) for layer={layer!r}, "
                              "or layer=None for maps at the input")
        params["layer"] = layer
    return params


def evaluate_model(model: nn.Module, data, *, method: str | None = "input_x_gradient", layer=None,
                   batch_size: int = 64, method_params: Mapping | None = None) -> dict:
    """Accuracy, worst-group accuracy, per-group accuracies, and the energy pointing game and IoU of
    `method`'s maps of the true class (means over the images with a box; NaN if none has one).

    The maps are computed without gradient to the parameters, in eval mode (the model's mode is
    restored). `method=None` skips the maps (epg and iou NaN).
    """
    import saliencylab as sl

    from ..envs.shortcut import group_accuracies, worst_group_accuracy

    data = as_training_data(data, where="evaluation data")
    params = _method_params(method, layer, method_params) if method else {}
    device = _device(model)
    was_training = model.training
    model.eval()
    predictions, epg, iou = [], [], []
    try:
        for idx in torch.arange(len(data)).split(batch_size):
            x = data.images[idx].to(device)
            y = data.labels[idx].to(device)
            with torch.no_grad():
                predictions.append(model(x).argmax(1).cpu())
            if not method:
                continue
            region = data.masks[idx]
            keep = region.flatten(1).any(1)
            if not bool(keep.any()):
                continue
            maps = sl.explain(model, x[keep.to(device)], method, target=y[keep.to(device)], **params).maps.detach()
            region = region[keep].to(maps.device)
            epg.append(sl.evaluate(None, x[keep.to(device)], maps, "energy_pointing_game", masks=region).cpu())
            iou.append(sl.evaluate(None, x[keep.to(device)], maps, "iou", masks=region).cpu())
    finally:
        model.train(was_training)
    pred = torch.cat(predictions)
    nan = float("nan")
    return {
        "accuracy": float((pred == data.labels).double().mean()),
        "worst_group_accuracy": float(worst_group_accuracy(pred, data.labels, data.groups)),
        "group_accuracies": {str(k): float(v) for k, v in group_accuracies(pred, data.labels, data.groups).items()},
        "epg": float(torch.cat(epg).double().mean()) if epg else nan,
        "iou": float(torch.cat(iou).double().mean()) if iou else nan,
        "n": len(data),
        "n_localized": int(sum(len(e) for e in epg)),
    }


# -- training ----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What `fit` returns. history: one dict per epoch, row 0 the model before training."""

    model: nn.Module
    history: list[dict]
    out_dir: Path | None = None
    checkpoint: Path | None = None
    report: Path | None = None
    resumed_from: int | None = None  # the epoch a resumed run started after
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _key(*parts) -> int:
    """A 63-bit seed from any parts: each epoch's draws depend on (seed, epoch) only."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _number(value, name, low=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")
    return value


def check_guidance(guidance) -> dict | None:
    """The guidance settings with defaults filled in; ConfigError names a bad key or value."""
    return _guidance_config(guidance)


def _guidance_config(guidance) -> dict | None:
    from .. import methods as _methods

    if guidance is None:
        return None
    if not isinstance(guidance, Mapping):
        raise ConfigError(f"guidance must be a dict with keys {', '.join(GUIDANCE_KEYS)}, got {type(guidance).__name__}")
    unknown = [k for k in guidance if k not in GUIDANCE_KEYS]
    if unknown:
        raise ConfigError(f"unknown guidance key(s) {', '.join(map(repr, unknown))}; known: {', '.join(GUIDANCE_KEYS)}")
    g = {"loss": "energy", "method": "input_x_gradient", "layer": None, "weight": 1.0, "start": 0, "reduction": "sum",
         "params": {}}
    g.update(guidance)
    from . import GUIDANCE_LOSSES

    if g["loss"] not in GUIDANCE_LOSSES:
        raise ConfigError(f"unknown guidance loss {g['loss']!r}; choose one of {', '.join(GUIDANCE_LOSSES)}")
    _methods.get(g["method"])
    _number(g["weight"], "guidance weight", low=0)
    if isinstance(g["start"], bool) or not isinstance(g["start"], int) or g["start"] < 0:
        raise ConfigError(f"guidance start must be an epoch count >= 0, got {g['start']!r}")
    g["params"] = dict(g["params"] or {})
    return g


def _distill_config(distill) -> dict | None:
    from .. import methods as _methods

    if distill is None:
        return None
    if not isinstance(distill, Mapping):
        raise ConfigError(f"distill must be a dict with keys {', '.join(DISTILL_KEYS)}, got {type(distill).__name__}")
    unknown = [k for k in distill if k not in DISTILL_KEYS]
    if unknown:
        raise ConfigError(f"unknown distill key(s) {', '.join(map(repr, unknown))}; known: {', '.join(DISTILL_KEYS)}")
    d = {"method": "gradcam", "temperature": 1.0, "weights": None, "student_layer": None, "teacher_layer": None,
         "params": {}}
    d.update(distill)
    if not isinstance(d.get("teacher"), nn.Module):
        raise ConfigError("distill needs teacher=<a torch.nn.Module> (load a file with load_model_file)")
    _methods.get(d["method"])
    _number(d["temperature"], "distillation temperature", positive=True)
    if d["weights"] is not None:
        w = tuple(d["weights"])
        if len(w) != 3:
            raise ConfigError(f"distillation weights are 3 numbers (ground truth, KD, explanation), got {d['weights']!r}")
        d["weights"] = tuple(float(_number(v, "a distillation weight", low=0)) for v in w)
    d["params"] = dict(d["params"] or {})
    return d


def _describe(config: dict | None) -> dict | None:
    """A JSON-able record of a guidance/distill config (the teacher by class and checksum)."""
    if config is None:
        return None
    out = {}
    for k, v in config.items():
        if isinstance(v, nn.Module):
            digest = hashlib.sha1()
            for t in v.state_dict().values():
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            out[k] = f"{type(v).__name__}:{digest.hexdigest()[:12]}"
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v if isinstance(v, (int, float, str, type(None), list, dict)) else repr(v)
    return out


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_epoch(seed: int, epoch: int) -> None:
    k = _key(seed, epoch, "rng")
    torch.manual_seed(k)
    np.random.seed(k % 2**32)
    random.seed(k)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / CHECKPOINTS).glob("epoch_*.pt"))


def _load_last_checkpoint(run_dir: Path):
    """The newest readable checkpoint (a half-written one cannot exist: files are renamed into place)."""
    for path in reversed(_checkpoints(run_dir)):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - skip an unreadable file, fall back to the one before
            continue
        if isinstance(blob, dict) and blob.get("format") == FORMAT:
            return path, blob
    return None, None


def open_run_dir(run_dir: Path, config: dict, resume: bool, outputs=()):
    """Create `run_dir`; with resume=False delete its checkpoints and `outputs`; return the newest readable
    checkpoint (path, blob), or (None, None), after checking it was written with the same `config`."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder '{run_dir}': {exc.strerror or exc}") from None
    if not resume:
        for p in [*_checkpoints(run_dir), *(run_dir / name for name in outputs)]:
            p.unlink(missing_ok=True)
    path, blob = _load_last_checkpoint(run_dir)
    if blob is not None:
        _check_resumable(blob["config"], config, run_dir)
    return path, blob


COLUMNS = ("epoch", "loss", "ce", "guidance", "guided_images", "accuracy", "worst_group_accuracy", "epg", "iou")


def _write_metrics(run_dir: Path, history: list[dict], config: dict) -> None:
    """metrics.csv / metrics.json rewritten from the history (never appended to: no duplicate rows)."""
    flat = []
    for row in history:
        r = {k: v for k, v in row.items() if k != "group_accuracies"}
        for g, acc in (row.get("group_accuracies") or {}).items():
            r[f"group_{g}_accuracy"] = acc
        flat.append(r)
    columns = list(COLUMNS)
    for r in flat:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in flat:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
    _atomic_text(buf.getvalue(), run_dir / "metrics.csv")
    _atomic_text(json.dumps(_no_nan({"config": config, "epochs": history}), indent=1, default=_json_default)
                 + "\n", run_dir / "metrics.json")


def _no_nan(v):
    """NaN (no image with a box, no evaluation) as null: metrics.json stays standard JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


def _json_default(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return repr(v)


def _pick_examples(data: TrainingData, k: int) -> list[int]:
    """Up to k images with a box, taken in turn from each group, so the examples show every group."""
    has = data.masks.flatten(1).any(1)
    by_group: dict[int, list[int]] = {}
    for i in torch.nonzero(has).flatten().tolist():
        by_group.setdefault(int(data.groups[i]), []).append(i)
    picks, lists = [], [by_group[g] for g in sorted(by_group)]
    while len(picks) < k and any(lists):
        for lst in lists:
            if lst and len(picks) < k:
                picks.append(lst.pop(0))
    return picks


def _example_maps(model, data: TrainingData, idx: list[int], method, params) -> torch.Tensor:
    import saliencylab as sl

    was = model.training
    model.eval()
    try:
        device = _device(model)
        x = data.images[idx].to(device)
        return sl.explain(model, x, method, target=data.labels[idx].to(device), **params).maps.detach().cpu()
    finally:
        model.train(was)


def _save_examples(run_dir: Path, data: TrainingData, idx: list[int], maps: torch.Tensor, when: str) -> list[dict]:
    from ..report.render import overlay, save_png

    folder = run_dir / "examples"
    out = []
    for j, (i, m) in enumerate(zip(idx, maps)):
        img = data.images[i]
        photo = (img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)).clamp(0, 1)
        photo = (photo.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        save_png(folder / f"image_{j}.png", photo)
        save_png(folder / f"{when}_{j}.png", overlay(photo, m))
        out.append({"index": int(i), "label": int(data.labels[i]), "group": int(data.groups[i]),
                    "image": f"examples/image_{j}.png", when: f"examples/{when}_{j}.png"})
    return out


def fit(model: nn.Module, train, val=None, *, epochs: int = 5, lr: float = 1e-3, batch_size: int = 32,
        guidance: Mapping | None = None, distill: Mapping | None = None, out_dir=None, resume: bool = True,
        seed: int = 0, progress: bool = True, eval_method: str | None = None, eval_layer=None,
        eval_batch_size: int = 64, examples: int = 6, callback: Callable[[str, dict], None] | None = None,
        meta: Mapping | None = None, report: bool = True, keep_checkpoints: int | None = None) -> TrainResult:
    """Train `model` in place with Adam on `train` (see `as_training_data` for what it accepts).

    guidance: dict(loss="energy"|"l1"|"rrr"|"ppce", method="input_x_gradient", layer=None, weight=1.0,
      start=0, params={}) adds `weight * guidance_loss(model, x, y, masks=regions, ...)` to the
      cross-entropy from epoch `start` + 1 on (the first `start` epochs train without it, the authors'
      "train, then fine-tune with guidance"); images without a box are skipped by the loss.
    distill: dict(teacher=<module>, method="gradcam", temperature=1.0, weights=(gt, kd, explanation),
      student_layer=None, teacher_layer=None, params={}): the loss is `distillation_loss(model,
      teacher, x, y, ...)` (which holds the cross-entropy term) instead of the cross-entropy; the
      teacher is put in eval mode and not trained. Both may be given (distillation + weight * guidance).
    val: evaluated before training (row 0) and after every epoch with `evaluate_model` (maps of
      `eval_method`, default the guidance / distillation method, at `eval_layer`, default its layer).
    out_dir: checkpoints, metrics.csv / metrics.json, model.pt, examples/ and report.html; with
      `resume` an existing run there continues from its last checkpoint (settings must match, except
      `epochs`, which may grow); `resume=False` starts over and removes the old checkpoints.
    seed: keys each epoch's shuffle and random state (dropout, random choices) by (seed, epoch); the
      caller's global random state is left as it was. The model's initial weights are the caller's.
    callback(event, info): called with "batch" (epoch, batch, loss) and "epoch" (the row) events;
      an exception there (e.g. KeyboardInterrupt) stops the run, which a later call resumes.
    keep_checkpoints: keep only the newest this many epoch checkpoints (None: all).
    meta: JSON-able facts stored in checkpoints, model.pt and metrics.json (`meta["model"]` =
      "module:factory" and `meta["model_kwargs"]` let `load_model_file` rebuild the model).
    """
    from tqdm.auto import tqdm

    from ..core import progress as _progress

    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fit trains a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("examples", examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name != "batch_size" else 1):
            raise ConfigError(f"{name} must be a non-negative integer" + (" >= 1" if name == "batch_size" else "")
                              + f", got {value!r}")
    _number(lr, "lr", positive=True)
    if keep_checkpoints is not None and (isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int)
                                         or keep_checkpoints < 1):
        raise ConfigError(f"keep_checkpoints must be None or an integer >= 1, got {keep_checkpoints!r}")
    g = _guidance_config(guidance)
    d = _distill_config(distill)
    train = as_training_data(train, where="train")
    val = as_training_data(val, num_classes=train.num_classes, where="val") if val is not None else None
    if val is not None and val.images.shape[1:] != train.images.shape[1:]:
        raise InputError(f"val images are {tuple(val.images.shape[1:])}, train images {tuple(train.images.shape[1:])}")
    if g is not None and not bool((train.masks.flatten(1).any(1) & train.supervised).any()):
        raise InputError("guidance needs boxes: no training image has a (non-empty) box")
    eval_method = eval_method or (g["method"] if g else d["method"] if d else "input_x_gradient")
    if eval_layer is None:
        eval_layer = g["layer"] if g else d["student_layer"] if d else None
    eval_params = _method_params(eval_method, eval_layer, None)
    device = _device(model)
    teacher = d["teacher"] if d else None
    if teacher is not None:
        teacher.eval()

    config = {"lr": lr, "batch_size": batch_size, "seed": seed, "guidance": _describe(g), "distill": _describe(d),
              "eval_method": eval_method, "eval_layer": eval_layer if not isinstance(eval_layer, nn.Module) else repr(eval_layer),
              "train": train.fingerprint(), "val": val.fingerprint() if val is not None else None,
              "optimizer": "Adam", "architecture": _architecture(model)}
    meta = {"num_classes": train.num_classes, **dict(meta or {})}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    run_dir = Path(out_dir) if out_dir is not None else None
    history: list[dict] = []
    start, resumed_from, example_rows = 0, None, []
    devices = [device.index or 0] if device.type == "cuda" else []
    # the caller's numpy and Python random state and the model's mode come back as they were (torch's: fork_rng)
    outer_numpy, outer_python, was_training = np.random.get_state(), random.getstate(), model.training
    try:
        with torch.random.fork_rng(devices=devices):
            if run_dir is not None:
                path, blob = open_run_dir(run_dir, config, resume, outputs=(
                    "metrics.csv", "metrics.json", "model.pt", "report.html", "examples.json"))
                if blob is not None:
                    if blob["epoch"] > epochs:
                        raise ConfigError(f"'{run_dir}' already holds {blob['epoch']} epochs, more than the {epochs} asked "
                                          "for; use another folder or resume=False")
                    model.load_state_dict(blob["model"])
                    optimizer.load_state_dict(blob["optimizer"])
                    _set_rng_state(blob["rng"], device)
                    history = list(blob["history"])
                    start = resumed_from = int(blob["epoch"])
                    _write_metrics(run_dir, history, config)  # drop rows written after that checkpoint
                    example_rows = _read_examples(run_dir)

            examples_data = val if val is not None else train
            example_idx = _pick_examples(examples_data, examples)
            if not history:  # epoch 0: the model before training
                _seed_epoch(seed, 0)
                row = {"epoch": 0, "loss": None, "ce": None, "guidance": None, "guided_images": None}
                if val is not None:
                    row.update(_evaluation_row(model, val, eval_method, eval_layer, eval_batch_size))
                row["seconds"] = 0.0
                history.append(row)
                if run_dir is not None:
                    if example_idx:
                        maps = _example_maps(model, examples_data, example_idx, eval_method, eval_params)
                        example_rows = _save_examples(run_dir, examples_data, example_idx, maps, "before")
                        _atomic_text(json.dumps(example_rows, indent=1), run_dir / "examples.json")
                    _save_checkpoint(run_dir, 0, model, optimizer, history, config, meta, device)
                    _write_metrics(run_dir, history, config)

            n_batches = math.ceil(len(train) / batch_size)
            show = progress and _progress._enabled
            bar = tqdm(total=(epochs - start) * n_batches, desc="train", unit="batch", delay=1.0, leave=False,
                       disable=None if show else True, dynamic_ncols=True)
            try:
                for epoch in range(start + 1, epochs + 1):
                    history.append(_train_epoch(model, teacher, optimizer, train, epoch, seed, batch_size, g, d, device,
                                                bar, callback, val, eval_method, eval_layer, eval_batch_size, epochs))
                    if run_dir is not None:
                        _save_checkpoint(run_dir, epoch, model, optimizer, history, config, meta, device)
                        _write_metrics(run_dir, history, config)
                        if keep_checkpoints is not None:  # older ones go only once the new one is in place
                            for old in _checkpoints(run_dir)[:-keep_checkpoints]:
                                old.unlink()
                    if callback is not None:
                        callback("epoch", dict(history[-1]))
            finally:
                bar.close()
    finally:
        np.random.set_state(outer_numpy)
        random.setstate(outer_python)
        model.train(was_training)

    result = TrainResult(model, history, run_dir, resumed_from=resumed_from)
    if run_dir is not None:
        result.checkpoint = _checkpoints(run_dir)[-1]
        save_model_file(run_dir / "model.pt", model, meta)
        if example_idx and example_rows:
            maps = _example_maps(model, examples_data, example_idx, eval_method, eval_params)
            after = _save_examples(run_dir, examples_data, example_idx, maps, "after")
            for row, a in zip(example_rows, after):
                row["after"] = a["after"]
            result.examples = example_rows
        if report:
            from ..report.training import write_training_report

            result.report = write_training_report(run_dir, history, examples=example_rows, meta={
                **meta, "config": config, "eval_method": eval_method,
                "class_names": train.class_names})
    result.seconds = time.perf_counter() - t0
    return result


def _architecture(model: nn.Module) -> str:
    """The model's class and its parameter and buffer names and shapes, as a digest: a resumed run must
    continue the same network (another width would fail to load; the same shapes under another class
    would silently continue the old weights)."""
    text = type(model).__qualname__ + ";" + ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _check_resumable(saved: dict, now: dict, run_dir: Path) -> None:
    # "architecture" is checked only where the checkpoint records it (checkpoints written before it was added)
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
            and (k != "architecture" or k in saved)]
    if diff:
        raise ConfigError(f"'{run_dir}' holds a run with other settings ({', '.join(diff)} differ); "
                          "resume=False (--no-resume) starts over, or use another folder")


def _read_examples(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "examples.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def _save_checkpoint(run_dir, epoch, model, optimizer, history, config, meta, device) -> Path:
    folder = run_dir / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    path = folder / f"epoch_{epoch:03d}.pt"
    _atomic_save({"format": FORMAT, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "rng": _rng_state(device), "history": history, "config": config, "meta": meta}, path)
    return path


def _evaluation_row(model, val, method, layer, batch_size) -> dict:
    ev = evaluate_model(model, val, method=method, layer=layer, batch_size=batch_size)
    return {k: ev[k] for k in ("accuracy", "worst_group_accuracy", "epg", "iou", "group_accuracies")}


def _train_epoch(model, teacher, optimizer, train: TrainingData, epoch, seed, batch_size, g, d, device, bar,
                 callback, val, eval_method, eval_layer, eval_batch_size, epochs) -> dict:
    from . import distillation_loss, guidance_loss

    t0 = time.perf_counter()
    _seed_epoch(seed, epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_key(seed, epoch, "shuffle")))
    guide = g is not None and epoch > g["start"] and g["weight"] > 0
    sums: dict[str, float] = {}
    guided = 0
    model.train()
    for b, idx in enumerate(order.split(batch_size)):
        x = train.images[idx].to(device)
        y = train.labels[idx].to(device)
        parts: dict[str, torch.Tensor] = {}
        optimizer.zero_grad(set_to_none=True)
        if d is not None:
            kw = {k: d[k] for k in ("method", "temperature", "student_layer", "teacher_layer")}
            if d["weights"] is not None:
                kw["weights"] = d["weights"]
            loss, info = distillation_loss(model, teacher, x, y, details=True, **kw, **d["params"])
            for k in ("gt", "kd", "explanation"):  # the unweighted terms (None when switched off)
                if isinstance(info.get(k), torch.Tensor):
                    parts[f"distill_{k}"] = info[k].detach()
        else:
            loss = F.cross_entropy(model(x), y)
            parts["ce"] = loss.detach()
        if guide:
            masks = (train.masks[idx] & train.supervised[idx, None, None]).to(device)
            if bool(masks.flatten(1).any(1).any()):
                gl, info = guidance_loss(model, x, y, masks=masks, method=g["method"], loss=g["loss"],
                                         layer=g["layer"], reduction=g["reduction"], details=True, **g["params"])
                loss = loss + g["weight"] * gl
                parts["guidance"] = gl.detach()
                guided += int(info.get("used", 0))
        if not bool(torch.isfinite(loss)):
            raise InputError(f"epoch {epoch}, batch {b}: the loss is not finite ({float(loss)}); lower lr or the weights")
        loss.backward()
        optimizer.step()
        n = len(idx)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        bar.update(1)
        bar.set_postfix_str(f"epoch {epoch}/{epochs} loss {float(loss.detach()):.3f}", refresh=False)
        if callback is not None:
            callback("batch", {"epoch": epoch, "batch": b, "loss": float(loss.detach())})
    row: dict[str, Any] = {"epoch": epoch}
    row.update({k: v / len(train) for k, v in sums.items()})
    row.setdefault("ce", None)
    row.setdefault("guidance", None)
    row["guided_images"] = guided if guide else None  # None: no guidance this epoch (none asked, or before start)
    if val is not None:
        row.update(_evaluation_row(model, val, eval_method, eval_layer, eval_batch_size))
    row["seconds"] = time.perf_counter() - t0
    return row
