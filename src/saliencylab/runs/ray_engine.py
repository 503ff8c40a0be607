"""The folder run on Ray Data (`saliencylab evaluate --data DIR --engine ray`): the same job as
`runs.dataset.evaluate_folder`, with the explaining and scoring spread over a pool of Ray actors.

Who does what
- The driver (this process) does what the local engine does before any image is decoded
  (`dataset.prepare_folder`: scan, shard, labels, skip log) and reads the rows already in OUT (every rows
  file, `shards.shard_store`); their keys are put in the object store once.
- Ray Data reads the image *paths* (`ray.data.from_items`; the pixels are never on the driver) and
  `map_batches` sends batches of `batch_size` paths to an actor pool of `num_actors` actors. Each actor
  loads the model once (from a picklable spec: an embedded model name or `module:factory` plus weights,
  loaded with `io.load_model`; or the model object, pickled once with `ray.put`), decodes its batch with
  the local engine's loader (`dataset.ChunkLoader`, so unreadable files are reported with the same
  reasons) and runs the local engine's per-chunk code (`dataset.run_chunk` -> `local.run_rows`) against
  the driver's done keys: a row is missing exactly when the local engine would compute it.
- Rows come back to the driver as JSON lines and the driver, the one writer, appends them to the same
  store (`rows.jsonl` or the shard's file) as each batch arrives: resume, shards and `saliencylab report`
  work unchanged, and a run killed at any point keeps every batch already returned.

Rows equal the local engine's row for row: keys are exact (same image digests, fingerprint, specs and
targets); scores agree up to float rounding, since a batch of other images may round differently, as
for chunks and shards (stochastic methods draw their noise by image id, so batching does not change it).
On GPU actors (`num_gpus_per_actor` > 0) the model and images move to the actor's GPU; keys do not
change (image digests are taken on the CPU values), scores agree to GPU float rounding.

The pattern is Ray Data's batch inference (docs.ray.io, "End-to-end: Offline Batch Inference" and
`ray.data.Dataset.map_batches`: a callable class whose __init__ loads the model, run by an
`ActorPoolStrategy(size=n)` pool). Deliberate difference: the rows are not written by a Ray Data sink
(`Dataset.write_json`/`write_parquet` write one file per block, with no notion of a row already done);
they come back to the driver, which appends them to the run's one keyed, append-only store.

Ray is imported only when this engine runs (`import saliencylab` never imports it); without Ray the
call fails with one line naming `pip install saliencylab[ray]`. `ray.init()` connects to the cluster
named by RAY_ADDRESS when it is set and otherwise starts a local Ray on this machine; a Ray already
initialised by the caller is used as it is.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch

from ..core.errors import ConfigError
from ..core.progress import progress
from . import shards as _shards
from .dataset import Chunk, ChunkLoader, FolderRun, ImageItem, LoaderStats, prepare_folder, run_chunk
from .store import Row, RunStore

__all__ = ["evaluate_folder_ray", "import_ray", "RAY_MISSING"]

RAY_MISSING = "--engine ray needs Ray, which is not installed: pip install saliencylab[ray]"
MIN_RAY = (2, 10)  # the Ray Data API used here; tested with Ray 2.60 only


def import_ray():
    """The `ray` module with `ray.data`, or ConfigError (one line) naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_RAY:
        raise ConfigError(f"--engine ray needs Ray >= {'.'.join(map(str, MIN_RAY))}, found {ray.__version__}: "
                          "pip install -U saliencylab[ray]")
    return ray


class _DoneKeys(RunStore):
    """An in-memory store that knows the driver's done keys (without their rows) plus what it computes."""

    def __init__(self, done):
        super().__init__(None)
        self._done = done

    def __contains__(self, key: str) -> bool:
        return key in self._rows or key in self._done


