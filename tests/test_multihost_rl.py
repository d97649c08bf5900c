"""Multi-process FC-RL on one machine: two `fwm train` processes (stage rl) joined by jax.distributed on
127.0.0.1 (2 CPU devices each) against one process with 4 devices, one RL iteration each (issue 13).

What must hold: the same rollout (rewards, response tokens, step samples) and the same update (loss, KL,
entropy, gradient norm, parameter norm); only process 0 writes metrics.jsonl and TensorBoard.

Why the two set-ups see the same episodes: rl.rollout_batch is global, so each of the two processes runs
one of the iteration's two tasks (rl_pipeline: process p reads tasks p, p+P, ...; data.shuffle off keeps
file order) where the single process runs both; each episode samples with its own key, drawn from its
slot's seed (task id, sample index), so a continuation does not depend on the batch or process it is
decoded in. A random model's episodes all get the same reward under the tasks' real answers (none), which
leaves every advantage and so the loss at 0; here each task accepts any single letter or digit as a
substring of the final answer (rl.outcome_metric substring_match), so an episode that answers at all
scores 1 and one that runs out of turns 0, and the groups' advantages are not all 0. rl.mini_batches is
1: the one update then sees every step sample in both set-ups (with more, each process draws its own
split, which is as random but not the same split as one process's).

The sampler's own collective call is checked alone too: prompts decoded across two processes (unequal
counts, a process with none) give the tokens one process gives them.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fwm import schema
from fwm.envs.jsonl import write_jsonl
from fwm.envs.retrievers import BM25Retriever
from fwm.files import read_jsonl
from fwm.tokenizer import train_sentencepiece

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_multihost import REPO, _env, _free_port, _wait  # noqa: E402  the launch helpers of the mid-training test
from test_rl_loop import DOCS, TASKS  # noqa: E402  the tiny search world of the single-process RL test

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

CONFIG_FILE = """
from fwm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.stage = "rl"
    c.tokenizer.path = {tokenizer!r}
    c.data.train_files = ({tasks!r},)
    c.data.shuffle = False
    c.model.update(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                        max_seq_len=1024))
    # Rows over fsdp (one block per process), tensor inside each process: a process's two devices hold
    # the same rows, which it must read back once.
    c.mesh.update(dict(data=1, fsdp=2, tensor=2))
    c.optim.update(dict(lr=1e-3, warmup_steps=0))
    c.train.update(dict(steps=1, ckpt_every=1, async_checkpoint=False))
    c.rl.update(dict(group_size=2, rollout_batch=4, max_turns=2, max_new_tokens=8, mini_batches=1, kl_beta=0.01,
                     outcome_metric="substring_match", index_dir={index!r}, env_threads=2))
    return c
