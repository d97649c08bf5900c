"""TrainState(params, opt_state, step), the optimiser from config, and the state created sharded on a mesh.

Sharded creation (DESIGN.md "Step functions over one sharded state"): the state's shapes come from
`jax.eval_shape`, its logical partition specs from the model's `param_logical_axes` (optimiser
moments mirror their parameters, scalars are replicated), `fwm.mesh.logical_to_sharding` turns them
into NamedShardings, and `jax.jit(init, out_shardings=...)` materialises every array directly on its
shards, so no device ever holds the whole state.

Parameters come from one of three sources (config `init.source`): fresh ('scratch'), an orbax
checkpoint of an earlier stage ('orbax:PATH': params only, the optimiser starts fresh) or a Hugging
Face directory ('hf:PATH'). When the tokenizer has more ids than the checkpoint's vocabulary (the
agent-format tags are new to it), the embedding and untied head grow with
`transformer.resize_vocab` (new rows = the mean row).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from fwm.config import ConfigError, model_config_from
from fwm.mesh import logical_to_sharding
from fwm.model import transformer

# ModelConfig fields that a run may change on a loaded checkpoint: numerics, not shapes.
RUNTIME_MODEL_FIELDS = ("compute_dtype", "param_dtype", "remat_policy")


@flax.struct.dataclass
class TrainState:
    """params: the model tree; opt_state: optax state; step: int32 count of optimiser updates done."""

    params: Any
    opt_state: Any
    step: jax.Array


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to optim.lr over warmup_steps, then cosine / linear decay to
    lr * min_lr_ratio at total_steps, or constant."""
    peak, warmup = float(optim.lr), int(optim.warmup_steps)
    end = peak * float(optim.min_lr_ratio)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(optim.min_lr_ratio))
    elif optim.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif optim.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"config key 'optim.schedule': expected cosine, linear or constant, got {optim.schedule!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True where AdamW decays: kernels (and the embedding if decay_embeddings); never norms or biases."""

    def decays(path: tuple, _: Any) -> bool:
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        if names[-1] in ("scale", "bias"):
            return False
        if "embed" in names:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if clip_norm > 0) then AdamW on the schedule, with the decay mask."""
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(
        schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
        mask=lambda params: weight_decay_mask(params, bool(optim.decay_embeddings)),
    )
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.clip_norm)), adamw)
    return adamw


def state_logical_axes(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """Logical PartitionSpecs of the state: optimiser moments mirror params, counters replicate."""
    param_specs = transformer.param_logical_axes(model_cfg)
    opt_shapes = jax.eval_shape(tx.init, transformer.param_shapes(model_cfg))
    opt_specs = optax.tree_map_params(
        tx, lambda _, spec: spec, opt_shapes, param_specs,
        transform_non_params=lambda _: PartitionSpec(), is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return TrainState(params=param_specs, opt_state=opt_specs, step=PartitionSpec())


def state_shapes(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs of the state, nothing allocated."""
    params = transformer.param_shapes(model_cfg)
    return TrainState(params=params, opt_state=jax.eval_shape(tx.init, params),
                      step=jax.ShapeDtypeStruct((), jnp.int32))


