"""`rl_step`: one optimiser update of FC-RL on one mini-batch, over the supervised stages' TrainState.

`make_rl_step(config, model_cfg, mesh)` returns `step(state, batch) -> (state, metrics)`: the loss of
`fwm.rl.losses.rl_loss` (clipped surrogate, optional k3 KL, the aggregation of `rl.loss_aggregation`)
summed over `optim.micro_batches` micro-batches by `fwm.train.steps.summed_grads` and applied with
`apply_summed_grads` -- the same optimiser plumbing, state and shardings as `mid_train_step` and
`sft_step` (`jax.jit` with explicit in/out shardings, the state donated, run under `jax.set_mesh`).
The RL loop splits each rollout batch into `rl.mini_batches` mini-batches and calls the step once per
mini-batch. `make_token_logprobs` gives the log-probs the loop needs before that: the reference
model's (for the KL) and, if it recomputes them, the rollout policy's.

Shapes: a mini-batch holds however many step samples the rollout produced, so the step takes any
(B, L) and compiles once per distinct shape (the loop should round B up to a few buckets, padding
with weight-0 rows). B must be divisible by `optim.micro_batches`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from fwm.mesh import batch_sharding, replicated
from fwm.model import transformer
from fwm.rl import losses as rl_losses
from fwm.train import memory
from fwm.train.losses import token_nll
from fwm.train.state import TrainState, learning_rate_schedule, make_optimizer, param_shardings, state_shardings
from fwm.train.steps import Batch, apply_summed_grads, summed_grads

LOGPROB_BATCH_KEYS = ("tokens_BxL", "targets_BxL", "segment_ids_BxL", "positions_BxL")


def _batch_shardings(mesh: Mesh, shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, Any]:
    # Rows over (data, fsdp) like every fwm batch: each data-parallel replica scores its own step
    # samples; the length axis stays whole (no sequence parallelism).
    return {key: batch_sharding(mesh, shape) for key, shape in shapes}


def _check_keys(batch: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in batch]
    if missing:
        raise KeyError(f"{what}: the batch lacks {missing} (it needs {list(keys)})")


def make_rl_step(config: ml_collections.ConfigDict, model_cfg: transformer.ModelConfig, mesh: Mesh
                 ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`rl_step(state, batch) -> (state, metrics)`; the state argument is donated.

    batch: the arrays of `fwm.rl.losses.batch_keys(rl.kl_beta)`, each (B, L). Metrics (replicated
    float32): loss, tokens, clip_fraction(_low/_high), ratio_mean/min/max, entropy, kl (when
    kl_beta > 0), tokens_/advantage_ per span, and grad_norm, lr, param_norm as in the supervised steps.
    """
    rl = config.rl
    keys = rl_losses.batch_keys(float(rl.kl_beta))
    loss_fn = functools.partial(rl_losses.rl_loss, eps_low=float(rl.clip_eps_low), eps_high=float(rl.clip_eps_high),
                                kl_beta=float(rl.kl_beta), aggregation=rl.loss_aggregation,
                                chunk_size=int(config.train.loss_chunk_size))
    micro_batches = int(config.optim.micro_batches)
    tx = make_optimizer(config.optim, int(config.train.steps))
    schedule = learning_rate_schedule(config.optim, int(config.train.steps))
    state_sh = state_shardings(model_cfg, tx, mesh)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_sums, loss_sum, count, aux = summed_grads(loss_fn, model_cfg, state.params, batch, micro_batches)
        state, metrics = apply_summed_grads(tx, schedule, state, grad_sums, loss_sum, count)
        metrics.update(rl_losses.rl_metrics(loss_sum, count, aux))
        return state, metrics

    @functools.cache
    def compiled(shapes: tuple[tuple[str, tuple[int, ...]], ...]):
        return jax.jit(step, in_shardings=(state_sh, _batch_shardings(mesh, shapes)),
                       out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)

    reported: set = set()  # batch shapes whose compiled memory was logged

    def rl_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_keys(batch, keys, "rl_step")
        rows = batch["tokens_BxL"].shape[0]
        if rows % micro_batches:
            raise ValueError(f"rl_step: {rows} rows do not split into optim.micro_batches={micro_batches}")
        shapes = tuple((key, tuple(batch[key].shape)) for key in keys)
        batch = {key: batch[key] for key in keys}
        with jax.set_mesh(mesh):
            if shapes not in reported:  # compiled ahead once per shape to log its memory (the call reuses it)
                reported.add(shapes)
                logging.info("rl_step on a %d x %d batch: %s", *batch["tokens_BxL"].shape,
                             memory.step_line(state, compiled(shapes).lower(state, batch).compile(), mesh))
            return compiled(shapes)(state, batch)

    return rl_step


def make_token_logprobs(model_cfg: transformer.ModelConfig, mesh: Mesh, chunk_size: int = 0
                        ) -> Callable[[Any, Batch], jax.Array]:
    """`token_logprobs(params, batch) -> logprobs_BxL` (float32): log p(targets_BxL | tokens) for
    any params of this model (the frozen reference, or the rollout policy), rows sharded as the batch;
    chunk_size > 0 (train.loss_chunk_size) without the full logits."""
    params_sh = param_shardings(model_cfg, mesh)

    def logprobs(params: Any, batch: Batch) -> jax.Array:
        return -token_nll(model_cfg, params, batch, chunk_size)

    @functools.cache
    def compiled(shapes: tuple[tuple[str, tuple[int, ...]], ...]):
        return jax.jit(logprobs, in_shardings=(params_sh, _batch_shardings(mesh, shapes)),
                       out_shardings=batch_sharding(mesh, dict(shapes)["targets_BxL"]))

    def token_logprobs(params: Any, batch: Batch) -> jax.Array:
        _check_keys(batch, LOGPROB_BATCH_KEYS, "token_logprobs")
        shapes = tuple((key, tuple(batch[key].shape)) for key in LOGPROB_BATCH_KEYS)
        with jax.set_mesh(mesh):
            return compiled(shapes)(params, {key: batch[key] for key in LOGPROB_BATCH_KEYS})

    return token_logprobs
