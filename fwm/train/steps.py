"""The supervised step functions: `mid_train_step` / `sft_step` (and eval), jitted over one sharded state.

`make_train_step(config, model_cfg, mesh, kind)` builds the step of a stage: `kind` is a key of
`fwm.train.losses.LOSSES` ('pretrain' and 'mid_train' share the LM loss, 'sft' adds per-span
metrics). The step is `jax.jit`-ed with explicit in/out shardings (state: from fwm.train.state;
batch: rows over the data+fsdp axes; metrics: replicated), the state donated, and called under
`jax.set_mesh(mesh)` so the model's logical sharding constraints are active. Everything static (the
config, the model config, the mesh) is closed over, so no positional static arguments exist.

Gradient accumulation: the per-step batch of B rows is split into M = optim.micro_batches
micro-batches of B/M rows, scanned with `lax.scan`; the step sums the gradients of the loss SUMS
and the token counts and divides once, so the update equals the one from the whole batch at once
(the exact token mean), up to float summation order.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from fwm.mesh import batch_sharding, constrain, replicated
from fwm.model import transformer
from fwm.train import losses
from fwm.train.state import TrainState, learning_rate_schedule, make_optimizer, param_shardings, state_shardings

Batch = Mapping[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def batch_shardings(mesh: Mesh, kind: str, batch_size: int, seq_len: int) -> dict[str, NamedSharding]:
    """Sharding of every array the step reads: rows over (data, fsdp), the length axis whole."""
    return {key: batch_sharding(mesh, (batch_size, seq_len)) for key in losses.BATCH_KEYS[kind]}


def _check_kind(kind: str) -> None:
    if kind not in losses.LOSSES:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {sorted(losses.LOSSES)}")


def _split_micro(x: jax.Array, micro_batches: int) -> jax.Array:
    """(B, ...) -> (M, B/M, ...): micro-batch i holds rows i, M+i, 2M+i, ... .

    Strided rather than contiguous: each device's contiguous block of rows feeds every micro-batch,
    so slicing a micro-batch never moves data between devices.
    """
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape((rows // micro_batches, micro_batches) + x.shape[1:]), 0, 1)


def _combine(carry: tuple, new: tuple) -> tuple:
    """Adds two micro-batches' (grads, loss sum, count, aux); aux entries named min_* / max_* take the
    minimum / maximum instead of the sum."""
    grads, loss_sum, count, aux = jax.tree.map(jnp.add, carry[:3], new[:3]) + (dict(carry[3]),)
    for key, value in new[3].items():
        reduce = jnp.minimum if key.startswith("min_") else jnp.maximum if key.startswith("max_") else jnp.add
        aux[key] = reduce(aux[key], value)
    return grads, loss_sum, count, aux


def _identity(shapes: tuple) -> tuple:
    """The neutral start of `_combine`: zeros, +inf for min_* and -inf for max_* aux entries."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    aux = {key: jnp.full(s.shape, jnp.inf if key.startswith("min_") else -jnp.inf, s.dtype)
           if key.startswith(("min_", "max_")) else zeros[3][key] for key, s in shapes[3].items()}
    return zeros[:3] + (aux,)


