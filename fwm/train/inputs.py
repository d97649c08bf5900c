"""A stage's inputs from config: its tokenizer (trained into the workdir when missing) and Grain pipelines.

`STAGE_DATA` says which fwm.data pipeline feeds each stage: packed LM batches for pretraining and
mid-training, SFT samples (prompt masked, span ids) for SFT. Batch sizes here are per process: the
config's global `data.batch_size` divided by the process count; the loop places each process's
rows with fwm.mesh.place_batch.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import grain
import jax
import ml_collections
from absl import logging

from fwm.config import ConfigError
from fwm.data import pipelines
from fwm.data.records import RecordValidator
from fwm.data.sources import open_source

STAGE_DATA = {"pretrain": "lm", "mid_train": "lm", "sft": "sft"}
DEFAULT_TOKENIZER_NAME = "tokenizer.model"


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
    """config.tokenizer.path, or WORKDIR/tokenizer.model when it is empty."""
    return config.tokenizer.path or os.path.join(config.train.workdir, DEFAULT_TOKENIZER_NAME)


def corpus_texts(files: Any, stage_data: str, limit: int, on_bad_record: str = "raise") -> Iterator[str]:
    """Up to `limit` texts of validated records, in file order (LM: the joined segments; SFT: prompt +
    response): what a tokenizer is trained on."""
    source = open_source(list(files) if not isinstance(files, str) else files)
    validator = RecordValidator(stage_data, on_bad_record)
    emitted = 0
    for index in range(len(source)):
        if emitted >= limit:
            return
        record = validator(source[index])
        if record is None:
            continue
        emitted += 1
        if stage_data == "lm":
            yield "".join(text for _, text in record["segments"])
        else:
            yield record["prompt"] + record["response"]


def prepare_tokenizer(config: ml_collections.ConfigDict) -> tuple[Any, str]:
    """(tokenizer, its path). An empty tokenizer.path means WORKDIR/tokenizer.model, trained from
    data.train_files with tokenizer.train.* when it does not exist yet (process 0 trains it)."""
    from fwm import tokenizer as tokenizer_lib  # lazy: fwm.cli imports this module's users lazily too

    path = tokenizer_path(config)
    if not os.path.exists(path):
        if config.tokenizer.path:
            raise FileNotFoundError(f"config key 'tokenizer.path': {path} does not exist")
        if not config.data.train_files:
            raise ConfigError("config key 'data.train_files' is empty: nothing to train the tokenizer on")
        if jax.process_index() == 0:
            opts = config.tokenizer.train
            texts = list(corpus_texts(config.data.train_files, STAGE_DATA[config.stage], int(opts.max_texts),
                                      config.data.on_bad_record))
            trained = tokenizer_lib.train_sentencepiece(
                texts, path, int(opts.vocab_size), character_coverage=float(opts.character_coverage),
                seed=int(opts.seed))
            logging.info("trained a SentencePiece tokenizer of %d pieces (asked for %d) on %d texts -> %s",
                         trained.vocab_size, opts.vocab_size, len(texts), path)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fwm tokenizer trained")
    return tokenizer_lib.load_tokenizer(path), path


def per_process_batch_size(config: ml_collections.ConfigDict) -> int:
    """Rows of the global batch that this process reads."""
    processes = jax.process_count()
    if config.data.batch_size % processes:
        raise ConfigError(f"config key 'data.batch_size': {config.data.batch_size} is not divisible by the "
                          f"{processes} processes")
    return config.data.batch_size // processes


def make_dataset(config: ml_collections.ConfigDict, tokenizer: Any, files: Any, *, train: bool) -> grain.IterDataset:
    """The stage's pipeline over `files`: shuffled training batches, or eval batches in file order
    (so every eval sees the same batches)."""
    d = config.data
    kind = STAGE_DATA.get(config.stage)
    if kind is None:
        raise ConfigError(f"config key 'stage': {config.stage!r} has no supervised data pipeline; "
                          f"expected one of {sorted(STAGE_DATA)}")
    common = dict(
        seq_len=int(d.seq_len), batch_size=per_process_batch_size(config), seed=int(d.seed),
        shuffle=bool(d.shuffle) and train, num_epochs=None, add_bos=bool(d.add_bos), add_eos=bool(d.add_eos),
        on_bad_record=d.on_bad_record, worker_count=int(d.worker_count) if train else 0,
        read_threads=int(d.read_threads),
    )
    files = list(files) if not isinstance(files, str) else files
    if kind == "lm":
        return pipelines.lm_pipeline(files, tokenizer, trained_roles=tuple(d.trained_roles), **common)
    return pipelines.sft_pipeline(files, tokenizer, pack=bool(d.pack), **common)
