"""One FC-RL iteration's wall time split into rollout, reward and update, on a tiny random-model setting.

A four-document BM25 world, four tasks, a SentencePiece tokenizer trained on them, a scratch model:
`fwm.rl.loop.run` runs two iterations (the first compiles) and the second's split is reported.
"""
from __future__ import annotations

import os
import tempfile

from fwm.bench import shapes

DOCS = (("d1", "Paris\nParis is the capital of France."), ("d2", "Lyon\nLyon is a city in France."),
        ("d3", "Anne\nAnne is the mayor of Paris."), ("d4", "Berlin\nBerlin is the capital of Germany."))
TASKS = (("What is the capital of France?", "Paris"), ("Who is the mayor of Paris?", "Anne"),
         ("What is the capital of Germany?", "Berlin"), ("Which country is Lyon in?", "France"))


def rl_iteration_split(size: str, max_new_tokens: int = 32) -> dict:
    from absl import logging

    from fwm import config as config_lib
    from fwm import schema
    from fwm.envs.jsonl import write_jsonl
    from fwm.envs.retrievers import BM25Retriever, Doc
    from fwm.rl.loop import run
    from fwm.tokenizer import train_sentencepiece

    logging.set_verbosity(logging.WARNING)
    cfg = shapes.model_config(size, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        docs = [Doc(i, text) for i, text in DOCS]
        texts = [d.contents for d in docs] + [q for q, _ in TASKS] + [schema.DEFAULT_INSTRUCTION]
        train_sentencepiece(texts * 20, os.path.join(tmp, "tok.model"), 320)
        BM25Retriever.build(docs, os.path.join(tmp, "bm25"))
        write_jsonl(os.path.join(tmp, "tasks.jsonl"),
                    [{"id": f"t{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate(TASKS)])
        config = config_lib.default_config()
        config.stage = "rl"
        config.tokenizer.path = os.path.join(tmp, "tok.model")
        config.model.update(dict(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                 num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
                                 max_seq_len=cfg.max_seq_len))
        config.data.train_files = (os.path.join(tmp, "tasks.jsonl"),)
        config.optim.update(dict(lr=1e-3, warmup_steps=0))
        # Two iterations of two mini-batches each; no checkpoint until the end.
        config.train.update(dict(steps=4, ckpt_every=100, workdir=os.path.join(tmp, "work"), async_checkpoint=False))
        config.rl.update(dict(group_size=2, rollout_batch=4, max_turns=2, max_new_tokens=max_new_tokens, mini_batches=2,
                              kl_beta=0.01, index_dir=os.path.join(tmp, "bm25"), env_threads=2))
        result = run(config_lib.validate(config))
    timings = result["last_timings"]
    if result["iteration"] != 2 or set(timings) != {"rollout_s", "reward_s", "update_s"}:
        raise RuntimeError(f"the RL bench expected 2 iterations with rollout/reward/update timings, got "
                           f"{result['iteration']} iterations and {sorted(timings)}")
    return {**timings, "iteration_s": sum(timings.values()), "episodes": 4 * 2, "max_new_tokens": max_new_tokens,
            "model": f"{cfg.num_layers} layers x {cfg.hidden_size}, vocab 320 (tokenizer)"}
