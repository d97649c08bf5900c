"""`fwm pipeline --sweep`: rows of a table as ml-collections overrides of one base pipeline config, several
seeds each, sharing every common stage.

A sweep file (experiments/sweeps/NAME.py, `get_config(arg)`) returns `default_sweep_config()` filled in:

  name, note     the sweep's name and a note printed at the start and end and written into the report
  base           a pipeline config (fwm/pipeline.py)
  rows.ROW       `row(label, overrides, reference)`: a readable label, the overrides of `base` as nested
                 partial configs (`row` takes them as dotted keys: {"plan.mid_train": "wm"}), and the paper's
                 number for the row (shown beside the measured one)
  order          the rows' order in runs and the report (ConfigDict sorts its keys); () means by name
  seeds          the seeds each row runs with (`--seeds` replaces them)

Every (row, seed) is one pipeline run (fwm.pipeline.run) in one WORKDIR: stages are content-addressed by
their fingerprint (fwm/runs.py), so one mid-training checkpoint serves every row whose mid-training config
is the same, whichever process or row ran it first. Rows can run as separate processes (`--rows a` on one
machine, `--rows b` on another, sharing the workdir): each stage is locked while it runs
(fwm.stages.StageLock), so a second process waits for it and then skips it. Every row config is built and
validated before the first stage runs. A row that fails is recorded and the sweep goes on with the next
(the command then exits non-zero). A SIGTERM / SIGINT stops the sweep once the running stage ends: the row
is preempted, or finished when that stage was its last; no later row starts (the command exits non-zero).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections
from absl import logging

from fwm import pipeline, runs
from fwm.configlib import ConfigError, check_keys, nearest

ROW_KEYS = ("label", "reference", "overrides")


class RowsFailedError(RuntimeError):
    """Some row runs of a sweep failed (each recorded in its row.json); `results` holds the others."""

    def __init__(self, message: str, results: list[pipeline.RowResult]):
        super().__init__(message)
        self.results = results


def default_sweep_config() -> ml_collections.ConfigDict:
    """The keys of a sweep file (module docstring)."""
    c = ml_collections.ConfigDict()
    c.name = "sweep"
    c.note = ""
    c.base = pipeline.default_pipeline_config()
    c.rows = ml_collections.ConfigDict()
    c.order = ()
    c.seeds = (0,)
    return c


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "a.c": 2} -> {"a": {"b": 1, "c": 2}}."""
    out: dict[str, Any] = {}
    for path, value in dotted.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def row(label: str, overrides: Mapping[str, Any], reference: str = "") -> ml_collections.ConfigDict:
    """A sweep row: its label, its overrides of the base config as dotted keys, the paper's number."""
    return ml_collections.ConfigDict({"label": label, "reference": reference, "overrides": nested(overrides)})


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str) -> None:
    """Sets every leaf of the nested `overrides` in `config` (in place); ConfigError naming `where`.KEY for an
    unknown key (with the nearest valid one) or a value of the wrong type."""
    for key, value in overrides.items():
        path = f"{where}.{key}"
        if key not in config:
            raise ConfigError(f"unknown config key {path!r}: {nearest(key, config.keys())}")
        if isinstance(value, (Mapping, ml_collections.ConfigDict)) and isinstance(config[key], ml_collections.ConfigDict):
            apply_overrides(config[key], value, path)
            continue
        try:
            config[key] = value
        except TypeError as err:
            raise ConfigError(f"config key {path!r}: {err}") from None


def row_config(sweep: ml_collections.ConfigDict, name: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
    """The validated pipeline config of (row, seed): base, then the row's overrides, name, label, seed, workdir."""
    if name not in sweep.rows:
        raise ConfigError(f"unknown row {name!r}: {nearest(name, sweep.rows.keys())}")
    spec = sweep.rows[name]
    for key in spec.keys():
        if key not in ROW_KEYS:
            raise ConfigError(f"unknown config key 'rows.{name}.{key}': {nearest(key, ROW_KEYS)}")
    config = ml_collections.ConfigDict(sweep.base.to_dict())
    apply_overrides(config, spec.get("overrides", {}), f"rows.{name}.overrides")
    config.name, config.seed, config.workdir = name, int(seed), workdir
    config.label = spec.get("label", "") or name
    config.reference = spec.get("reference", "")
    try:
        return pipeline.validate_pipeline_config(config)
    except ConfigError as err:
        raise ConfigError(f"row {name!r}: {err}") from None


def check_sweep_keys(sweep: ml_collections.ConfigDict) -> None:
    """Unknown top-level or base keys of a sweep file (rows are checked as their configs are built)."""
    schema = default_sweep_config()
    for key in sweep.keys():
        if key not in schema:
            raise ConfigError(f"unknown config key {key!r}: {nearest(key, schema.keys())}")
    check_keys(sweep.base, schema.base, "base.")


def row_names(sweep: ml_collections.ConfigDict) -> list[str]:
    """Every row, in `order` (then any row it leaves out, by name); ConfigError for a name of `order` that is
    no row."""
    for name in sweep.order:
        if name not in sweep.rows:
            raise ConfigError(f"config key 'order': {name!r} is not a row: {nearest(name, sweep.rows.keys())}")
    return list(sweep.order) + sorted(set(sweep.rows.keys()) - set(sweep.order))


def selected(sweep: ml_collections.ConfigDict, rows: Sequence[str] | None, seeds: Sequence[int] | None
             ) -> tuple[list[str], list[int]]:
    """The rows (all, in the file's order, when None) and seeds (the file's when None) to run; unknown row
    names are a ConfigError naming the valid ones."""
    names = list(rows) if rows else row_names(sweep)
    for name in names:
        if name not in sweep.rows:
            raise ConfigError(f"--rows: unknown row {name!r}: {nearest(name, sweep.rows.keys())}")
    return names, [int(s) for s in (seeds if seeds else sweep.seeds)]


def run(sweep: ml_collections.ConfigDict, workdir: str, rows: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None) -> list[pipeline.RowResult]:
    """Runs the selected rows x seeds in WORKDIR one after another (module docstring); the report is
    rewritten after each. Raises RowsFailedError after the last row if any row failed."""
    check_sweep_keys(sweep)
    names, seed_list = selected(sweep, rows, seeds)
    configs = [row_config(sweep, name, seed, workdir) for name in names for seed in seed_list]  # all checked first
    runs.register_sweep(workdir, sweep.name, row_names(sweep), seed_list,
                        {name: sweep.rows[name].get("label", "") or name for name in sweep.rows.keys()}, sweep.note)
    if sweep.note:
        logging.info("%s", sweep.note)
    results, failed = [], []
    for index, config in enumerate(configs, start=1):
        logging.info("sweep %s: row %d/%d %s seed %d", sweep.name, index, len(configs), config.name, config.seed)
        try:
            result = pipeline.run(config)
        except Exception as err:  # noqa: BLE001 -- recorded in row.json; the other rows still run
            logging.error("row %s seed %d failed: %s: %s", config.name, config.seed, type(err).__name__, err)
            failed.append(f"{config.name} seed {config.seed}: {type(err).__name__}: {err}")
            continue
        results.append(result)
        if result.status == "preempted" or result.stop_signal:
            logging.warning("sweep %s stopped: %s during row %s seed %d (%s); rerun the same command for the rest",
                            sweep.name, result.stop_signal or "a stop request", config.name, config.seed, result.status)
            break
    if failed:
        raise RowsFailedError(f"{len(failed)} of {len(configs)} row runs failed: " + "; ".join(failed), results)
    return results
