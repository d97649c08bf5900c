"""The FC-RL loop (stage 'rl'): rollout -> rewards -> advantages -> rl_step per mini-batch, resumable.

`run(config)` trains in config.train.workdir:
  RL task batches (data.train_files, `fwm.data.pipelines.rl_pipeline`: rl.rollout_batch episodes =
  distinct tasks x rl.group_size) -> one iteration each (`rl_iteration`):
    1. episodes of the current policy (`fwm.rollout.episodes.run_episodes`, `ModelPolicy` at
       rl.temperature, rl.max_new_tokens per step, rl.max_turns steps) in an `EnvPool` (rl.tool);
    2. rewards and span advantages (`fwm.rl.rollout_data.rollout_advantages`);
    3. the step samples shuffled into rl.mini_batches mini-batches (`rollout_data.mini_batches`; with
       rl.pack several samples share a row);
    4. old log-probs recomputed by the training forward for every mini-batch before the first update
       (the first mini-batch is then exactly on-policy, and the sampler's numerics -- another program,
       KV cache -- never enter the ratio; their gap to the sampler's is reported as
       `sampler_logprob_gap`; rl.old_logprobs=sampler keeps the sampler's instead and skips that
       forward pass), and the reference's when rl.kl_beta > 0;
    5. one `rl_step` per mini-batch, in order, rl.epochs times over the same mini-batches.
  train.steps counts optimiser updates (mini-batches); the loop stops once state.step reaches it.
- The reference model of the KL is the policy the run started from (config.init.source), frozen.
- Checkpoints (fwm/train/checkpoints.py: state, task iterator, meta with the iteration) after every
  train.ckpt_every-th iteration and at the end; a workdir with a checkpoint resumes from it, with the
  next task batch and the same iteration count (the rollout and mini-batch RNG are derived from
  train.seed and the iteration, so the iteration is the RNG state). metrics.jsonl gets one line per
  iteration (step = optimiser updates so far); a resumed run first cuts it back to the restored step.
  TensorBoard (WORKDIR/tb) gets the same scalars plus the iteration's wall-clock seconds and an ETA.
- Run control as in the supervised loop (fwm/train/run_control.py): SIGTERM / SIGINT finish the
  current iteration, save a checkpoint and return normally (exit code 0 from the CLI), a second signal
  aborts at once; a NaN/Inf loss or gradient norm in an iteration raises NonFiniteLossError before
  anything of that iteration is written or saved (the last good checkpoint stays the newest).
- The tokenizer must exist (tokenizer.path, else WORKDIR/tokenizer.model): the one the SFT checkpoint
  was trained with.
- Search: a BM25 index (rl.index_dir) or a Search-R1 retrieval server (rl.retriever_url).
- Several processes (train.distributed / FWM_DISTRIBUTED=1; the mesh spans every process's devices):
  rl.rollout_batch stays the global episode count and each process runs the environments of its share,
  whole groups of its own tasks (rl_pipeline shards tasks by process), so rewards and advantages, which
  are per group, need nothing from the other processes. What is collective: the sampler calls (every
  process decodes its rows of one global batch; the processes agree on the prompt bucket, the rows per
  process and the number of calls, a process out of live episodes sending none: `generate`,
  `ModelPolicy`, `run_episodes`), the mini-batches (the same count and shape on every process, each
  process's rows placed into the global batch by `place_batch`; a process short of step samples pads)
  and the rollout metrics (sums and counts added over processes). Process 0 alone writes metrics.jsonl
  and TensorBoard; every process saves its part of the checkpoint (and its own task position).
  Mini-batches are drawn per process: with rl.mini_batches > 1 a global mini-batch holds another
  (equally random) set of step samples than one process with all the devices would draw.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fwm.config import ConfigError, validate
from fwm.data.pipelines import rl_pipeline
from fwm.envs.base import Task
from fwm.envs.retrievers import HTTPRetriever
from fwm.mesh import initialize_distributed, make_mesh, place_batch, process_reduce
from fwm.model import transformer
from fwm.rl import rollout_data
from fwm.rl.losses import REF_KEY
from fwm.rl.step import make_rl_step, make_token_logprobs
from fwm.rollout.envs import EnvPool
from fwm.rollout.episodes import ModelPolicy, PromptOptions, episode_slots, run_episodes
from fwm.tokenizer import load_tokenizer
from fwm.train import checkpoints
from fwm.train.inputs import tokenizer_path
from fwm.train.metrics import MetricsWriter, truncate_jsonl
from fwm.train.run_control import StopRequest, check_finite, warn_config_changes
from fwm.train.state import TrainState, abstract_state, create_state, initial_params, make_optimizer, param_shardings
from fwm.trajectories.collect import EnvSpec, derive_seed


def env_spec(rl: ml_collections.ConfigDict) -> tuple[EnvSpec, HTTPRetriever | None]:
    """The EnvSpec of the `rl` section and, for search over a Search-R1 server (rl.retriever_url), its client."""
    if rl.tool == "search" and not (rl.index_dir or rl.retriever_url):
        raise ConfigError("config key 'rl.index_dir': the search tool needs a BM25 index directory "
                          "(fwm data: WORKDIR/world/bm25) or rl.retriever_url (a Search-R1 retrieval server)")
    retriever = (HTTPRetriever(rl.retriever_url, timeout_s=float(rl.timeout_s))
                 if rl.tool == "search" and rl.retriever_url else None)
    # With a server, index_dir only names the retriever (as in fwm eval): EnvPool uses the one given.
    spec = EnvSpec(rl.tool, max_turns=int(rl.max_turns), index_dir=rl.index_dir or rl.retriever_url,
                   topk=int(rl.topk), metric=rl.env_metric, timeout_s=float(rl.timeout_s), memory_mb=int(rl.memory_mb),
                   isolation=rl.isolation)
    return spec, retriever


def _tasks_of(batch: dict[str, np.ndarray], group_size: int) -> list[Task]:
    """The distinct tasks of an rl_pipeline batch (each repeated group_size times there)."""
    rows = range(0, len(batch["task_ids_B"]), group_size)
    return [Task(id=str(batch["task_ids_B"][i]), question=str(batch["questions_B"][i]),
                 answers=tuple(batch["answers_B"][i]), metadata=dict(batch["metadata_B"][i]),
                 data_source=str(batch["data_sources_B"][i])) for i in rows]


def _mean_metrics(history: Sequence[dict[str, jax.Array]]) -> dict[str, float]:
    """Per-mini-batch step metrics averaged over the iteration (min / max of the ratio over it)."""
    fetched = [{k: float(v) for k, v in jax.device_get(m).items()} for m in history]
    out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    out["ratio_min"] = min(m["ratio_min"] for m in fetched)
    out["ratio_max"] = max(m["ratio_max"] for m in fetched)
    return out


def _lap(timings: dict[str, float] | None, name: str, since: float) -> float:
    """Records the seconds since `since` under `name` (when timings are kept); returns now."""
    now = time.perf_counter()
    if timings is not None:
        timings[name] = now - since
    return now


def rl_iteration(state: TrainState, tasks: Sequence[Task], iteration: int, *, config: ml_collections.ConfigDict,
                 model_cfg: transformer.ModelConfig, mesh: Any, tokenizer: Any, pool: EnvPool,
                 rl_step: Callable, token_logprobs: Callable, ref_params: Any | None, options: PromptOptions,
                 timings: dict[str, float] | None = None) -> tuple[TrainState, dict[str, float]]:
    """One rollout of rl.group_size episodes per task and one rl_step per mini-batch (module docstring).

    timings: if given, filled with the wall-clock seconds of the iteration's parts: rollout_s (episodes:
    sampling and tool calls), reward_s (rewards and advantages), update_s (batching, log-prob passes and
    the rl_steps, waited for).
    """
    clock = time.perf_counter()
    rl = config.rl
    seed = int(config.train.seed)
    slots = episode_slots(tasks, int(rl.group_size), seed, tag=f"rl/{iteration}")
    policy = ModelPolicy(model_cfg, state.params, max_new_tokens=int(rl.max_new_tokens), stop_ids=(tokenizer.eos_id,),
                         temperature=float(rl.temperature), mesh=mesh)
    episodes = run_episodes(slots, policy, pool, tokenizer, options)
    clock = _lap(timings, "rollout_s", clock)
    rewards, advantages = rollout_data.rollout_advantages(episodes, rl)
    clock = _lap(timings, "reward_s", clock)
    samples = rollout_data.step_samples(episodes, advantages)
    # Rows: a multiple of the data-parallel size (each replica gets whole rows) times the micro-batches,
    # of which this process holds its share (run() checks that the data-parallel size splits over processes).
    row_multiple = int(mesh.shape["data"] * mesh.shape["fsdp"] * config.optim.micro_batches) // jax.process_count()
    mini_batch_rng = np.random.default_rng(derive_seed(seed, "rl/mini_batches", iteration))
    batches = rollout_data.mini_batches(samples, int(rl.mini_batches), mini_batch_rng, row_multiple=row_multiple,
                                        max_seq_len=model_cfg.max_seq_len, pad_id=tokenizer.pad_id,
                                        pack=bool(rl.pack), agree=process_reduce)
    placed, gaps = [], []
    for batch in batches:  # every mini-batch scored by the policy before the first update
        on_device = place_batch(mesh, batch)
        if rl.old_logprobs == "recompute":
            sampler_logprobs = on_device["old_logprobs_BxL"]
            on_device["old_logprobs_BxL"] = token_logprobs(state.params, on_device)
            weights = on_device["loss_weights_BxL"]
            gaps.append(jnp.sum(weights * jnp.abs(on_device["old_logprobs_BxL"] - sampler_logprobs))
                        / jnp.maximum(jnp.sum(weights), 1.0))
        if ref_params is not None:
            on_device[REF_KEY] = token_logprobs(ref_params, on_device)
        placed.append(on_device)
    history = []
    for _ in range(int(rl.epochs)):
        for on_device in placed:
            state, metrics = rl_step(state, on_device)
            history.append(metrics)
    if timings is not None:
        jax.block_until_ready(state)  # dispatch is asynchronous: the update ends when the state exists
        _lap(timings, "update_s", clock)
    record = rollout_data.rollout_metrics(episodes, rewards, advantages,
                                          total=lambda values: process_reduce(values, np.sum))
    record.update(step_samples=float(process_reduce(len(samples), np.sum)), mini_batches=float(len(placed)))
    if gaps:  # measured only where old log-probs are recomputed
        record["sampler_logprob_gap"] = float(np.mean(jax.device_get(gaps)))
    if history:
        record.update(_mean_metrics(history))  # fetches the step metrics, so the updates have finished here
    return state, record


def _reference_params(config: ml_collections.ConfigDict, model_cfg: transformer.ModelConfig, mesh: Any,
                      vocab_size: int, new_tag_ids: Sequence[int]) -> Any:
    """The policy the run started from (config.init.source), loaded again: a resumed run's state has moved."""
    _, params = initial_params(config, mesh, vocab_size, new_tag_ids)
    if params is None:  # scratch: the same key create_state uses
        params = jax.jit(lambda key: transformer.init_params(model_cfg, key),
                         out_shardings=param_shardings(model_cfg, mesh))(jax.random.key(int(config.train.seed)))
    return params


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains FC-RL in config.train.workdir until state.step reaches config.train.steps."""
    validate(config)
    initialize_distributed(bool(config.train.distributed))
    rl, workdir = config.rl, config.train.workdir
    processes = jax.process_count()
    if int(rl.rollout_batch) % (processes * int(rl.group_size)):
        raise ConfigError(f"config key 'rl.rollout_batch': {rl.rollout_batch} episodes do not split into whole groups "
                          f"of rl.group_size={rl.group_size} over {processes} processes (each process runs whole "
                          f"groups of its own tasks); expected a multiple of {processes * int(rl.group_size)}")
    if not workdir:
        raise ConfigError("config key 'train.workdir' is empty; pass --workdir DIR")
    os.makedirs(workdir, exist_ok=True)
    total_steps = int(config.train.steps)
    mesh = make_mesh(config.mesh.to_dict())
    if (mesh.shape["data"] * mesh.shape["fsdp"]) % processes:
        raise ConfigError(f"config keys 'mesh.data' x 'mesh.fsdp': the data-parallel size {mesh.shape['data']} x "
                          f"{mesh.shape['fsdp']} does not split over {processes} processes; each process samples and "
                          f"trains its own rows of the batch")
    tok_path = tokenizer_path(config)
    if not os.path.exists(tok_path):
        raise ConfigError(f"config key 'tokenizer.path': no tokenizer at {tok_path}; RL needs the tokenizer of the "
                          f"checkpoint it starts from")
    tokenizer = load_tokenizer(tok_path)
    new_tag_ids = tuple(getattr(tokenizer, "new_tag_ids", ()))
    tasks = iter(rl_pipeline(list(config.data.train_files), batch_size=int(rl.rollout_batch) // processes,
                             group_size=int(rl.group_size), seed=int(config.data.seed),
                             shuffle=bool(config.data.shuffle), on_bad_record=config.data.on_bad_record))
    tx = make_optimizer(config.optim, total_steps)
    manager = checkpoints.make_manager(workdir, int(config.train.keep_ckpts), bool(config.train.async_checkpoint))
    start = manager.latest_step()
    if start is not None:
        meta = checkpoints.restore_meta(manager, start)
        model_cfg = transformer.ModelConfig.from_dict(meta["model_config"])
        iteration = int(meta["iteration"])
        state = checkpoints.restore(manager, start, abstract_state(model_cfg, tx, mesh), tasks, iteration)
        warn_config_changes(meta.get("config", {}), json.loads(config.to_json()))
        logging.info("resumed rl from %s/%d (iteration %d)", checkpoints.checkpoint_root(workdir), start, iteration)
    else:
        start, iteration = 0, 0
        model_cfg, params = initial_params(config, mesh, tokenizer.vocab_size, new_tag_ids)
        state = create_state(model_cfg, tx, mesh, rng=jax.random.key(int(config.train.seed)), params=params)
    room = model_cfg.max_seq_len - int(rl.max_new_tokens)
    if room < 2:
        raise ConfigError(f"config key 'rl.max_new_tokens': {rl.max_new_tokens} leaves no room for a prompt in the "
                          f"model's max_seq_len={model_cfg.max_seq_len}")
    options = PromptOptions(variant=rl.variant, budget_tokens=int(rl.prompt_budget_tokens) or room - 1,
                            max_prompt_tokens=room, strict_actions=bool(rl.strict_actions))
    ref_params = (_reference_params(config, model_cfg, mesh, tokenizer.vocab_size, new_tag_ids)
                  if float(rl.kl_beta) > 0 else None)
    rl_step = make_rl_step(config, model_cfg, mesh)
    token_logprobs = make_token_logprobs(model_cfg, mesh, int(config.train.loss_chunk_size))
    is_writer = jax.process_index() == 0
    if is_writer:
        truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start)
    writer = MetricsWriter(workdir, enabled=is_writer, purge_step=start + 1 if start else None)
    meta = {"model_config": model_cfg.to_dict(), "config": json.loads(config.to_json()), "tokenizer": tok_path,
            "stage": "rl"}
    root = checkpoints.checkpoint_root(workdir)
    record: dict[str, float] = {}
    timings: dict[str, float] = {}  # the last iteration's rollout / reward / update seconds
    step, saved, preempted = int(state.step), start, False
    try:
        spec, retriever = env_spec(rl)
        with StopRequest("iteration") as stop, EnvPool(spec, retriever, threads=int(rl.env_threads)) as pool:
            if step >= total_steps:
                logging.info("rl already finished: checkpoint step %d >= train.steps %d", step, total_steps)
            while step < total_steps:
                task_batch = _tasks_of(next(tasks), int(rl.group_size))
                started, done, timings = time.perf_counter(), step, {}
                state, record = rl_iteration(state, task_batch, iteration, config=config, model_cfg=model_cfg,
                                             mesh=mesh, tokenizer=tokenizer, pool=pool, rl_step=rl_step,
                                             token_logprobs=token_logprobs, ref_params=ref_params, options=options,
                                             timings=timings)
                iteration, step = iteration + 1, int(state.step)
                record = check_finite(step, record, root, manager)  # raises before this iteration is written
                record["iteration"] = float(iteration)
                seconds = time.perf_counter() - started  # wall clock: TensorBoard only, not metrics.jsonl
                perf = {"perf/iteration_s": seconds, **{f"perf/{k}": v for k, v in timings.items()}}
                if step > done:
                    perf["perf/eta_s"] = seconds / (step - done) * max(total_steps - step, 0)
                writer.write(step, record, perf)
                logging.info("rl iteration %d, step %d/%d: reward %.3f, correct %.3f, format %.3f, loss %.4f | "
                             "%.1f s/iteration (rollout %.1f, reward %.2f, update %.1f)", iteration, step, total_steps,
                             record["reward"], record["correct"], record["format_adherence"],
                             record.get("loss", float("nan")), seconds, timings.get("rollout_s", 0.0),
                             timings.get("reward_s", 0.0), timings.get("update_s", 0.0))
                preempted = stop.requested(step, True)  # iterations sync anyway (the rollout needs the params)
                want_ckpt = preempted or iteration % int(config.train.ckpt_every) == 0 or step >= total_steps
                if want_ckpt and step != saved:
                    checkpoints.save(manager, step, state, tasks, {**meta, "step": step, "iteration": iteration})
                    saved = step
                if preempted:
                    logging.warning("preempted by %s at iteration %d, step %d: saved checkpoint %s/%d; rerun the "
                                    "same command to resume", stop.name or "a peer process", iteration, step, root,
                                    saved)
                    break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return {"step": step, "iteration": iteration, "preempted": preempted, "last_record": record,
            "checkpoint_dir": root, "last_timings": timings}
