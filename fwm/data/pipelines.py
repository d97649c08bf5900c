"""Per-stage Grain pipelines: files -> this process's shard -> shuffled epochs -> validated -> batches.

Each function returns a `grain.IterDataset` of numpy dict batches for THIS process (batch_size is
the per-process batch; the training loop places them with jax.make_array_from_process_local_data).
`iter(dataset)` gives a `grain.DatasetIterator` whose state saves/restores through orbax
(fwm/data/checkpointing.py) and resumes on exactly the next batch.

- Sharding: process p of P reads records p, p+P, p+2P, ... of the concatenated files (disjoint,
  together covering everything); defaults come from jax.process_index()/process_count().
- Order: the shard is shuffled with `seed` (a different permutation every epoch) before validation
  and featurisation; `num_epochs=None` repeats forever, so with finite epochs processes may yield
  different numbers of batches -- run a fixed number of steps instead. Batches are full
  (drop_remainder) so shapes stay static under jit.
- Batches (token arrays follow the input-aligned convention of fwm/data/features.py: predict
  `targets_BxL[b, t]` from `tokens_BxL[b, :t+1]` with weight `loss_weights_BxL[b, t]`):
  LM -- `tokens_BxL`, `targets_BxL`, `segment_ids_BxL` (1..n per row, 0 = padding), `positions_BxL`
  (restart at 0 per segment), `loss_weights_BxL`; documents are concatenated and split into rows of
  seq_len (Grain's ConcatThenSplit), so a long document continues in the next row as a new segment.
  SFT -- the same plus `span_ids_BxL` (int8, schema.SPAN_*); one sample per row (padded) or packed
  first-fit (`pack=True`, never split).
  RL -- B = batch_size samples holding B/G distinct tasks, each repeated G = group_size times in a
  row: `task_ids_B`, `questions_B`, `answers_B` (object arrays), `data_sources_B`, `metadata_B`,
  `group_ids_B` (int32, 0..B/G-1 within the batch); a batch never straddles two epochs.
- `worker_count > 0` tokenizes in Grain worker processes: they re-import the main module, so guard
  entry points with `if __name__ == "__main__"` (absl app.run parses flags; unparsed flags are marked
  parsed here). Batches depend on worker_count (deterministic for a fixed count): resume a
  checkpoint with the same count, and close() iterators you drop to stop their workers.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Collection, Sequence

import grain
import numpy as np
from absl import flags, logging

from fwm.data import features
from fwm.data.records import ROLES, RecordValidator
from fwm.data.sources import open_source

Paths = str | os.PathLike | Sequence[str | os.PathLike]


def resolve_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to this JAX process; checked for consistency."""
    if process_index is None or process_count is None:
        import jax  # only for the defaults: tests and tools pass explicit shards

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    return process_index, process_count


def shuffled_shard(
    paths: Paths,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
) -> grain.MapDataset:
    """This process's records of `paths` (SourceRecords), shuffled per epoch and repeated."""
    process_index, process_count = resolve_shard(process_index, process_count)
    source = open_source(paths)
    dataset = grain.MapDataset.source(source)[process_index::process_count]
    if len(dataset) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} gets no records: {paths} hold only {len(source)}"
        )
    if shuffle:
        dataset = dataset.shuffle(seed=seed % 2**32)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}; expected a positive number or None (forever)")
    return dataset.repeat(num_epochs)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive integer")


def _is_valid(record: dict | None) -> bool:
    return record is not None


def _read(dataset: grain.MapDataset, read_threads: int) -> grain.IterDataset:
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(16, 8 * read_threads))
    )


