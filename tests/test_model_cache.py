"""KV cache bounds (extend refuses tokens that do not fit, instead of overwriting the newest slots) and the
decode loop writing the cache in place."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwm.model import kv_cache as C
from fwm.model import transformer as T

CFG = T.ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)


def test_extend_past_the_cache_raises_when_shapes_or_index_are_known():
    params = T.init_params(CFG, jax.random.key(0))
    cache = C.init_cache(CFG, 2, 8)
    with pytest.raises(ValueError, match=r"9 new tokens do not fit a KV cache of 8 slots"):
        C.prefill(CFG, params, cache, jnp.ones((2, 9), jnp.int32))
    _, cache, pos = C.prefill(CFG, params, cache, jnp.ones((2, 6), jnp.int32))
    assert int(C.cache_room(cache)) == 2
    _, cache = C.decode_step(CFG, params, cache, jnp.ones((2,), jnp.int32), pos)
    _, cache = C.decode_step(CFG, params, cache, jnp.ones((2,), jnp.int32), pos + 1)  # slot 8 of 8: fits
    with pytest.raises(ValueError, match=r"1 new tokens at cache index 8 overflow the KV cache of 8 slots"):
        C.decode_step(CFG, params, cache, jnp.ones((2,), jnp.int32), pos + 2)


def test_extend_past_the_cache_under_jit_gives_nan_logits_not_wrong_ones():
    params = T.init_params(CFG, jax.random.key(0))
    step = jax.jit(functools.partial(C.decode_step, CFG))  # the index is traced: no trace-time check
    cache = C.init_cache(CFG, 2, 3)
    tokens, pos = jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    for t in range(3):
        logits, cache = step(params, cache, tokens, pos + t)
        assert np.isfinite(np.asarray(logits)).all()
    assert int(C.cache_room(cache)) == 0
    logits, _ = step(params, cache, tokens, pos + 3)
    assert np.isnan(np.asarray(logits)).all()


def test_prefill_reads_no_cached_slot_and_refuses_a_cache_in_use():
    params = T.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, CFG.vocab_size)
    fresh = C.init_cache(CFG, 2, 8)
    # Garbage in the slots of a fresh-index cache changes nothing: prefill attends to the new keys only.
    dirty = fresh._replace(k=tuple(k + 7.0 for k in fresh.k), v=tuple(v - 3.0 for v in fresh.v),
                           segment_ids_BxS=jnp.ones_like(fresh.segment_ids_BxS))
    clean_logits, _, _ = C.prefill(CFG, params, fresh, tokens)
    dirty_logits, _, _ = C.prefill(CFG, params, dirty, tokens)
    np.testing.assert_array_equal(np.asarray(clean_logits), np.asarray(dirty_logits))
    # The same tokens through extend, reading the (empty) cached part, give the same logits.
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    read_logits, _ = C.extend(CFG, params, fresh, tokens, positions, jnp.ones((2, 5), bool))
    np.testing.assert_allclose(np.asarray(read_logits), np.asarray(clean_logits), atol=1e-6, rtol=1e-6)
    _, used, _ = C.prefill(CFG, params, fresh, tokens[:, :2])
    with pytest.raises(ValueError, match=r"empty_cache=True but the cache index is 2"):
        C.prefill(CFG, params, used, tokens[:, :2])



def _copies_in_loops(hlo: str, shapes: set[str]) -> list[str]:
    """Copy instructions of the given f32 shapes ("[4,2,8,24]") inside the bodies of compiled while loops."""
    computations = {m.group(1): block for block in re.split(r"\n(?=\S)", hlo)
                    if (m := re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block))}
    bodies = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo)
    assert bodies, "no while loop in the compiled program"
    return [line.strip() for body in bodies for line in computations[body].splitlines()
            if (m := re.search(r"= f32(\[[\d,]+\])\{[\d,]*\} copy\(", line)) and m.group(1) in shapes]


def test_the_decode_loop_writes_the_cache_in_place():
    """No cache-sized copy inside a compiled decode loop: every layer writes its own buffers and attends over
    what it wrote. Reading a layer's cache out of one stacked array, or reading the old buffer before writing
    it, made XLA copy the whole cache every layer of every token."""
    cfg = T.ModelConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=24)
    params = T.init_params(cfg, jax.random.key(0))
    cache = C.init_cache(cfg, 4, 24)

    def loop(params, cache, tokens_B, positions_B):
        params = C.decode_params(cfg, params)

        def body(_, carry):
            cache, positions_B = carry
            _, cache = C.decode_step(cfg, params, cache, tokens_B, positions_B)
            return cache, positions_B + 1
        return jax.lax.fori_loop(0, 6, body, (cache, positions_B))[0]

    tokens = jnp.ones((4,), jnp.int32)
    shapes = {"[" + ",".join(map(str, x.shape)) + "]" for x in cache.k + cache.v}
    assert shapes == {"[4,2,8,24]", "[4,2,24,8]"}
    assert _copies_in_loops(jax.jit(loop).lower(params, cache, tokens, tokens).compile().as_text(), shapes) == []

    # The check can fail: a loop that keeps the old buffer beside the written one gets a copy per iteration.
    def keeps_old(k_BxKxHxS):
        def body(i, carry):
            k, _ = carry
            return jax.lax.dynamic_update_slice_in_dim(k, jnp.ones(k.shape[:3] + (1,)), i, axis=3), k
        return jax.lax.fori_loop(0, 6, body, (k_BxKxHxS, k_BxKxHxS))
    assert _copies_in_loops(jax.jit(keeps_old).lower(cache.k[0]).compile().as_text(), shapes)


def test_long_prefill_by_query_blocks_equals_one_softmax_and_each_row_alone(monkeypatch):
    """From T.PREFILL_BLOCKS_FROM tokens prefill attends by causal query blocks (3 blocks of 64 at 150 tokens
    here); a left-padded batch gets the logits of one softmax over all slots and of each row run alone."""
    params = T.init_params(CFG, jax.random.key(3))
    rng = np.random.default_rng(3)
    width, lengths = 150, [150, 97, 30]
    tokens = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(1, CFG.vocab_size, n)
        valid[i, width - n:] = True
    logits = {}
    for blocks_from in (128, 10**9):
        monkeypatch.setattr(T, "PREFILL_BLOCKS_FROM", blocks_from)
        logits[blocks_from], _, _ = C.prefill(CFG, params, C.init_cache(CFG, 3, width + 1), tokens, valid)
    assert len(T.query_blocks(width)) == 3
    for i, n in enumerate(lengths):
        alone = T.forward(CFG, params, tokens[i:i + 1, width - n:])[0]
        for blocks_from in (128, 10**9):
            np.testing.assert_allclose(logits[blocks_from][i, width - n:], alone, atol=1e-5, rtol=1e-5)
