"""Multi-process training on one machine: two `fwm train` processes joined by jax.distributed on 127.0.0.1
(2 CPU devices each) against one process with 4 devices.

What must hold (issue 13): the same mid-training losses (and eval loss) step by step; only process 0 writes
metrics.jsonl and TensorBoard; the checkpoint the two processes wrote together restores in one process
(on another mesh) and training goes on to the loss the single-process run reaches.

Same data in both set-ups: every process reads its own records (p, p+P, ...), so the global batch of the
two-process run holds the same rows as the one-process batch only if rows are whole records. The corpus
is therefore made of records that tokenize to exactly data.seq_len tokens (BOS and EOS included) and read
in file order (data.shuffle False): each step's batch is then the same 8 records in another row order, and
a token-mean loss does not depend on row order (up to float summation order).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fwm import tokenizer as tokenizer_lib
from fwm.files import read_jsonl
from fwm.mesh import distributed_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEXTS = os.path.join(REPO, "experiments", "data", "tiny", "lm_train.jsonl")
SEQ_LEN = 24
TRAIN_RECORDS, EVAL_RECORDS = 16, 8  # two global batches of 8 rows per epoch; one eval batch

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

CONFIG_FILE = """
from fwm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.stage = "mid_train"
    c.tokenizer.path = {tokenizer!r}
    c.data.train_files = ({train!r},)
    c.data.eval_files = ({eval!r},)
    c.data.update(dict(seq_len={seq_len}, batch_size=8, shuffle=False))
    c.model.update(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                        max_seq_len=64))
    # fsdp over every device: each parameter is split across both processes, so the checkpoint needs both.
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    # A constant learning rate: the runs differ in train.steps, which would move a decaying schedule.
    c.optim.update(dict(lr=1e-2, warmup_steps=0, schedule="constant"))
    c.train.update(dict(steps=4, log_every=1, ckpt_every=3, eval_every=3, async_checkpoint=True))
    return c
"""


def _whole_row_records(tokenizer, count, skip):
    """`count` texts that tokenize to exactly SEQ_LEN - 2 ids (BOS and EOS fill the row), from the tiny corpus."""
    out = []
    for _, record in read_jsonl(TINY_TEXTS):
        ids = tokenizer.encode(record["text"])
        if len(ids) < SEQ_LEN - 2:
            continue
        text = tokenizer.decode(ids[:SEQ_LEN - 2])
        if len(tokenizer.encode(text)) == SEQ_LEN - 2:
            out.append({"id": f"r{len(out)}", "text": text})
    assert len(out) >= skip + count, f"only {len(out)} whole-row texts in {TINY_TEXTS}"
    return out[skip:skip + count]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    texts = [record["text"] for _, record in read_jsonl(TINY_TEXTS)]
    tokenizer = tokenizer_lib.train_sentencepiece(texts, str(root / "tok.model"), 512)
    paths = {}
    for name, count, skip in (("train", TRAIN_RECORDS, 0), ("eval", EVAL_RECORDS, TRAIN_RECORDS)):
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for record in _whole_row_records(tokenizer, count, skip):
                f.write(json.dumps(record) + "\n")
    config = root / "exp.py"
    config.write_text(CONFIG_FILE.format(tokenizer=str(root / "tok.model"), seq_len=SEQ_LEN, **paths))
    return root, str(config)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, process_id=None, processes=1, port=0):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FWM_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    if processes > 1:
        env.update(FWM_DISTRIBUTED="1", FWM_COORDINATOR=f"127.0.0.1:{port}", FWM_NUM_PROCESSES=str(processes),
                   FWM_PROCESS_ID=str(process_id))
    return env


def _start(config, workdir, env_list, *overrides):
    """`fwm train` in one process per env of env_list, started at once."""
    cmd = [sys.executable, "-m", "fwm.cli", "train", "--config", config, "--workdir", str(workdir), *overrides]
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
            for env in env_list]


def _wait(procs, timeout=900):
    """The outputs of `procs`, each checked to have exited with 0; on a timeout all are killed and their
    output is shown (a hang in a collective shows where each process was)."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [proc.communicate()[0][-3000:] for proc in procs]
        pytest.fail(f"fwm train did not finish within {timeout} s:\n" + "\n-----\n".join(tails))
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    return outputs


def _metrics(workdir):
    return {row["step"]: row for _, row in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(experiment):
    root, config = experiment
    two, one = root / "two", root / "one"
    port = _free_port()
    # Both set-ups at once (the test's wall time on a small machine): 2 processes x 2 devices, 1 x 4.
    out0, out1, _ = _wait(_start(config, two, [_env(2, i, 2, port) for i in range(2)], "--config.train.steps=3")
                          + _start(config, one, [_env(4)]))

    two_metrics, one_metrics = _metrics(two), _metrics(one)
    assert sorted(two_metrics) == [1, 2, 3]  # one line per step: process 1 wrote none
    for step in (1, 2, 3):
        for key in ("loss", "tokens", "grad_norm", "param_norm"):
            np.testing.assert_allclose(two_metrics[step][key], one_metrics[step][key], rtol=2e-5,
                                       err_msg=f"step {step} {key}")
    assert two_metrics[3]["tokens"] == 8 * (SEQ_LEN - 1)  # every row a whole record: BOS..EOS, 23 targets
    np.testing.assert_allclose(two_metrics[3]["eval_loss"], one_metrics[3]["eval_loss"], rtol=2e-5)
    assert len(os.listdir(two / "tb")) == 1  # one TensorBoard event file: process 0's
    assert "multi-process run: process 0 of 2" in out0
    assert "step 1/3" in out0 and "step 1/3" not in out1  # process 1 logs warnings only
    positions = sorted(name for name in os.listdir(two / "checkpoints" / "3" / "data") if name.startswith("process_"))
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]  # one data position per process

    # The two-process checkpoint, resumed by one process on 2 devices (the state resharded from 4 to 2),
    # trains step 4 on the same records as the one-process run did.
    (out,) = _wait(_start(config, two, [_env(2)]))
    assert "not this run's process_0-of-1.json" in out  # the data position skipped ahead instead
    resumed = _metrics(two)
    assert sorted(resumed) == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "param_norm", "eval_loss"):
        np.testing.assert_allclose(resumed[4][key], one_metrics[4][key], rtol=2e-5, err_msg=f"step 4 {key}")


def test_distributed_args_from_config_and_environment():
    assert distributed_args(False, {}) is None  # a single-process run: jax.distributed never starts
    assert distributed_args(False, {"FWM_DISTRIBUTED": "0"}) is None
    # TPU VMs: jax finds the coordinator and the process count and index itself.
    assert distributed_args(True, {}) == {"coordinator_address": None, "num_processes": None, "process_id": None}
    env = {"FWM_DISTRIBUTED": "1", "FWM_COORDINATOR": "10.0.0.2:1234", "FWM_NUM_PROCESSES": "4",
           "FWM_PROCESS_ID": "3"}
    assert distributed_args(False, env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                            "process_id": 3}
    with pytest.raises(ValueError, match="FWM_DISTRIBUTED='yes'"):
        distributed_args(False, {"FWM_DISTRIBUTED": "yes"})
    with pytest.raises(ValueError, match="FWM_PROCESS_ID='-1'"):
        distributed_args(True, {"FWM_PROCESS_ID": "-1"})
