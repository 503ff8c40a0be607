"""Image folders as a stream of chunks: class subfolders or a labels file, a background loader, and the
folder run (`evaluate_folder`) that explains and scores them chunk by chunk into rows.

Layouts (`scan`)
- class subfolders: `DIR/<class>/<image>`; the class is an ImageNet-1k synset name (`n01440764` ->
  its index in the ILSVRC-2012 order, the sorted synsets, shipped as models/data/imagenet_synsets.txt),
  a number (the class index itself) or a class name of the model (exact, case-insensitive).
- a flat folder (or any tree) plus a labels file: CSV `file,label` (a header line is optional) or JSON
  (`{"file": label}` or a list of `{"file": ..., "label": ...}` / `[file, label]`); files are paths
  relative to DIR; labels as above.
- a folder without labels: fine for `target="predicted"` or a fixed class index.
Image ids are the paths relative to DIR with `/` separators, so they are the same on every machine and
in every shard (`saliencylab.runs.shards`).

Difference from torchvision's `ImageFolder` (`DatasetFolder.find_classes`, torchvision/datasets/folder.py:
class index = rank of the folder name among the sorted folders present): here a synset folder keeps its
ImageNet-1k index whatever other folders exist, so a folder with 10 ImageNet classes is scored against
the 1000-class model's own indices. To get torchvision's numbering, name the folders 0, 1, 2, ...

Loading: images are decoded and preprocessed by a pool of `workers` threads (PIL decodes and resizes
with the GIL released, and threads need not pickle the model or its preprocessing as worker processes
would), one chunk ahead of the chunk being explained: at most `chunk_size * 2` decoded images exist at
any time, whatever the number of images (`LoaderStats.peak`). A file that cannot be read or
preprocessed is reported (`OUT/skipped.csv`: image id, reason) and the run goes on.

Resume: every chunk goes through `runs.local.run_rows`, which appends each (method, metric) of the
chunk to the rows file as soon as it is computed and skips rows whose key exists; a run killed at any
point and started again recomputes only the missing rows (the explanations of a chunk's images that
miss some row are recomputed, as in `run_rows`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .. import methods as _methods
from .. import metrics as _metrics
from ..core.errors import ConfigError, InputError
from ..core.progress import progress
from . import shards as _shards
from .local import check_requirements, run_rows

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "Chunk", "LoaderStats", "ChunkLoader", "FolderRun", "scan",
           "read_labels_file", "resolve_label", "imagenet_synsets", "evaluate_folder", "FolderJob",
           "prepare_folder", "run_chunk"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SYNSET = re.compile(r"n\d{8}")
_HEADER = {"file", "filename", "image", "image_id", "path", "name"}


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in class-index order (the ILSVRC-2012 order: sorted ids)."""
    from ..models import DATA_DIR

    ids = tuple((DATA_DIR / "imagenet_synsets.txt").read_text(encoding="utf-8").split())
    assert len(ids) == 1000 and list(ids) == sorted(ids), "imagenet_synsets.txt: 1000 sorted synset ids"
    return ids


