"""Atomic writes: whole file or the old one, nothing left behind on error, permissions as open() gives."""
import os

import pytest

from fwm.envs.jsonl import read_jsonl, write_jsonl
from fwm.files import atomic_open


def test_atomic_open_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_open(path) as f:
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half of the second")
            raise RuntimeError("killed midway")
    assert path.read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # the temporary file is gone


def test_written_files_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"b": 2}])
        with atomic_open(tmp_path / "blob.bin", "wb") as f:
            f.write(b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "rows.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "blob.bin").stat().st_mode & 0o777 == 0o644
    assert [row for _, row in read_jsonl(tmp_path / "rows.jsonl")] == [{"a": 1}, {"b": 2}]
