"""`fwm pipeline`: data -> stage 0 -> mid-training -> SFT -> RL -> evaluation from one config, every stage
skipped when finished, resumed when interrupted, redone when its config changed (and everything after it).

The pipeline config (`default_pipeline_config()`, experiments/pipeline_*.py start from it) is one tree:

  name, label, reference   the row's name (WORKDIR/runs/NAME), a readable label and the paper's number for
                           it (report only)
  seed                     the training seed of every stage (train.seed, data.seed, the eval's episode seed);
                           the world and corpora are shared by all seeds
  unseeded_stages          stages that run with seed 0 whatever `seed` is (default none): ("pretrain",
                           "mid_train", "sft") makes a row's seeds vary RL (and eval) only, on one shared SFT
                           checkpoint, which tells the RL's variance from the whole pipeline's
  plan                     which stages run: pretrain (stage 0 on the world's documents: knowledge world only),
                           mid_train (none | standard | wm | iwm: corpus mid_train_plain | mid_train_wm | iwm),
                           sft (bool), format (plain | state | full: the response format of SFT, RL and eval),
                           rl (none | grpo | fc_rl), eval (bool)
  init.source              where the first training stage starts: scratch (shapes from `model`) or hf:PATH
  model                    the model (fwm.config's `model` section): every stage's numerics, the first one's shapes
  data                     the `fwm data` config (fwm.trajectories.pipeline.default_data_config)
  stages.{pretrain, mid_train, sft, rl}   each a training config (fwm.config.default_config) without its
                           `model` and `stage`; `stage_section(experiment_config)` makes one from an experiment
  eval                     the `fwm eval` config (fwm.eval.config.default_eval_config)

Keys the pipeline sets itself must stay at their defaults in the sections (an error names any that is not):
workdirs, seeds, init.source, tokenizer.path, the data files and corpus (from the plan and the data stage's
manifest), rl.variant / rl.tool / rl.index_dir / rl.topk / rl.env_metric (the format and the world), the
eval's checkpoint, data_dir, tasks, tokenizer, prompt.variant and env.topk / env.metric. plan.rl=grpo turns
the world-model terms off (rl.omega 0, no R_calib, no R_ground) whatever stages.rl.rl says; fc_rl keeps them.
The mid-training arms are compared at equal epochs: stages.mid_train.train.epochs must be > 0 (steps from the
corpus size, so the longer WM-AMT corpus gets more steps).

Each stage runs in WORKDIR/stages/LABEL-FP12 (fwm/runs.py) under fwm.stages.Stage with a lock: its
fingerprint covers the stage's resolved config (paths and pure bookkeeping keys left out: log/checkpoint
cadence, worker counts, progress bars) and the fingerprints of the stages before it, so rows and seeds share
every stage whose config is the same, a changed stage gets a new directory (as does every stage after it),
and an interrupted stage is rerun in its own directory, where the trainers resume from their checkpoints.
SIGTERM / SIGINT: a training stage saves and returns, the pipeline records the row as preempted and stops
(rerun the command to continue); during data or eval the stage finishes first. Stages run in this process
(the trainers, `fwm data` and `fwm eval` functions); the data stage's worker processes are kept on the CPU.
WORKDIR/runs/NAME/seedS/row.json records what ran; fwm/report.py writes WORKDIR/report.md at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Iterable, Iterator

import ml_collections
from absl import logging

from fwm import config as train_config_lib
from fwm import configlib
from fwm import runs
from fwm.configlib import ConfigError, check_keys, check_types, require
from fwm.data.manifest import read_manifest
from fwm.eval.config import default_eval_config, validate_eval_config
from fwm.schema import VARIANTS
from fwm.stages import Stage, fingerprint
from fwm.train.run_control import StopRequest
from fwm.trajectories import pipeline as data_pipeline

FORMAT_VERSION = 1  # part of every fingerprint: bump when a stage's outputs change meaning
MID_TRAIN_CORPUS = {"standard": "mid_train_plain", "wm": "mid_train_wm", "iwm": "iwm"}
MID_TRAIN_ARMS = ("none",) + tuple(MID_TRAIN_CORPUS)
RL_ALGORITHMS = ("none", "grpo", "fc_rl")
TRAINING_STAGES = ("pretrain", "mid_train", "sft", "rl")
# Set by the pipeline in every training section (they must stay at their defaults there).
TRAIN_OWNED = ("train.workdir", "train.seed", "data.seed", "data.manifest", "data.corpus", "data.train_files",
               "data.eval_files", "init.source", "tokenizer.path")
RL_OWNED = TRAIN_OWNED + ("rl.variant", "rl.tool", "rl.index_dir", "rl.topk", "rl.env_metric")
EVAL_OWNED = ("workdir", "checkpoint", "tokenizer", "data_dir", "tasks_file", "tasks_format", "seed", "prompt.variant",
              "env.topk", "env.metric", "env.retriever_url")
DATA_OWNED = ("workdir",)
# Keys no result depends on, and paths (the fingerprints name the stages before instead): left out of the
# fingerprints, so an interrupted stage may resume with other values and a moved workdir keeps its stages.
TRAIN_NOT_FINGERPRINTED = ("train.workdir", "train.log_every", "train.ckpt_every", "train.keep_ckpts",
                           "train.async_checkpoint", "train.peak_flops_per_device", "data.worker_count",
                           "data.read_threads", "rl.env_threads", "init.source", "tokenizer.path", "data.manifest",
                           "data.train_files", "data.eval_files", "rl.index_dir")
# The supervised stages never read the `rl` section: a change of an RL default must not redo stage 0 to SFT.
SUPERVISED_NOT_FINGERPRINTED = ("rl",)
DATA_NOT_FINGERPRINTED = ("workdir", "workers", "chunk_size", "progress")
EVAL_NOT_FINGERPRINTED = ("workdir", "progress", "env.threads", "checkpoint", "data_dir", "tokenizer")


class StagePreempted(RuntimeError):
    """A training stage stopped on SIGTERM/SIGINT after saving a checkpoint; rerun to resume it."""


# ---------------------------------------------------------------------------------------------- config
def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def stage_section(train_config: ml_collections.ConfigDict, owned: tuple[str, ...] = RL_OWNED
                  ) -> ml_collections.ConfigDict:
    """A training config (an experiment's get_config()) as a pipeline section: without `model` and `stage`
    (the pipeline's), the keys the pipeline sets back at their defaults."""
    section = ml_collections.ConfigDict(train_config.to_dict())
    defaults = train_config_lib.default_config()
    for path in owned:
        _set(section, path, _get(defaults, path))
    del section["model"]
    del section["stage"]
    return section


def eval_section(eval_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An eval config (experiments/eval.py's get_config()) with the keys the pipeline sets at their defaults."""
    section = ml_collections.ConfigDict(eval_config.to_dict())
    defaults = default_eval_config()
    for path in EVAL_OWNED:
        _set(section, path, _get(defaults, path))
    return section


def default_pipeline_config() -> ml_collections.ConfigDict:
    """Every key `fwm pipeline` reads (module docstring), with defaults: the full paper arm on a small
    search world with the default training sections."""
    c = ml_collections.ConfigDict()
    c.name = "pipeline"
    c.label = ""
    c.reference = ""
    c.workdir = ""
    c.seed = 0
    c.unseeded_stages = ()
    c.plan = ml_collections.ConfigDict(dict(pretrain=True, mid_train="wm", sft=True, format="full", rl="fc_rl",
                                            eval=True))
    c.init = ml_collections.ConfigDict(dict(source="scratch"))
    c.model = train_config_lib.default_config().model
    c.data = data_pipeline.default_data_config()
    c.stages = ml_collections.ConfigDict()
    for name in TRAINING_STAGES:
        section = stage_section(train_config_lib.default_config())
        if name == "mid_train":
            section.train.epochs = 1.0
        c.stages[name] = section
    c.eval = eval_section(default_eval_config())
    return c


def _prefixed(err: ConfigError, prefix: str) -> ConfigError:
    """err with every quoted dotted key it names prefixed (a section's error as the pipeline's key)."""
    return ConfigError(re.sub(r"((?:config key|config section|key) ')", lambda m: m.group(1) + prefix, str(err)))


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One planned stage: `label` names its directory, `config` is what it runs with (paths filled in by the
    runner), `fingerprint` covers the config and the stages before it."""

    name: str                           # data | pretrain | mid_train | sft | rl | eval
    label: str                          # data, pretrain, mid_train_wm, sft_full, rl_fc_rl, eval_full
    fingerprint: str
    config: ml_collections.ConfigDict   # data config, training config or eval config
    fingerprinted: dict[str, Any]       # the config as fingerprinted (recorded in the stage's marker)


def _without(tree: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """A deep copy of a config dict without the dotted `paths` it has."""
    out = json.loads(json.dumps(tree, default=list))
    for path in paths:
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _data_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(c.data.to_dict())


def stage_seed(c: ml_collections.ConfigDict, name: str) -> int:
    """The seed stage `name` runs with: the row's, or 0 for the `unseeded_stages`."""
    return 0 if name in c.unseeded_stages else int(c.seed)


def _training_config(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The full training config of stage `name` (paths empty: the runner fills them)."""
    full = train_config_lib.default_config()
    section = c.stages[name].to_dict()
    full.update(section)
    full.model = ml_collections.ConfigDict(c.model.to_dict())
    full.stage = name
    full.train.seed = full.data.seed = stage_seed(c, name)
    p = c.plan
    if name == "pretrain":
        full.data.corpus = "pretrain"
    elif name == "mid_train":
        full.data.corpus = MID_TRAIN_CORPUS[p.mid_train]
    elif name == "sft":
        full.data.corpus = f"sft_{p.format}"
    else:
        full.rl.variant = p.format
        full.rl.tool = "search" if c.data.world.kind == "knowledge" else "python"
        full.rl.topk = int(c.data.env.topk)
        full.rl.env_metric = c.data.env.metric
        if p.rl == "grpo":
            full.rl.update(dict(omega=0.0, calib_reward=False, ground_reward=False))
    return full


def _eval_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    full = ml_collections.ConfigDict(c.eval.to_dict())
    full.seed = stage_seed(c, "eval")
    full.prompt.variant = c.plan.format
    full.env.topk = int(c.data.env.topk)
    full.env.metric = c.data.env.metric
    return full


def planned_stages(c: ml_collections.ConfigDict) -> list[str]:
    """The training stages the plan runs, in order."""
    p = c.plan
    wanted = {"pretrain": p.pretrain, "mid_train": p.mid_train != "none", "sft": p.sft, "rl": p.rl != "none"}
    return [name for name in TRAINING_STAGES if wanted[name]]


def _label(c: ml_collections.ConfigDict, name: str) -> str:
    p = c.plan
    return {"data": "data", "pretrain": "pretrain", "mid_train": f"mid_train_{p.mid_train}",
            "sft": f"sft_{p.format}", "rl": f"rl_{p.rl}", "eval": f"eval_{p.format}"}[name]


def plan(c: ml_collections.ConfigDict) -> list[StageSpec]:
    """Every stage of the row, in order, with its config and fingerprint (a pure function of the config)."""
    specs = []
    data = _data_config(c)
    shown = _without(data.to_dict(), DATA_NOT_FINGERPRINTED)
    data_fp = fingerprint(FORMAT_VERSION, "data", shown)
    specs.append(StageSpec("data", "data", data_fp, data, shown))
    parent_fp, source = data_fp, c.init.source
    for name in planned_stages(c):
        config = _training_config(c, name)
        unread = TRAIN_NOT_FINGERPRINTED + (() if name == "rl" else SUPERVISED_NOT_FINGERPRINTED)
        shown = _without(config.to_dict(), unread)
        stage_fp = fingerprint(FORMAT_VERSION, name, parent_fp, data_fp, source, shown)
        specs.append(StageSpec(name, _label(c, name), stage_fp, config, shown))
        parent_fp, source = stage_fp, "previous stage"
    if c.plan.eval:
        config = _eval_config(c)
        shown = _without(config.to_dict(), EVAL_NOT_FINGERPRINTED)
        specs.append(StageSpec("eval", _label(c, "eval"), fingerprint(FORMAT_VERSION, "eval", parent_fp, data_fp,
                                                                      shown), config, shown))
    return specs


def check_pipeline_override_args(argv: Iterable[str]) -> None:
    """Checks `--config.a.b=v` and `--sweep.base.a.b=v` override paths against default_pipeline_config()."""
    schema = default_pipeline_config()
    configlib.check_override_args(argv, schema, "config")
    configlib.check_override_args(argv, schema, "sweep.base")


def _check_owned(section: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, owned: tuple[str, ...],
                 prefix: str) -> None:
    for path in owned:
        value, default = _get(section, path), _get(defaults, path)
        same = list(value) == list(default) if isinstance(default, (tuple, list)) else value == default
        require(same, prefix + path, f"its default {default!r}: the pipeline sets it (fwm/pipeline.py docstring)",
                value)


def validate_pipeline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Unknown keys, types, the plan, the keys the pipeline owns, then every planned stage's own config
    validated as its command would (errors name the pipeline's dotted key). Returns config."""
    schema = default_pipeline_config()
    check_keys(config, schema)
    check_types(config, schema, nullable={"model.rope_scaling": (tuple, list)})
    c, p = config, config.plan
    require(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", c.name)), "name", "a row name of letters, digits, '_', '-', '.'",
            c.name)
    require(p.mid_train in MID_TRAIN_ARMS, "plan.mid_train", f"one of {MID_TRAIN_ARMS}", p.mid_train)
    require(p.format in VARIANTS, "plan.format", f"one of {VARIANTS}", p.format)
    require(p.rl in RL_ALGORITHMS, "plan.rl", f"one of {RL_ALGORITHMS}", p.rl)
    require(p.rl != "fc_rl" or p.format == "full", "plan.rl",
            f"'grpo' or 'none' with plan.format={p.format!r} (FC-RL needs the full format's confidence)", p.rl)
    require(set(c.unseeded_stages) <= set(TRAINING_STAGES + ("eval",)), "unseeded_stages",
            f"stage names of {TRAINING_STAGES + ('eval',)}", tuple(c.unseeded_stages))
    require(bool(planned_stages(c)) or not p.eval, "plan", "at least one training stage to evaluate", p.to_dict())
    require(re.fullmatch(r"scratch|orbax:.+|hf:.+", c.init.source) is not None, "init.source",
            "'scratch', 'orbax:PATH' or 'hf:PATH'", c.init.source)
    if p.mid_train != "none":
        require(c.stages.mid_train.train.epochs > 0, "stages.mid_train.train.epochs",
                "> 0: the mid-training arms are compared at equal epochs of their corpora", c.stages.mid_train.train.epochs)
    _check_owned(c.data, data_pipeline.default_data_config(), DATA_OWNED, "data.")
    try:
        data_pipeline.validate_data_config(_data_config(c))
    except ConfigError as err:
        raise _prefixed(err, "data.") from None
    require(not p.pretrain or c.data.world.kind == "knowledge", "plan.pretrain",
            "False for the arithmetic world (stage 0 trains on the knowledge world's documents)", p.pretrain)
    defaults = train_config_lib.default_config()
    for name in TRAINING_STAGES:
        _check_owned(c.stages[name], defaults, RL_OWNED if name == "rl" else TRAIN_OWNED, f"stages.{name}.")
    _check_owned(c.eval, default_eval_config(), EVAL_OWNED, "eval.")
    specs = plan(c)
    for index, spec in enumerate(specs[1:]):
        stage_config = ml_collections.ConfigDict(spec.config.to_dict())
        try:
            if spec.name == "eval":
                stage_config.checkpoint, stage_config.data_dir = "<last stage>", "<data>"
                validate_eval_config(stage_config)
            else:
                stage_config.data.manifest = "<data>" if spec.name != "rl" else ""
                stage_config.init.source = c.init.source if index == 0 else "orbax:<previous stage>"
                train_config_lib.validate(stage_config)
        except ConfigError as err:
            if spec.name == "eval":
                raise _prefixed(err, "eval.") from None
            message = _prefixed(err, f"stages.{spec.name}.").args[0]
            raise ConfigError(message.replace(f"stages.{spec.name}.model.", "model.")) from None
    return config


# ---------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _cpu_only_children() -> Iterator[None]:
    """Processes spawned inside the block (the data stage's workers) see JAX_PLATFORMS=cpu: data work needs
    no accelerator, and one claimed by a worker would be missing for training (this process keeps its own)."""
    previous = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = previous


def _run_data(spec: StageSpec, directory: str) -> tuple[dict[str, Any], list[str]]:
    config = ml_collections.ConfigDict(spec.config.to_dict())
    config.workdir = directory
    with _cpu_only_children():
        stats = data_pipeline.run(config)
    logging.info("%s", data_pipeline.format_stats(stats))
    return {"stages": stats["stages"]}, ["stats.json", os.path.join("corpora", "manifest.json")]


def _run_training(spec: StageSpec, directory: str, data_dir: str, source: str) -> tuple[dict[str, Any], list[str]]:
    config = ml_collections.ConfigDict(spec.config.to_dict())
    config.train.workdir = directory
    config.init.source = source
    if spec.name == "rl":
        from fwm.rl import loop as rl_loop
        from fwm.train.inputs import source_tokenizer

        manifest = read_manifest(data_dir)
        config.data.train_files = manifest.corpora["rl_tasks"].train_files
        if config.rl.tool == "search":
            config.rl.index_dir = os.path.join(data_dir, "world", "bm25")
        recorded = source_tokenizer(source) if source != "scratch" else None
        config.tokenizer.path = recorded.path if recorded is not None else manifest.tokenizer
        result = rl_loop.run(config)
        if result["preempted"]:
            raise StagePreempted(f"stage {spec.label} stopped at step {result['step']} ({directory})")
        return {"step": result["step"], "iterations": result["iteration"], "last_record": result["last_record"]}, [
            "checkpoints", "metrics.jsonl"]
    from fwm.train import loop as train_loop

    config.data.manifest = data_dir
    result = train_loop.run(config)
    if result.preempted:
        raise StagePreempted(f"stage {spec.label} stopped at step {result.step} ({directory})")
    return {"step": result.step, "last_record": result.last_record, "perf": result.perf}, ["checkpoints"]


def _run_eval(spec: StageSpec, directory: str, data_dir: str, checkpoint: str) -> tuple[dict[str, Any], list[str]]:
    from fwm.eval import run as eval_run

    config = ml_collections.ConfigDict(spec.config.to_dict())
    config.workdir, config.data_dir, config.checkpoint = directory, data_dir, checkpoint
    results = eval_run.run(config)
    greedy = results.get("greedy", {}).get("by_source", {}).get("all", {})
    return {"tasks": results["num_tasks"], "score": greedy.get("score"),
            "format_adherence": greedy.get("format_adherence")}, ["eval.json", "eval.md"]


@dataclasses.dataclass
class RowResult:
    """What one (row, seed) did; `record` is its row.json."""

    status: str          # finished | preempted | failed
    record: dict[str, Any]
    record_path: str
    # SIGTERM / SIGINT received while the row ran, also when it came during the last stage, which then finished
    # (status finished): a sweep must stop after this row, not start the next
    stop_signal: str | None = None


def run(config: ml_collections.ConfigDict, write_report: bool = True) -> RowResult:
    """Runs (or skips) every stage of the row config.name, seed config.seed, into config.workdir; returns its
    status. A failing stage is recorded (status failed) and re-raised; a preempted one returns 'preempted'."""
    validate_pipeline_config(config)
    if not config.workdir:
        raise ConfigError("config key 'workdir': expected the pipeline's directory (--workdir DIR), got ''")
    workdir = os.path.abspath(config.workdir)
    specs = plan(config)
    record: dict[str, Any] = {
        "row": config.name, "seed": int(config.seed), "label": config.label or config.name,
        "reference": config.reference, "plan": config.plan.to_dict(), "status": "running", "stages": [],
        "config": json.loads(config.to_json()), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = runs.write_row(workdir, record)
    dirs: dict[str, str] = {}
    source = config.init.source
    started = time.monotonic()
    logging.info("pipeline %s seed %d: %d stages (%s) in %s", config.name, config.seed, len(specs),
                 " -> ".join(spec.label for spec in specs), workdir)
    stop = StopRequest("stage")
    try:
        with stop:
            for index, spec in enumerate(specs, start=1):
                directory = runs.stage_dir(workdir, spec.label, spec.fingerprint)
                runner: Callable[[], tuple[dict[str, Any], list[str]]]
                if spec.name == "data":
                    runner = lambda spec=spec, d=directory: _run_data(spec, d)  # noqa: E731
                elif spec.name == "eval":
                    runner = lambda spec=spec, d=directory, s=source: _run_eval(  # noqa: E731
                        spec, d, dirs["data"], s.split(":", 1)[1] if s.startswith("orbax:") else s[len("hf:"):])
                else:
                    runner = lambda spec=spec, d=directory, s=source: _run_training(  # noqa: E731
                        spec, d, dirs["data"], s)
                logging.info("stage %d/%d %s (%s): %s", index, len(specs), spec.label, config.name, directory)
                stage_start = time.monotonic()
                stats, skipped = Stage(spec.label, directory, spec.fingerprint,
                                       record={"config": spec.fingerprinted}).execute(runner, exclusive=True)
                logging.info("stage %d/%d %s %s (%.1f s)", index, len(specs), spec.label,
                             "skipped: finished earlier" if skipped else "done", time.monotonic() - stage_start)
                dirs[spec.name] = directory
                if spec.name not in ("data", "eval"):
                    source = "orbax:" + os.path.join(directory, "checkpoints")
                record["stages"].append({"stage": spec.name, "label": spec.label, "dir": directory,
                                         "fingerprint": spec.fingerprint, "skipped": skipped,
                                         "seconds": stats.get("seconds"), "stats": stats})
                runs.write_row(workdir, record)
                if stop.name is not None and index < len(specs):
                    raise StagePreempted(f"{stop.name} received during stage {spec.label}")
        record["status"] = "finished"
    except StagePreempted as err:
        record["status"], record["error"] = "preempted", str(err)
        logging.warning("pipeline %s seed %d preempted: %s; rerun the same command to resume", config.name,
                        config.seed, err)
    except BaseException as err:
        record["status"], record["error"] = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        record["seconds"] = round(time.monotonic() - started, 2)
        if "eval" in dirs:
            record["eval_dir"] = dirs["eval"]
        runs.write_row(workdir, record)
        if write_report:
            _report(workdir)
    return RowResult(record["status"], record, path, stop.name)


def _report(workdir: str) -> None:
    """Writes WORKDIR/report.md (fwm/report.py); a report that fails is logged, never the run's failure."""
    from fwm import report

    try:
        report.write_report(workdir)
    except Exception as err:  # noqa: BLE001 -- the stages' outputs stand; the report can be rerun (fwm report)
        logging.error("could not write the report of %s: %s: %s (rerun: fwm report %s)", workdir,
                      type(err).__name__, err, workdir)
