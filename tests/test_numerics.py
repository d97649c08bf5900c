"""Numerics at scale: bfloat16 compute over float32 master weights tracks a float32 run; the chunked
cross-entropy equals the plain one (loss, gradients, RL entropy) and needs less memory at a large vocabulary;
the memory estimate and the compiled step's memory agree on the state."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwm import config as config_lib
from fwm.mesh import make_mesh, place_batch
from fwm.model import transformer as T
from fwm.rl import losses as rl_losses
from fwm.train import losses, memory, state as state_lib, steps
from mesh_checks import assert_trees_close, one_device_mesh

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

MODEL = T.ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=64)


def _batch(rng, b, length, vocab):
    """Two packed documents per row, random 0/1 loss weights."""
    segments = np.ones((b, length), np.int32)
    segments[:, length // 2:] = 2
    return {"tokens_BxL": rng.integers(0, vocab, (b, length)).astype(np.int32),
            "targets_BxL": rng.integers(0, vocab, (b, length)).astype(np.int32),
            "segment_ids_BxL": segments, "positions_BxL": np.asarray(T.positions_from_segments(segments)),
            "loss_weights_BxL": (rng.random((b, length)) > 0.3).astype(np.float32)}


@pytest.mark.parametrize("tied,chunk", [(False, 4), (True, 5)])  # 5 does not divide 16: padded
def test_chunked_loss_equals_plain(tied, chunk):
    cfg = dataclasses.replace(MODEL, tie_embeddings=tied)
    params = T.init_params(cfg, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0), 4, 16, cfg.vocab_size).items()}
    plain = jax.jit(jax.value_and_grad(lambda p: losses.lm_loss(cfg, p, batch)[0]))(params)
    chunked = jax.jit(jax.value_and_grad(lambda p: losses.lm_loss(cfg, p, batch, chunk_size=chunk)[0]))(params)
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-6)
    assert_trees_close(chunked[1], plain[1], rtol=1e-5, atol=1e-6)
    # RL: log-probs and the entropy metric from the chunks equal those of the full logits.
    nll, entropy = jax.jit(lambda p: losses.chunked_nll(cfg, p, batch, chunk, with_entropy=True))(params)
    logits = jax.jit(lambda p: losses.batch_logits(cfg, p, batch))(params)
    np.testing.assert_allclose(nll, losses.target_nll(logits, batch["targets_BxL"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy, rl_losses.entropy_from_logits(logits), rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_plain_in_bfloat16_and_sharded():
    """bf16 compute, vocab split over tensor and rows over data: the chunk logits are the same products."""
    cfg = dataclasses.replace(MODEL, compute_dtype="bfloat16")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = config_lib.default_config()
    config.data.batch_size, config.data.seq_len = 4, 16
    tx = state_lib.make_optimizer(config.optim, 10)
    state = state_lib.create_state(cfg, tx, mesh, rng=jax.random.key(2))
    batch = place_batch(mesh, _batch(np.random.default_rng(3), 4, 16, cfg.vocab_size))
    out = {}
    for chunk in (0, 8):
        config.train.loss_chunk_size = chunk
        out[chunk] = steps.make_eval_step(config, cfg, mesh, "mid_train")(state.params, batch)
    np.testing.assert_allclose(out[8]["loss_sum"], out[0]["loss_sum"], rtol=1e-5)


def test_chunked_loss_peak_memory_is_lower_at_a_large_vocabulary():
    """Qwen2.5's 151,936-id vocabulary on a tiny body: XLA's memory analysis of loss + gradient."""
    cfg = dataclasses.replace(MODEL, vocab_size=151936, tie_embeddings=True, compute_dtype="bfloat16")
    params = jax.eval_shape(lambda: T.init_params(cfg, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in _batch(np.random.default_rng(0), 2, 256, 8).items()}
    temp = {}
    for chunk in (0, 16):
        grad = jax.jit(jax.grad(lambda p, b, c=chunk: losses.lm_loss(cfg, p, b, chunk_size=c)[0]))
        temp[chunk] = memory.compiled_bytes(grad.lower(params, batch).compile())["temporaries"]
    logits_bytes = 2 * 256 * cfg.vocab_size * 4  # one float32 copy of the full logits: 297 MiB
    print(f"temporaries: plain {temp[0] / 2**20:.1f} MiB, chunked(16) {temp[16] / 2**20:.1f} MiB, "
          f"float32 logits {logits_bytes / 2**20:.1f} MiB")
    assert temp[0] > 2 * logits_bytes  # the plain loss holds several batch x seq x vocab float32 arrays
    assert temp[16] < temp[0] / 3
    assert temp[16] < logits_bytes  # less than even one full float32 logits array


def test_bfloat16_compute_with_float32_masters_tracks_float32():
    """50 steps on a learnable stream (token t+1 = (5 * token t + 3) mod V from random starts): the
    bf16-compute run's loss stays within 3% (relative) of the float32 run's at every step while both fall
    to under half; its parameters and AdamW moments stay float32 (the masters)."""
    mesh = one_device_mesh()  # numerics, not sharding: one device keeps 100 steps quick
    config = config_lib.default_config()
    config.data.batch_size, config.data.seq_len = 8, 32
    config.train.steps = 50
    config.optim.update(dict(lr=1e-2, warmup_steps=5))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(50):
        tokens = np.zeros((8, 33), np.int64)
        tokens[:, 0] = rng.integers(0, MODEL.vocab_size, 8)
        for t in range(32):
            tokens[:, t + 1] = (5 * tokens[:, t] + 3) % MODEL.vocab_size
        batches.append({"tokens_BxL": tokens[:, :32].astype(np.int32), "targets_BxL": tokens[:, 1:].astype(np.int32),
                        "segment_ids_BxL": np.ones((8, 32), np.int32),
                        "positions_BxL": np.tile(np.arange(32, dtype=np.int32), (8, 1)),
                        "loss_weights_BxL": np.ones((8, 32), np.float32)})
    curves = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(MODEL, compute_dtype=dtype)
        tx = state_lib.make_optimizer(config.optim, 50)
        state = state_lib.create_state(cfg, tx, mesh, rng=jax.random.key(0))
        step = steps.make_train_step(config, cfg, mesh, "mid_train")
        seen = []
        for batch in batches:
            state, metrics = step(state, place_batch(mesh, batch))
            seen.append(metrics["loss"])
        curves[dtype] = np.asarray(jax.device_get(seen))
        assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state))} <= {
            jnp.dtype("float32"), jnp.dtype("int32")}
    relative = np.abs(curves["bfloat16"] - curves["float32"]) / curves["float32"]
    print(f"float32 loss {curves['float32'][0]:.3f} -> {curves['float32'][-1]:.3f}; bf16 compute "
          f"{curves['bfloat16'][0]:.3f} -> {curves['bfloat16'][-1]:.3f}; max relative gap {relative.max():.4f} "
          f"at step {relative.argmax() + 1}")
    assert curves["float32"][-1] < 0.5 * curves["float32"][0]
    assert relative.max() < 0.03


def test_training_refuses_bfloat16_parameters():
    config = config_lib.default_config()
    config.model.param_dtype = "bfloat16"
    with pytest.raises(config_lib.ConfigError, match="model.param_dtype.*float32 for training"):
        config_lib.validate(config)


def test_estimate_counts_the_state_as_the_compiled_step_holds_it():
    """The estimate's params and optimizer bytes equal the real state's shards on the same mesh."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = config_lib.default_config()
    tx = state_lib.make_optimizer(config.optim, 10)
    state = state_lib.abstract_state(MODEL, tx, mesh)
    estimated = memory.estimate(MODEL, tx, dict(mesh.shape), batch_size=8, seq_len=32)
    real = memory.state_bytes(state)
    assert (estimated["params"], estimated["optimizer"]) == (real["params"], real["optimizer"])
    assert estimated["total"] > estimated["params"] + estimated["optimizer"]
