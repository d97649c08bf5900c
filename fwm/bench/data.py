"""Input pipeline throughput: the train loop's LM loader (`fwm.data.pipelines.lm_pipeline`: read, validate,
tokenize, pack, batch) in tokens/s, beside which `fwm bench` puts the train step's consumption.

The corpus is synthetic mid-training trajectories (prompt / world-model / policy / observation segments)
with a SentencePiece tokenizer trained on them, in a temporary directory. Tokens counted are the emitted
batches' non-padding tokens, over one pass, worker start-up included.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

WORDS = ("search city river capital founded north museum bridge year population mayor team album "
         "released singer born died company headquarters university professor novel author").split()


def trajectory_document(rng: np.random.Generator, index: int) -> dict:
    """One synthetic LM record with 2-5 steps of world-model block, policy turn and observation."""
    words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    steps = []
    for _ in range(int(rng.integers(2, 6))):
        steps += [
            {"role": "world_model",
             "text": f"<imaginary>{words(20)}</imaginary><confidence>{rng.integers(100)}</confidence>"},
            {"role": "policy", "text": f"<think>{words(30)}</think><action><search>{words(4)}</search></action>"},
            {"role": "observation", "text": f"<information>{words(120)}</information>"},
        ]
    return {"id": f"doc{index}", "segments": [{"role": "prompt", "text": f"Question: {words(12)}?"}] + steps}


def write_corpus(workdir: str, num_docs: int, vocab_size: int) -> tuple[str, list[dict], str]:
    """(corpus JSONL path, its documents, the SentencePiece model trained on the first 300) in workdir."""
    from fwm.tokenizer import train_sentencepiece

    rng = np.random.default_rng(0)
    docs = [trajectory_document(rng, i) for i in range(num_docs)]
    corpus = os.path.join(workdir, "corpus.jsonl")
    with open(corpus, "w") as out:
        out.writelines(json.dumps(d) + "\n" for d in docs)
    model_path = os.path.join(workdir, "bench.model")
    train_sentencepiece(["".join(s["text"] for s in d["segments"]) for d in docs[:300]], model_path, vocab_size)
    return corpus, docs, model_path


def tokens_per_second(dataset) -> tuple[float, int]:
    """(non-padding tokens per second, tokens) over one pass of a Grain IterDataset of LM batches."""
    start, tokens = time.perf_counter(), 0
    iterator = iter(dataset)
    for batch in iterator:
        tokens += int((batch["segment_ids_BxL"] > 0).sum())
    elapsed = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()  # stops Grain worker processes and frees their shared memory
    return tokens / elapsed, tokens


def lm_loader(batch: int, seq_len: int, num_docs: int = 2000, vocab_size: int = 1000, read_threads: int = 2) -> dict:
    """The LM loader end to end, in this process (worker_count 0, as the CPU train loop runs it)."""
    from fwm.data import pipelines
    from fwm.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as workdir:
        corpus, _, model_path = write_corpus(workdir, num_docs, vocab_size)
        loader = pipelines.lm_pipeline(corpus, load_tokenizer(model_path), seq_len=seq_len, batch_size=batch,
                                       num_epochs=1, process_index=0, process_count=1, worker_count=0,
                                       read_threads=read_threads)
        rate, tokens = tokens_per_second(loader)
    if tokens == 0:
        raise RuntimeError(f"the LM loader emitted no tokens from {num_docs} documents (batch {batch} x {seq_len})")
    return {"tokens_per_s": rate, "tokens": tokens, "documents": num_docs, "read_threads": read_threads}
