"""JSON and JSONL files: atomic writes, and reads whose errors name the file and line."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

from fwm.files import atomic_open


class DataFormatError(ValueError):
    """A data file does not have the expected form; the message names the file, the line/row and the field."""


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Writes one JSON object per line, atomically (atomic_open); returns the row count."""
    count = 0
    with atomic_open(path, suffix=".jsonl") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes one JSON document atomically (atomic_open)."""
    with atomic_open(path, suffix=".json") as f:
        json.dump(value, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")


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
