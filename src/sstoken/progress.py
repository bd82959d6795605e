"""Progress bars for long steps (tokenizing, scoring, training, evaluation): rates and ETA on
a terminal, quiet in CI, in non-terminal logs and on every process but the main one."""

from __future__ import annotations

import os
import sys


def quiet() -> bool:
    """True in CI (``CI`` set), when stderr is not a terminal (a log file), or off rank 0."""
    return (bool(os.environ.get("CI")) or not sys.stderr.isatty()
            or int(os.environ.get("RANK", "0")) != 0)


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=quiet(), dynamic_ncols=True, **kw)
