"""Progress bars for long steps (tokenizing, scoring, training, evaluation): rates and ETA on
a terminal, quiet in CI and in non-terminal logs."""

from __future__ import annotations

import os
import sys


def quiet() -> bool:
    """True in CI (``CI`` set) or when stderr is not a terminal (a log file)."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=quiet(), dynamic_ncols=True, **kw)
