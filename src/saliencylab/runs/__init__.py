"""Runs: results as per-image rows with complete keys, the statistics computed from them, and the local runner.

- `store`: `Row` (one score of one image under one model, method spec, metric spec and target) and
  `RunStore` (an append-only rows.jsonl; resume skips rows whose key exists).
- `stats`: bootstrap intervals, paired permutation tests, Holm; `summarize(rows)` -> method x metric
  `Record`s, `significance_against_best(records)` pairing by image id.
- `local`: `run_rows(model, x, methods, metrics, ...)` explains and scores what the store misses.
- `dataset`: `evaluate_folder(model, DIR, methods, metrics, out=..., shard=(i, N))` streams an image folder
  in chunks (class subfolders or a labels file) and writes rows as it goes; `shards`: the deterministic
  slices, `merge_rows` and `write_report` (the leaderboard of every shard's rows).
"""

from .dataset import evaluate_folder
from .local import check_requirements, missing_requirements, run_rows
from .stats import (Record, bootstrap_interval, cost_rows, holm, paired_permutation_test, significance,
                    significance_against_best, summarize)
from .shards import merge_rows, write_report
from .store import FILENAME, IDENTITY, Row, RunStore, row_key

__all__ = ["Row", "RunStore", "row_key", "FILENAME", "IDENTITY", "Record", "summarize", "bootstrap_interval",
           "paired_permutation_test", "holm", "significance", "significance_against_best", "cost_rows", "run_rows",
           "check_requirements", "missing_requirements", "evaluate_folder", "merge_rows", "write_report"]
