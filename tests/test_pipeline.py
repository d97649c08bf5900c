"""`fwm pipeline` end to end on experiments/quickstart.py:micro (a 1-layer model, a 60-question world, a few
steps per stage): every stage runs in process; a SIGTERM in the middle of SFT leaves a checkpoint and no
marker, the rerun resumes SFT from it and finishes; a second rerun skips every stage; a changed RL stage is
redone with the eval after it, the stages before it are reused; a sweep row that shares the mid-training
arm reuses its directory. The report's table and figures hold numbers."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from fwm import pipeline, runs, sweep
from fwm import report as report_lib
from fwm.configlib import ConfigError, load_experiment
from fwm.files import read_json, read_jsonl

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "quickstart.py")


def _micro_sweep():
    return load_experiment(QUICKSTART, __file__).get_config("micro")


STD_SFT_GRPO = {"plan.mid_train": "standard", "plan.format": "plain", "plan.rl": "grpo"}


def _row(workdir, **dotted):
    """The quickstart's first row (std_sft_grpo) with more overrides, as its sweep would build it."""
    s = _micro_sweep()
    assert sweep.nested(STD_SFT_GRPO) == s.rows.std_sft_grpo.overrides.to_dict()
    s.rows.std_sft_grpo = sweep.row(s.rows.std_sft_grpo.label, {**STD_SFT_GRPO, **dotted},
                                    s.rows.std_sft_grpo.reference)
    return sweep.row_config(s, "std_sft_grpo", 0, str(workdir))


def _stages(record):
    return {stage["stage"]: stage for stage in record["stages"]}