def die_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain worker init: the worker exits as soon as the process that started it dies, even by SIGKILL
    (which runs no cleanup), instead of living on as an orphan holding memory and shared buffers.

    A daemon thread blocks on the parent's multiprocessing sentinel (it becomes ready when the parent
    exits). Not PR_SET_PDEATHSIG: that fires when the parent *thread* that forked the worker ends, and
    Grain may start workers from a pool thread that ends while training goes on.
    """
    del worker_index, worker_count  # Grain's worker_init_fn signature
    import multiprocessing
    import multiprocessing.connection
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no cleanup: the buffers it would flush belong to a dead reader

    threading.Thread(target=watch, name="fwm-die-with-parent", daemon=True).start()


def _with_workers(dataset: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    if worker_count <= 0:
        return dataset
    if not flags.FLAGS.is_parsed():
        # Grain reads its absl flags when it starts workers; a program that never parsed flags (a test,
        # a notebook) would fail there. Marking them parsed keeps every flag at its default.
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                               worker_init_fn=die_with_parent)


def _packed_to_batch(packed: dict[str, np.ndarray], *, pad_id: int, with_spans: bool) -> dict[str, np.ndarray]:
    """Packer output ({feature}, tokens_segment_ids, tokens_positions; batched) -> the batch dict."""
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)
    batch = {
        "tokens_BxL": np.where(segment_ids > 0, packed["tokens"], pad_id).astype(np.int32),
        "targets_BxL": np.where(segment_ids > 0, packed["targets"], pad_id).astype(np.int32),
        "segment_ids_BxL": segment_ids,
        "positions_BxL": packed["tokens_positions"].astype(np.int32),
        "loss_weights_BxL": np.where(segment_ids > 0, packed["loss_weights"], 0).astype(np.float32),
    }
    if with_spans:
        batch["span_ids_BxL"] = np.where(segment_ids > 0, packed["span_ids"], 0).astype(np.int8)
        # Host-side counters (the step never reads them): samples per row are its segments 1..n.
        batch["samples_B"] = segment_ids.max(axis=1).astype(np.int32)
        batch["truncated_B"] = np.where(segment_ids > 0, packed["truncated"], 0).sum(axis=1).astype(np.int32)
    return batch


def lm_pipeline(
    paths: Paths,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    trained_roles: Collection[str] | None = None,
    add_bos: bool = True,
    add_eos: bool = True,
    on_bad_record: str = "raise",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Packed LM batches (pretraining / mid-training) from LM corpus files; see the module docstring.

    trained_roles: the target roles of every record; None or empty: each record's own `trained_roles`,
    else features.DEFAULT_TRAINED_ROLES. drop_remainder=False (finite eval passes) keeps a last,
    smaller batch, whose last row may be short too (padded with segment 0).
    """
    _check_sizes(seq_len=seq_len, batch_size=batch_size)
    trained_roles = tuple(trained_roles or ())
    unknown = sorted(set(trained_roles) - set(ROLES))
    if unknown:
        raise ValueError(f"trained_roles has unknown roles {unknown}; expected roles among {list(ROLES)}")
    dataset = shuffled_shard(
        paths, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
    )
    dataset = dataset.map(RecordValidator("lm", on_bad_record)).filter(_is_valid)
    dataset = dataset.map(
        functools.partial(
            features.lm_example, tokenizer=tokenizer, trained_roles=trained_roles or None,
            add_bos=add_bos, add_eos=add_eos,
        )
    )
    batched = pack_lm_examples(_read(dataset, read_threads), seq_len=seq_len, batch_size=batch_size,
                               pad_id=tokenizer.pad_id, drop_remainder=drop_remainder)
    return _with_workers(batched, worker_count)


def pack_lm_examples(
    examples: grain.IterDataset, *, seq_len: int, batch_size: int, pad_id: int, drop_remainder: bool = True
) -> grain.IterDataset:
    """features.lm_example outputs -> packed LM batches (concatenate, split at seq_len, batch)."""
    lengths = {name: seq_len for name in ("tokens", "targets", "loss_weights")}
    packed = grain.experimental.ConcatThenSplitIterDataset(examples, length_struct=lengths)
    return packed.batch(batch_size, drop_remainder=drop_remainder).map(
        functools.partial(_packed_to_batch, pad_id=pad_id, with_spans=False)
    )


def _pad_example(example: dict[str, np.ndarray], *, seq_len: int) -> dict[str, np.ndarray]:
    """One SFT example in a row of its own: the packer's layout with a single segment."""
    length = len(example["tokens"])
    padded = {name: np.zeros(seq_len, values.dtype) for name, values in example.items()}
    for name, values in example.items():
        padded[name][:length] = values
    padded["tokens_segment_ids"] = (np.arange(seq_len) < length).astype(np.int32)
    padded["tokens_positions"] = np.where(np.arange(seq_len) < length, np.arange(seq_len), 0).astype(np.int32)
    return padded