def state_shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings of every state leaf (replicated where a dim does not divide its mesh axes)."""
    return logical_to_sharding(state_logical_axes(model_cfg, tx), mesh, state_shapes(model_cfg, tx))


def abstract_state(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs carrying their shardings: the restore target of a checkpoint."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state_shapes(model_cfg, tx), state_shardings(model_cfg, tx, mesh))


def create_state(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                 rng: jax.Array | None = None, params: Any | None = None) -> TrainState:
    """A sharded TrainState at step 0: fresh params from `rng`, or the given params (donated) with a
    fresh optimiser."""
    shardings = state_shardings(model_cfg, tx, mesh)
    if params is None:
        if rng is None:
            raise ValueError("create_state: pass rng (fresh parameters) or params")

        def init_fresh(key):
            fresh = transformer.init_params(model_cfg, key)
            return TrainState(fresh, tx.init(fresh), jnp.zeros((), jnp.int32))

        return jax.jit(init_fresh, out_shardings=shardings)(rng)

    def init_from(given):
        return TrainState(given, tx.init(given), jnp.zeros((), jnp.int32))

    return jax.jit(init_from, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)


def apply_runtime_fields(loaded: transformer.ModelConfig, model_section: ml_collections.ConfigDict
                         ) -> transformer.ModelConfig:
    """A checkpoint's ModelConfig with the run's numerics (RUNTIME_MODEL_FIELDS) from config `model`."""
    return dataclasses.replace(loaded, **{name: model_section[name] for name in RUNTIME_MODEL_FIELDS})


def _cast_params(params: Any, model_cfg: transformer.ModelConfig, mesh: Mesh) -> Any:
    shardings = param_shardings(model_cfg, mesh)
    dtype = jnp.dtype(model_cfg.param_dtype)
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings,
                   donate_argnums=0)(params)


def _reset_rows_to_mean(model_cfg: transformer.ModelConfig, params: Any, rows: list[int], mesh: Mesh) -> Any:
    """Embedding (and untied head) rows `rows` set to the mean of the rows before min(rows)."""
    rows_array, first = jnp.asarray(sorted(rows), jnp.int32), min(rows)

    def reset(p):
        p = jax.tree.map(lambda x: x, p)
        emb = p["embed"]["embedding"]
        mean_row = jnp.mean(emb[:first].astype(jnp.float32), axis=0).astype(emb.dtype)
        p["embed"] = {"embedding": emb.at[rows_array].set(mean_row)}
        if not model_cfg.tie_embeddings:
            head = p["lm_head"]["kernel"]
            mean_col = jnp.mean(head[:, :first].astype(jnp.float32), axis=1).astype(head.dtype)
            p["lm_head"] = {"kernel": head.at[:, rows_array].set(mean_col[:, None])}
        return p

    return jax.jit(reset, out_shardings=param_shardings(model_cfg, mesh), donate_argnums=0)(params)


def initial_params(config: ml_collections.ConfigDict, mesh: Mesh, tokenizer_vocab_size: int,
                   new_tag_ids: tuple[int, ...] | list[int] = ()) -> tuple[transformer.ModelConfig, Any | None]:
    """(model config, params or None) for config.init.source; None means "initialise fresh".

    The vocabulary is at least the tokenizer's: a checkpoint's embedding grows to it
    (transformer.resize_vocab: new rows = the mean row); a scratch model takes model.vocab_size, or
    the tokenizer's when 0. `new_tag_ids` (an HF tokenizer's tags that were new to its checkpoint)
    matter for 'hf:' sources whose embedding is padded past the tokenizer (Qwen2.5): the tags land
    on spare, never-trained rows, which are set to the mean of the rows before them. 'orbax:'
    sources are trusted as they are (an earlier fwm stage has trained those rows).
    """
    source = config.init.source
    if source == "scratch":
        fields = config.model.to_dict()
        fields["vocab_size"] = fields["vocab_size"] or tokenizer_vocab_size
        if fields["vocab_size"] < tokenizer_vocab_size:
            raise ConfigError(f"config key 'model.vocab_size': {fields['vocab_size']} is smaller than the "
                              f"tokenizer's {tokenizer_vocab_size} ids; set it to 0 to use the tokenizer's size")
        return model_config_from(fields), None
    kind, path = source.split(":", 1)
    if kind == "orbax":
        from fwm.model.checkpoint import load_params  # lazy: only runs that start from a checkpoint need it

        loaded_cfg, params = load_params(path, mesh=mesh)
    elif kind == "hf":
        from fwm.model.hf import load_hf

        loaded_cfg, params = load_hf(path, mesh=mesh, dtype=config.model.param_dtype)  # cast while reading
    else:
        raise ConfigError(f"config key 'init.source': unknown kind {kind!r}; expected scratch, orbax:PATH or hf:PATH")
    model_cfg = apply_runtime_fields(loaded_cfg, config.model)
    if model_cfg.param_dtype != loaded_cfg.param_dtype:
        params = _cast_params(params, model_cfg, mesh)
    spare_rows = [i for i in new_tag_ids if i < model_cfg.vocab_size]
    if kind == "hf" and spare_rows:
        # Before growing, so the appended rows' mean is over trained rows only.
        logging.info("%d format tags land on spare embedding rows of %s: set to the mean row", len(spare_rows),
                     source)
        params = _reset_rows_to_mean(model_cfg, params, spare_rows, mesh)
    if tokenizer_vocab_size > model_cfg.vocab_size:
        logging.info("growing the vocabulary of %s from %d to %d ids (new rows = mean row)", source,
                     model_cfg.vocab_size, tokenizer_vocab_size)
        new_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer_vocab_size)
        resize = jax.jit(lambda p: transformer.resize_vocab(model_cfg, p, tokenizer_vocab_size)[1],
                         out_shardings=param_shardings(new_cfg, mesh), donate_argnums=0)
        with warnings.catch_warnings():
            # Donated so unchanged layers are not copied; the grown embedding/head cannot reuse theirs.
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            model_cfg, params = new_cfg, resize(params)
    return model_cfg, params


def param_shardings(model_cfg: transformer.ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings of the parameter tree alone."""
    return logical_to_sharding(transformer.param_logical_axes(model_cfg), mesh, transformer.param_shapes(model_cfg))
