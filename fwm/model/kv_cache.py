"""Decoding with a KV cache: the cache pytree, its sharding, and appending tokens to it (prefill, decode steps).

The model itself (and its masking rule, which the cache's segment ids feed) is fwm.model.transformer; this
module drives `Transformer(unstacked=True)` with a cache. Every layer owns its buffers and writes its new keys
and values into them in place (transformer.Attention), so a decode step costs the matmuls and one read of the
filled cache, not a copy of the cache.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fwm.model.transformer import ModelConfig, Transformer, unstack_params


class KVCache(NamedTuple):
    """Decoding state. k: one keys_BxKxHxS per layer (stored transposed, the layout the score matmul reads);
    v: one values_BxKxSxH per layer; segment_ids_BxS: 1 for a filled real slot, 0 otherwise; index: next slot
    to write (shared by all rows: rows advance together, left padding aligns them)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids_BxS: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: str | None = None) -> KVCache:
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
    dt = jnp.dtype(dtype or cfg.compute_dtype)
    k_shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch_size, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def cache_logical_axes(cfg: ModelConfig) -> KVCache:
    """Logical specs of a KVCache (same tree): rows over batch axes, kv heads over tensor."""
    k = PartitionSpec("batch", "kv_heads", None, "length")
    v = PartitionSpec("batch", "kv_heads", "length", None)
    return KVCache((k,) * cfg.num_layers, (v,) * cfg.num_layers, PartitionSpec("batch", "length"), PartitionSpec())


def decode_params(cfg: ModelConfig, params: dict) -> dict:
    """The parameters in the form the cache's model takes (`transformer.unstack_params`: a copy of the layer
    weights, one tree per layer); already split ones pass through. A decode loop calls this once before the
    loop: `extend` given the stacked parameters splits them on every call."""
    return params if "layers" not in params else unstack_params(cfg, params)


def extend(cfg: ModelConfig, params: dict, cache: KVCache, tokens_BxL: jax.Array, positions_BxL: jax.Array,
           valid_BxL: jax.Array, empty_cache: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends L tokens per row at the cache index; returns (logits_BxLxV, cache).

    params: stacked (init_params) or split by `decode_params`. valid_BxL marks real tokens (False for left
    padding): invalid slots are never attended to. The L tokens must fit: index + L <= S (cache length). A
    ValueError says so when that is known at trace time (L > S always; index + L > S when the index is
    concrete). Under jit the index is traced: lax.dynamic_update_slice would clamp the write and overwrite the
    newest slots, so the caller must stop at `cache_room(cache) < L` (a decode loop's condition), and logits of
    an overflowing call are NaN instead of silently wrong. empty_cache=True promises the cache holds nothing
    yet (index 0): the cached slots are then not read at all (a ValueError when a concrete index says
    otherwise).
    """
    b, l = tokens_BxL.shape
    s = cache.segment_ids_BxS.shape[1]
    if l > s:
        raise ValueError(f"extend: {l} new tokens do not fit a KV cache of {s} slots; init_cache with a larger "
                         f"max_len")
    if len(cache.k) != cfg.num_layers or len(cache.v) != cfg.num_layers:
        raise ValueError(f"extend: the cache has {len(cache.k)} layers of keys and {len(cache.v)} of values, the "
                         f"model {cfg.num_layers}; make it with init_cache(cfg, ...)")
    try:
        index = int(cache.index)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError):
        index = None  # traced: guarded by NaN logits below and by the caller's cache_room check
    if empty_cache and index not in (None, 0):
        raise ValueError(f"extend: empty_cache=True but the cache index is {index}; prefill needs a fresh cache "
                         f"(init_cache)")
    if index is not None and index + l > s:
        raise ValueError(f"extend: {l} new tokens at cache index {index} overflow the KV cache of {s} slots "
                         f"(index + L must be <= {s}); stop decoding at cache_room(cache) < L or init_cache "
                         f"with a larger max_len")
    seg_BxL = jnp.asarray(valid_BxL, jnp.int32)
    k_seg_BxS = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids_BxS, seg_BxL, cache.index, axis=1)
    # Padding queries would have no key at all; give them segment 1 so their (unused) logits stay finite.
    q_seg_BxL = jnp.ones_like(seg_BxL)
    q_slot_BxL = cache.index + jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    logits, new_kv = Transformer(cfg, empty_cache, unstacked=True).apply(
        {"params": decode_params(cfg, params)}, jnp.asarray(tokens_BxL, jnp.int32),
        jnp.asarray(positions_BxL, jnp.int32), q_seg_BxL, q_slot_BxL, k_seg_BxS, tuple(zip(cache.k, cache.v)),
        cache.index,
    )
    logits = jnp.where(cache.index + l > s, jnp.nan, logits)
    return logits, KVCache(tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv), k_seg_BxS, cache.index + l)


def cache_room(cache: KVCache) -> jax.Array:
    """Free slots left in the cache (S - index): a decode loop continues while this is >= the tokens it adds."""
    return cache.segment_ids_BxS.shape[1] - cache.index


def prefill(cfg: ModelConfig, params: dict, cache: KVCache, tokens_BxL: jax.Array,
            valid_BxL: jax.Array | None = None) -> tuple[jax.Array, KVCache, jax.Array]:
    """Writes (left-padded) prompts into an empty cache (a fresh `init_cache`; its slots are not read).

    Returns (logits_BxLxV, cache, next_positions_B): positions count real tokens only, so each row's
    next token goes at its own position.
    """
    if valid_BxL is None:
        valid_BxL = jnp.ones(tokens_BxL.shape, bool)
    valid_i32 = jnp.asarray(valid_BxL, jnp.int32)
    positions_BxL = jnp.maximum(jnp.cumsum(valid_i32, axis=1) - 1, 0)
    logits, cache = extend(cfg, params, cache, tokens_BxL, positions_BxL, valid_BxL, empty_cache=True)
    return logits, cache, jnp.sum(valid_i32, axis=1)


def decode_step(cfg: ModelConfig, params: dict, cache: KVCache, tokens_B: jax.Array,
                positions_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """One token per row at per-row positions; returns (logits_BxV, cache). In a loop, pass
    `decode_params(cfg, params)` (split once) rather than the stacked parameters."""
    logits, cache = extend(cfg, params, cache, tokens_B[:, None], positions_B[:, None],
                           jnp.ones((tokens_B.shape[0], 1), bool))
    return logits[:, 0], cache
