"""The `fwm` command line: `fwm <command> [flags]`, one function per command.

Commands import their modules lazily so `fwm convert` does not pay for the training stack and
Grain worker processes (which re-import the main module) stay cheap.
"""
from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
from typing import Any, Iterator

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("dtype", None, "convert: parameter dtype to write (float32, bfloat16, float16); default keeps it.")
_TRAIN_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "train, data: experiment file experiments/NAME.py[:arg]; override keys with --config.a.b=v",
    lock_config=True)
flags.DEFINE_bool("quick", False, "bench: the S model only, one decode batch (under 3 minutes on 2 idle cores)")
flags.DEFINE_string("out", "bench.json", "bench: where the JSON report goes")
_SWEEP_CONFIG = config_flags.DEFINE_config_file(
    "sweep", None, "pipeline: a sweep file experiments/sweeps/NAME.py[:arg] (rows x seeds of pipeline configs); "
    "override keys with --sweep.base.a.b=v", lock_config=True)
flags.DEFINE_float("min_gain", 0.0, "compare: the least gain (a share, 0.05 = 5 points) the lower end of the "
                   "paired 95% interval must reach; exit status 1 otherwise")
flags.DEFINE_list("rows", None, "pipeline --sweep: the rows to run (default: all, in the file's order)")
flags.DEFINE_list("seeds", None, "pipeline --sweep: the seeds to run each row with (default: the file's seeds)")
flags.DEFINE_string("workdir", None, "train: the stage's directory (checkpoints, metrics.jsonl, TensorBoard, "
                    "tokenizer); data: where the world, trajectories, blocks, corpora and stats.json go")


def _known_error(err: BaseException) -> BaseException | None:
    """The first error in err's chain (raised from, or during the handling of) that carries a message meant
    for the user: a bad config, a bad record or data file (Grain re-raises it wrapped), a missing path, a
    tokenizer mismatch, a diverged run."""
    from fwm.configlib import ConfigError
    from fwm.data.records import BadRecordError
    from fwm.files import DataFormatError
    from fwm.train.inputs import TokenizerMismatchError
    from fwm.train.run_control import NonFiniteLossError

    known = (ConfigError, BadRecordError, DataFormatError, TokenizerMismatchError, NonFiniteLossError,
             FileNotFoundError)
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, known):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _known_errors_as_messages(command: str) -> Iterator[None]:
    """Known errors end the command with their one-line message and exit status 1; --verbosity=1 keeps the
    traceback (as does any other error)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- filtered by _known_error, everything else re-raised
        known = _known_error(err)
        if known is None or FLAGS.verbosity >= 1:
            raise
        sys.exit(f"{command}: {known} (--verbosity=1 shows the traceback)")


def _cmd_convert(args: list[str]) -> None:
    """fwm convert SRC DST: an HF directory to an orbax params checkpoint, or an orbax one back to HF."""
    if len(args) != 2:
        raise app.UsageError("usage: fwm convert SRC_DIR DST_DIR [--dtype=bfloat16]")

    from fwm.model import checkpoint

    src, dst = args
    if os.path.isfile(os.path.join(src, "config.json")):
        checkpoint.convert_hf_to_orbax(src, dst, dtype=FLAGS.dtype)
        logging.info("wrote orbax params checkpoint %s", dst)
    else:
        checkpoint.convert_orbax_to_hf(src, dst, dtype=FLAGS.dtype)
        logging.info("wrote Hugging Face directory %s", dst)
    copied = _copy_tokenizer_files(src, dst)
    if copied:
        logging.info("copied tokenizer files %s", ", ".join(copied))


def _copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copies the files that travel with a model (tokenizer, generation config) so DST stands on its own."""
    import shutil

    from fwm.train.inputs import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not os.path.exists(os.path.join(dst, name)):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def _cmd_train(args: list[str]) -> None:
    """fwm train --config experiments/NAME.py[:arg] [--config.a.b=v ...] --workdir DIR: runs config.stage."""
    if args or _TRAIN_CONFIG.value is None:
        raise app.UsageError("usage: fwm train --config experiments/NAME.py[:arg] [--config.a.b=v ...] --workdir DIR")
    import importlib

    from fwm import config as config_lib

    config = _TRAIN_CONFIG.value
    if "stage" not in config or "train" not in config:
        sys.exit(f"fwm train: {config_flags.get_config_filename(FLAGS['config'])} is not a training config (it has "
                 f"no 'stage' and 'train' keys); build one on fwm.config.default_config(), such as "
                 f"experiments/tiny.py (data configs run with `fwm data`)")
    with config.unlocked():
        config.train.workdir = FLAGS.workdir or config.train.workdir
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as err:
        sys.exit(f"fwm train: {err}")
    if not config.train.workdir:
        raise app.UsageError("fwm train needs --workdir DIR (or train.workdir in the config)")
    module_name, function_name = config_lib.STAGES[config.stage].split(":")
    with _known_errors_as_messages("fwm train"):
        result = getattr(importlib.import_module(module_name), function_name)(config)
    logging.info("%s done: %s", config.stage, result)