def summed_grads(loss_fn: Callable, model_cfg: transformer.ModelConfig, params: Any, batch: Batch,
                 micro_batches: int) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
    """(gradient of the loss sum (float32), loss sum, token count, aux sums) over the whole batch.

    Aux entries named min_* / max_* are combined over micro-batches by minimum / maximum, not summed.
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(model_cfg, p, b), has_aux=True)

    def one(micro: Batch):
        (loss_sum, (count, aux)), grads = grad_fn(params, micro)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), loss_sum, count, aux

    if micro_batches == 1:
        return one(batch)
    stacked = {k: _split_micro(v, micro_batches) for k, v in batch.items()}

    def body(carry, micro):
        micro = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in micro.items()}
        return _combine(carry, one(micro)), None

    first = jax.tree.map(lambda v: v[0], stacked)
    total, _ = jax.lax.scan(body, _identity(jax.eval_shape(one, first)), stacked)
    return total


def apply_summed_grads(tx: optax.GradientTransformation, schedule: optax.Schedule, state: TrainState,
                       grad_sums: Any, loss_sum: jax.Array, count: jax.Array
                       ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update from summed gradients: grads = grad_sums / count (the exact mean).

    Returns the new state and the metrics every step reports (float32): loss (loss_sum / count),
    tokens (count), grad_norm (before clipping), lr (of this update), param_norm (after it).
    """
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denominator,
        "tokens": count,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "param_norm": optax.tree.norm(params),
    }
    return TrainState(params, opt_state, state.step + 1), {k: v.astype(jnp.float32) for k, v in metrics.items()}


def make_train_step(config: ml_collections.ConfigDict, model_cfg: transformer.ModelConfig, mesh: Mesh,
                    kind: str) -> StepFn:
    """`step(state, batch) -> (state, metrics)` for stage `kind`; the state argument is donated.

    Metrics (replicated float32 scalars): loss (token mean), tokens (trained-token count), grad_norm
    (before clipping), lr (of this update), param_norm (after it); SFT adds loss_/tokens_ per span.
    """
    _check_kind(kind)
    loss_fn = functools.partial(losses.LOSSES[kind], chunk_size=int(config.train.loss_chunk_size))
    keys = losses.BATCH_KEYS[kind]
    micro_batches = int(config.optim.micro_batches)
    tx = make_optimizer(config.optim, int(config.train.steps))
    schedule = learning_rate_schedule(config.optim, int(config.train.steps))
    state_sh = state_shardings(model_cfg, tx, mesh)
    batch_sh = batch_shardings(mesh, kind, int(config.data.batch_size), int(config.data.seq_len))

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_sums, loss_sum, count, aux = summed_grads(loss_fn, model_cfg, state.params, batch, micro_batches)
        state, metrics = apply_summed_grads(tx, schedule, state, grad_sums, loss_sum, count)
        metrics.update({k: v.astype(jnp.float32) for k, v in losses.span_metrics(aux).items()})
        return state, metrics

    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
                     donate_argnums=0)

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(mesh):
            return jitted(state, {k: batch[k] for k in keys})

    def lower(state: TrainState, batch: Batch) -> Any:
        """The step lowered for these (abstract or real) arguments: `.compile().memory_analysis()`; jax
        keeps the executable, so a later call with the same shapes does not compile again."""
        with jax.set_mesh(mesh):
            return jitted.lower(state, {k: batch[k] for k in keys})

    run.__name__ = f"{kind}_step"
    run.lower = lower
    return run


def make_eval_step(config: ml_collections.ConfigDict, model_cfg: transformer.ModelConfig, mesh: Mesh,
                   kind: str) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`eval_step(params, batch) -> {loss_sum, tokens, ...aux sums}`: sums, so batches add up exactly."""
    _check_kind(kind)
    loss_fn = functools.partial(losses.LOSSES[kind], chunk_size=int(config.train.loss_chunk_size))
    keys = losses.BATCH_KEYS[kind]
    batch_sh = batch_shardings(mesh, kind, int(config.data.batch_size), int(config.data.seq_len))

    def evaluate(params: Any, batch: Batch) -> dict[str, jax.Array]:
        loss_sum, (count, aux) = loss_fn(model_cfg, params, batch)
        return {"loss_sum": loss_sum, "tokens": count, **aux}

    jitted = jax.jit(evaluate, in_shardings=(param_shardings(model_cfg, mesh), batch_sh),
                     out_shardings=replicated(mesh))

    def run(params: Any, batch: Batch) -> dict[str, jax.Array]:
        with jax.set_mesh(mesh):
            return jitted(params, {k: batch[k] for k in keys})

    return run

