"""sstoken.io: atomic writes leave the old file (or nothing) on failure, readable permissions,
and logging from the main process only."""
import os
import stat

import pytest

from sstoken.io import atomic_dir, atomic_write, log


def test_atomic_write_text_bytes_and_callable(tmp_path):
    p = tmp_path / "a" / "b.txt"
    atomic_write(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda tmp: tmp.write_text("via path"))
    assert p.read_text() == "via path"
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH       # not mkstemp's 0600
    assert sorted(x.name for x in p.parent.iterdir()) == ["b.txt"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, broken)
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "entry"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(KeyError):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("2")
            raise KeyError("interrupted")
    assert (out / "f").read_text() == "1" and [x.name for x in tmp_path.iterdir()] == ["entry"]


def test_log_only_on_rank_zero(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log("hidden")
    monkeypatch.setenv("RANK", "0")
    log("shown")
    assert capsys.readouterr().err == "[sstoken] shown\n"
