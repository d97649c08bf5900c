"""Stages that can be skipped, redone and shared: a fingerprint of what a stage reads, a completion marker
that records it, and an exclusive lock so two processes never run the same stage directory at once.

Used by `fwm data` (fwm/trajectories/pipeline.py: world, collect, blocks, tokenizer, corpora) and by
`fwm pipeline` (fwm/pipeline.py: data, training stages, evaluation). This module imports no other part
of fwm but fwm.files, so any stage may use it.

- `fingerprint(*parts)`: sha256 of the JSON of `parts` (keys sorted): a function of the config values a
  stage reads and of the fingerprints of the stages before it, so a change anywhere upstream changes it.
- `Stage(name, directory, fingerprint)`: `finished()` is the marker (DIRECTORY/stage.json, written last)
  when it holds this fingerprint and every output it lists exists; `execute(run)` returns the marker's
  stats when finished, else removes any stale marker (no claim of completion while outputs change), runs
  `run()` (which returns stats and the outputs to check next time) and writes the marker atomically.
  What `run` leaves behind when it is interrupted (a training stage's checkpoints) stays, so the next
  `execute` resumes from it.
- `execute(run, exclusive=True)` holds `StageLock(directory)` (an flock on DIRECTORY.lock, released by
  the kernel when the process dies, so a killed run never leaves a stale lock): a second process that
  wants the same stage waits, logging who holds it, then finds the marker and skips. flock works on local
  disks and NFSv4; on a filesystem without locks (gcsfuse), give each stage one machine.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from typing import Any, Callable, Mapping

from absl import logging

from fwm.files import write_json

MARKER = "stage.json"
WAIT_LOG_EVERY_S = 60.0  # while waiting for another process's stage, log that every this many seconds


def fingerprint(*parts: Any) -> str:
    """sha256 hex of the JSON of parts (dict keys sorted; tuples as lists)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=list).encode()).hexdigest()


class StageLock:
    """An exclusive flock on `directory`.lock for the life of the `with` block; waits (logging who holds it)
    when another process has it. Holder info (pid, host, since) is written into the lock file for that
    message; a process that dies releases the lock with its file descriptor."""

    def __init__(self, directory: str, poll_s: float = 0.5):
        self.path = os.path.abspath(directory).rstrip(os.sep) + ".lock"
        self.poll_s = poll_s
        self._fd: int | None = None
        self.waited_s = 0.0

    def holder(self) -> str:
        """Who holds the lock, as its file says ('unknown' when unreadable)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown"

    def __enter__(self) -> "StageLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start, last_log = time.monotonic(), None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
            if last_log is None or time.monotonic() - last_log >= WAIT_LOG_EVERY_S:
                logging.info("waiting for %s: another process runs this stage (%s)", self.path, self.holder())
                last_log = time.monotonic()
            time.sleep(self.poll_s)
        self.waited_s = time.monotonic() - start
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclasses.dataclass
class Stage:
    """A stage's directory, marker and fingerprint (module docstring). `record` adds fields to the marker
    (the pipeline records the config the fingerprint was taken over)."""

    name: str
    directory: str
    fingerprint: str
    marker_name: str = MARKER  # `fwm data`'s tokenizer stage writes into its workdir itself: tokenizer.stage.json
    record: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def marker(self) -> str:
        return os.path.join(self.directory, self.marker_name)

    def finished(self) -> dict[str, Any] | None:
        """The marker if it matches this fingerprint and every output it lists exists, else None."""
        try:
            with open(self.marker, encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(marker, dict) or marker.get("fingerprint") != self.fingerprint:
            return None
        if not all(os.path.exists(os.path.join(self.directory, output)) for output in marker.get("outputs", ())):
            return None
        return marker

    def execute(self, run: Callable[[], tuple[dict[str, Any], list[str]]], exclusive: bool = False
                ) -> tuple[dict[str, Any], bool]:
        """(stats, skipped): the finished marker's stats, or run()'s (run returns stats and outputs); with
        `exclusive`, under StageLock (a process that waited for another finds its marker and skips)."""
        marker = self.finished()
        if marker is not None:
            return marker["stats"], True
        if not exclusive:
            return self._run(run), False
        with StageLock(self.directory):
            marker = self.finished()  # another process may have finished it while this one waited
            if marker is not None:
                return marker["stats"], True
            return self._run(run), False

    def _run(self, run: Callable[[], tuple[dict[str, Any], list[str]]]) -> dict[str, Any]:
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self.marker):
            os.remove(self.marker)  # outputs are about to change: no stale claim of completion
        start = time.monotonic()
        stats, outputs = run()
        stats["seconds"] = round(time.monotonic() - start, 2)
        write_json(self.marker, {**self.record, "stage": self.name, "fingerprint": self.fingerprint,
                                 "outputs": outputs, "stats": stats})
        return stats
