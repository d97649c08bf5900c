"""The layout of a pipeline workdir and its records, written by `fwm pipeline` and read by `fwm report`.

  WORKDIR/stages/LABEL-FP12/        one directory per stage, content-addressed: LABEL names the stage and its
                                    arm (data, pretrain, mid_train_wm, sft_full, rl_fc_rl, eval_full), FP12 the
                                    first 12 hex digits of its fingerprint (fwm/stages.py), so every row and
                                    seed whose stage has the same config (and the same stages before it) uses
                                    the same directory; DIR/stage.json marks it finished; DIR.lock is its lock
  WORKDIR/runs/ROW/seedS/row.json   what one (row, seed) ran: its config, its plan, per stage the directory,
                                    fingerprint, whether it was skipped and the seconds it took, its status
                                    (running | finished | preempted | failed) and the eval directory
  WORKDIR/sweep.json                a sweep's rows and seeds (merged over the processes that ran parts of it),
                                    so the report can name the rows that have not finished
  WORKDIR/report.md, WORKDIR/figures/*.png   fwm report
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from fwm.files import DataFormatError, read_json, write_json
from fwm.stages import StageLock

STAGES_DIR = "stages"
RUNS_DIR = "runs"
ROW_RECORD = "row.json"
SWEEP_RECORD = "sweep.json"
REPORT = "report.md"
FIGURES_DIR = "figures"
FP_CHARS = 12
STATUSES = ("running", "finished", "preempted", "failed")


def stage_dir(workdir: str, label: str, fingerprint: str) -> str:
    """WORKDIR/stages/LABEL-FP12."""
    return os.path.join(os.path.abspath(workdir), STAGES_DIR, f"{label}-{fingerprint[:FP_CHARS]}")


def row_dir(workdir: str, row: str, seed: int) -> str:
    """WORKDIR/runs/ROW/seedSEED."""
    return os.path.join(os.path.abspath(workdir), RUNS_DIR, row, f"seed{seed}")


def located(workdir: str, recorded_dir: str) -> str:
    """A row record's stage directory (its `dir`, `eval_dir`) as WORKDIR/stages/NAME of the workdir being read.
    Records hold the absolute path the stage ran in; a workdir that was moved, restored elsewhere, or gathered
    from several machines into one directory holds its stages under its own stages/, by the same content-addressed
    NAME. The recorded path when the workdir has no such directory (a stage kept outside it)."""
    here = os.path.join(os.path.abspath(workdir), STAGES_DIR, os.path.basename(os.path.normpath(recorded_dir)))
    return here if os.path.isdir(here) else recorded_dir


def write_row(workdir: str, record: Mapping[str, Any]) -> str:
    """Writes a (row, seed)'s record atomically; returns its path."""
    path = os.path.join(row_dir(workdir, record["row"], int(record["seed"])), ROW_RECORD)
    write_json(path, dict(record))
    return path


def read_rows(workdir: str) -> list[dict[str, Any]]:
    """Every WORKDIR/runs/*/seed*/row.json, sorted by (row, seed), each stage's `dir` and the `eval_dir` as
    `located` in this workdir; DataFormatError naming a bad file."""
    root = os.path.join(workdir, RUNS_DIR)
    records = []
    for row in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        for seed_dir in sorted(os.listdir(os.path.join(root, row))):
            path = os.path.join(root, row, seed_dir, ROW_RECORD)
            if not os.path.isfile(path):
                continue
            record = read_json(path)
            missing = [key for key in ("row", "seed", "status", "stages") if key not in record] \
                if isinstance(record, dict) else ["(an object)"]
            if missing:
                raise DataFormatError(f"{path}: expected a row record with keys row, seed, status, stages; "
                                      f"missing {missing}")
            for stage in record["stages"]:
                if isinstance(stage, dict) and stage.get("dir"):
                    stage["dir"] = located(workdir, stage["dir"])
            if record.get("eval_dir"):
                record["eval_dir"] = located(workdir, record["eval_dir"])
            records.append(record)
    return sorted(records, key=lambda r: (r["row"], int(r["seed"])))


def register_sweep(workdir: str, name: str, rows: Sequence[str], seeds: Iterable[int], labels: Mapping[str, str],
                   note: str = "") -> dict[str, Any]:
    """Adds this process's rows and seeds to WORKDIR/sweep.json (read, merged, written under a lock, so
    processes that run different rows of one sweep all leave their share); returns the merged record."""
    path = os.path.join(workdir, SWEEP_RECORD)
    with StageLock(path):
        existing = read_json(path) if os.path.isfile(path) else {}
        merged_rows = list(existing.get("rows", []))
        merged_rows += [row for row in rows if row not in merged_rows]
        record = {"name": name, "note": note, "rows": merged_rows,
                  "seeds": sorted(set(existing.get("seeds", [])) | {int(s) for s in seeds}),
                  "labels": {**existing.get("labels", {}), **dict(labels)}}
        write_json(path, record)
    return record


def read_sweep(workdir: str) -> dict[str, Any] | None:
    """WORKDIR/sweep.json, or None when the workdir holds no sweep."""
    path = os.path.join(workdir, SWEEP_RECORD)
    return read_json(path) if os.path.isfile(path) else None
