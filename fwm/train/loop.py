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
  code 0 from the CLI) and logs where it saved; a second signal aborts at once.
- A NaN/Inf loss or gradient norm raises NonFiniteLossError (step and value) without saving.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
from absl import logging

from fwm.config import validate
from fwm.mesh import make_mesh, place_batch
from fwm.model import transformer
from fwm.train import checkpoints, inputs
from fwm.train.losses import BATCH_KEYS
from fwm.train.metrics import MetricsWriter, Throughput, peak_flops_per_device, truncate_jsonl
from fwm.train.state import abstract_state, create_state, initial_params, make_optimizer
from fwm.train.steps import make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the message names the step, the values and the last good checkpoint."""


@dataclasses.dataclass
class RunResult:
    """What a finished (or preempted) run did."""

    step: int                        # optimiser steps done (state.step)
    preempted: bool                  # stopped by SIGTERM/SIGINT (a checkpoint of `step` was saved)
    last_record: dict[str, float]    # the last metrics.jsonl record's values
    checkpoint_dir: str
    model_config: transformer.ModelConfig
    perf: dict[str, float]           # training throughput over the run (steps/s, tokens/s, mfu; no compile/eval)


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop polls; a second signal restores the default and aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logging.warning("not in the main thread: SIGTERM/SIGINT will not trigger a clean save")
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
        self.name = signal.Signals(signum).name
        logging.warning("%s received: finishing the current step, then saving a checkpoint", self.name)

    def requested(self, step: int, sync: bool) -> bool:
        """Whether to stop after `step`; with several processes all agree (checked at sync steps only)."""
        if jax.process_count() == 1:
            return self.name is not None
        if not sync:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(int(self.name is not None)).max())

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "train.workdir":
            logging.warning("config %s%s changed since the checkpoint: %r -> %r", prefix, key, a, b)


def _fetch(step: int, metrics: dict[str, jax.Array], root: str, manager: Any) -> dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        last = manager.latest_step()
        where = f"step {last} in {root}" if last is not None else f"none in {root}"
        raise NonFiniteLossError(
            f"step {step}: loss is {values['loss']} and grad_norm {values['grad_norm']}; stopped without saving "
            f"(last good checkpoint: {where}). Lower optim.lr, raise optim.warmup_steps or check the data."
        )
    return values


def _evaluate(eval_step: Any, params: Any, dataset: Any, mesh: Any, keys: tuple[str, ...],
              num_batches: int) -> dict[str, float]:
    """Held-out token-mean loss over the first num_batches batches of the eval split."""
    iterator = iter(dataset)
    total = None
    for _ in range(num_batches):
        batch = next(iterator)
        out = eval_step(params, place_batch(mesh, {k: batch[k] for k in keys}))
        total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
    sums = {k: float(v) for k, v in jax.device_get(total).items()}
    record = {"eval_loss": sums["loss_sum"] / max(sums["tokens"], 1.0), "eval_tokens": sums["tokens"]}
    for key, value in sums.items():
        if key.startswith("loss_sum_"):
            name = key[len("loss_sum_"):]
            record[f"eval_loss_{name}"] = value / max(sums[f"tokens_{name}"], 1.0)
    return record


def run(config: ml_collections.ConfigDict) -> RunResult:
    """Trains config.stage in config.train.workdir until config.train.steps (or a stop signal)."""
    validate(config)
    workdir = config.train.workdir
    if not workdir:
        raise ValueError("config key 'train.workdir' is empty; pass --workdir DIR")
    os.makedirs(workdir, exist_ok=True)
    stage, total_steps = config.stage, int(config.train.steps)
    is_writer = jax.process_index() == 0
    mesh = make_mesh(config.mesh.to_dict())
    tokenizer, tok_path = inputs.prepare_tokenizer(config)
    train_data = inputs.make_dataset(config, tokenizer, config.data.train_files, train=True)
    eval_data = (inputs.make_dataset(config, tokenizer, config.data.eval_files, train=False)
                 if config.data.eval_files else None)
    train_iter = iter(train_data)
    tx = make_optimizer(config.optim, total_steps)
    manager = checkpoints.make_manager(workdir, int(config.train.keep_ckpts), bool(config.train.async_checkpoint))
    root = checkpoints.checkpoint_root(workdir)
    start = manager.latest_step()
    if start is not None:
        meta = checkpoints.restore_meta(manager, start)
        model_cfg = transformer.ModelConfig.from_dict(meta["model_config"])
        _warn_config_changes(meta.get("config", {}), _config_json(config))
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"{tok_path} has {tokenizer.vocab_size} ids but the checkpoint's model only "
                             f"{model_cfg.vocab_size}: the tokenizer changed since step {start}")
        state = checkpoints.restore(manager, start, abstract_state(model_cfg, tx, mesh), train_iter)
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
    meta = {"model_config": model_cfg.to_dict(), "config": _config_json(config), "tokenizer": tok_path,
            "stage": stage}

    def save(step: int) -> None:
        checkpoints.save(manager, step, state, train_iter, {**meta, "step": step})

    step, last_saved, preempted = start, start, False
    last_record: dict[str, float] = {}
    pending: tuple[int, dict[str, jax.Array]] | None = None

    def finish(done_step: int, device_metrics: dict[str, jax.Array], evaluate: bool = False) -> None:
        """Fetches step done_step's metrics (raises if not finite), evaluates if asked, logs and writes."""
        nonlocal last_record
        values = _fetch(done_step, device_metrics, root, manager)
        record, shown, fresh_perf = {}, {}, {}
        if done_step % config.train.log_every == 0 or done_step == total_steps:
            record.update(values)
            shown["loss"] = values["loss"]
            fresh_perf = throughput.report(done_step)  # before the eval: only training time counts
        if evaluate:
            eval_record = _evaluate(eval_step, state.params, eval_data, mesh, keys, int(config.train.eval_batches))
            record.update(eval_record)
            shown.update(eval_record)
        if record:
            logging.info("%s", throughput.line(done_step, shown, fresh_perf))
            writer.write(done_step, record, fresh_perf)
            last_record = record

    try:
        with _StopRequest() as stop:
            if start >= total_steps:
                logging.info("%s already finished: checkpoint step %d >= train.steps %d", stage, start, total_steps)
            while step < total_steps:
                batch = next(train_iter)
                state, device_metrics = train_step(state, place_batch(mesh, {k: batch[k] for k in keys}))
                step += 1
                if pending is not None:
                    finish(*pending)  # the previous step's metrics, fetched while this step runs
                    pending = None
                want_eval = eval_step is not None and step % config.train.eval_every == 0
                want_ckpt = step % config.train.ckpt_every == 0 or step == total_steps
                want_sync = want_eval or want_ckpt or step % config.train.log_every == 0
                if stop.requested(step, want_sync):
                    preempted, want_ckpt = True, True
                if not (want_eval or want_ckpt):
                    pending = (step, device_metrics)
                    continue
                finish(step, device_metrics, evaluate=want_eval)
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
