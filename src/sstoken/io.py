"""Side effects at the edge, one way each: atomic writes and rank-0 logging.

* :func:`atomic_write` / :func:`atomic_dir` - a file or folder appears whole or not at all:
  it is written beside its destination under a temporary name and renamed into place (a
  rename within one file system is atomic), with ordinary permissions (0644 / 0755, not
  ``mkstemp``'s 0600).
* :func:`locked` - an inter-process lock (``filelock``) around work that several processes
  (ranks, parallel runs) might otherwise all do at once.
* :func:`log` - one line ``[sstoken] ...`` on stderr, from the main process only (``RANK``
  unset or 0), so a run on 8 GPUs prints each message once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` / ``accelerate launch`` job."""
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """Print ``[sstoken] msg`` to stderr on the main process only."""
    if is_main_process():
        print(f"[sstoken] {msg}", file=sys.stderr, flush=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``data`` is text (UTF-8), bytes, or a function that writes the temporary file it is given
    (for writers that want a path, like ``safetensors.save_file`` or ``fig.savefig``). The
    parent folder is created. On any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` fill ``tmp``; on success it becomes ``out`` whole.

    An error inside the block removes ``tmp`` and leaves ``out`` untouched. ``replace=False``
    is for content-addressed folders (a cache entry, a converted model): if ``out`` appeared
    meanwhile (another process wrote the same thing), it is kept and ``tmp`` dropped, so a
    complete folder is never deleted under a reader.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists() and replace:
            shutil.rmtree(path)
        if not path.exists():
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an inter-process lock on ``path`` (a ``<path>.lock`` file beside it) for the block:
    one process at a time converts a model or scores a dataset; the others wait, then find
    the result."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield
