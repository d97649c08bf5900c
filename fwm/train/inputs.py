"""A stage's inputs from config: the manifest's corpus, its tokenizer (the one its parameters were trained
with, recorded in every checkpoint), its step count, and Grain pipelines.

`STAGE_DATA` says which fwm.data pipeline feeds each stage: packed LM batches for pretraining and
mid-training, SFT samples (prompt masked, span ids) for SFT. Batch sizes here are per process: the
config's global `data.batch_size` divided by the process count; the loop places each process's
rows with fwm.mesh.place_batch.

Tokenizers chain with the parameters: each run copies its tokenizer into the workdir
(WORKDIR/tokenizer.model, or WORKDIR/tokenizer/ for a Hugging Face one) and records that path and
its sha256 in every checkpoint's meta; `source_tokenizer` finds it again from `init.source`, and
`prepare_tokenizer` refuses a different one unless tokenizer.allow_change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from typing import Any, Iterator

import grain
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from fwm.config import ConfigError
from fwm.data import pipelines
from fwm.data.manifest import read_manifest
from fwm.data.records import RecordValidator
from fwm.data.sources import open_source
from fwm.files import atomic_open

STAGE_DATA = {"pretrain": "lm", "mid_train": "lm", "sft": "sft"}
DEFAULT_TOKENIZER_NAME = "tokenizer.model"
HF_TOKENIZER_DIR = "tokenizer"  # WORKDIR/tokenizer/: the copy of a Hugging Face tokenizer
# Files that define a tokenizer (or travel with one): copied into workdirs and by `fwm convert`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


class TokenizerMismatchError(ValueError):
    """The run's tokenizer differs from the one its parameters were trained with."""


@dataclasses.dataclass(frozen=True)
class RecordedTokenizer:
    """The tokenizer some parameters were trained with."""

    path: str
    sha256: str
    where: str  # for messages: "init.source orbax:/x/checkpoints" or "this workdir's checkpoint 40"


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with data.manifest's corpus filled in: train/eval files, trained roles (LM
    corpora) and tokenizer.path. Keys the config sets explicitly (non-empty) win."""
    if not config.data.manifest:
        return config
    try:
        manifest = read_manifest(config.data.manifest)
    except ValueError as err:
        raise ConfigError(f"config key 'data.manifest': {err}") from None
    corpus = manifest.corpora.get(config.data.corpus)
    if corpus is None:
        raise ConfigError(f"config key 'data.corpus': {config.data.corpus!r} is not in {manifest.path}; "
                          f"expected one of {sorted(manifest.corpora)}")
    expected = STAGE_DATA.get(config.stage)
    if corpus.stage != expected:
        raise ConfigError(f"config key 'data.corpus': {corpus.name!r} holds {corpus.stage} records, but stage "
                          f"{config.stage!r} reads {expected} records")
    resolved = ml_collections.ConfigDict(config.to_dict())
    d = resolved.data
    d.train_files = tuple(d.train_files) or corpus.train_files
    d.eval_files = tuple(d.eval_files) or corpus.eval_files
    d.trained_roles = tuple(d.trained_roles) or corpus.trained_roles
    resolved.tokenizer.path = resolved.tokenizer.path or manifest.tokenizer
    roles = f", trained roles {d.trained_roles or 'per record'}" if corpus.stage == "lm" else ""
    logging.info("data from %s, corpus %r: %d train file(s), %d eval file(s)%s, tokenizer %s", manifest.path,
                 corpus.name, len(d.train_files), len(d.eval_files), roles, resolved.tokenizer.path or "(none named)")
    return resolved


def check_init_source(source: str) -> None:
    """ConfigError unless init.source's path exists: checked before the workdir is touched."""
    if source == "scratch":
        return
    kind, path = source.split(":", 1)
    if "://" not in path and not os.path.exists(path):
        raise ConfigError(f"config key 'init.source': {source}: {path} does not exist (expected an earlier "
                          f"stage's WORKDIR/checkpoints, a step directory in it, or a `fwm convert` output)")


