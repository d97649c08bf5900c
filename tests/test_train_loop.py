"""The training loop end to end on experiments/tiny.py: loss falls, kills and preemption resume exactly,
divergence stops without saving, SFT starts from the pretrained checkpoint.

Killed runs are real `python -m fwm.cli train` processes (8 simulated CPU devices, from conftest's
XLA_FLAGS); one tokenizer is trained once and shared so every run sees the same ids.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fwm.model.checkpoint import load_meta
from fwm.train import inputs, loop
from fwm.files import read_jsonl as read_jsonl_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")
STEPS = 60


def read_jsonl(path):
    return [row for _, row in read_jsonl_lines(path)]


def _tiny_config(arg=None):
    spec = importlib.util.spec_from_file_location("tiny", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    config = _tiny_config()
    config.train.workdir = str(tmp_path_factory.mktemp("tokenizer"))
    _, path = inputs.prepare_tokenizer(config)
    return path


def _cli(workdir, tokenizer_path, *overrides):
    return [sys.executable, "-m", "fwm.cli", "train", "--config", TINY, "--workdir", str(workdir),
            f"--config.tokenizer.path={tokenizer_path}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.ckpt_every=10", "--config.train.eval_every=30", "--config.train.keep_ckpts=10", *overrides]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start(cmd, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log


def _lines(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def _wait_for(condition, proc, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_path):
    """An uninterrupted run: its metrics.jsonl is what every interrupted run must end with."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(_cli(workdir, tokenizer_path))
    return workdir, read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_uninterrupted_run_loss_falls(reference):
    workdir, records = reference
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert records[0]["lr"] == 0 and all(r["lr"] > 0 for r in records[1:])  # linear warmup from 0
    assert all(np.isfinite(r["grad_norm"]) and r["tokens"] > 0 for r in records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(s) for s in (10, 20, 30, 40, 50, 60)]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))


def test_sigkill_midway_then_restart_matches_uninterrupted(reference, tmp_path, tokenizer_path):
    workdir = tmp_path / "killed"
    proc, log = _start(_cli(workdir, tokenizer_path), tmp_path / "killed.log")
    # Past the first finished checkpoint and a few steps beyond it, so the restart must drop lines.
    _wait_for(lambda: os.path.isdir(workdir / "checkpoints" / "10") and _lines(workdir) >= 15, proc,
              "checkpoint 10 and 15 metrics lines")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    log.close()
    killed_at = _lines(workdir)
    assert killed_at < STEPS, "the run finished before it was killed"

    resumed = _run(_cli(workdir, tokenizer_path))
    assert "resumed pretrain from" in resumed.stderr
    assert read_jsonl(workdir / "metrics.jsonl") == reference[1]  # identical floats on CPU, not just close


def test_sigterm_saves_a_checkpoint_that_resumes(reference, tmp_path, tokenizer_path):
    workdir = tmp_path / "preempted"
    proc, log = _start(_cli(workdir, tokenizer_path), tmp_path / "preempted.log")
    _wait_for(lambda: _lines(workdir) >= 12, proc, "12 metrics lines")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log.close()
    text = open(tmp_path / "preempted.log").read()
    assert "preempted by SIGTERM at step" in text, text[-3000:]
    stopped_at = int(text.split("preempted by SIGTERM at step ")[1].split(":")[0])
    assert 12 <= stopped_at < STEPS
    assert os.path.isdir(workdir / "checkpoints" / str(stopped_at))  # saved where it stopped
    assert read_jsonl(workdir / "metrics.jsonl")[-1]["step"] == stopped_at

    resumed = _run(_cli(workdir, tokenizer_path))
    assert f"checkpoints/{stopped_at}" in resumed.stderr
    assert read_jsonl(workdir / "metrics.jsonl") == reference[1]


def test_divergence_stops_with_step_and_value_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_path):
    config = _tiny_config("runlocal")
    config.tokenizer.path, config.train.workdir = tokenizer_path, str(tmp_path)
    config.train.ckpt_every = 1  # a save is due after every step, including the diverged one
    config.optim.lr, config.optim.warmup_steps = 1e30, 0  # step 1 is finite, its update blows the weights up
    with pytest.raises(loop.NonFiniteLossError, match=r"step 2: loss is (nan|inf)") as err:
        loop.run(config)
    saved = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert saved == [1]
    assert "last good checkpoint: step 1" in str(err.value)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_sft_stage_starts_from_the_pretrained_checkpoint(reference, tmp_path, tokenizer_path):
    config = _tiny_config("sft,runlocal")
    config.tokenizer.path, config.train.workdir = tokenizer_path, str(tmp_path)
    config.init.source = f"orbax:{reference[0]}/checkpoints"  # the newest step's state.params
    result = loop.run(config)
    assert result.step == 8 and not result.preempted
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for record in records:
        assert record["tokens_world_model"] > 0 and record["tokens_policy"] > 0
        assert record["tokens_world_model"] + record["tokens_policy"] <= record["tokens"]
        assert np.isfinite(record["loss_world_model"]) and np.isfinite(record["loss_policy"])
    assert records[-1]["loss"] < records[0]["loss"]
    assert "eval_loss_world_model" in records[-1]
    meta = load_meta(tmp_path / "checkpoints" / "8")
    assert meta["stage"] == "sft" and meta["step"] == 8 and meta["config"]["init"]["source"].startswith("orbax:")
