"""Atomic file writes shared by every stage: a reader sees the old file or the whole new one, never half."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


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