def sft_pipeline(
    paths: Paths,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    pack: bool = False,
    packing_bins: int | None = None,
    add_bos: bool = True,
    add_eos: bool = True,
    on_bad_record: str = "raise",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """SFT batches (prompt masked, response trained, span ids) from SFT sample files.

    pack=False: one sample per row, padded. pack=True: first-fit packing into `packing_bins` open
    rows (default batch_size); samples are truncated to seq_len first (features.sft_example), and
    `samples_B` / `truncated_B` count per row the samples and those that lost tokens to it.
    drop_remainder=False (finite eval passes) keeps a last, smaller batch.
    """
    _check_sizes(seq_len=seq_len, batch_size=batch_size)
    dataset = shuffled_shard(
        paths, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
    )
    dataset = dataset.map(RecordValidator("sft", on_bad_record)).filter(_is_valid)
    dataset = dataset.map(
        functools.partial(features.sft_example, tokenizer=tokenizer, seq_len=seq_len, add_bos=add_bos, add_eos=add_eos)
    )
    if pack:
        lengths = {name: seq_len for name in ("tokens", "targets", "loss_weights", "span_ids", "truncated")}
        rows = grain.experimental.FirstFitPackIterDataset(
            _read(dataset, read_threads), length_struct=lengths,
            num_packing_bins=packing_bins or batch_size, seed=seed % 2**32, shuffle_bins=True,
        )
    else:
        rows = _read(dataset.map(functools.partial(_pad_example, seq_len=seq_len)), read_threads)
    batched = rows.batch(batch_size, drop_remainder=drop_remainder).map(
        functools.partial(_packed_to_batch, pad_id=tokenizer.pad_id, with_spans=True)
    )
    return _with_workers(batched, worker_count)


def load_rl_tasks(
    paths: Paths,
    *,
    on_bad_record: str = "raise",
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[dict[str, Any]]:
    """This process's validated RL tasks, read eagerly (task files are small) in file order."""
    process_index, process_count = resolve_shard(process_index, process_count)
    source = open_source(paths)
    validator = RecordValidator("rl", on_bad_record)
    tasks = [task for i in range(process_index, len(source), process_count) if (task := validator(source[i]))]
    if validator.num_bad:
        logging.warning("skipped %d bad RL task records of %s", validator.num_bad, paths)
    return tasks


def _group_batch(tasks: Sequence[dict[str, Any]], *, group_size: int) -> dict[str, np.ndarray]:
    """B/G tasks -> B samples, each task repeated group_size times consecutively."""

    def column(name: str) -> np.ndarray:
        values = np.empty(len(tasks) * group_size, dtype=object)  # object: strings/lists stay Python values
        for i, task in enumerate(tasks):
            for j in range(group_size):
                values[i * group_size + j] = task[name]
        return values

    return {
        "task_ids_B": column("id"),
        "questions_B": column("question"),
        "answers_B": column("answers"),
        "data_sources_B": column("data_source"),
        "metadata_B": column("metadata"),
        "group_ids_B": np.repeat(np.arange(len(tasks), dtype=np.int32), group_size),
    }


def rl_pipeline(
    paths: Paths,
    *,
    batch_size: int,
    group_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    on_bad_record: str = "raise",
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """RL task batches: batch_size samples = batch_size // group_size distinct tasks x group_size."""
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of group_size={group_size}")
    tasks_per_batch = batch_size // group_size
    tasks = load_rl_tasks(
        paths, on_bad_record=on_bad_record, process_index=process_index, process_count=process_count
    )
    if len(tasks) < tasks_per_batch:
        raise ValueError(
            f"this process has {len(tasks)} valid RL tasks in {paths}, fewer than the "
            f"{tasks_per_batch} distinct tasks one batch needs (batch_size {batch_size} / group_size {group_size})"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}; expected a positive number or None (forever)")
    dataset = grain.MapDataset.source(tasks)
    if shuffle:
        dataset = dataset.shuffle(seed=seed % 2**32)
    # Batch before repeat: MapDataset batches each epoch separately, so a batch's tasks are distinct.
    dataset = dataset.batch(
        tasks_per_batch, drop_remainder=True, batch_fn=functools.partial(_group_batch, group_size=group_size)
    )
    return dataset.repeat(num_epochs).to_iter_dataset(grain.ReadOptions(num_threads=0))
