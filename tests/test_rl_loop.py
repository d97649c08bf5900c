"""The FC-RL loop end to end on a tiny random model: rollouts in a search env, updates, checkpoint, resume,
SIGTERM and kill -9 of a real subprocess run (8 simulated CPU devices through conftest's XLA_FLAGS)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fwm import config as config_lib
from fwm import schema
from fwm.envs.jsonl import write_jsonl
from fwm.envs.retrievers import BM25Retriever, Doc
from fwm.rl.loop import run
from fwm.tokenizer import train_sentencepiece
from fwm.train.run_control import NonFiniteLossError

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

DOCS = [Doc("d1", "Paris\nParis is the capital of France."), Doc("d2", "Lyon\nLyon is a city in France."),
        Doc("d3", "Anne\nAnne is the mayor of Paris."), Doc("d4", "Berlin\nBerlin is the capital of Germany.")]
TASKS = [{"id": f"t{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate([
    ("What is the capital of France?", "Paris"), ("Who is the mayor of Paris?", "Anne"),
    ("What is the capital of Germany?", "Berlin"), ("Which country is Lyon in?", "France")])]


TESTS = os.path.dirname(os.path.abspath(__file__))


def _config(tmp_path, steps):
    if not (tmp_path / "tasks.jsonl").exists():  # built once per tmp_path (a subprocess run reuses them)
        texts = [d.contents for d in DOCS] + [t["question"] for t in TASKS] + [schema.DEFAULT_INSTRUCTION]
        train_sentencepiece(texts * 20, str(tmp_path / "tok.model"), 320)
        BM25Retriever.build(DOCS, tmp_path / "bm25")
        write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    config = config_lib.default_config()
    config.stage = "rl"
    config.tokenizer.path = str(tmp_path / "tok.model")
    config.model.update(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                             max_seq_len=1024))
    config.data.train_files = (str(tmp_path / "tasks.jsonl"),)
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    config.optim.update(dict(lr=1e-3, warmup_steps=0))
    config.train.update(dict(steps=steps, ckpt_every=1, workdir=str(tmp_path / "work"), async_checkpoint=False))
    config.rl.update(dict(group_size=2, rollout_batch=4, max_turns=2, max_new_tokens=8, mini_batches=2,
                          kl_beta=0.01, index_dir=str(tmp_path / "bm25"), env_threads=2))
    return config_lib.validate(config)


def test_rl_loop_trains_checkpoints_and_resumes(tmp_path):
    first = run(_config(tmp_path, steps=2))
    # One iteration of 2 mini-batches: 4 episodes (2 tasks x 2), each 2 malformed steps of a random model.
    assert first["step"] == 2 and first["iteration"] == 1
    record = first["last_record"]
    assert record["step_samples"] == 8 and record["mini_batches"] == 2 and record["steps_per_episode"] == 2
    assert record["format_adherence"] == 0.0 and record["correct"] == 0.0 and record["r_calib"] == -1.0
    for key in ("loss", "kl", "entropy", "clip_fraction", "ratio_mean", "grad_norm", "sampler_logprob_gap"):
        assert np.isfinite(record[key]), key
    # Old log-probs are the training forward's: the first mini-batch is exactly on-policy.
    assert record["ratio_min"] <= 1.0 <= record["ratio_max"]
    assert record["sampler_logprob_gap"] < 1e-3
    assert all(first["last_timings"][f"{phase}_s"] > 0 for phase in ("rollout", "reward", "update"))

    # Resumes from step 2 with the next task batch; two passes over its 2 mini-batches: 4 more updates.
    config = _config(tmp_path, steps=6)
    # pi_old = the sampler's log-probs (no gap measured), several step samples per row
    config.rl.update(dict(epochs=2, old_logprobs="sampler", pack=True))
    second = run(config)
    assert second["step"] == 6 and second["iteration"] == 2
    assert "sampler_logprob_gap" not in second["last_record"] and np.isfinite(second["last_record"]["loss"])
    lines = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 6] and [line["iteration"] for line in lines] == [1, 2]
    assert "iteration_s" not in lines[-1]  # wall clock goes to TensorBoard only
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "work" / "tb"))

    # Divergence: the iteration's first update (finite loss) blows the weights up, the second is not finite.
    config = _config(tmp_path, steps=10)
    config.optim.lr = 1e30
    with pytest.raises(NonFiniteLossError, match=r"step 8: loss is") as err:
        run(config)
    assert "last good checkpoint: step 6" in str(err.value)
    saved = sorted(int(name) for name in os.listdir(tmp_path / "work" / "checkpoints") if name.isdigit())
    assert saved[-1] == 6  # nothing of the diverged iteration saved or written
    lines = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 6]


def _start(tmp_path, steps, ckpt_every):
    """`run` of this file's config in a subprocess (a long run, to be stopped); stdout+stderr to run.log."""
    _config(tmp_path, steps)  # the tokenizer, index and tasks, before the subprocess starts
    code = (f"import json, pathlib, sys; sys.path.insert(0, {TESTS!r}); from test_rl_loop import _config, run; "
            f"c = _config(pathlib.Path({str(tmp_path)!r}), {steps}); c.train.ckpt_every = {ckpt_every}; "
            f"r = run(c); print('RESULT', json.dumps({{k: r[k] for k in ('step', 'iteration', 'preempted')}}))")
    log = open(tmp_path / "run.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=TESTS), log


def _metrics(tmp_path):
    path = tmp_path / "work" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _checkpoint_steps(tmp_path):
    root = tmp_path / "work" / "checkpoints"
    return sorted(int(name) for name in os.listdir(root) if name.isdigit()) if root.is_dir() else []


def _wait_for(condition, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_mid_run_saves_a_checkpoint_that_a_rerun_resumes(tmp_path):
    proc, log = _start(tmp_path, steps=200, ckpt_every=1000)  # no periodic checkpoint: only the stop saves
    _wait_for(lambda: len(_metrics(tmp_path)) >= 1, proc, "the first iteration")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 0
    log.close()
    text = (tmp_path / "run.log").read_text()
    assert "preempted by SIGTERM at iteration" in text, text[-3000:]
    result = json.loads(text.split("RESULT ")[1].splitlines()[0])
    stopped, iterations = result["step"], result["iteration"]
    assert result["preempted"] and 0 < stopped < 200 and iterations >= 1
    assert _checkpoint_steps(tmp_path) == [stopped]  # saved where it stopped
    assert _metrics(tmp_path)[-1]["step"] == stopped

    resumed = run(_config(tmp_path, steps=stopped + 1))  # one more iteration, from the saved one
    assert resumed["iteration"] == iterations + 1 and resumed["step"] > stopped and not resumed["preempted"]
    lines = _metrics(tmp_path)
    assert [line["iteration"] for line in lines] == list(range(1, iterations + 2))
    assert lines[-1]["step"] == resumed["step"]


def test_kill_9_mid_run_resumes_from_the_last_checkpoint_and_continues(tmp_path):
    proc, log = _start(tmp_path, steps=200, ckpt_every=2)
    # Past a checkpoint (every 2nd iteration) and an iteration beyond it, so the rerun must drop a line.
    _wait_for(lambda: _checkpoint_steps(tmp_path) and len(_metrics(tmp_path)) >= 3, proc,
              "a checkpoint and 3 iterations")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    log.close()
    saved = _checkpoint_steps(tmp_path)[-1]
    before = _metrics(tmp_path)
    kept = [line for line in before if line["step"] <= saved]
    assert kept[-1]["step"] == saved and len(kept) < len(before)

    resumed = run(_config(tmp_path, steps=saved + 1))
    assert resumed["iteration"] == kept[-1]["iteration"] + 1 and resumed["step"] > saved
    lines = _metrics(tmp_path)
    assert lines[:-1] == kept  # cut back to the checkpoint, then one new iteration
    assert lines[-1]["iteration"] == kept[-1]["iteration"] + 1 and lines[-1]["step"] == resumed["step"]
