"""The supervised training loop (stages pretrain, mid_train, sft): resumable, preemptible, one step ahead.

`run(config)` trains config.stage in config.train.workdir:
  tokenizer + Grain pipeline -> mesh -> TrainState (restored from the workdir's newest checkpoint,
  else created from config.init.source) -> steps -> checkpoints, metrics.jsonl, TensorBoard.
- The host never waits for the device without need: step t's metrics are fetched (jax.device_get)
  after step t+1 has been dispatched; only checkpoint, eval and final steps sync.
- Checkpoints (fwm/train/checkpoints.py) every train.ckpt_every steps and at the end, asynchronous,
  the newest train.keep_ckpts kept. A save happens only after that step's loss and gradient norm were
  seen to be finite, so a checkpoint never holds a diverged state.
- Resume: a workdir with a checkpoint continues from it (state, data iterator, so the exact next
  batch); metrics.jsonl is cut back to the restored step first, so it ends equal to an uninterrupted
  run's.
- SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, `run` returns normally (exit
  code 0 from the CLI) and logs where it saved; a second signal aborts at once (fwm/train/run_control.py,
  shared with the RL loop).
- A NaN/Inf loss or gradient norm raises NonFiniteLossError (step and value) without saving.
- Eval every train.eval_every steps and always at the last step: one pass over every eval record
  exactly once (train.eval_batches > 0 caps it), the last batch padded with zero-weight rows.
- Logged: trained tokens/s (loss weight > 0); SFT runs also the share of samples truncated to
  data.seq_len (`truncated_share`, `eval_truncated_share`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fwm.config import ConfigError, validate
from fwm.mesh import initialize_distributed, make_mesh, place_batch
from fwm.model import transformer
from fwm.train import checkpoints, inputs, memory
from fwm.train.inputs import TokenizerMismatchError
from fwm.train.losses import BATCH_KEYS
from fwm.train.metrics import MetricsWriter, Throughput, peak_flops_per_device, truncate_jsonl
# NonFiniteLossError stays importable from here (fwm.train.loop.NonFiniteLossError)
from fwm.train.run_control import NonFiniteLossError, StopRequest, check_finite, warn_config_changes  # noqa: F401
from fwm.train.state import abstract_state, create_state, initial_params, make_optimizer
from fwm.train.steps import make_eval_step, make_train_step


@dataclasses.dataclass
class RunResult:
    """What a finished (or preempted) run did."""

    step: int                        # optimiser steps done (state.step)
    preempted: bool                  # stopped by SIGTERM/SIGINT (a checkpoint of `step` was saved)
    last_record: dict[str, float]    # the last metrics.jsonl record's values
    checkpoint_dir: str
    model_config: transformer.ModelConfig
    perf: dict[str, float]           # training throughput over the run (steps/s, tokens/s, mfu; no compile/eval)


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def _eval_batches(dataset: Any, keys: tuple[str, ...], cap: int, batch_size: int) -> tuple[list[dict], dict]:
    """One pass over the eval split (the first `cap` batches when cap > 0), each batch padded to batch_size
    rows with padding rows (segment 0, weight 0); with several processes, every process gets as many
    batches as the one with most (padding batches), so the jitted eval steps line up. Also returns the
    SFT truncation counters of the pass."""
    batches, counts = [], {"samples": 0, "truncated": 0}
    for batch in dataset:
        if "samples_B" in batch:
            counts["samples"] += int(batch["samples_B"].sum())
            counts["truncated"] += int(batch["truncated_B"].sum())
        rows = {k: batch[k] for k in keys}
        short = batch_size - len(rows[keys[0]])
        if short:
            rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
        batches.append(rows)
        if cap and len(batches) >= cap:
            break
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        most = int(multihost_utils.process_allgather(np.int32(len(batches))).max())
        empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
        batches += [empty] * (most - len(batches))
    return batches, counts


def _evaluate(eval_step: Any, params: Any, dataset: Any, mesh: Any, keys: tuple[str, ...], cap: int,
              batch_size: int) -> dict[str, float]:
    """Held-out token-mean loss over every eval record once (or the first `cap` batches)."""
    batches, counts = _eval_batches(dataset, keys, cap, batch_size)
    total = None
    for batch in batches:
        out = eval_step(params, place_batch(mesh, batch))
        total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
    sums = {k: float(v) for k, v in jax.device_get(total).items()}
    record = {"eval_loss": sums["loss_sum"] / max(sums["tokens"], 1.0), "eval_tokens": sums["tokens"],
              "eval_batches": float(len(batches))}
    for key, value in sums.items():
        if key.startswith("loss_sum_"):
            name = key[len("loss_sum_"):]
            record[f"eval_loss_{name}"] = value / max(sums[f"tokens_{name}"], 1.0)
            record[f"eval_tokens_{name}"] = sums[f"tokens_{name}"]
    if counts["samples"]:
        # this process's share (each process reads its own records)
        record["eval_truncated_share"] = counts["truncated"] / counts["samples"]
    return record


def run(config: ml_collections.ConfigDict) -> RunResult:
    """Trains config.stage in config.train.workdir until the step count (train.steps, or from
    train.epochs) or a stop signal. Everything is checked before anything is written: the config, the
    manifest, init.source, the batch split over the mesh, the tokenizer against the parameters'."""
    validate(config)
    initialize_distributed(bool(config.train.distributed))  # before any device is touched
    config = validate(inputs.resolve_config(config))
    workdir = config.train.workdir
    if not workdir:
        raise ConfigError("config key 'train.workdir' is empty; pass --workdir DIR")
    stage = config.stage
    is_writer = jax.process_index() == 0
    resuming = checkpoints.has_checkpoint(workdir)
    if not resuming:
        inputs.check_init_source(config.init.source)
    mesh = make_mesh(config.mesh.to_dict())
    inputs.check_batch_size(config, mesh)
    manager = (checkpoints.make_manager(workdir, int(config.train.keep_ckpts), bool(config.train.async_checkpoint))
               if resuming else None)
    start = manager.latest_step() if manager is not None else None
    root = checkpoints.checkpoint_root(workdir)
    resume_meta = checkpoints.restore_meta(manager, start) if start is not None else None
    if resume_meta is not None:
        reference = inputs.recorded_tokenizer(resume_meta, root, f"this workdir's checkpoint {start}")
    else:
        reference = inputs.source_tokenizer(config.init.source)
    tokenizer, tok_path = inputs.prepare_tokenizer(config, reference)
    os.makedirs(workdir, exist_ok=True)
    total_steps = inputs.total_steps(config, tokenizer)
    if total_steps != config.train.steps:  # from train.epochs: one step count for the schedule, the steps, the meta
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.steps = total_steps
    train_data = inputs.make_dataset(config, tokenizer, config.data.train_files, train=True)
    eval_data = (inputs.make_dataset(config, tokenizer, config.data.eval_files, train=False)
                 if config.data.eval_files else None)
    train_iter = iter(train_data)
    tx = make_optimizer(config.optim, total_steps)
    if manager is None:
        manager = checkpoints.make_manager(workdir, int(config.train.keep_ckpts), bool(config.train.async_checkpoint))
    if start is not None:
        meta = resume_meta
        model_cfg = transformer.ModelConfig.from_dict(meta["model_config"])
        warn_config_changes(meta.get("config", {}), _config_json(config))
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise TokenizerMismatchError(f"{tok_path} has {tokenizer.vocab_size} ids but the checkpoint's model only "
                                         f"{model_cfg.vocab_size}: the tokenizer changed since step {start}")
        state = checkpoints.restore(manager, start, abstract_state(model_cfg, tx, mesh), train_iter, start)
        logging.info("resumed %s from %s/%d", stage, root, start)
    else:
        start = 0
        model_cfg, params = initial_params(config, mesh, tokenizer.vocab_size,
                                           getattr(tokenizer, "new_tag_ids", ()))
        state = create_state(model_cfg, tx, mesh, rng=jax.random.key(int(config.train.seed)), params=params)
        logging.info("started %s from %s: %s, %.2fM parameters", stage, config.init.source, model_cfg,
                     transformer.num_params(model_cfg) / 1e6)
    if is_writer:
        truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start)
    writer = MetricsWriter(workdir, enabled=is_writer, purge_step=start + 1 if start else None)
    writer.write_config(config.to_json_best_effort(indent=2) + f"\nmodel: {model_cfg}", start)
    train_step = make_train_step(config, model_cfg, mesh, stage)
    eval_step = make_eval_step(config, model_cfg, mesh, stage) if eval_data is not None else None
    keys = BATCH_KEYS[stage]
    device = jax.devices()[0]
    peak, peak_note = peak_flops_per_device(device.device_kind, device.platform, jax.local_device_count(),
                                            float(config.train.peak_flops_per_device))
    tokens_per_step = int(config.data.batch_size) * int(config.data.seq_len)
    throughput = Throughput(total_steps, tokens_per_step,
                            transformer.train_flops_per_token(model_cfg, int(config.data.seq_len)),
                            peak * jax.device_count(), peak_note)
    meta = {"model_config": model_cfg.to_dict(), "config": _config_json(config),
            "tokenizer": os.path.abspath(tok_path), "tokenizer_sha256": inputs.tokenizer_fingerprint(tok_path),
            "stage": stage, "total_steps": total_steps}

    def save(step: int) -> None:
        checkpoints.save(manager, step, state, train_iter, {**meta, "step": step})

    step, last_saved, preempted = start, start, False
    last_record: dict[str, float] = {}
    pending: tuple[int, dict[str, jax.Array], tuple[int, int]] | None = None
    truncation = [0, 0]  # SFT samples and those truncated to seq_len, since the last logged step

    def finish(done_step: int, device_metrics: dict[str, jax.Array], counts: tuple[int, int],
               evaluate: bool = False) -> None:
        """Fetches step done_step's metrics (raises if not finite), evaluates if asked, logs and writes."""
        nonlocal last_record
        values = check_finite(done_step, device_metrics, root, manager)
        throughput.add_trained_tokens(values["tokens"])
        truncation[0] += counts[0]
        truncation[1] += counts[1]
        record, shown, fresh_perf = {}, {}, {}
        if done_step % config.train.log_every == 0 or done_step == total_steps:
            record.update(values)
            shown["loss"] = values["loss"]
            if truncation[0]:
                # this process's samples since the last log: a cut prompt or response hides a too-short seq_len
                record["truncated_share"] = shown["truncated_share"] = truncation[1] / truncation[0]
                truncation[0] = truncation[1] = 0
            fresh_perf = throughput.report(done_step)  # before the eval: only training time counts
        if evaluate:
            eval_record = _evaluate(eval_step, state.params, eval_data, mesh, keys, int(config.train.eval_batches),
                                    inputs.per_process_batch_size(config))
            record.update(eval_record)
            shown.update(eval_record)
        if record:
            logging.info("%s", throughput.line(done_step, shown, fresh_perf))
            writer.write(done_step, record, fresh_perf)
            last_record = record

    try:
        with StopRequest() as stop:
            if start >= total_steps:
                logging.info("%s already finished: checkpoint step %d >= train.steps %d", stage, start, total_steps)
            while step < total_steps:
                batch = next(train_iter)
                placed = place_batch(mesh, {k: batch[k] for k in keys})
                if step == start:  # compiled ahead to report its memory; the call below reuses the executable
                    logging.info("%s", memory.step_line(state, train_step.lower(state, placed).compile(), mesh))
                state, device_metrics = train_step(state, placed)
                counts = ((int(batch["samples_B"].sum()), int(batch["truncated_B"].sum())) if "samples_B" in batch
                          else (0, 0))
                step += 1
                if pending is not None:
                    finish(*pending)  # the previous step's metrics, fetched while this step runs
                    pending = None
                want_eval = eval_step is not None and (step % config.train.eval_every == 0 or step == total_steps)
                want_ckpt = step % config.train.ckpt_every == 0 or step == total_steps
                want_sync = want_eval or want_ckpt or step % config.train.log_every == 0
                if stop.requested(step, want_sync):
                    preempted, want_ckpt = True, True
                if not (want_eval or want_ckpt):
                    pending = (step, device_metrics, counts)
                    continue
                finish(step, device_metrics, counts, evaluate=want_eval)
                if want_ckpt and last_saved != step:
                    save(step)
                    last_saved = step
                throughput.restart(step)
                if preempted:
                    logging.warning("preempted by %s at step %d: saved checkpoint %s/%d; rerun the same command "
                                    "to resume", stop.name or "a peer process", step, root, step)
                    break
            if pending is not None:
                finish(*pending)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return RunResult(step=step, preempted=preempted, last_record=last_record, checkpoint_dir=root,
                     model_config=model_cfg, perf=throughput.average(step))
