"""Where training records come from: JSON / JSONL files (optionally gzipped), ``datasets``
folders and hub datasets. Each record comes with where it was found (:class:`Where`), so every
error names the file and the line; records that cannot be parsed are yielded as
:class:`BadRecord` so that ``--skip_invalid`` can skip them like any other bad record."""

from __future__ import annotations

import codecs
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError


class Where(str):
    """Where a record came from, printed as ``file:line`` (JSONL) or ``file[record i]`` (a JSON
    list, a datasets folder); ``file``, ``line`` and ``record`` stay available for reports."""

    def __new__(cls, file, line: int | None = None, record: int | None = None):
        text = f"{file}:{line}" if line is not None else f"{file}[record {record}]" \
            if record is not None else str(file)
        obj = super().__new__(cls, text)
        obj.file, obj.line, obj.record = str(file), line, record
        return obj


def where_text(skipped: dict) -> str:
    return str(Where(skipped["file"], skipped.get("line"), skipped.get("record")))


@dataclass
class BadRecord:
    """Stands in for a record that could not even be parsed (invalid JSON, not UTF-8), so that
    ``--skip_invalid`` can skip it like any other bad record."""

    reason: str


def _jsonl(path: Path, raw: bytes) -> Iterator[tuple[Where, Any]]:
    """One record per line; a line that is not UTF-8 or not JSON becomes a :class:`BadRecord`."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = Where(path, line=lineno)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, BadRecord(f"not valid UTF-8 ({e.reason} at column {e.start + 1})")
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            yield where, BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")


def read_records(source: str | os.PathLike, split: str = "train") -> Iterable[tuple[str, Any]]:
    """Yield ``(where, record)`` pairs; ``where`` (:class:`Where`) names file and line/record.

    ``source`` is a ``.json`` / ``.jsonl`` (optionally ``.gz``) file, a ``datasets.save_to_disk``
    folder, or a dataset name for ``datasets.load_dataset`` (``owner/name``). A UTF-8 byte-order
    mark is accepted. In JSONL each line stands alone: a line that is not UTF-8 or not valid
    JSON (a truncated last line, a NUL byte) is yielded as a :class:`BadRecord`, which
    ``--skip_invalid`` skips. A JSON list that does not parse has no records to skip: it is a
    :class:`DataError` naming the line.
    """
    path = Path(source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a datasets.save_to_disk folder ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
        for i, rec in enumerate(ds):
            yield Where(path, record=i), rec
        return
    if not path.exists():
        if not looks_like_hub_name(str(source)):
            raise DataError(f"{path}: no such file")
        import datasets  # a hub dataset name

        ds = datasets.load_dataset(str(source), split=split)
        for i, rec in enumerate(ds):
            yield Where(source, record=i), rec
        return
    opener = gzip.open if path.suffix == ".gz" else open
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:      # unreadable, a directory, a broken or cut .gz
        raise DataError(f"{path}: cannot be read ({e.__class__.__name__}: {e})") from e
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if stem_suffix == ".jsonl" or (stem_suffix != ".json" and not raw.lstrip().startswith(b"[")):
        yield from _jsonl(path, raw)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); a JSON list "
                        "cannot be read in part (JSONL, one record per line, can skip bad lines)") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); a JSON list "
                        "cannot be read in part (JSONL, one record per line, can skip bad lines)") from e
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield Where(path, record=i), rec


def looks_like_hub_name(source: str) -> bool:
    """``owner/name`` with no file extension and no local path: a dataset on the hub."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
            and Path(source).suffix not in (".json", ".jsonl", ".gz"))
