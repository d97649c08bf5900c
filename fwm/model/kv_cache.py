"""Decoding with a KV cache: the cache pytree, its sharding, and appending tokens to it (prefill, decode steps).

The model itself (and its masking rule, which the cache's segment ids feed) is fwm.model.transformer; this
module only drives `Transformer` with a cache and writes the new keys and values into it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fwm.model.transformer import ModelConfig, Transformer


class KVCache(NamedTuple):
    """Decoding state. k/v: [layers, B, K, S, Dh]; segment_ids_BxS: 1 for a filled real slot, 0 otherwise;
    index: next slot to write (shared by all rows: rows advance together, left padding aligns them)."""

    k: jax.Array
    v: jax.Array
    segment_ids_BxS: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: str | None = None) -> KVCache:
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.compute_dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch_size, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))


def cache_logical_axes() -> KVCache:
    """Logical specs of a KVCache: rows over batch axes, kv heads over tensor."""
    kv = PartitionSpec("layers", "batch", "kv_heads", "length", None)
    return KVCache(kv, kv, PartitionSpec("batch", "length"), PartitionSpec())


def extend(cfg: ModelConfig, params: dict, cache: KVCache, tokens_BxL: jax.Array, positions_BxL: jax.Array,
           valid_BxL: jax.Array, empty_cache: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends L tokens per row at the cache index; returns (logits_BxLxV, cache).

    valid_BxL marks real tokens (False for left padding): invalid slots are never attended to.
    The L tokens must fit: index + L <= S (cache length). A ValueError says so when that is known at
    trace time (L > S always; index + L > S when the index is concrete). Under jit the index is traced:
    lax.dynamic_update_slice would clamp the write and overwrite the newest slots, so the caller must
    stop at `cache_room(cache) < L` (a decode loop's condition), and logits of an overflowing call are
    NaN instead of silently wrong. empty_cache=True promises the cache holds nothing yet (index 0): the
    cached slots are then not read at all (a ValueError when a concrete index says otherwise).
    """
    b, l = tokens_BxL.shape
    s = cache.segment_ids_BxS.shape[1]
    if l > s:
        raise ValueError(f"extend: {l} new tokens do not fit a KV cache of {s} slots; init_cache with a larger "
                         f"max_len")
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
    logits, (new_k, new_v) = Transformer(cfg, empty_cache).apply(
        {"params": params}, jnp.asarray(tokens_BxL, jnp.int32), jnp.asarray(positions_BxL, jnp.int32),
        q_seg_BxL, q_slot_BxL, k_seg_BxS, (cache.k, cache.v), cache.index,
    )
    # One in-place write of every layer's L new slots (the cache is a donated loop carry): O(L) per call,
    # not a copy of the cache.
    new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, new_k, cache.index, axis=3)
    new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, new_v, cache.index, axis=3)
    logits = jnp.where(cache.index + l > s, jnp.nan, logits)
    return logits, KVCache(new_k, new_v, k_seg_BxS, cache.index + l)


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
    """One token per row at per-row positions; returns (logits_BxV, cache)."""
    logits, cache = extend(cfg, params, cache, tokens_B[:, None], positions_B[:, None],
                           jnp.ones((tokens_B.shape[0], 1), bool))
    return logits[:, 0], cache
