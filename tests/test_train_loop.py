"""The training loop end to end on experiments/tiny.py: loss falls, kills and preemption resume exactly,
divergence stops without saving, SFT starts from the pretrained checkpoint.

Killed runs are real `python -m fwm.cli train` processes (8 simulated CPU devices, from conftest's
XLA_FLAGS); one tokenizer is trained once and shared so every run sees the same ids.
"""
import importlib.util
import json
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

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

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


# ---------------------------------------------------------------- chaining stages, start-up checks, messages


def _fwm_train(*args, variant="runlocal"):
    return subprocess.run([sys.executable, "-m", "fwm.cli", "train", "--config", f"{TINY}:{variant}", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=240)


def _one_line_error(proc):
    """The failure's stderr: exit status 1, the message, no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def _sha256(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_next_stage_reuses_the_source_checkpoints_tokenizer(reference, tmp_path, tokenizer_path):
    workdir = tmp_path / "sft"
    proc = _fwm_train("--workdir", str(workdir), f"--config.init.source=orbax:{reference[0]}/checkpoints",
                      "--config.train.steps=2", variant="sft,runlocal")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the one init.source orbax:{reference[0]}/checkpoints was trained with" in proc.stderr
    assert _sha256(workdir / "tokenizer.model") == _sha256(tokenizer_path)  # the same ids, not a new tokenizer
    meta = load_meta(workdir / "checkpoints" / "2")
    assert meta["tokenizer"] == str(workdir / "tokenizer.model")
    assert meta["tokenizer_sha256"] == inputs.tokenizer_fingerprint(tokenizer_path)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    from fwm.tokenizer import train_sentencepiece

    texts = list(inputs.corpus_texts(_tiny_config().data.train_files, "lm", 200))
    path = str(tmp_path_factory.mktemp("other") / "other.model")
    train_sentencepiece(texts, path, 400)
    return path


def test_a_different_tokenizer_than_the_sources_stops_unless_allowed(reference, tmp_path, other_tokenizer):
    source = f"orbax:{reference[0]}/checkpoints"
    proc = _fwm_train("--workdir", str(tmp_path / "w"), f"--config.init.source={source}",
                      f"--config.tokenizer.path={other_tokenizer}")
    message = _one_line_error(proc)
    assert f"names the tokenizer {other_tokenizer}" in message and f"init.source {source} was trained with" in message
    assert "--config.tokenizer.allow_change=True" in message
    assert not (tmp_path / "w").exists()  # stopped before writing anything

    config = _tiny_config("runlocal")
    config.init.source, config.tokenizer.path, config.train.workdir = source, other_tokenizer, str(tmp_path / "ok")
    config.tokenizer.allow_change, config.train.steps = True, 1
    assert loop.run(config).step == 1
    assert load_meta(tmp_path / "ok" / "checkpoints" / "1")["tokenizer_sha256"] == _sha256(other_tokenizer)


def test_missing_init_source_is_one_clear_message_and_leaves_nothing_behind(tmp_path):
    workdir = tmp_path / "w"
    message = _one_line_error(_fwm_train("--workdir", str(workdir),
                                         f"--config.init.source=orbax:{tmp_path}/nope/checkpoints"))
    assert f"{tmp_path}/nope/checkpoints does not exist" in message and "'init.source'" in message
    assert not workdir.exists()


def test_unknown_key_suggests_the_alias(tmp_path):
    message = _one_line_error(_fwm_train("--workdir", str(tmp_path / "w"), "--config.optim.learning_rate=1e-3"))
    assert "unknown config key 'optim.learning_rate'" in message and "did you mean 'lr'?" in message


def test_corrupted_json_line_is_one_message_naming_file_and_line(tmp_path, tokenizer_path):
    lines = open(_tiny_config().data.train_files[0]).read().splitlines()[:6]
    lines[3] = lines[3][: len(lines[3]) // 2]  # a line cut in half
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    message = _one_line_error(_fwm_train("--workdir", str(tmp_path / "w"), f"--config.tokenizer.path={tokenizer_path}",
                                         f"--config.data.train_files=('{bad}',)", "--config.data.shuffle=False"))
    assert message.startswith(f"fwm train: {bad}, line 4:") and "invalid JSON" in message


def test_batch_size_that_does_not_split_over_the_mesh_names_the_key(tmp_path, tokenizer_path):
    config = _tiny_config("runlocal")
    config.tokenizer.path, config.train.workdir = tokenizer_path, str(tmp_path / "w")
    config.data.batch_size = 12  # 8 simulated devices on the data axis
    with pytest.raises(loop.ConfigError, match=r"'data.batch_size': 12 rows .* 8 batch shards; use a multiple of 8"):
        loop.run(config)
    config.data.batch_size, config.mesh.data, config.mesh.fsdp = 16, 2, 4
    config.optim.micro_batches = 4  # 4 rows per micro-batch over 8 shards
    with pytest.raises(loop.ConfigError, match=r"'data.batch_size'.*use a multiple of 32"):
        loop.run(config)
    assert not (tmp_path / "w").exists()


def test_eval_runs_at_the_end_over_each_eval_record_once(tmp_path, tokenizer_path):
    from fwm.data import features, records
    from fwm.tokenizer import load_tokenizer

    docs = [{"id": f"e{i}", "text": text} for i, text in
            enumerate(list(inputs.corpus_texts(_tiny_config().data.eval_files, "lm", 3)))]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tokenizer = load_tokenizer(tokenizer_path)
    expected = sum(float(features.lm_example(records.validate_lm(d), tokenizer)["loss_weights"].sum()) for d in docs)
    config = _tiny_config("runlocal")
    config.tokenizer.path, config.train.workdir = tokenizer_path, str(tmp_path / "w")
    config.data.eval_files, config.train.steps, config.train.eval_every = (str(eval_file),), 3, 2
    loop.run(config)
    evals = [r for r in read_jsonl(tmp_path / "w" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every eval_every steps and at the end
    assert all(r["eval_tokens"] == expected for r in evals)  # 3 small records, each counted once


def test_epochs_set_the_steps_and_the_learning_rate_schedule(tmp_path, tokenizer_path):
    from fwm.train.state import learning_rate_schedule

    config = _tiny_config("runlocal")
    config.tokenizer.path, config.train.workdir = tokenizer_path, str(tmp_path)
    config.train.epochs, config.data.eval_files = 0.1, ()
    result = loop.run(config)
    steps = inputs.total_steps(config, inputs.prepare_tokenizer(config)[0])
    assert result.step == steps != config.train.steps
    records = read_jsonl(tmp_path / "metrics.jsonl")
    expected = learning_rate_schedule(config.optim, steps)(steps - 1)  # decays to its end at the derived step count
    assert np.isclose(records[-1]["lr"], float(expected)) and records[-1]["lr"] < config.optim.lr / 2
    assert load_meta(tmp_path / "checkpoints" / str(steps))["config"]["train"]["steps"] == steps
