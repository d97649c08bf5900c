"""The FC-RL loop end to end on a tiny random model: rollouts in a search env, updates, checkpoint, resume."""
import json

import numpy as np

from fwm import config as config_lib
from fwm import schema
from fwm.envs.jsonl import write_jsonl
from fwm.envs.retrievers import BM25Retriever, Doc
from fwm.rl.loop import run
from fwm.tokenizer import train_sentencepiece

DOCS = [Doc("d1", "Paris\nParis is the capital of France."), Doc("d2", "Lyon\nLyon is a city in France."),
        Doc("d3", "Anne\nAnne is the mayor of Paris."), Doc("d4", "Berlin\nBerlin is the capital of Germany.")]
TASKS = [{"id": f"t{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate([
    ("What is the capital of France?", "Paris"), ("Who is the mayor of Paris?", "Anne"),
    ("What is the capital of Germany?", "Berlin"), ("Which country is Lyon in?", "France")])]


def _config(tmp_path, steps):
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

    # Resumes from step 2 with the next task batch; two passes over its 2 mini-batches: 4 more updates.
    config = _config(tmp_path, steps=6)
    config.rl.epochs = 2
    second = run(config)
    assert second["step"] == 6 and second["iteration"] == 2
    lines = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 6] and [line["iteration"] for line in lines] == [1, 2]