class _Worker:
    """One Ray actor: loads the model once, then explains and scores batches of image paths."""

    def __init__(self, model_ref, spec, weights, preprocess_ref, fingerprint: str, check_fingerprint: bool,
                 done_ref, method_names, metric_names, mode, method_params, metric_params, workers: int,
                 use_gpu: bool):
        import ray

        from ..core.session import model_fingerprint

        if spec is not None:
            from .. import io

            loaded = io.load_model(spec, weights)
            net, preprocess = loaded.model, loaded.preprocess
        else:
            net = ray.get(model_ref)
            preprocess = None
        if preprocess_ref is not None:
            preprocess = ray.get(preprocess_ref)
        net = getattr(net, "model", net)  # a LoadedModel shipped whole
        if check_fingerprint and model_fingerprint(net) != fingerprint:
            raise ConfigError("the model loaded on a Ray worker differs from the driver's (another fingerprint): "
                              "give --weights or a factory that builds the same weights every time")
        if use_gpu and torch.cuda.is_available():
            net = net.to("cuda")
        self.net, self.preprocess, self.fingerprint = net, preprocess, fingerprint
        self.done = ray.get(done_ref)
        self.method_names, self.metric_names, self.mode = method_names, metric_names, mode
        self.method_params, self.metric_params, self.workers = method_params, metric_params, workers

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        items = [ImageItem(str(i), str(p), None if lab == "" else int(lab))
                 for i, p, lab in zip(batch["image_id"], batch["path"], batch["label"])]
        store = _DoneKeys(self.done)
        kind, image_id, payload = [], [], []
        loader = ChunkLoader(items, self.preprocess, chunk_size=max(1, len(items)), workers=self.workers)
        for chunk in loader:
            for i, reason in chunk.skipped:
                kind.append("skipped"), image_id.append(i), payload.append(reason)
            if chunk.x is not None:
                device = next(self.net.parameters(), torch.empty(0)).device
                chunk = Chunk(chunk.items, chunk.x.to(device), chunk.skipped)
                run_chunk(self.net, chunk, self.method_names, self.metric_names, mode=self.mode, store=store,
                          model_id=self.fingerprint, method_params=self.method_params,
                          metric_params=self.metric_params)
            for it in chunk.items:
                kind.append("image"), image_id.append(it.image_id), payload.append("")
        for row in store.rows():
            kind.append("row"), image_id.append(row.image_id), payload.append(json.dumps(row.to_dict(), allow_nan=True))
        return {"kind": np.array(kind, dtype=object), "image_id": np.array(image_id, dtype=object),
                "payload": np.array(payload, dtype=object)}


