"""LM packing throughput in tokens/s: packing alone, and read + validate + tokenize + pack end to end.

Builds a synthetic mid-training corpus (trajectories with prompt/action/observation/policy roles)
and a SentencePiece tokenizer trained on it in a temporary directory, then times
fwm.data.pipelines.pack_lm_examples on pre-tokenized documents and fwm.data.pipelines.lm_pipeline
on the JSONL file. Tokens counted are non-padding tokens of the emitted batches.

    python experiments/benchmarks/packing_throughput.py [--num_docs=4000 --seq_len=2048 --worker_count=0]
"""
import json
import os
import tempfile
import time

import grain
import numpy as np
from absl import app, flags

from fwm.data import features, pipelines, records
from fwm.tokenizer import load_tokenizer, train_sentencepiece

flags.DEFINE_integer("num_docs", 4000, "documents in the synthetic corpus")
flags.DEFINE_integer("seq_len", 2048, "packed row length")
flags.DEFINE_integer("batch_size", 8, "rows per batch")
flags.DEFINE_integer("vocab_size", 2000, "SentencePiece vocabulary size")
flags.DEFINE_integer("worker_count", 0, "Grain worker processes for the end-to-end pipeline")
flags.DEFINE_integer("read_threads", 2, "Grain read threads per process")

WORDS = ("search city river capital founded north museum bridge year population mayor team album "
         "released singer born died company headquarters university professor novel author").split()


def _document(rng: np.random.Generator, index: int) -> dict:
    words = lambda n: " ".join(rng.choice(WORDS, n))
    steps = []
    for _ in range(int(rng.integers(2, 6))):
        steps += [
            {"role": "world_model", "text": f"<imaginary>{words(20)}</imaginary><confidence>{rng.integers(100)}</confidence>"},
            {"role": "policy", "text": f"<think>{words(30)}</think><action><search>{words(4)}</search></action>"},
            {"role": "observation", "text": f"<information>{words(120)}</information>"},
        ]
    return {"id": f"doc{index}", "segments": [{"role": "prompt", "text": f"Question: {words(12)}?"}] + steps}


def _tokens_per_second(dataset: grain.IterDataset) -> tuple[float, int]:
    """(non-padding tokens per second, tokens) over one pass of dataset, worker start-up included."""
    start, tokens = time.perf_counter(), 0
    iterator = iter(dataset)
    for batch in iterator:
        tokens += int((batch["segment_ids_BxL"] > 0).sum())
    elapsed = time.perf_counter() - start
    iterator.close()  # stops Grain worker processes and frees their shared memory
    return tokens / elapsed, tokens


def main(argv):
    del argv
    f = flags.FLAGS
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as workdir:
        docs = [_document(rng, i) for i in range(f.num_docs)]
        corpus = os.path.join(workdir, "corpus.jsonl")
        with open(corpus, "w") as out:
            out.writelines(json.dumps(d) + "\n" for d in docs)
        texts = ["".join(s["text"] for s in d["segments"]) for d in docs[:300]]
        model_path = os.path.join(workdir, "bench.model")
        train_sentencepiece(texts, model_path, f.vocab_size)
        tokenizer = load_tokenizer(model_path)

        start = time.perf_counter()
        examples = [features.lm_example(records.validate_lm(d), tokenizer) for d in docs]
        tokenize_rate = sum(len(e["tokens"]) for e in examples) / (time.perf_counter() - start)
        packed = pipelines.pack_lm_examples(
            grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0)),
            seq_len=f.seq_len, batch_size=f.batch_size, pad_id=tokenizer.pad_id,
        )
        pack_rate, pack_tokens = _tokens_per_second(packed)
        end_to_end = pipelines.lm_pipeline(
            corpus, tokenizer, seq_len=f.seq_len, batch_size=f.batch_size, num_epochs=1,
            process_index=0, process_count=1, worker_count=f.worker_count, read_threads=f.read_threads,
        )
        e2e_rate, e2e_tokens = _tokens_per_second(end_to_end)
    print(f"corpus: {f.num_docs} documents, {pack_tokens} packed tokens, seq_len {f.seq_len}, batch {f.batch_size}")
    print(f"tokenize + weights only (features.lm_example): {tokenize_rate:,.0f} tokens/s")
    print(f"packing only (ConcatThenSplit + batch):       {pack_rate:,.0f} tokens/s")
    print(f"end to end (read, validate, tokenize, pack; {f.worker_count} workers, {f.read_threads} threads): "
          f"{e2e_rate:,.0f} tokens/s ({e2e_tokens} tokens)")


if __name__ == "__main__":
    app.run(main)
