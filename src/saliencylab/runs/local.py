"""Methods x metrics on one machine, as rows: explain what is missing, score it, append each row as computed.

For every method, the images that miss a row for some metric are explained in one call (with their
image ids, so stochastic methods draw the same numbers as in a full run); each metric then scores
only the images it misses. Rows already in the store are returned as they are.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import torch

from .. import methods as _methods
from .. import metrics as _metrics
from .. import perturbation as _perturbation
from ..api import explain
from ..core.errors import ConfigError
from ..core.session import Cost, ModelSession, model_fingerprint
from ..core.targets import resolve_target
from ..core.validation import numpy_as_tensor
from .store import Row, RunStore, callable_description, row_key, settings_digest, spec_value, tensor_digest

# Curve entries that are axes common to a batch (one value per step, not per image).
SHARED_CURVES = ("fraction", "quantile", "ratio", "n", "layers")


def missing_requirements(name: str, *, boxes=None, masks=None, truth=None) -> list[str]:
    """What metric `name` cannot run without and was not given (empty: it can run); from the metric's
    own `requires` metadata."""
    return _metrics.missing_requirements(name, boxes=boxes, masks=masks, truth=truth)


def check_requirements(metric_names: Sequence[str], *, boxes=None, masks=None, truth=None) -> None:
    """Raise ConfigError naming every metric whose data (boxes, masks, truth) was not given."""
    problems = [m for name in metric_names for m in missing_requirements(name, boxes=boxes, masks=masks, truth=truth)]
    # counterfactual metrics score images where maps go: an explanation run would feed them saliency maps
    problems += [f"{name} scores counterfactual images, not explanation maps (use "
                 f"saliencylab.metrics.counterfactual or `saliencylab counterfactual`)"
                 for name in metric_names if _metrics.get(name).category == "counterfactual"]
    if problems:
        raise ConfigError("cannot run: " + "; ".join(problems))


def metric_data(name: str, *, boxes=None, masks=None, truth=None) -> dict:
    """The data keyword arguments metric `name` takes (from its `requires`)."""
    requires = _metrics.requirements(name)
    if "boxes_or_masks" in requires:
        return {"boxes": boxes} if boxes is not None else ({"masks": masks} if masks is not None else {})
    if "truth" in requires:
        return {} if truth is None else {"truth": truth}
    return {}


def resolve_targets(model, x: torch.Tensor, target) -> tuple[list, object]:
    """(the row target of each image, the target to explain with). Predicted classes are resolved with one
    forward pass of the clean images, so each row names the class it explains; a callable is described."""
    n = x.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        text = callable_description(target)
        return [text] * n, target
    if target is None:
        with ModelSession(model) as session, torch.no_grad():
            outputs = torch.cat([session.forward(x[i:i + 32]) for i in range(0, n, 32)])
        classes = resolve_target(None, outputs).classes.cpu()
    elif isinstance(target, int) and not isinstance(target, bool) or (
            isinstance(target, torch.Tensor) and target.dim() == 0):
        classes = torch.full((n,), int(target), dtype=torch.long)
    else:
        classes = torch.as_tensor(list(target) if not isinstance(target, torch.Tensor) else target)
        if classes.is_floating_point() or classes.dtype == torch.bool:
            raise ConfigError(f"target class indices must be integers, got dtype {classes.dtype}")
        classes = classes.long().reshape(-1).cpu()
        if classes.numel() != n:
            raise ConfigError(f"got {classes.numel()} targets for {n} images; give one per image or a single int")
    return classes.tolist(), classes


def _take(value, idx: list[int]):
    if value is None:
        return None
    value = numpy_as_tensor(value)  # numpy boxes/masks: one entry per image, like a tensor
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(idx, dtype=torch.long, device=value.device)]
    if isinstance(value, (list, tuple)):
        return [value[i] for i in idx]
    return value


def data_digests(metric: str, n: int, *, boxes=None, masks=None, truth=None) -> list[str | None]:
    """Per image, a digest of the data a metric reads besides the map (its boxes, masks or ground truth),
    so that rows scored against other boxes are computed again instead of reused; None: the metric
    reads no such data."""
    data = metric_data(metric, boxes=boxes, masks=masks, truth=truth)
    if not data:
        return [None] * n
    out = []
    for i in range(n):
        parts = []
        for name, value in sorted(data.items()):
            item = _take(value, [i])
            if isinstance(item, torch.Tensor):
                parts.append(f"{name}:{tensor_digest(item)}")
            else:
                text = json.dumps(spec_value(item), sort_keys=True, default=str)
                parts.append(f"{name}:{hashlib.sha1(text.encode()).hexdigest()[:16]}")
        out.append("|".join(parts))
    return out


def share_cost(cost: Cost | dict | None, n: int) -> dict:
    """One image's share of a batch's cost (counts and seconds divided by the batch size)."""
    if cost is None:
        return {}
    d = cost.as_dict() if isinstance(cost, Cost) else dict(cost)
    return {k: (v / n if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "peak_memory_bytes" else v)
            for k, v in d.items()}


def split_curves(curves: dict | None, n: int) -> list[dict | None]:
    """A batch's curves as one entry per image: values with a leading dimension of n are per image, the
    others (and the named axes in SHARED_CURVES) are common to the batch."""
    if not curves:
        return [None] * n
    shared, image = {}, {}
    for k, v in curves.items():
        v = v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v
        if k not in SHARED_CURVES and isinstance(v, (list, tuple)) and len(v) == n:
            image[k] = v
        else:
            shared[k] = v if isinstance(v, (int, float, list)) else spec_value(v)
    return [{"image": {k: v[i] for k, v in image.items()}, "shared": shared} for i in range(n)]


def image_digests(x: torch.Tensor) -> list[str]:
    return [tensor_digest(img) for img in x]


def run_rows(model, x: torch.Tensor, method_names: Sequence[str], metric_names: Sequence[str], *,
             target=None, method_params: dict | None = None, metric_params: dict | None = None,
             boxes=None, masks=None, truth=None, store: RunStore | None = None,
             image_ids: Sequence | None = None, model_id: str | None = None,
             on_rows: Callable[[list[Row]], None] | None = None,
             on_explanation: Callable | None = None) -> list[Row]:
    """Rows of every (method, metric, image); those in `store` are reused, the others computed and appended.

    method_params / metric_params: {name: {param: value}}. `on_rows(rows)` is called with the rows of
    each (method, metric) when some of them were computed; `on_explanation(method, explanation)` with
    every explanation computed (of the images that missed a row). `model_id` replaces the model's
    fingerprint in the keys (default `model_fingerprint(model)`). Raises ConfigError before running
    anything when a metric needs boxes, masks or truth that were not given.
    """
    method_params = method_params or {}
    metric_params = metric_params or {}
    for name in method_names:
        _methods.get(name)
    for name in metric_names:
        _metrics.get(name)
    check_requirements(metric_names, boxes=boxes, masks=masks, truth=truth)
    store = store if store is not None else RunStore(None)
    n = x.shape[0]
    ids = [str(i) for i in image_ids] if image_ids is not None else [str(i) for i in range(n)]
    if len(ids) != n or len(set(ids)) != n:
        raise ConfigError(f"need {n} distinct image ids, got {len(ids)} ({len(set(ids))} distinct)")
    digests = image_digests(x)
    fingerprint = model_id or model_fingerprint(model)
    row_targets, explain_target = resolve_targets(model, x, target)

    out: list[Row] = []
    # map-independent passes (clean outputs, sensitivity-N drops) are computed once for all methods
    with _perturbation.shared_passes():
        for method in method_names:
            mparams = method_params.get(method, {})
            plan = []
            for metric in metric_names:
                params = dict(metric_params.get(metric, {}))
                if "method" in _metrics.requirements(metric):
                    params.setdefault("method", method)
                    params.setdefault("method_params", mparams)
                settings = settings_digest(method, mparams, metric, params)
                regions = data_digests(metric, n, boxes=boxes, masks=masks, truth=truth)
                identity = [dict(image_id=ids[i], image_digest=digests[i], model=fingerprint, method=method,
                                 method_params=spec_value(mparams), metric=metric,
                                 metric_params=spec_value(params) if regions[i] is None
                                 else {**spec_value(params), "data": regions[i]},
                                 target=spec_value(row_targets[i]), settings=settings) for i in range(n)]
                keys = [row_key(**d) for d in identity]
                plan.append((metric, params, identity, keys))
            pending = sorted({i for _, _, _, keys in plan for i, k in enumerate(keys) if k not in store})
            explanation, explain_share = None, {}
            if pending:
                explanation = explain(model, _take(x, pending), method, _take(explain_target, pending),
                                      image_ids=[ids[i] for i in pending], **mparams)
                explain_share = share_cost(explanation.cost, len(pending))
                if on_explanation is not None:
                    on_explanation(method, explanation)
            where = {i: j for j, i in enumerate(pending)}
            for metric, params, identity, keys in plan:
                need = [i for i, k in enumerate(keys) if k not in store]
                if need:
                    cls = _metrics.get(metric)
                    instance = _metrics.build(metric, **params)
                    rows_in_expl = [where[i] for i in need]
                    maps = explanation.maps[torch.as_tensor(rows_in_expl, device=explanation.maps.device)]
                    data = {k: _take(v, need) for k, v in
                            metric_data(metric, boxes=boxes, masks=masks, truth=truth).items()}
                    measured = instance.measure(model if cls.needs_model else None, _take(x, need), maps,
                                                _take(explain_target, need), image_ids=[ids[i] for i in need], **data)
                    scores = measured.scores.detach().cpu().flatten().tolist()
                    metric_share = share_cost(measured.cost, len(need))
                    curves = split_curves(measured.curves, len(need))
                    computed = [Row(**identity[i], score=s, cost={"explain": explain_share, "metric": metric_share},
                                    higher_is_better=cls.higher_is_better, category=cls.category, curves=c, key=keys[i])
                                for i, s, c in zip(need, scores, curves)]
                    store.append(computed)
                rows = [store.get(k) for k in keys]
                out += rows
                if need and on_rows is not None:
                    on_rows(rows)
    return out
