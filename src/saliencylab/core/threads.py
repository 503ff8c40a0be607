"""How many CPU threads torch may use for one piece of work: `with threads(n): ...`.

On a machine whose cores are already busy, torch's intra-op threads (one per core by default) wait for
each other at the end of every parallel operation: a thread the scheduler has put aside holds up the
others, so a job slows down by more than its fair share of the cores (benchmarks/busy.py measures it).
`threads(1)` runs torch's operations in the calling thread alone; `threads("auto")` uses torch's default
count less the cores other work keeps busy right now (the processes running or runnable besides this
one, read from /proc/stat; the 1-minute load average where that cannot be read), at least 1. Not the load
average first: it still counts the user's previous command for a minute, so a quiet machine would get one
thread after every command (measured: `evaluate` 28 s with 2 threads, 48 s with 1). SALIENCYLAB_THREADS sets the
number (or "auto") for every command, `saliencylab --threads N` for one.
Measured (benchmarks/results/busy.md): IBA on 2 photos, 2 cores beside 2 busy loops, default 2 threads ran
past 45 s where 1 thread took 8.3 s (its fair share: 8.0 s); on a quiet machine 2 threads are 1.7x faster.

What is changed, and only inside the `with` block: torch's intra-op thread count (`torch.set_num_threads`,
which also sets OpenMP's and MKL's counts for the calling thread). Nothing is changed at import.
What is not changed, and why:
- inter-op threads (`torch.set_num_interop_threads`): torch allows setting them once per process, before
  any inter-op work, so they cannot be restored; CPU autograd and our methods do not use them.
- OpenMP's spin-waiting (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME): read once when the OpenMP
  runtime starts (when torch is imported), so setting them later has no effect; they can only be given
  in the environment before Python starts. The same holds for OMP_NUM_THREADS: set in the shell it works;
  `os.environ["OMP_NUM_THREADS"] = "1"` after `import torch` does nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import torch

from .errors import ConfigError

__all__ = ["threads", "resolve_threads", "auto_threads", "running_elsewhere", "ENV"]

ENV = "SALIENCYLAB_THREADS"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def running_elsewhere(samples: int = 7, interval: float = 0.005, stat: str = "/proc/stat") -> float | None:
    """Processes running or runnable now besides this one: the median over `samples` readings of Linux's
    `procs_running` (which counts this process too) minus one; None where it cannot be read."""
    readings = []
    for i in range(samples):
        try:
            with open(stat) as f:
                running = next((int(line.split()[1]) for line in f if line.startswith("procs_running")), None)
        except (OSError, ValueError, IndexError):
            return None
        if running is None:
            return None
        readings.append(running)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0.0, statistics.median(readings) - 1)


def auto_threads(load: float | None = None, cores: int | None = None, default: int | None = None) -> int:
    """Threads for "auto": the cores not kept busy by other work, `cores - round(load)`, capped by the current
    count (torch's default, one per core, unless changed) and at least 1. `load`: the processes running
    elsewhere now (`running_elsewhere`), else the 1-minute load average; where neither can be read, the
    current count."""
    default = torch.get_num_threads() if default is None else default
    cores = _cores() if cores is None else cores
    if load is None:
        load = running_elsewhere()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return default
    return max(1, min(default, cores - int(round(load))))


def resolve_threads(n: int | str | None = None) -> int | None:
    """The thread count asked for: `n`, else SALIENCYLAB_THREADS, else None (leave torch as it is).

    Accepts a positive int, its text, or "auto" (see auto_threads); anything else is a ConfigError naming
    where it came from.
    """
    source = "threads"
    if n is None:
        n = os.environ.get(ENV, "").strip() or None
        source = ENV
        if n is None:
            return None
    if isinstance(n, str) and n.strip().lower() == "auto":
        return auto_threads()
    if isinstance(n, bool):
        raise ConfigError(f"{source} must be a positive whole number or 'auto', got {n!r}")
    try:
        value = int(str(n).strip()) if isinstance(n, str) else int(n)
    except (TypeError, ValueError):
        raise ConfigError(f"{source} must be a positive whole number or 'auto', got {n!r}") from None
    if value != n and not isinstance(n, str) or value < 1:
        raise ConfigError(f"{source} must be a positive whole number or 'auto', got {n!r}")
    return value


@contextmanager
def threads(n: int | str | None = None):
    """Run the block with `n` torch intra-op threads ("auto": see auto_threads; None: SALIENCYLAB_THREADS, or
    leave as is), then
    restore the previous count, also when the block raises. Yields the count in force inside."""
    value = resolve_threads(n)
    before = torch.get_num_threads()
    if value is None:
        yield before
        return
    if value != before:
        torch.set_num_threads(value)
    try:
        yield value
    finally:
        torch.set_num_threads(before)
