"""JSONL files for the environments: atomic writes, and reads whose errors name the file and line."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Iterator


class DataFormatError(ValueError):
    """A data file does not have the expected form; the message names the file, the line/row and the field."""


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Writes one JSON object per line to a temporary file, then moves it onto `path`; returns the row count."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    count = 0
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=".tmp_", suffix=".jsonl",
                                     delete=False) as f:
        try:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
    return count


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes one JSON document atomically (temporary file, then os.replace)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=".tmp_", suffix=".json",
                                     delete=False) as f:
        json.dump(value, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(f.name, path)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (1-based line number, object) for each non-blank line; raises DataFormatError on a bad line."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}, line {line_number}: not valid JSON ({error.msg} at column "
                                      f"{error.colno})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}, line {line_number}: expected a JSON object, got "
                                      f"{type(row).__name__}")
            yield line_number, row
