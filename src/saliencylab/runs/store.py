"""Results as rows: one JSON line per (image, model, method spec, metric spec, target), appended as computed.

A row's identity is the image (its id and a digest of its pixels), the model's fingerprint
(`core.session.model_fingerprint`), the method and its parameters, the metric and its parameters,
and the target explained (the resolved class index of that image, a list of classes when a score
needs several maps, or a description of a callable target). `key` is a hash of exactly those fields,
so a rerun with another model, target, image or setting computes new rows instead of reusing old
ones, and a rerun with the same ones computes nothing.

The file is append-only. A line cut short by an interrupted run is dropped when the store is opened
(its row was never complete, so it is computed again); every complete line is kept, and a row whose
key is already stored is never written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import torch

from ..core.explanation import jsonable
from ..core.validation import numpy_as_tensor

FILENAME = "rows.jsonl"
IDENTITY = ("image_id", "image_digest", "model", "method", "method_params", "metric", "metric_params", "target",
            "settings")


def spec_value(value):
    """A JSON-friendly value for a row's identity: `jsonable`, except that tensors keep a digest of their
    contents (two data tensors of the same shape are different settings)."""
    value = numpy_as_tensor(value)  # a numpy array keys by its contents, as a tensor does
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}#{tensor_digest(value)}"
    if isinstance(value, (list, tuple)):
        return [spec_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): spec_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return jsonable(value)


def settings_digest(method: str | None, method_params: dict, metric: str | None, metric_params: dict) -> str:
    """Digest (16 hex digits) of what the given parameters leave implicit: every declared default of the
    method and the metric, and their `revision` (bumped when results change for the same parameters).
    A row computed before a default or an implementation changed has another key, so a store never
    serves it as current."""
    from .. import methods as _methods, metrics as _metrics

    def full(registry, name, given):
        if name is None or name not in registry.available():
            return None
        cls = registry.get(name)
        params = {**registry.parameters(name), **(given or {})}
        if registry is _metrics:  # what a preset such as protocol="igos" expands to, as the metric resolved it
            try:
                built = registry.build(name, **(given or {}))
                params = {k: getattr(built, k, v) for k, v in params.items()}
            except Exception:  # noqa: BLE001 - invalid settings fail later with their own clear error
                pass
        return {"revision": getattr(cls, "revision", 0), "params": spec_value(params)}

    text = json.dumps([full(_methods, method, method_params), full(_metrics, metric, metric_params)],
                      sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    """sha1 (16 hex digits) of a tensor's shape, dtype and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha1(f"{tuple(t.shape)}:{t.dtype}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def callable_description(fn) -> str:
    """A callable target as text: its qualified name and a digest of its code, constants and closure, so two
    different lambdas of one module are different targets."""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    key = getattr(fn, "cache_key", None)
    if key is not None:
        return f"callable:{name}:{key}"
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"callable:{name}:{fn!r}"
    closure = [spec_value(c.cell_contents) for c in (getattr(fn, "__closure__", None) or ())]
    text = code.co_code.hex() + json.dumps([spec_value(c) for c in code.co_consts if not hasattr(c, "co_code")]
                                           + closure, default=repr)
    return f"callable:{name}#{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def row_key(**identity) -> str:
    """Hash (24 hex digits) of a row's identity fields (IDENTITY, all required)."""
    missing = [k for k in IDENTITY if k not in identity]
    if missing or len(identity) != len(IDENTITY):
        raise TypeError(f"row_key needs exactly the fields {IDENTITY}, missing {missing}")
    text = json.dumps([[k, identity[k]] for k in IDENTITY], sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class Row:
    """One score of one image. `cost` holds this image's share of the explanation's and the metric's cost
    (`{"explain": {...}, "metric": {...}}`); `curves` this image's curves (`{"image": {...}, "shared":
    {...}}`: per-image values, and axes common to the batch such as the removed fraction)."""

    image_id: str
    model: str
    method: str
    method_params: dict
    metric: str
    metric_params: dict
    target: object
    score: float
    image_digest: str = ""
    cost: dict = field(default_factory=dict)
    higher_is_better: bool = True
    category: str = ""
    curves: dict | None = None
    settings: str = ""  # settings_digest: the defaults and revisions behind the given parameters
    key: str = ""

    def __post_init__(self):
        self.method_params = spec_value(self.method_params or {})
        self.metric_params = spec_value(self.metric_params or {})
        self.target = spec_value(self.target)
        self.score = float(self.score)
        if not self.key:
            self.key = row_key(**self.identity())

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RunStore:
    """Rows in an append-only JSON-lines file (`path`, or `path/rows.jsonl` for a folder), by key.

    `RunStore(None)` keeps rows in memory only."""

    def __init__(self, path=None):
        self.path: Path | None = None
        self._rows: dict[str, Row] = {}
        self.skipped = 0  # unreadable complete lines (left in the file, reported once)
        if path is not None:
            p = Path(path)
            if p.suffix != ".jsonl":
                p = p / FILENAME
            p.parent.mkdir(parents=True, exist_ok=True)
            self.path = p
            self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline; else the last line, maybe cut short
        for line in lines:
            if line.strip():
                row = self._parse(line)
                if row is None:
                    self.skipped += 1
                elif row.key not in self._rows:
                    self._rows[row.key] = row
        if tail:
            row = self._parse(tail)
            if row is not None:  # a complete row whose newline was not written: keep it, end its line
                self._rows.setdefault(row.key, row)
                with self.path.open("ab") as f:
                    f.write(b"\n")
            else:  # cut short by an interrupted run: drop it so the next append starts a clean line
                with self.path.open("r+b") as f:
                    f.truncate(len(data) - len(tail))
        if self.skipped:
            warnings.warn(f"{self.path}: skipped {self.skipped} unreadable line(s)", stacklevel=3)

    @staticmethod
    def _parse(line: bytes) -> Row | None:
        try:
            d = json.loads(line)
            row = Row.from_dict(d)
        except (ValueError, TypeError, KeyError):
            return None
        # a line whose key is not the hash of its fields (edited, or another version's) is not trusted
        return row if row_key(**row.identity()) == row.key else None

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> Row | None:
        return self._rows.get(key)

    def rows(self) -> list[Row]:
        return list(self._rows.values())

    def include(self, rows: Iterable[Row]) -> int:
        """Know rows stored elsewhere (other shards' files) as done: they are served by `get` and never
        written to this store's file. Returns how many were new here."""
        n = 0
        for row in rows:
            if row.key not in self._rows:
                self._rows[row.key] = row
                n += 1
        return n

    def append(self, rows: Iterable[Row]) -> list[Row]:
        """Write the rows not stored yet (flushed and synced before returning); returns those written."""
        new = []
        for row in rows:
            if row.key not in self._rows:
                self._rows[row.key] = row
                new.append(row)
        if new and self.path is not None:
            text = "".join(json.dumps(r.to_dict(), allow_nan=True) + "\n" for r in new)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        return new
