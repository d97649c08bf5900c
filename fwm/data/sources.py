"""Random-access record sources (JSONL, Parquet, ArrayRecord) that remember where each record came from.

Every source is a Grain random-access data source (`__len__` + `__getitem__`) whose elements are
`SourceRecord`s: the raw payload plus the file and line/row it was read from, so that validation
(fwm/data/records.py) can name the exact place of a bad record. Sources hold no open file handles
when pickled, so Grain worker processes can take them.

Locations: JSONL records are named by their 1-based physical line number (blank lines are skipped
but still counted); Parquet and ArrayRecord records by their 0-based row index within the file.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import os
import threading
from typing import Any, Sequence

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARRAY_RECORD_MARKER = ".array_record"  # also matches sharded names like x.array_record-00000-of-00004
_INDEX_CHUNK_BYTES = 1 << 24


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One raw record: `payload` is JSON bytes (JSONL, ArrayRecord) or a dict (Parquet row)."""

    path: str
    location: str  # "line 7" (JSONL, 1-based) or "row 6" (Parquet / ArrayRecord, 0-based)
    payload: bytes | dict


class JsonlSource:
    """Random access to the non-blank lines of one JSONL file through a line-offset index built at open."""

    def __init__(self, path: str):
        self.path = str(path)
        self._starts, self._ends, self._linenos = _build_line_index(self.path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)  # pread on one fd is thread-safe

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> SourceRecord:
        index = _check_index(index, len(self), self.path)
        start, end = int(self._starts[index]), int(self._ends[index])
        payload = os.pread(self._fd, end - start, start)
        return SourceRecord(self.path, f"line {int(self._linenos[index])}", payload)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = None  # file descriptors do not cross process boundaries
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


def _build_line_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte [start, end) of every non-blank line (newline and trailing \\r excluded) and its 1-based number."""
    newline_positions = []
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_INDEX_CHUNK_BYTES):
            newline_positions.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
            size += len(chunk)
        newlines = np.concatenate(newline_positions) if newline_positions else np.zeros(0, np.int64)
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        ends = np.concatenate([newlines, [size]]).astype(np.int64)
        linenos = np.arange(1, len(starts) + 1, dtype=np.int64)
        # Lines of at most 2 bytes may be blank ("", "\r", " \r"); read them to decide. Longer lines that
        # are only whitespace fail JSON parsing later with their line number, which is what a user wants.
        keep = ends > starts
        for i in np.flatnonzero(keep & (ends - starts <= 2)):
            f.seek(int(starts[i]))
            if not f.read(int(ends[i] - starts[i])).strip():
                keep[i] = False
        # A CRLF line's "\r" is left in place: json.loads accepts trailing whitespace.
    return starts[keep], ends[keep], linenos[keep]


class ParquetSource:
    """Random access to the rows of one Parquet file; decoded row groups are kept in a small LRU cache."""

    def __init__(self, path: str, cached_row_groups: int = 4):
        import pyarrow.parquet as pq  # heavy import, only for Parquet users

        self.path = str(path)
        metadata = pq.ParquetFile(self.path).metadata
        rows_per_group = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(rows_per_group)]).astype(np.int64)
        self._cached_row_groups = cached_row_groups
        self._file = None
        self._cache: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # Grain reads with several threads; the cache is shared

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def __getitem__(self, index: int) -> SourceRecord:
        index = _check_index(index, len(self), self.path)
        group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
        table = self._row_group(group)
        row = table.slice(index - int(self._group_starts[group]), 1).to_pylist()[0]
        return SourceRecord(self.path, f"row {index}", row)

    def _row_group(self, group: int):
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            if self._file is None:
                import pyarrow.parquet as pq

                self._file = pq.ParquetFile(self.path)
            table = self._file.read_row_group(group)
            self._cache[group] = table
            if len(self._cache) > self._cached_row_groups:
                self._cache.popitem(last=False)
            return table

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_file"] = None
        state["_cache"] = collections.OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ParquetSource({self.path!r}, {len(self)} records)"


class ArrayRecordSource:
    """Random access to one ArrayRecord file whose records are JSON-encoded bytes."""

    def __init__(self, path: str):
        import grain

        self.path = str(path)
        self._source = grain.sources.ArrayRecordDataSource([self.path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> SourceRecord:
        index = _check_index(index, len(self), self.path)
        return SourceRecord(self.path, f"row {index}", self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, {len(self)} records)"


class ConcatSource:
    """Several sources read as one, in the given order."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> SourceRecord:
        index = _check_index(index, len(self), "the concatenated sources")
        which = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[which][index - int(self._offsets[which])]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r})"


def _check_index(index: Any, length: int, what: str) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"record index {index} out of range for {what} ({length} records)")
    return index


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by a path, a glob, or a list of them, in sorted order within each glob."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for pattern in paths:
        pattern = os.fspath(pattern)
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for path in matched:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file {path!r} does not exist (or is not a file)")
        files.extend(matched)
    if not files:
        raise ValueError("no data files given")
    return files


def open_file_source(path: str) -> JsonlSource | ParquetSource | ArrayRecordSource:
    """The source for one file, chosen by its extension."""
    name = os.path.basename(path)
    if name.endswith(JSONL_SUFFIXES):
        return JsonlSource(path)
    if name.endswith(PARQUET_SUFFIXES):
        return ParquetSource(path)
    if ARRAY_RECORD_MARKER in name:
        return ArrayRecordSource(path)
    raise ValueError(
        f"cannot tell the format of {path!r}: expected a name ending in {' or '.join(JSONL_SUFFIXES)} "
        f"(JSONL), {PARQUET_SUFFIXES[0]} (Parquet) or containing {ARRAY_RECORD_MARKER} (ArrayRecord)"
    )


def open_source(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> ConcatSource:
    """One random-access source over every file named by `paths` (path, glob or list), concatenated.

    Raises FileNotFoundError for a pattern that matches nothing and ValueError when there are no records.
    """
    files = expand_paths(paths)
    source = ConcatSource([open_file_source(path) for path in files])
    if len(source) == 0:
        raise ValueError(f"the data files {files} hold no records")
    return source