def resolve_label(value, class_names: Sequence[str] | None = None, where: str = "") -> int:
    """A label as a class index: an int, a number, an ImageNet synset id, or a class name of the model."""
    if isinstance(value, bool):
        raise ConfigError(f"label {value!r}{where} is not a class")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if _SYNSET.fullmatch(text):
        try:
            return imagenet_synsets().index(text)
        except ValueError:
            raise ConfigError(f"label {text!r}{where} is not an ImageNet-1k synset") from None
    if class_names:
        lowered = [c.lower() for c in class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    raise ConfigError(f"label {text!r}{where} is neither a class index, an ImageNet synset id nor a class "
                      "name of the model")


@dataclass
class ImageItem:
    image_id: str  # path relative to the data folder, '/' separators
    path: str
    label: object = None  # as found (folder name or labels-file value); resolved with resolve_label


def read_labels_file(path) -> dict[str, object]:
    """{relative file path: label} from a CSV (`file,label`, optional header) or JSON labels file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read labels file '{p}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read labels file '{p}': not UTF-8 text") from None
    out: dict[str, object] = {}
    if p.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"labels file '{p}' is not valid JSON: {exc}") from None
        entries = data.items() if isinstance(data, dict) else data
        for entry in entries:
            if isinstance(entry, dict) and "file" in entry and "label" in entry:
                entry = (entry["file"], entry["label"])
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ConfigError(f"labels file '{p}': expected {{file: label}}, [{{\"file\", \"label\"}}] or "
                                  f"[[file, label]], got an entry {entry!r}")
            out[_norm(entry[0])] = entry[1]
    else:
        for n, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise ConfigError(f"labels file '{p}' line {n}: expected file,label, got {','.join(row)!r}")
            if n == 1 and row[0].strip().lower() in _HEADER:
                continue
            out[_norm(row[0])] = row[1].strip()
    if not out:
        raise ConfigError(f"labels file '{p}' has no entries")
    return out


def _norm(name) -> str:
    text = str(name).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return Path(text).as_posix()


def scan(data, labels=None) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """(images sorted by id, [(id, reason)] of labels-file entries without a file). Hidden files and
    folders are skipped; files with other extensions are ignored."""
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"--data '{data}' is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    ids = [f.relative_to(root).as_posix() for f in files]
    missing: list[tuple[str, str]] = []
    if labels is not None:
        table = read_labels_file(labels)
        items = [ImageItem(i, str(f), table.get(i)) for i, f in zip(ids, files)]
        present = set(ids)
        missing = [(k, f"listed in {Path(labels).name} but not found in the data folder")
                   for k in sorted(table) if k not in present]
    else:  # class subfolders: the first folder of the relative path names the class
        items = [ImageItem(i, str(f), i.split("/", 1)[0] if "/" in i else None) for i, f in zip(ids, files)]
    items.sort(key=lambda it: it.image_id)
    if not items:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{data}'")
    return items, missing


@dataclass
class Chunk:
    items: list[ImageItem]  # the readable images of the chunk, in order
    x: torch.Tensor | None  # (B, C, H, W), None when none was readable
    skipped: list[tuple[str, str]]  # (image id, reason)

    @property
    def ids(self) -> list[str]:
        return [it.image_id for it in self.items]


@dataclass
class LoaderStats:
    """What the loader holds: decoded images handed out or being decoded and not released yet."""

    held: int = 0
    peak: int = 0
    chunks: int = 0
    largest_chunk: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n


class ChunkLoader:
    """Iterate over `items` in chunks of `chunk_size` decoded images, `workers` threads decoding the next
    chunk while the current one is used (workers=0: in the calling thread, no prefetch). A chunk is
    released when the next one is asked for."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Callable, chunk_size: int = 32, workers: int = 2,
                 stats: LoaderStats | None = None):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk size must be a positive int, got {chunk_size!r}")
        if not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be an int >= 0, got {workers!r}")
        self.items, self.preprocess = list(items), preprocess
        self.chunk_size, self.workers = chunk_size, workers
        self.stats = stats if stats is not None else LoaderStats()

    def __len__(self) -> int:
        return -(-len(self.items) // self.chunk_size)

    def _load(self, item: ImageItem):
        try:
            t = self.preprocess(item.path)
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise InputError(f"preprocessing gave {type(t).__name__} "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}, not a (C, H, W) tensor")
            if not bool(torch.isfinite(t).all()):
                raise InputError("non-finite values after preprocessing")
            return t
        except Exception as exc:  # noqa: BLE001 - one unreadable file loses only itself
            self.stats.release(1)
            return " ".join(str(exc).split()) or type(exc).__name__

    def _submit(self, pool, chunk):
        self.stats.add(len(chunk))
        return [pool.submit(self._load, it) for it in chunk]

    def __iter__(self) -> Iterator[Chunk]:
        groups = [self.items[i:i + self.chunk_size] for i in range(0, len(self.items), self.chunk_size)]
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="saliencylab-load") if self.workers else None
        previous = 0  # images of the chunk last handed out, released when the consumer asks for the next
        try:
            pending = self._submit(pool, groups[0]) if groups and pool is not None else None
            for k, group in enumerate(groups):
                if pool is None:
                    self.stats.release(previous)
                    self.stats.add(len(group))
                    results = [self._load(it) for it in group]
                else:
                    results = [f.result() for f in pending]
                    self.stats.release(previous)
                    pending = self._submit(pool, groups[k + 1]) if k + 1 < len(groups) else None
                kept = [(it, r) for it, r in zip(group, results) if isinstance(r, torch.Tensor)]
                skipped = [(it.image_id, r) for it, r in zip(group, results) if not isinstance(r, torch.Tensor)]
                x = None
                if kept:
                    shapes = {tuple(r.shape) for _, r in kept}
                    if len(shapes) > 1:
                        raise InputError(f"images preprocess to different sizes {sorted(shapes)}; give a "
                                         "preprocessing that resizes to one size")
                    x = torch.stack([r for _, r in kept])
                del results
                previous = len(kept)
                self.stats.chunks += 1
                self.stats.largest_chunk = max(self.stats.largest_chunk, len(kept))
                yield Chunk([it for it, _ in kept], x, skipped)
            self.stats.release(previous)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class FolderRun:
    """What a folder run did: images in this shard, rows computed, files skipped, where the rows are."""

    out: Path
    rows_file: Path
    images: int
    computed: int
    skipped: list[tuple[str, str]]
    loader: LoaderStats