def _config_with_workdir(command: str, keys: tuple[str, str], kind: str, example: str, validate: Any,
                         usage: str) -> Any:
    """The --config of a data or eval command: checked to be `kind` (it has both `keys`), --workdir set into
    config.workdir, validated (a ConfigError exits with its one-line message); usage error without a workdir."""
    from fwm.configlib import ConfigError

    config = _TRAIN_CONFIG.value
    if any(key not in config for key in keys):
        sys.exit(f"{command}: {config_flags.get_config_filename(FLAGS['config'])} is not {kind} (it has no "
                 f"{keys[0]!r} and {keys[1]!r} keys); use one built on {example}")
    with config.unlocked():
        config.workdir = FLAGS.workdir or config.workdir
    try:
        validate(config)
    except ConfigError as err:
        sys.exit(f"{command}: {err}")
    if not config.workdir:
        raise app.UsageError(usage)
    return config


def _cmd_data(args: list[str]) -> None:
    """fwm data --config experiments/synthetic_*.py[:runlocal] [--config.a.b=v ...] --workdir DIR: world,
    trajectories, world-model blocks and stage corpora into DIR (finished stages are skipped); prints stats."""
    usage = "usage: fwm data --config experiments/synthetic_search.py[:runlocal] [--config.a.b=v ...] --workdir DIR"
    if args or _TRAIN_CONFIG.value is None:
        raise app.UsageError(usage)
    from fwm.trajectories import collect, pipeline

    collect.cpu_only_jax()  # nothing here needs an accelerator; bm25s would otherwise claim it (see there)
    config = _config_with_workdir("fwm data", ("world", "workdir"), "a data config",
                                  "fwm.trajectories.pipeline.default_data_config(), such as "
                                  "experiments/synthetic_search.py",
                                  pipeline.validate_data_config, usage)
    with _known_errors_as_messages("fwm data"):
        stats = pipeline.run(config)
    print(pipeline.format_stats(stats), flush=True)


def _cmd_eval(args: list[str]) -> None:
    """fwm eval --config experiments/eval.py[:runlocal] --config.checkpoint=DIR --config.data_dir=DIR --workdir OUT:
    greedy (and k-sample) episodes of a checkpoint on held-out tasks; eval.json, eval.md, episodes_*.jsonl in OUT."""
    usage = ("usage: fwm eval --config experiments/eval.py[:runlocal] --config.checkpoint=TRAIN_DIR "
             "--config.data_dir=DATA_DIR [--config.a.b=v ...] --workdir DIR")
    if args or _TRAIN_CONFIG.value is None:
        raise app.UsageError(usage)
    from fwm.eval import run as eval_run
    from fwm.eval.config import validate_eval_config

    config = _config_with_workdir("fwm eval", ("checkpoint", "sampling"), "an eval config",
                                  "fwm.eval.config.default_eval_config(), such as experiments/eval.py",
                                  validate_eval_config, usage)
    results = eval_run.run(config)
    print(open(os.path.join(config.workdir, "eval.md"), encoding="utf-8").read(), flush=True)
    logging.info("eval done: %d tasks; results in %s", results["num_tasks"], config.workdir)


def _cmd_compare(args: list[str]) -> None:
    """fwm compare BEFORE_EVAL_DIR AFTER_EVAL_DIR [--min_gain 0.05]: the paired success gain of two `fwm eval`
    runs on the same tasks with a bootstrap interval (fwm/eval/compare.py); exit 1 below --min_gain."""
    if len(args) != 2:
        raise app.UsageError("usage: fwm compare BEFORE_EVAL_DIR AFTER_EVAL_DIR [--min_gain 0.05]")
    from fwm.eval import compare

    with _known_errors_as_messages("fwm compare"):
        gains = compare.compare_runs(args[0], args[1])
    print(compare.markdown(gains, FLAGS.min_gain), flush=True)
    failing = [g.kind for g in gains if not g.passes(FLAGS.min_gain)]
    if failing:
        sys.exit(f"fwm compare: the gain's 95% interval reaches below {FLAGS.min_gain:g} for {', '.join(failing)}")


def _cmd_bench(args: list[str]) -> None:
    """fwm bench [--quick] [--out bench.json]: train step, decode and RL iteration speed beside transformers +
    PyTorch and the host's measured matmul peak (fwm/bench/run.py); prints a table and writes the JSON."""
    if args:
        raise app.UsageError("usage: fwm bench [--quick] [--out bench.json]")
    from fwm.bench import run as bench

    bench.main(quick=FLAGS.quick, out=FLAGS.out)


