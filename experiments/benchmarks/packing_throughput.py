"""LM packing throughput in tokens/s: packing alone, and read + validate + tokenize + pack end to end.

Builds the synthetic mid-training corpus and tokenizer of fwm.bench.data in a temporary directory, then times
fwm.data.pipelines.pack_lm_examples on pre-tokenized documents and fwm.data.pipelines.lm_pipeline
on the JSONL file. Tokens counted are non-padding tokens of the emitted batches.

    python experiments/benchmarks/packing_throughput.py [--num_docs=4000 --seq_len=2048 --worker_count=0]
"""
import tempfile
import time

import grain
from absl import app, flags

from fwm.bench.data import tokens_per_second, write_corpus
from fwm.data import features, pipelines, records
from fwm.tokenizer import load_tokenizer

flags.DEFINE_integer("num_docs", 4000, "documents in the synthetic corpus")
flags.DEFINE_integer("seq_len", 2048, "packed row length")
flags.DEFINE_integer("batch_size", 8, "rows per batch")
flags.DEFINE_integer("vocab_size", 2000, "SentencePiece vocabulary size")
flags.DEFINE_integer("worker_count", 0, "Grain worker processes for the end-to-end pipeline")
flags.DEFINE_integer("read_threads", 2, "Grain read threads per process")


def main(argv):
    del argv
    f = flags.FLAGS
    with tempfile.TemporaryDirectory() as workdir:
        corpus, docs, model_path = write_corpus(workdir, f.num_docs, f.vocab_size)
        tokenizer = load_tokenizer(model_path)

        start = time.perf_counter()
        examples = [features.lm_example(records.validate_lm(d), tokenizer) for d in docs]
        tokenize_rate = sum(len(e["tokens"]) for e in examples) / (time.perf_counter() - start)
        packed = pipelines.pack_lm_examples(
            grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0)),
            seq_len=f.seq_len, batch_size=f.batch_size, pad_id=tokenizer.pad_id,
        )
        pack_rate, pack_tokens = tokens_per_second(packed)
        end_to_end = pipelines.lm_pipeline(
            corpus, tokenizer, seq_len=f.seq_len, batch_size=f.batch_size, num_epochs=1,
            process_index=0, process_count=1, worker_count=f.worker_count, read_threads=f.read_threads,
        )
        e2e_rate, e2e_tokens = tokens_per_second(end_to_end)
    print(f"corpus: {f.num_docs} documents, {pack_tokens} packed tokens, seq_len {f.seq_len}, batch {f.batch_size}")
    print(f"tokenize + weights only (features.lm_example): {tokenize_rate:,.0f} tokens/s")
    print(f"packing only (ConcatThenSplit + batch):       {pack_rate:,.0f} tokens/s")
    print(f"end to end (read, validate, tokenize, pack; {f.worker_count} workers, {f.read_threads} threads): "
          f"{e2e_rate:,.0f} tokens/s ({e2e_tokens} tokens)")


if __name__ == "__main__":
    app.run(main)