"""


def _experiment(root):
    texts = [d.contents for d in DOCS] + [t["question"] for t in TASKS] + [schema.DEFAULT_INSTRUCTION]
    train_sentencepiece(texts * 20, str(root / "tok.model"), 320)
    BM25Retriever.build(DOCS, root / "bm25")
    anything = list("bcdefghijklmnopqrstuvwxyz0123456789")  # "a" is an article: normalised away
    write_jsonl(root / "tasks.jsonl", [dict(task, answers=anything) for task in TASKS])
    config = root / "rl.py"
    config.write_text(CONFIG_FILE.format(tokenizer=str(root / "tok.model"), tasks=str(root / "tasks.jsonl"),
                                         index=str(root / "bm25")))
    return str(config)


def _start(config, workdir, env):
    cmd = [sys.executable, "-m", "fwm.cli", "train", "--config", config, "--workdir", str(workdir)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def test_two_processes_run_the_same_rl_iteration_as_one(tmp_path):
    config = _experiment(tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    port = _free_port()
    out0, out1, _ = _wait([_start(config, two, _env(2, i, 2, port)) for i in range(2)] + [_start(config, one, _env(4))])

    (two_row,) = [row for _, row in read_jsonl(os.path.join(two, "metrics.jsonl"))]  # process 1 wrote none
    (one_row,) = [row for _, row in read_jsonl(os.path.join(one, "metrics.jsonl"))]
    print(json.dumps({k: (two_row[k], one_row[k]) for k in sorted(one_row)}))  # the measured numbers (pytest -s)
    assert two_row["step"] == one_row["step"] == 1
    # The rollout: 2 tasks x 2 episodes of at most 2 steps; the same episodes, so the same counts and rewards
    # (metrics summed over processes travel as float32: rtol 1e-6).
    for key in ("step_samples", "mini_batches", "steps_per_episode", "response_tokens", "truncated_responses"):
        assert two_row[key] == one_row[key], key
    for key in ("reward", "outcome", "r_calib", "r_ground", "advantage_world_model_abs", "advantage_policy_abs"):
        np.testing.assert_allclose(two_row[key], one_row[key], rtol=1e-6, err_msg=key)
    # A comparison worth making: some episodes answered and some did not, so the loss is not 0 (if a change
    # of seeds or numerics makes every episode alike, pick another train.seed).
    assert 0 < one_row["outcome"] < 1 and one_row["advantage_policy_abs"] > 0 and abs(one_row["loss"]) > 1e-3
    # The update: the same samples in one global batch, summed in another order over other devices.
    for key in ("loss", "kl", "entropy", "grad_norm", "param_norm", "ratio_mean"):
        np.testing.assert_allclose(two_row[key], one_row[key], rtol=2e-5, atol=1e-7, err_msg=key)
    assert abs(two_row["sampler_logprob_gap"] - one_row["sampler_logprob_gap"]) < 1e-4
    assert len(os.listdir(two / "tb")) == 1  # one TensorBoard event file: process 0's
    assert "multi-process run: process 0 of 2" in out0 and "rl iteration 1" in out0
    assert "rl iteration 1" not in out1  # process 1 logs warnings only
    print([line for line in out0.splitlines() if "rl iteration" in line])
    positions = sorted(name for name in os.listdir(two / "checkpoints" / "1" / "data") if name.startswith("process_"))
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's own task position


GENERATE_SCRIPT = """
import json

import jax
import numpy as np

from fwm.mesh import initialize_distributed, make_mesh
from fwm.model import transformer
from fwm.rollout import sampler
from fwm.train.state import param_shardings

initialize_distributed(False)  # FWM_DISTRIBUTED of the environment decides
cfg = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              mlp_dim=64, max_seq_len=64)
mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
params = jax.jit(lambda key: transformer.init_params(cfg, key),
                 out_shardings=param_shardings(cfg, mesh))(jax.random.key(0))
rng = np.random.default_rng(0)
prompts = [[1] + rng.integers(2, 64, n).tolist() for n in (5, 20, 3, 9)]
# Two calls; per call the prompts of process 0 and of process 1 (one process sends both lists): unequal
# counts and lengths, and a process with no prompts at all in each call.
out = []
for call in ([[0, 1, 2], []], [[], [3]]):
    mine = call[0] + call[1] if jax.process_count() == 1 else call[jax.process_index()]
    keys = jax.vmap(jax.random.key)(np.asarray(mine, np.int32)) if mine else None
    samples = sampler.generate(cfg, params, [prompts[i] for i in mine], 6, temperature=1.0, rng=keys, mesh=mesh)
    out += [{"prompt": i, "tokens": s.tokens, "logprobs": s.logprobs} for i, s in zip(mine, samples)]
print("RESULT " + json.dumps(out))
"""


def test_generate_across_processes_samples_what_one_process_does(tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_SCRIPT)
    port = _free_port()
    start = lambda env: subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,  # noqa: E731
                                         stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    outputs = _wait([start(_env(2, i, 2, port)) for i in range(2)] + [start(_env(4))])
    results = [json.loads(out.split("RESULT ")[1].splitlines()[0]) for out in outputs]
    two = sorted(results[0] + results[1], key=lambda r: r["prompt"])
    one = sorted(results[2], key=lambda r: r["prompt"])
    assert [r["prompt"] for r in two] == [r["prompt"] for r in one] == [0, 1, 2, 3]
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"], a["prompt"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-6)
