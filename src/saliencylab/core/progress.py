"""Progress bars: shown on a terminal for anything that takes more than a second, silent otherwise."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

_enabled = os.environ.get("SALIENCYLAB_PROGRESS", "1") != "0"


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off for the whole process."""
    global _enabled
    _enabled = bool(enabled)


def progress(iterable, desc: str = "", total: int | None = None, **kwargs):
    # delay=1: a bar appears only once a loop has run for a second; disable=None hides it off a TTY.
    return tqdm(iterable, desc=desc or None, total=total, delay=1.0, leave=False,
                disable=None if _enabled else True, **kwargs)
