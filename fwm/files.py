"""The one home of file I/O shared by every stage: atomic writes (a reader sees the old file or the whole
new one, never half) and JSON / JSONL reads whose errors name the file and line."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterable, Iterator


class DataFormatError(ValueError):
    """A data file does not have the expected form; the message names the file, the line/row and the field."""


def _default_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (mkstemp's files are 0o600 otherwise)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", suffix: str = "") -> Iterator[IO]:
    """A temporary file beside `path` that replaces `path` when the block ends without error and is
    removed when it raises, so readers never see a half-written file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    encoding = None if "b" in mode else "utf-8"
    with tempfile.NamedTemporaryFile(mode, encoding=encoding, dir=directory, prefix=".tmp_", suffix=suffix,
                                     delete=False) as f:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data (power loss, preemption)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.chmod(f.name, _default_file_mode())
    os.replace(f.name, path)


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


def read_json(path: str | os.PathLike) -> Any:
    """One JSON document; DataFormatError naming the file (and line) when it is missing or not JSON."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataFormatError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column "
                              f"{error.colno})") from None


def read_jsonl(path: str | os.PathLike, *, stop_at_bad_line: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (1-based line number, object) for each non-blank line; raises DataFormatError on a bad line,
    or with stop_at_bad_line ends quietly there (a log whose last line a kill tore)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}, line {line_number}: expected a JSON object, got "
                                          f"{type(row).__name__}")
            except json.JSONDecodeError as error:
                if stop_at_bad_line:
                    return
                raise DataFormatError(f"{path}, line {line_number}: not valid JSON ({error.msg} at column "
                                      f"{error.colno})") from None
            except DataFormatError:
                if stop_at_bad_line:
                    return
                raise
            yield line_number, row
