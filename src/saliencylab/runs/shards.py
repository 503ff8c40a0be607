"""Shards of a folder run: a deterministic slice per process, one rows file per shard, and merging them.

A shard is `i/N` with 0 <= i < N. An image belongs to shard `int(sha256(image_id)[:16], 16) % N`, where the
image id is its path relative to the data folder (posix separators). The slice depends only on the id
and N: not on the order files are listed in, not on the machine, and adding images to the folder never
moves an existing image to another shard (every-N-th of the sorted list would). Shards are about equal
in size for a few hundred images or more, not exactly equal.

Every shard writes its own rows file into the shared output folder (`rows-shard-i-of-N.jsonl`; the
unsharded run writes `rows.jsonl`), so processes running at the same time never write to one file.
Rows already in any rows file of the folder count as done for every shard (an unsharded rerun after a
sharded one computes nothing); they are read, never rewritten, and a line still being written by
another process (no newline yet) is ignored, not truncated. `merge_rows(out)` is the union of every
rows file, one row per key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..core.errors import ConfigError
from .store import FILENAME, Row, RunStore

ROWS_GLOB = "rows*.jsonl"
SKIPPED = "skipped.csv"


def parse_shard(spec) -> tuple[int, int]:
    """'i/N' (or a pair (i, N), or None for the whole job) -> (i, N) with 0 <= i < N."""
    if spec is None:
        return 0, 1
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise ConfigError(f"--shard expects i/N (e.g. 0/4), got {spec!r}")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise ConfigError(f"shard must be 'i/N' or a pair (i, N), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: N must be at least 1 and the index run from 0 to N-1")
    return i, n


def shard_of(image_id: str, n: int) -> int:
    """The shard (0 .. n-1) of an image id: a hash of the id, so it is the same on every machine."""
    if n == 1:
        return 0
    return int(hashlib.sha256(str(image_id).encode("utf-8")).hexdigest()[:16], 16) % n


def select(items: Sequence, shard, key=lambda item: item) -> list:
    """The items of shard `shard` ('i/N' or (i, N)), in their given order; `key(item)` is the image id."""
    i, n = parse_shard(shard)
    return [it for it in items if shard_of(key(it), n) == i]


def rows_filename(shard) -> str:
    """rows.jsonl for the whole job, rows-shard-i-of-N.jsonl for shard i of N."""
    i, n = parse_shard(shard)
    return FILENAME if n == 1 else f"rows-shard-{i}-of-{n}.jsonl"


def skipped_filename(shard) -> str:
    i, n = parse_shard(shard)
    return SKIPPED if n == 1 else f"skipped-shard-{i}-of-{n}.csv"


def rows_files(out) -> list[Path]:
    """Every rows file of an output folder, sorted by name."""
    return sorted(p for p in Path(out).glob(ROWS_GLOB) if p.is_file())


def read_rows(path) -> list[Row]:
    """The complete, valid rows of a rows file, read only: a last line without its newline (still being
    written, or cut short) and unreadable lines are left out, the file is not touched."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    lines.pop()  # b"" after a final newline, else an incomplete line
    rows = []
    for line in lines:
        if line.strip():
            row = RunStore._parse(line)
            if row is not None:
                rows.append(row)
    return rows


def merge_rows(out, files: Iterable | None = None) -> list[Row]:
    """The union of the rows of every rows file in `out` (or of `files`), one row per key, in file order."""
    seen: dict[str, Row] = {}
    for path in (rows_files(out) if files is None else files):
        for row in read_rows(path):
            seen.setdefault(row.key, row)
    return list(seen.values())


def shard_store(out, shard) -> RunStore:
    """The store a shard appends to (its own file in `out`), knowing the rows of every other rows file in
    `out` as done."""
    own = Path(out) / rows_filename(shard)
    store = RunStore(own)
    store.include(row for p in rows_files(out) if p != own for row in read_rows(p))
    return store