def check_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """ConfigError unless data.batch_size splits evenly over the mesh axes that batch rows shard over
    (data x fsdp); otherwise fwm.mesh would silently replicate the batch on every device."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = config.data.batch_size // config.optim.micro_batches
    if config.data.batch_size % shards or rows % shards:
        raise ConfigError(f"config key 'data.batch_size': {config.data.batch_size} rows (in "
                          f"{config.optim.micro_batches} micro-batch(es)) do not split over the mesh's "
                          f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} batch shards; use a "
                          f"multiple of {shards * config.optim.micro_batches} or change mesh.data / mesh.fsdp")


def _tokenizer_files(path: str) -> list[str]:
    """The files that define the tokenizer at `path` (a file, or a directory holding TOKENIZER_FILES)."""
    if os.path.isdir(path):
        return [os.path.join(path, name) for name in TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    return [path]


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over the tokenizer's defining files (names and bytes): equal iff the ids are equal."""
    digest = hashlib.sha256()
    for file in _tokenizer_files(path):
        if os.path.isdir(path):  # a file's name is not part of it (copies are renamed); a directory's files' are
            digest.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _has_tokenizer(path: str) -> bool:
    return os.path.isfile(path) or (os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer.model")))


def workdir_tokenizer(workdir: str, source_path: str) -> str:
    """Where a run keeps its copy of the tokenizer at `source_path`."""
    if os.path.isfile(source_path) and source_path.endswith(".model"):
        return os.path.join(workdir, DEFAULT_TOKENIZER_NAME)
    if os.path.isfile(source_path):
        return os.path.join(workdir, os.path.basename(source_path))
    return os.path.join(workdir, HF_TOKENIZER_DIR)


def copy_tokenizer(source_path: str, workdir: str) -> str:
    """Copies the tokenizer into the workdir (atomically, file by file) unless it is that copy; returns it."""
    target = workdir_tokenizer(workdir, source_path)
    if os.path.abspath(target) == os.path.abspath(source_path):
        return target
    for file in _tokenizer_files(source_path):
        destination = target if os.path.isfile(source_path) else os.path.join(target, os.path.basename(file))
        with open(file, "rb") as src, atomic_open(destination, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def recorded_tokenizer(meta: dict[str, Any], near: str, where: str) -> RecordedTokenizer | None:
    """The tokenizer a checkpoint's meta records, found at its recorded path or, when the workdir moved,
    under the same name in `near` or its parents. None when meta records none (older checkpoints)."""
    recorded, sha = meta.get("tokenizer"), meta.get("tokenizer_sha256")
    if not recorded:
        return None
    candidates = [recorded]
    directory = os.path.abspath(near)
    for _ in range(3):
        candidates.append(os.path.join(directory, os.path.basename(recorded.rstrip(os.sep))))
        directory = os.path.dirname(directory)
    for candidate in candidates:
        if _has_tokenizer(candidate) and (sha is None or tokenizer_fingerprint(candidate) == sha):
            return RecordedTokenizer(candidate, sha or tokenizer_fingerprint(candidate), where)
    if sha is None:
        raise TokenizerMismatchError(
            f"{where} was trained with the tokenizer {recorded}, which is no longer there (nor beside {near}); "
            f"pass that tokenizer with --config.tokenizer.path=PATH")
    return RecordedTokenizer(recorded, sha, where)  # gone, but its sha256 still checks a named tokenizer


def source_tokenizer(source: str) -> RecordedTokenizer | None:
    """The tokenizer the parameters of init.source were trained with: recorded in an fwm checkpoint's meta
    (or copied beside a `fwm convert` output), or a Hugging Face directory's own. None for 'scratch' or
    when the source says nothing."""
    if source == "scratch":
        return None
    kind, path = source.split(":", 1)
    where = f"init.source {source}"
    if kind == "orbax":
        from fwm.model.checkpoint import load_meta  # lazy: orbax only for runs that start from a checkpoint

        found = recorded_tokenizer(load_meta(path), path, where)
        if found is not None:
            return found
    if _has_tokenizer(path) and os.path.isdir(path):
        return RecordedTokenizer(path, tokenizer_fingerprint(path), where)
    return None


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


def _check_same(path: str, reference: RecordedTokenizer | None, allow_change: bool, named_by: str) -> None:
    if reference is None or allow_change:
        return
    sha = tokenizer_fingerprint(path)
    if sha != reference.sha256:
        raise TokenizerMismatchError(
            f"{named_by} names the tokenizer {path} (sha256 {sha[:12]}), but {reference.where} was trained with "
            f"{reference.path} (sha256 {reference.sha256[:12]}): its token ids would mean other text. Leave "
            f"tokenizer.path (and the manifest's tokenizer) to use that one, or pass "
            f"--config.tokenizer.allow_change=True to train on a different tokenizer deliberately")


def prepare_tokenizer(config: ml_collections.ConfigDict, reference: RecordedTokenizer | None = None
                      ) -> tuple[Any, str]:
    """(tokenizer, path of the workdir's copy). Which one (see config.py's `tokenizer` comment): a named
    tokenizer.path (from the config or the manifest), checked against `reference` (the tokenizer the
    parameters were trained with) unless tokenizer.allow_change; else the reference; else the workdir's
    own; else one trained into WORKDIR/tokenizer.model from data.train_files (process 0 trains it).
    The choice is copied into the workdir, so checkpoints can record it."""
    from fwm import tokenizer as tokenizer_lib  # lazy: fwm.cli imports this module's users lazily too

    workdir = config.train.workdir
    named = config.tokenizer.path
    if named:
        if not os.path.exists(named):
            raise FileNotFoundError(f"config key 'tokenizer.path': {named} does not exist")
        named_by = "config key 'tokenizer.path'" + (f" (from data.manifest {config.data.manifest})"
                                                    if config.data.manifest else "")
        _check_same(named, reference, bool(config.tokenizer.allow_change), named_by)
        chosen = named
    elif reference is not None:
        if not _has_tokenizer(reference.path):
            raise TokenizerMismatchError(
                f"{reference.where} was trained with the tokenizer {reference.path} (sha256 {reference.sha256[:12]}), "
                f"which is no longer there; pass that tokenizer with --config.tokenizer.path=PATH")
        chosen = reference.path
        logging.info("tokenizer: %s, the one %s was trained with", chosen, reference.where)
    else:
        chosen = next((path for path in (os.path.join(workdir, DEFAULT_TOKENIZER_NAME),
                                         os.path.join(workdir, HF_TOKENIZER_DIR)) if _has_tokenizer(path)), "")
    if not chosen:
        chosen = os.path.join(workdir, DEFAULT_TOKENIZER_NAME)
        if not config.data.train_files:
            raise ConfigError("config key 'data.train_files' is empty: nothing to train the tokenizer on")
        if jax.process_index() == 0:
            opts = config.tokenizer.train
            texts = list(corpus_texts(config.data.train_files, STAGE_DATA[config.stage], int(opts.max_texts),
                                      config.data.on_bad_record))
            trained = tokenizer_lib.train_sentencepiece(
                texts, chosen, int(opts.vocab_size), character_coverage=float(opts.character_coverage),
                seed=int(opts.seed))
            logging.info("trained a SentencePiece tokenizer of %d pieces (asked for %d) on %d texts -> %s",
                         trained.vocab_size, opts.vocab_size, len(texts), chosen)
    path = copy_tokenizer(chosen, workdir) if jax.process_index() == 0 else workdir_tokenizer(workdir, chosen)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fwm tokenizer in the workdir")
    return tokenizer_lib.load_tokenizer(path), path


def epoch_rows(config: ml_collections.ConfigDict, tokenizer: Any) -> float:
    """Rows (of data.seq_len) that one pass over data.train_files fills, from one tokenizing pass:
    LM, packed: (tokens + BOS/EOS) / seq_len; SFT: one row per sample, or with data.pack an estimate,
    (tokens truncated to seq_len) / seq_len (first-fit packing fills rows a little less)."""
    d = config.data
    kind = STAGE_DATA[config.stage]
    source = open_source(list(d.train_files))
    validator = RecordValidator(kind, d.on_bad_record)
    extra = int(d.add_bos) + int(d.add_eos)
    tokens, samples = 0, 0
    for index in range(len(source)):
        record = validator(source[index])
        if record is None:
            continue
        samples += 1
        if kind == "lm":
            tokens += len(tokenizer.encode("".join(text for _, text in record["segments"]))) + extra
        elif d.pack:
            length = len(tokenizer.encode(record["prompt"])) + len(tokenizer.encode(record["response"])) + extra
            tokens += min(length, int(d.seq_len))
    if kind == "sft" and not d.pack:
        return float(samples)
    return tokens / int(d.seq_len)


def total_steps(config: ml_collections.ConfigDict, tokenizer: Any) -> int:
    """train.steps, or, with train.epochs > 0, ceil(epochs x epoch_rows / data.batch_size)."""
    epochs = float(config.train.epochs)
    if epochs <= 0:
        return int(config.train.steps)
    rows = epoch_rows(config, tokenizer)
    steps = max(1, math.ceil(epochs * rows / int(config.data.batch_size)))
    logging.info("train.epochs=%g -> %d steps (one epoch: %.1f rows of %d tokens = %.1f batches of %d)", epochs,
                 steps, rows, config.data.seq_len, rows / config.data.batch_size, config.data.batch_size)
    return steps


def per_process_batch_size(config: ml_collections.ConfigDict) -> int:
    """Rows of the global batch that this process reads."""
    processes = jax.process_count()
    if config.data.batch_size % processes:
        raise ConfigError(f"config key 'data.batch_size': {config.data.batch_size} is not divisible by the "
                          f"{processes} processes")
    return config.data.batch_size // processes


def make_dataset(config: ml_collections.ConfigDict, tokenizer: Any, files: Any, *, train: bool) -> grain.IterDataset:
    """The stage's pipeline over `files`: shuffled training batches repeated forever, or one pass of eval
    batches in file order (every eval record exactly once; the last batch may be short)."""
    d = config.data
    kind = STAGE_DATA.get(config.stage)
    if kind is None:
        raise ConfigError(f"config key 'stage': {config.stage!r} has no supervised data pipeline; "
                          f"expected one of {sorted(STAGE_DATA)}")
    common = dict(
        seq_len=int(d.seq_len), batch_size=per_process_batch_size(config), seed=int(d.seed),
        shuffle=bool(d.shuffle) and train, num_epochs=None if train else 1, add_bos=bool(d.add_bos),
        add_eos=bool(d.add_eos), on_bad_record=d.on_bad_record, worker_count=int(d.worker_count) if train else 0,
        read_threads=int(d.read_threads), drop_remainder=train,
    )
    files = list(files) if not isinstance(files, str) else files
    if kind == "lm":
        # () leaves each record's own trained_roles in charge (features.roles_for).
        return pipelines.lm_pipeline(files, tokenizer, trained_roles=tuple(d.trained_roles) or None, **common)
    return pipelines.sft_pipeline(files, tokenizer, pack=bool(d.pack), **common)