def _cmd_pipeline(args: list[str]) -> None:
    """fwm pipeline --config experiments/pipeline_*.py[:arg] --workdir DIR, or --sweep experiments/sweeps/NAME.py
    [--rows a,b] [--seeds 0,1,2] --workdir DIR: every stage of one row (or of each row x seed of a sweep),
    skipping finished stages; then the report (DIR/report.md), whose path and table are printed."""
    usage = ("usage: fwm pipeline (--config experiments/pipeline_NAME.py[:arg] | --sweep experiments/sweeps/NAME.py"
             "[:arg] [--rows a,b] [--seeds 0,1]) [--config.a.b=v | --sweep.base.a.b=v ...] --workdir DIR")
    if args or (_TRAIN_CONFIG.value is None) == (_SWEEP_CONFIG.value is None) or not FLAGS.workdir:
        raise app.UsageError(usage)
    from fwm import pipeline, report, sweep

    try:
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    except ValueError:
        sys.exit(f"fwm pipeline: --seeds expects integers, got {FLAGS.seeds}")
    note, failed = "", ""
    with _known_errors_as_messages("fwm pipeline"):
        if _SWEEP_CONFIG.value is not None:
            note = _SWEEP_CONFIG.value.get("note", "")
            try:
                results = sweep.run(_SWEEP_CONFIG.value, FLAGS.workdir, rows=FLAGS.rows, seeds=seeds)
            except sweep.RowsFailedError as err:  # the other rows ran; their report is printed below
                results, failed = err.results, str(err)
        else:
            if FLAGS.rows or seeds:
                raise app.UsageError("--rows and --seeds go with --sweep; with --config set --config.name / "
                                     "--config.seed")
            config = _config_with_workdir("fwm pipeline", ("plan", "stages"), "a pipeline config",
                                          "fwm.pipeline.default_pipeline_config(), such as "
                                          "experiments/pipeline_search.py", pipeline.validate_pipeline_config, usage)
            results = [pipeline.run(config)]
    path = os.path.join(FLAGS.workdir, "report.md")
    states = ", ".join(f"{r.record['row']} seed {r.record['seed']}: {r.status}" for r in results)
    print(f"\nfwm pipeline: {states}\nreport: {os.path.abspath(path)}\n\n{report.table_text(path)}\n"
          + (f"\n{note}\n" if note else ""), flush=True)
    if failed or any(r.status != "finished" for r in results):
        sys.exit(f"fwm pipeline: {failed or 'not finished: ' + states}")
    stopped = [r.stop_signal for r in results if r.stop_signal]
    if stopped and _SWEEP_CONFIG.value is not None:  # a row's last stage finished after the signal; no row after it
        sys.exit(f"fwm pipeline: stopped by {stopped[0]} after {states}; rerun the same command for the rest")


def _cmd_report(args: list[str]) -> None:
    """fwm report WORKDIR: WORKDIR/report.md and WORKDIR/figures/*.png from whatever has finished."""
    if len(args) != 1:
        raise app.UsageError("usage: fwm report WORKDIR (a `fwm pipeline` workdir)")
    from fwm import report

    if not os.path.isdir(args[0]):
        sys.exit(f"fwm report: {args[0]} is not a directory")
    with _known_errors_as_messages("fwm report"):
        path = report.write_report(args[0])
    print(f"report: {os.path.abspath(path)}\n\n{report.table_text(path)}", flush=True)


COMMANDS = {
    "bench": _cmd_bench,
    "compare": _cmd_compare,
    "convert": _cmd_convert,
    "data": _cmd_data,
    "eval": _cmd_eval,
    "pipeline": _cmd_pipeline,
    "report": _cmd_report,
    "train": _cmd_train,
}


class _LibraryInfoFilter(pylogging.Filter):
    """Drops INFO and DEBUG records logged from inside orbax and jax (dozens of lines per checkpoint),
    so the console shows fwm's progress; their warnings and errors still pass. --verbosity=1 keeps all."""

    _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}", f"{os.sep}jax{os.sep}experimental{os.sep}")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(part in record.pathname for part in self._NOISY)


def _main(argv: list[str]) -> None:
    if FLAGS.verbosity < 1:
        logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    if len(argv) < 2 or argv[1] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        raise app.UsageError(f"usage: fwm <command> [flags]; commands: {names}")
    COMMANDS[argv[1]](argv[2:])


def main() -> None:
    """Console-script entry point."""
    if any(arg.startswith(("--config.", "--sweep.base.")) for arg in sys.argv):
        # Unknown --config.x paths otherwise fail inside flag parsing with a bare traceback.
        from fwm.configlib import ConfigError

        if sys.argv[1:2] == ["data"]:  # `fwm data` has its own schema (fwm.trajectories.pipeline)
            from fwm.trajectories.pipeline import check_data_override_args as check_override_args
        elif sys.argv[1:2] == ["eval"]:  # so has `fwm eval` (fwm.eval.config)
            from fwm.eval.config import check_eval_override_args as check_override_args
        elif sys.argv[1:2] == ["pipeline"]:  # and `fwm pipeline` (fwm.pipeline), also under --sweep.base
            from fwm.pipeline import check_pipeline_override_args as check_override_args
        else:
            from fwm.config import check_override_args
        try:
            check_override_args(sys.argv)
        except ConfigError as err:
            sys.exit(f"fwm: {err}")
    app.run(_main, argv=sys.argv)

if __name__ == "__main__":
    main()