def skipped_entries(out) -> dict[str, str]:
    """{image id: reason} from every skipped*.csv of an output folder."""
    import csv

    found: dict[str, str] = {}
    for path in sorted(Path(out).glob("skipped*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0] != "image_id":
                    found.setdefault(row[0], row[1])
    return found


def _labelled(rows: Sequence[Row]) -> list[Row]:
    """Rows whose method (metric) ran with several parameter sets get the parameters in their name, so
    the table keeps them apart instead of one replacing the other."""
    from dataclasses import replace

    def text(params: dict, drop=()) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in drop)

    method_sets: dict[str, set] = {}
    metric_sets: dict[str, set] = {}
    for r in rows:
        method_sets.setdefault(r.method, set()).add(text(r.method_params))
        metric_sets.setdefault(r.metric, set()).add(text(r.metric_params, ("method", "method_params")))
    out = []
    for r in rows:
        changes = {}
        if len(method_sets[r.method]) > 1:
            changes["method"] = f"{r.method} ({text(r.method_params) or 'defaults'})"
        if len(metric_sets[r.metric]) > 1:
            changes["metric"] = f"{r.metric} ({text(r.metric_params, ('method', 'method_params')) or 'defaults'})"
        out.append(replace(r, **changes) if changes else r)
    return out


def write_report(out, dest=None, *, command: str | None = None) -> dict[str, Path]:
    """Merge every rows file of `out` into one leaderboard in `dest` (default `out`): leaderboard.md,
    leaderboard.json, index.html (means, 95% bootstrap intervals, paired permutation tests against the
    best method with Holm's correction, costs) and summary.md; one table per model. Rows of one image
    under several targets (e.g. a 'label' and a 'predicted' run into one folder) are counted once (the
    first read) and reported in a warning; an image whose pixels changed between runs counts with its
    newest rows (also reported)."""
    import warnings

    from ..core.errors import InputError
    from .leaderboard import GroupResult, write_leaderboard
    from .stats import significance_against_best, summarize

    out = Path(out)
    files = rows_files(out)
    if not files:
        raise InputError(f"no rows files ({ROWS_GLOB}) in '{out}'")
    rows = _labelled(merge_rows(out, files))
    if not rows:
        raise InputError(f"the rows files in '{out}' hold no complete rows")
    seen: dict[tuple, Row] = {}
    doubled = changed = 0
    for r in rows:  # in file order: a later row was written later
        k = (r.model, r.method, r.metric, r.image_id)
        if k not in seen:
            seen[k] = r
        elif seen[k].image_digest != r.image_digest:  # the file changed since: its old rows are stale
            seen[k] = r
            changed += 1
        else:
            doubled += 1
    if doubled:
        warnings.warn(f"{doubled} row(s) repeat an image under another target or setting; the first is used")
    if changed:
        warnings.warn(f"{changed} row(s) are of images whose pixels changed since an earlier run; the newest is used")
    skipped = skipped_entries(out)
    # tables independent of the order shards ran in: methods and metrics in order of first appearance,
    # each one's images sorted by id (the bootstrap resamples by position)
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in seen.values()))}
    metric_rank = {m: i for i, m in enumerate(dict.fromkeys(r.metric for r in seen.values()))}
    ordered = sorted(seen.values(), key=lambda r: (method_rank[r.method], metric_rank[r.metric], r.image_id))
    by_model: dict[str, list[Row]] = {}
    for r in ordered:
        by_model.setdefault(r.model, []).append(r)
    results = []
    for model, group in by_model.items():
        records = summarize(group)
        images = len({r.image_id for r in group})
        note = (f"Model fingerprint {model}; {images} images, {len(group)} rows merged from "
                f"{len(files)} rows file(s) ({', '.join(p.name for p in files)})"
                + (f"; {len(skipped)} file(s) skipped (see skipped*.csv)" if skipped else "") + ".")
        name = "results" if len(by_model) == 1 else f"model {model}"
        results.append(GroupResult(name, records, {}, significance_against_best(records), note=note))
    seconds = sum(float((r.cost.get(part) or {}).get("seconds", 0) or 0)
                  for r in seen.values() for part in ("explain", "metric"))
    methods = list(dict.fromkeys(r.method for r in seen.values()))
    dest = Path(dest) if dest is not None else out
    dest.mkdir(parents=True, exist_ok=True)
    return write_leaderboard(results, dest, suite="report", methods=methods, full=False, seed=0, seconds=seconds,
                             title=f"saliencylab report: {out.name}",
                             command=command or f"saliencylab report {out}")