def _sigterm_when_training(stage_label_prefix, workdir):
    """A thread that sends this process SIGTERM once the training loop of the stage whose directory starts with
    `stage_label_prefix` has installed its StopRequest (its handler's unit is 'step'; the pipeline's is 'stage')."""
    def watch():
        stages_dir = os.path.join(workdir, runs.STAGES_DIR)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            handler = signal.getsignal(signal.SIGTERM)
            started = os.path.isdir(stages_dir) and any(
                name.startswith(stage_label_prefix) and not name.endswith(".lock") for name in os.listdir(stages_dir))
            if started and getattr(getattr(handler, "__self__", None), "unit", None) == "step":
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The micro row through every stage, interrupted once in SFT and rerun: (workdir, row record)."""
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    watcher = _sigterm_when_training("sft_", workdir)
    first = pipeline.run(_row(workdir))
    watcher.join(timeout=5)
    assert first.status == "preempted", first.record
    sft = _stages(first.record).get("sft")
    assert sft is None  # not finished: no entry, and no marker in its directory
    sft_dir = [os.path.join(workdir, runs.STAGES_DIR, d) for d in os.listdir(os.path.join(workdir, runs.STAGES_DIR))
               if d.startswith("sft_") and not d.endswith(".lock")]
    assert len(sft_dir) == 1 and not os.path.exists(os.path.join(sft_dir[0], "stage.json"))
    saved = sorted(int(d) for d in os.listdir(os.path.join(sft_dir[0], "checkpoints")) if d.isdigit())
    assert saved and saved[-1] >= 1  # the preempted trainer saved where it stopped

    second = pipeline.run(_row(workdir))
    assert second.status == "finished", second.record
    return workdir, second.record, saved[-1]


def test_every_stage_runs_and_the_report_holds_numbers(finished):
    workdir, record, _ = finished
    stages = _stages(record)
    assert list(stages) == ["data", "pretrain", "mid_train", "sft", "rl", "eval"]
    assert [stages[s]["skipped"] for s in ("data", "pretrain", "mid_train")] == [True] * 3  # done before the SIGTERM
    assert not stages["sft"]["skipped"] and not stages["rl"]["skipped"] and not stages["eval"]["skipped"]
    for stage in stages.values():
        marker = read_json(os.path.join(stage["dir"], "stage.json"))
        assert marker["fingerprint"] == stage["fingerprint"] and os.path.basename(stage["dir"]).endswith(
            stage["fingerprint"][:12]) and "config" in marker
    results = read_json(os.path.join(record["eval_dir"], "eval.json"))
    assert results["greedy"]["by_source"]["all"]["episodes"] == 4 and results["sampled"]["k"] == 2

    report = open(os.path.join(workdir, runs.REPORT), encoding="utf-8").read()
    results_table = report_lib.table_text(os.path.join(workdir, runs.REPORT)).splitlines()
    table = [line for line in results_table if line.startswith("| standard mid-train + SFT + GRPO ")]
    assert len(table) == 1
    cells = [cell.strip() for cell in table[0].strip("|").split("|")]
    header = results_table[0]
    # the Per seed table repeats the row with its one seed's values
    assert re.search(r"^\| standard mid-train \+ SFT \+ GRPO( †)? \| 0 \| " + re.escape(cells[2]) + r" \|",
                     report.split("## Per seed")[1], re.M)
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert {"score %", "format %", "recovery %", "selected@k %", "paper"} <= set(columns)
    for column in ("score %", "format %", "recovery %", "selected@k %", "tokens/episode"):
        float(cells[columns.index(column)])  # a number, not '-'
    assert cells[columns.index("n")] == "1" and cells[columns.index("paper")] == "46.1"
    marked = float(cells[columns.index("format %")]) < 100 * report_lib.MIN_FORMAT  # the micro row's format is low
    assert cells[0] == "standard mid-train + SFT + GRPO" + (" †" if marked else "")
    for name in ("table.png", "rl_curves.png"):
        with open(os.path.join(workdir, runs.FIGURES_DIR, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}" in report
    assert "sft_plain" in report and "## Missing rows" in report
    steps = [row["step"] for _, row in read_jsonl(os.path.join(stages["rl"]["dir"], "metrics.jsonl"))]
    assert steps == [2]  # one RL iteration of 2 mini-batch updates


def test_interrupted_stage_resumes_from_its_checkpoint(finished):
    _, record, saved = finished
    sft = _stages(record)["sft"]
    steps = [row["step"] for _, row in read_jsonl(os.path.join(sft["dir"], "metrics.jsonl"))]
    assert steps == [1, 2, 3]  # the preempted steps are kept once, the rest appended after the resume
    assert sft["stats"]["step"] == 3 and saved <= 3


def test_rerun_skips_and_a_changed_stage_is_redone_with_what_follows(finished):
    workdir, record, _ = finished
    before = {name: os.path.getmtime(os.path.join(s["dir"], "stage.json")) for name, s in _stages(record).items()}
    again = pipeline.run(_row(workdir), write_report=False)
    assert again.status == "finished" and all(s["skipped"] for s in again.record["stages"])
    assert {name: os.path.getmtime(os.path.join(s["dir"], "stage.json"))
            for name, s in _stages(again.record).items()} == before

    changed = pipeline.run(_row(workdir, **{"stages.rl.rl.max_new_tokens": 16}), write_report=False)
    new, old = _stages(changed.record), _stages(record)
    assert [new[s]["skipped"] for s in ("data", "pretrain", "mid_train", "sft")] == [True] * 4
    assert all(new[s]["dir"] == old[s]["dir"] for s in ("data", "pretrain", "mid_train", "sft"))
    assert not new["rl"]["skipped"] and not new["eval"]["skipped"]
    assert new["rl"]["dir"] != old["rl"]["dir"] and new["eval"]["dir"] != old["eval"]["dir"]
    assert os.path.isfile(os.path.join(old["rl"]["dir"], "stage.json"))  # the old stage is left as it was


def test_a_workdir_restored_elsewhere_is_reported_and_resumed_there(finished, tmp_path):
    """The workdir copied to another path and the original gone (a restore, or workdirs gathered from machines):
    the report reads the copy's stages, and a changed RL stage trains from the copy's SFT checkpoint."""
    workdir, _, _ = finished
    restored = str(tmp_path / "restored")
    shutil.copytree(workdir, restored)
    aside = workdir + ".aside"
    os.rename(workdir, aside)  # every absolute path in the copied records now names nothing
    try:
        table = report_lib.table_text(report_lib.write_report(restored))
        assert re.search(r"^\| standard mid-train \+ SFT \+ GRPO( †)? \| 1 \| \d", table, re.M), table
        changed = pipeline.run(_row(restored, **{"stages.rl.rl.max_new_tokens": 12}), write_report=False)
        assert changed.status == "finished", changed.record
        assert [s["skipped"] for s in changed.record["stages"]] == [True] * 4 + [False] * 2
        assert all(s["dir"].startswith(restored) for s in changed.record["stages"])
    finally:
        os.rename(aside, workdir)


def test_sweep_rows_share_the_mid_training_stage(finished):
    workdir, record, _ = finished
    s = _micro_sweep()
    s.rows.std_fesft = sweep.row("standard mid-train + FE-SFT", {
        "plan.mid_train": "standard", "plan.format": "full", "plan.rl": "none", "plan.eval": False})
    results = sweep.run(s, workdir, rows=["std_sft_grpo", "std_fesft"])
    assert [r.status for r in results] == ["finished", "finished"]
    first, second = (_stages(r.record) for r in results)
    assert all(stage["skipped"] for stage in first.values())
    assert second["mid_train"]["dir"] == first["mid_train"]["dir"] and second["mid_train"]["skipped"]
    assert second["sft"]["dir"] != first["sft"]["dir"] and not second["sft"]["skipped"]
    assert set(second) == {"data", "pretrain", "mid_train", "sft"}
    report = open(os.path.join(workdir, runs.REPORT), encoding="utf-8").read()
    assert "wm_fesft_fcrl seed 0: not started" in report  # the sweep's other row, never run here
    assert "std_fesft seed 0: finished" not in report  # finished (no eval planned): not missing
    done = subprocess.run([sys.executable, "-m", "fwm.cli", "report", workdir], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^\| standard mid-train \+ SFT \+ GRPO( †)? \| 1 \|", done.stdout, re.M), done.stdout


def test_a_signal_during_a_rows_last_stage_stops_the_sweep_after_it(finished, monkeypatch):
    """SIGTERM while a row's eval (its last stage, not resumable) runs: the eval finishes and the row with it, and
    the sweep starts no other row (it used to forget the signal with the row's handler and go on)."""
    workdir, _, _ = finished
    s = _micro_sweep()
    s.base.eval.sampling.max_new_tokens -= 1  # a new eval stage: the one that runs when the signal comes
    run_eval = pipeline._run_eval

    def signalled_eval(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return run_eval(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run_eval", signalled_eval)
    handler = signal.getsignal(signal.SIGTERM)
    results = sweep.run(s, workdir, rows=["std_sft_grpo", "wm_fesft_fcrl"])
    assert [(r.record["row"], r.status, r.stop_signal) for r in results] == [("std_sft_grpo", "finished", "SIGTERM")]
    assert not _stages(results[0].record)["eval"]["skipped"]
    assert signal.getsignal(signal.SIGTERM) is handler  # restored: a later signal is not swallowed


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rows.std_sft_grpo.overrides.plan.mid_trian.*mid_train"):
        _row(tmp_path, **{"plan.mid_trian": "wm"})
    with pytest.raises(ConfigError, match=r"'plan.rl'.*FC-RL needs"):
        _row(tmp_path, **{"plan.rl": "fc_rl", "plan.format": "plain"})
    with pytest.raises(ConfigError, match=r"'stages.sft.data.corpus'.*the pipeline sets it"):
        _row(tmp_path, **{"stages.sft.data.corpus": "sft_full"})
    with pytest.raises(ConfigError, match=r"'stages.mid_train.train.epochs'.*equal epochs"):
        _row(tmp_path, **{"stages.mid_train.train.epochs": 0.0})
    with pytest.raises(ConfigError, match=r"'stages.rl.rl.group_size'"):
        _row(tmp_path, **{"stages.rl.rl.group_size": 1})
    with pytest.raises(ConfigError, match=r"'data.world.kind'"):
        _row(tmp_path, **{"data.world.kind": "maths"})
    with pytest.raises(ConfigError, match=r"'plan.pretrain'.*arithmetic world"):
        _row(tmp_path, **{"data.world.kind": "arithmetic"})
    with pytest.raises(ConfigError, match=r"--rows: unknown row 'std_sft'.*std_sft_grpo"):
        sweep.selected(_micro_sweep(), ["std_sft"], None)


def test_two_processes_never_run_one_stage_twice(tmp_path):
    """Two processes execute the same Stage at once: one runs it (under the lock), the other waits and skips."""
    script = (
        "import os, sys, time\n"
        "from fwm.stages import Stage\n"
        "def run():\n"
        "    with open(os.path.join(sys.argv[1], 'runs.txt'), 'a') as f:\n"
        "        f.write(str(os.getpid()) + '\\n')\n"
        "    time.sleep(1.5)\n"
        "    open(os.path.join(sys.argv[1], 'stage', 'out.txt'), 'w').write('x')\n"
        "    return {'pid': os.getpid()}, ['out.txt']\n"
        "stats, skipped = Stage('demo', os.path.join(sys.argv[1], 'stage'), 'f' * 64).execute(run, exclusive=True)\n"
        "print('skipped' if skipped else 'ran', stats['pid'])\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].split() for p in procs)
    assert [o[0] for o in outputs] == ["ran", "skipped"] and outputs[0][1] == outputs[1][1]
    assert len(open(tmp_path / "runs.txt").read().split()) == 1
    marker = json.loads((tmp_path / "stage" / "stage.json").read_text())
    assert marker["outputs"] == ["out.txt"] and marker["stats"]["pid"] == int(outputs[0][1])