def evaluate_folder_ray(model, data, method_names: Sequence[str], metric_names: Sequence[str], *, out,
                        labels=None, target="predicted", shard=None, workers: int = 2, chunk_size: int = 32,
                        preprocess: Callable | None = None, class_names: Sequence[str] | None = None,
                        method_params: dict | None = None, metric_params: dict | None = None,
                        model_id: str | None = None, on_rows: Callable | None = None,
                        on_chunk: Callable[[Chunk], None] | None = None, stats: LoaderStats | None = None,
                        weights: str | None = None, spec: str | None = None, num_actors: int = 2,
                        num_gpus_per_actor: float = 0,
                        num_cpus_per_actor: float = 1, batch_size: int | None = None) -> FolderRun:
    """`evaluate_folder` on Ray Data: the same arguments, rows and output files.

    model: a `models.LoadedModel` or nn.Module (pickled once into the object store), or a spec string (an
    embedded model name or `module:factory`, with `weights`) that every actor loads itself with
    `io.load_model` (the driver loads it once too, for class names and the fingerprint). spec= with a model
    object: the spec (and `weights`) that object was loaded from, for the actors to load it the same way.
    num_actors: actors in the pool, each holding one model; num_gpus_per_actor / num_cpus_per_actor: what
    each actor reserves (num_gpus_per_actor=1: one GPU per actor; 0.5: two actors share a GPU).
    batch_size: images per actor call (default `chunk_size`); workers: decoding threads per actor.
    on_rows(rows) is called on the driver with the rows the actors computed in each batch; on_chunk(chunk) with each
    batch's images (`x` is None: the pixels stay on the actors). `stats` counts batches, not pixels.
    """
    from .. import io
    from ..core.session import model_fingerprint

    for name, value in (("num_actors", num_actors), ("batch_size", batch_size if batch_size is not None else 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(num_gpus_per_actor, (int, float)) or num_gpus_per_actor < 0:
        raise ConfigError(f"num_gpus_per_actor must be >= 0, got {num_gpus_per_actor!r}")
    ray = import_ray()
    if isinstance(model, str):
        spec = model
        model = io.load_model(spec, weights)
    elif weights is not None and spec is None:
        raise ConfigError("weights= goes with a model spec string, not a model object")
    job = prepare_folder(model, data, method_names, metric_names, out=out, labels=labels, target=target,
                         shard=shard, preprocess=preprocess, class_names=class_names)
    store = _shards.shard_store(job.out, job.shard)
    before = len(store)
    fingerprint = model_id or model_fingerprint(job.net)
    stats = stats if stats is not None else LoaderStats()
    i, n = job.shard
    if not job.items:
        job.skips.finish()
        return FolderRun(out=job.out, rows_file=store.path, images=0, computed=0,
                         skipped=sorted(job.skips.entries.items()), loader=stats)

    if not ray.is_initialized():  # RAY_ADDRESS set: that cluster; otherwise a local Ray on this machine
        address = os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                     logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
            raise ConfigError(f"cannot start or reach {where}: {' '.join(str(exc).split())}") from None
    # Ray waits forever for resources the cluster does not have: say so instead of hanging
    for resource, each in (("GPU", num_gpus_per_actor), ("CPU", num_cpus_per_actor)):
        have = float(ray.cluster_resources().get(resource, 0) or 0)
        if each and num_actors * each > have:
            raise ConfigError(f"{num_actors} Ray actor(s) x {each:g} {resource} need {num_actors * each:g} {resource}(s), "
                              f"but the cluster has {have:g}; use fewer actors or less per actor")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images over the whole job
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False

    model_ref = None if spec is not None else ray.put(job.net)
    # an explicit preprocess (or a model object's) travels with the actors; a spec brings its own
    preprocess_ref = None if spec is not None and preprocess is None else ray.put(job.preprocess)
    done_ref = ray.put(frozenset(store._rows))
    # labels travel only where they are the targets (resolved class indices by then)
    # absolute paths: the actors' working directory is not the driver's
    rows_in = [{"image_id": it.image_id, "path": os.path.abspath(it.path),
                "label": str(it.label) if job.mode == "label" else ""}
               for it in job.items]
    by_id = {it.image_id: it for it in job.items}
    blocks = max(1, min(len(rows_in), num_actors * 4))
    ds = ray.data.from_items(rows_in, override_num_blocks=blocks)
    ds = ds.map_batches(
        _Worker, batch_size=batch_size or chunk_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=num_gpus_per_actor or None,
        num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs=dict(model_ref=model_ref, spec=spec, weights=weights, preprocess_ref=preprocess_ref,
                                   fingerprint=fingerprint, check_fingerprint=model_id is None, done_ref=done_ref,
                                   method_names=job.method_names, metric_names=job.metric_names, mode=job.mode,
                                   method_params=method_params or {}, metric_params=metric_params or {},
                                   workers=workers, use_gpu=bool(num_gpus_per_actor)))
    bar = progress(None, desc=("images (ray)" if n == 1 else f"images (ray, shard {i}/{n})"), total=len(job.items),
                   unit="image")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if "kind" not in batch:  # an empty batch
                continue
            new = [Row.from_dict(json.loads(p)) for k, p in zip(batch["kind"], batch["payload"]) if k == "row"]
            if new:
                store.append(new)
                if on_rows is not None:
                    on_rows(new)
            skipped = [(str(i_), str(p)) for k, i_, p in zip(batch["kind"], batch["image_id"], batch["payload"])
                       if k == "skipped"]
            for image_id, reason in skipped:
                job.skips.add(image_id, reason)
            done = [str(i_) for k, i_ in zip(batch["kind"], batch["image_id"]) if k == "image"]
            stats.chunks += 1
            stats.largest_chunk = max(stats.largest_chunk, len(done))
            bar.update(len(done) + len(skipped))
            if on_chunk is not None:
                on_chunk(Chunk([by_id[d] for d in done], None, skipped))
    except Exception as exc:  # an actor's ConfigError/InputError as the one line it is, not a Ray traceback
        cause = _our_error(exc)
        if cause is None:
            raise
        raise cause from None
    finally:
        bar.close()
    job.skips.finish()
    return FolderRun(out=job.out, rows_file=store.path, images=len(job.items), computed=len(store) - before,
                     skipped=sorted(job.skips.entries.items()), loader=stats)


def _our_error(exc, depth: int = 0):
    """The SaliencyLabError inside a Ray error (RayTaskError.cause, Ray Data's wrapping), if any; an actor
    that failed in __init__ comes back as ActorDiedError whose message alone names the error, so the last
    `saliencylab.core.errors.<Error>: message` line of the text is rebuilt."""
    import re

    from ..core import errors

    if exc is None or depth > 8:
        return None
    if isinstance(exc, errors.SaliencyLabError):
        return exc
    for inner in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if inner is not None and inner is not exc:
            found = _our_error(inner, depth + 1)
            if found is not None:
                return found
    if depth == 0:
        named = re.findall(r"saliencylab\.core\.errors\.(\w+): ([^\n]*)", str(exc))
        if named and isinstance(getattr(errors, named[-1][0], None), type):
            cls = getattr(errors, named[-1][0])
            if issubclass(cls, errors.SaliencyLabError):
                return cls(named[-1][1].strip())
    return None
