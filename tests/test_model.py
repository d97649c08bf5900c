"""Decoder invariants: cache == full forward, packing == separate rows, left padding, sharding."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwm import mesh as mesh_lib
from fwm.model import kv_cache as C
from fwm.model import transformer as T

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

CONFIGS = {
    "gqa_bias_untied": T.ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     head_dim=8, mlp_dim=48, qkv_bias=True),
    "mha_tied_remat": T.ModelConfig(vocab_size=64, hidden_size=24, num_layers=3, num_heads=3, num_kv_heads=3,
                                    head_dim=8, mlp_dim=40, tie_embeddings=True, remat_policy="full"),
    "mqa_llama3_rope": T.ModelConfig(vocab_size=80, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1,
                                     head_dim=16, mlp_dim=64, rope_scaling=("llama3", 8.0, 1.0, 4.0, 64),
                                     remat_policy="dots"),
}


# Jitted once per config: eager flax apply re-traces the scan on every call, which is slow.
_forward = jax.jit(T.forward, static_argnums=0)


def _params(cfg, seed=0):
    params = T.init_params(cfg, jax.random.key(seed))
    # Larger-than-init weights make attention patterns sharp, so masking mistakes show in the logits.
    return jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decode_matches_full_forward(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, cfg.vocab_size)
    full = _forward(cfg, params, tokens)
    cache = C.init_cache(cfg, 3, 16)
    logits, cache, pos = C.prefill(cfg, params, cache, tokens[:, :5])
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5, rtol=1e-5)
    step = jax.jit(functools.partial(C.decode_step, cfg))
    for t in range(5, 11):
        logits_t, cache = step(params, cache, tokens[:, t], pos)
        pos = pos + 1
        np.testing.assert_allclose(logits_t, full[:, t], atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 11


def test_packed_segments_equal_separate_sequences():
    cfg = CONFIGS["gqa_bias_untied"]
    params = _params(cfg)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, cfg.vocab_size, n) for n in (4, 7, 3)]
    packed = np.concatenate(docs + [np.zeros(2, int)])[None]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(2, int)])[None]
    logits = _forward(cfg, params, packed, segment_ids_BxL=seg)
    start = 0
    for doc in docs:
        alone = _forward(cfg, params, doc[None])
        np.testing.assert_allclose(logits[0, start:start + len(doc)], alone[0], atol=1e-5, rtol=1e-5)
        start += len(doc)
    assert np.isfinite(np.asarray(logits)).all()  # padding rows stay finite


def test_left_padded_batch_gives_unpadded_logits():
    cfg = CONFIGS["mqa_llama3_rope"]
    params = _params(cfg)
    rng = np.random.default_rng(1)
    lengths = [6, 3, 1]
    width = max(lengths)
    rows = [rng.integers(1, cfg.vocab_size, n) for n in lengths]
    tokens = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        valid[i, width - len(row):] = True
    # Full forward with segment 0 on the pads.
    logits = _forward(cfg, params, tokens, segment_ids_BxL=valid.astype(np.int32))
    # Prefill + decode on the same left-padded batch.
    cache = C.init_cache(cfg, 3, width + 2)
    pre, cache, pos = C.prefill(cfg, params, cache, tokens, valid)
    nxt = rng.integers(1, cfg.vocab_size, 3)
    step_logits, _ = C.decode_step(cfg, params, cache, jnp.asarray(nxt), pos)
    for i, row in enumerate(rows):
        alone = _forward(cfg, params, row[None])[0]
        np.testing.assert_allclose(logits[i, width - len(row):], alone, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(pre[i, width - len(row):], alone, atol=1e-5, rtol=1e-5)
        extended = _forward(cfg, params, np.concatenate([row, nxt[i:i + 1]])[None])[0, -1]
        np.testing.assert_allclose(step_logits[i], extended, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa_bias_untied", "mha_tied_remat"])
def test_sharded_forward_equals_unsharded(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(2), (4, 12), 0, cfg.vocab_size)
    expected = _forward(cfg, params, tokens)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = mesh_lib.logical_to_sharding(T.param_logical_axes(cfg), mesh, params)
    sharded = jax.device_put(params, shardings)
    # At least one parameter is really split over several devices.
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
    with jax.set_mesh(mesh):
        fn = jax.jit(functools.partial(T.forward, cfg))
        got = fn(sharded, jax.device_put(tokens, mesh_lib.batch_sharding(mesh, tokens.shape)))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


def test_logical_sharding_falls_back_on_indivisible_dims():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = mesh_lib.logical_to_mesh_spec(("vocab", "embed"), (101, 32), dict(mesh.shape))
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert mesh_lib.logical_to_mesh_spec(("batch", None), (6, 3), dict(mesh.shape)) == jax.sharding.PartitionSpec(None, None)


def test_make_mesh_validates():
    assert dict(mesh_lib.make_mesh({"fsdp": 4, "tensor": -1}).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="devices"):
        mesh_lib.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        mesh_lib.make_mesh({"model": 2})


def test_bfloat16_compute_close_to_float32():
    cfg = CONFIGS["gqa_bias_untied"]
    params = T.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    f32 = _forward(cfg, params, tokens)
    bf16_cfg = dataclasses.replace(cfg, compute_dtype="bfloat16", param_dtype="bfloat16")
    bf16 = _forward(bf16_cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.05)


def test_resize_vocab_appends_mean_rows():
    cfg = CONFIGS["gqa_bias_untied"]
    params = T.init_params(cfg, jax.random.key(0))
    new_cfg, new_params = T.resize_vocab(cfg, params, cfg.vocab_size + 5)
    emb = np.asarray(new_params["embed"]["embedding"])
    assert emb.shape == (cfg.vocab_size + 5, cfg.hidden_size)
    np.testing.assert_allclose(emb[-1], np.asarray(params["embed"]["embedding"]).mean(0), rtol=1e-5, atol=1e-7)
    assert new_params["lm_head"]["kernel"].shape == (cfg.hidden_size, cfg.vocab_size + 5)
    tokens = jnp.array([[1, 2, cfg.vocab_size + 4]])
    old_logits = _forward(cfg, params, tokens[:, :2])
    new_logits = _forward(new_cfg, new_params, tokens)
    np.testing.assert_allclose(new_logits[:, :2, :cfg.vocab_size], old_logits, atol=1e-5)
    with pytest.raises(ValueError, match="smaller"):
        T.resize_vocab(cfg, params, 3)


def test_config_validation_and_round_trip():
    cfg = CONFIGS["mqa_llama3_rope"]
    assert T.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_kv_heads"):
        T.ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown keys"):
        T.ModelConfig.from_dict({"hidden": 3})
    assert T.num_params(cfg) == sum(x.size for x in jax.tree.leaves(T.param_shapes(cfg)))


def test_sharded_forward_and_grad_compile_without_full_rematerialization():
    """On a (2,2,2) mesh no op's sharding forces XLA to rebuild a whole tensor on every device (it once
    did for the embedding lookup: table rows sharded over fsdp, batch also split over fsdp). XLA reports
    this only as a C++ warning, so the check compiles in a subprocess and reads its stderr."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp
        from fwm.mesh import batch_sharding, make_mesh
        from fwm.model import transformer as T
        from fwm.train.state import param_shardings
        for tie in (False, True):
            cfg = T.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=8, mlp_dim=64, max_seq_len=64, tie_embeddings=tie)
            mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
            with jax.set_mesh(mesh):
                params = jax.device_put(T.init_params(cfg, jax.random.key(0)), param_shardings(cfg, mesh))
                tokens = jax.device_put(jnp.ones((8, 16), jnp.int32), batch_sharding(mesh, (8, 16)))
                loss = lambda p, t: T.forward(cfg, p, t).astype(jnp.float32).sum()
                jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(params, tokens))
        print("compiled")
    """)
    # Without the tests' compilation cache: a cached program would not compile, and XLA would not warn.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
    assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-3000:]


def test_query_blocks_cover_the_sequence_in_order():
    assert T.query_blocks(10) == [(0, 10)]
    assert T.query_blocks(200) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    # Long sequences: at most MAX_QUERY_BLOCKS blocks, so the traced graph stays small.
    blocks = T.query_blocks(4096)
    assert len(blocks) == T.MAX_QUERY_BLOCKS and blocks[0] == (0, 256) and blocks[-1] == (3840, 4096)


def test_blocked_causal_attention_equals_one_softmax_with_packing_and_padding():
    """By blocks of queries (each reading only the keys up to its end) = one softmax over all L keys, for
    packed segments, padding and a ragged last block; the gradients too (padding queries carry no loss)."""
    b, length, k, g, dh = 2, 150, 2, 2, 8
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, length, k, g, dh)), jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(b, k, length, dh)), jnp.float32) for _ in range(2))
    seg = np.zeros((b, length), np.int32)
    seg[0, :70], seg[0, 70:140] = 1, 2          # two packed segments, then padding
    seg[1, :] = 1
    seg = jnp.asarray(seg)
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    real = (seg != 0)[:, :, None, None, None]

    def blocked(q, keys, values):
        return T.causal_self_attention(q, keys, values, seg, slots, seg)

    def full(q, keys, values):
        return T.attend(q, keys, values, T.attention_mask(seg, slots, seg, jnp.arange(length)))

    np.testing.assert_allclose(np.where(real, blocked(q, keys, values), 0), np.where(real, full(q, keys, values), 0),
                               atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(real, f(*a), 0.0) ** 2)  # noqa: E731
    for got, want in zip(jax.grad(loss(blocked), (0, 1, 2))(q, keys, values),
                         jax.grad(loss(full), (0, 1, 2))(q, keys, values)):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_matmul_gradient_equals_plain_dot():
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32), jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(12, 7)), jnp.float32)
    np.testing.assert_allclose(T.matmul(x, w), x @ w, rtol=1e-6)
    got = jax.grad(lambda x, w: jnp.sum(T.matmul(x, w) * g), (0, 1))(x, w)
    np.testing.assert_allclose(got[0], g @ w.T, rtol=1e-5, atol=1e-6)   # d/dx = g W^T
    np.testing.assert_allclose(got[1], x.T @ g, rtol=1e-5, atol=1e-6)   # d/dW = x^T g
    # bfloat16 operands keep their dtypes in both gradients.
    gx, gw = jax.grad(lambda x, w: jnp.sum(T.matmul(x, w).astype(jnp.float32)), (0, 1))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