class _SkipLog:
    """OUT/skipped.csv (or the shard's file): appended as files fail, so a killed run keeps it;
    rewritten with exactly this run's entries when the run completes."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, str] = {}
        self._known: set[str] = set()
        if path.exists():
            with path.open(newline="", encoding="utf-8") as f:
                self._known = {row[0] for row in csv.reader(f) if row and row[0] != "image_id"}

    def add(self, image_id: str, reason: str) -> None:
        self.entries[image_id] = reason
        if image_id in self._known:
            return
        self._known.add(image_id)
        new = not self.path.exists()
        with self.path.open("a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["image_id", "reason"])
            w.writerow([image_id, reason])

    def finish(self) -> None:
        if not self.entries:
            if self.path.exists():
                self.path.unlink()
            return
        with self.path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "reason"])
            w.writerows(sorted(self.entries.items()))


def evaluate_folder(model, data, method_names: Sequence[str], metric_names: Sequence[str], *, out,
                    labels=None, target="predicted", shard=None, workers: int = 2, chunk_size: int = 32,
                    preprocess: Callable | None = None, class_names: Sequence[str] | None = None,
                    method_params: dict | None = None, metric_params: dict | None = None,
                    model_id: str | None = None, on_rows: Callable | None = None,
                    on_chunk: Callable[[Chunk], None] | None = None, stats: LoaderStats | None = None) -> FolderRun:
    """Explain and score every image of folder `data` (or of shard `shard`, 'i/N') into rows in `out`.

    model: a `models.LoadedModel` (its preprocessing and class names are used) or an nn.Module with
    `preprocess` (path -> (C, H, W) tensor). target: "predicted" (or None), "label" (from the class
    folder or the labels file) or a class index. Rows go to `out/rows.jsonl` (`rows-shard-i-of-N.jsonl`
    for a shard); rows in any rows file of `out` are not computed again. `on_rows(rows)` is called per
    (method, metric) and chunk with new rows, `on_chunk(chunk)` after each chunk. Raises ConfigError
    before loading any image for unknown methods or metrics, metrics that need boxes, masks or truth,
    and labels that name no class.
    """
    from ..core.session import model_fingerprint

    job = prepare_folder(model, data, method_names, metric_names, out=out, labels=labels, target=target,
                         shard=shard, preprocess=preprocess, class_names=class_names)
    store = _shards.shard_store(job.out, job.shard)
    before = len(store)
    fingerprint = model_id or model_fingerprint(job.net)
    loader = ChunkLoader(job.items, job.preprocess, chunk_size=chunk_size, workers=workers, stats=stats)
    i, n = job.shard
    bar = progress(None, desc="images" if n == 1 else f"images (shard {i}/{n})", total=len(job.items), unit="image")
    try:
        for chunk in loader:
            for image_id, reason in chunk.skipped:
                job.skips.add(image_id, reason)
            run_chunk(job.net, chunk, job.method_names, job.metric_names, mode=job.mode, store=store,
                      model_id=fingerprint, method_params=method_params, metric_params=metric_params,
                      on_rows=on_rows)
            bar.update(len(chunk.items) + len(chunk.skipped))
            if on_chunk is not None:
                on_chunk(chunk)
    finally:
        bar.close()
    job.skips.finish()
    return FolderRun(out=job.out, rows_file=store.path, images=len(job.items), computed=len(store) - before,
                     skipped=sorted(job.skips.entries.items()), loader=loader.stats)


@dataclass
class FolderJob:
    """What every engine decides on the driver before any image is decoded: the model, the images of this
    shard with resolved labels, the target mode, the output folder and its skip log."""

    net: torch.nn.Module
    preprocess: Callable
    method_names: list[str]
    metric_names: list[str]
    mode: object  # "predicted", "label" or a class index
    items: list[ImageItem]
    shard: tuple[int, int]
    out: Path
    skips: _SkipLog


def prepare_folder(model, data, method_names, metric_names, *, out, labels=None, target="predicted", shard=None,
                   preprocess=None, class_names=None) -> FolderJob:
    """The driver's part of a folder run (shared by the local and the Ray engine): check methods, metrics and
    target, scan and shard the folder, resolve labels (images without one go to the skip log)."""
    from ..models import LoadedModel

    net = model.model if isinstance(model, LoadedModel) else model
    if preprocess is None:
        if not isinstance(model, LoadedModel):
            raise ConfigError("evaluate_folder needs a LoadedModel or preprocess= (path -> (C, H, W) tensor)")
        preprocess = model.preprocess
    if class_names is None and isinstance(model, LoadedModel):
        class_names = model.labels
    method_names, metric_names = list(method_names), list(metric_names)
    for name in method_names:
        _methods.get(name)
    for name in metric_names:
        _metrics.get(name)
    check_requirements(metric_names)
    mode = _target_mode(target)
    items, missing = scan(data, labels)
    key = _shards.parse_shard(shard)
    items = _shards.select(items, key, key=lambda it: it.image_id)
    missing = _shards.select(missing, key, key=lambda m: m[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skips = _SkipLog(out / _shards.skipped_filename(key))
    for image_id, reason in missing:
        skips.add(image_id, reason)
    if mode == "label":
        ready = []
        for it in items:
            if it.label is None:
                skips.add(it.image_id, "no label (not in a class folder or the labels file)")
            else:
                it.label = resolve_label(it.label, class_names, f" of '{it.image_id}'")
                ready.append(it)
        items = ready
    return FolderJob(net, preprocess, method_names, metric_names, mode, items, key, out, skips)


def run_chunk(net, chunk: Chunk, method_names, metric_names, *, mode, store, model_id: str,
              method_params: dict | None = None, metric_params: dict | None = None,
              on_rows: Callable | None = None) -> None:
    """The per-chunk work of every engine: the chunk's targets, then `run_rows` into `store` (rows whose
    key is in `store` are not computed again)."""
    if chunk.x is None:
        return
    chunk_target = (torch.tensor([it.label for it in chunk.items], dtype=torch.long) if mode == "label"
                    else (None if mode == "predicted" else mode))
    run_rows(net, chunk.x, method_names, metric_names, target=chunk_target, method_params=method_params,
             metric_params=metric_params, store=store, image_ids=chunk.ids, model_id=model_id, on_rows=on_rows)


def _target_mode(target):
    if target is None or target == "predicted":
        return "predicted"
    if target == "label":
        return "label"
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    if isinstance(target, str) and re.fullmatch(r"\d+", target.strip()):
        return int(target)
    raise ConfigError(f"target must be 'label', 'predicted' or a class index, got {target!r}")
