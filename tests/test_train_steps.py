"""Train state and step functions: exact token means, accumulation, sharding parity, optimiser, init sources."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwm import config as config_lib
from fwm import schema
from fwm.mesh import make_mesh, place_batch
from fwm.model import checkpoint, hf
from fwm.model import transformer as T
from fwm.train import losses, state as state_lib, steps
from mesh_checks import assert_trees_close, one_device_mesh

# A long file: conftest schedules it first, so the 2 xdist workers finish together.
pytestmark = pytest.mark.slow

MODEL = T.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=64)
B, L = 8, 16


def _config(micro_batches=1, **optim):
    config = config_lib.default_config()
    config.data.batch_size, config.data.seq_len = B, L
    config.train.steps = 20
    # eps 1e-3: Adam's m / sqrt(v) would turn float noise in near-zero gradients into lr-sized update
    # noise; a larger eps keeps updates smooth in the gradients, so parity tolerances stay tight.
    config.optim.update(dict(lr=1e-2, warmup_steps=0, micro_batches=micro_batches, eps=1e-3, **optim))
    return config


def _batch(seed=0, with_spans=False):
    """Two packed documents per row, a padded tail, random 0/1 weights; SFT spans on some targets."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (B, L)).astype(np.int32)
    segments = np.ones((B, L), np.int32)
    segments[:, L // 2:] = 2
    segments[np.arange(L)[None, :] >= L - (np.arange(B) % 4)[:, None]] = 0  # rows end with 0..3 padding slots
    weights = (rng.random((B, L)) > 0.3).astype(np.float32) * (segments > 0)
    batch = {"tokens_BxL": tokens, "targets_BxL": rng.integers(0, MODEL.vocab_size, (B, L)).astype(np.int32),
             "segment_ids_BxL": segments, "positions_BxL": np.asarray(T.positions_from_segments(segments)),
             "loss_weights_BxL": weights}
    if with_spans:
        spans = rng.choice([schema.SPAN_NONE, schema.SPAN_WORLD_MODEL, schema.SPAN_POLICY], (B, L))
        batch["span_ids_BxL"] = spans.astype(np.int8)
    return batch


def _train(mesh, config, kind="mid_train", num_steps=2, with_spans=False):
    tx = state_lib.make_optimizer(config.optim, config.train.steps)
    state = state_lib.create_state(MODEL, tx, mesh, rng=jax.random.key(0))
    step = steps.make_train_step(config, MODEL, mesh, kind)
    history = []
    for i in range(num_steps):
        state, metrics = step(state, place_batch(mesh, _batch(i, with_spans)))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.fixture(scope="module")
def one_device_run():
    """Two steps on one device, the whole batch at once: the reference of the parity tests."""
    return _train(one_device_mesh(), _config(micro_batches=1))


def test_accumulation_over_4_micro_batches_matches_one_large_batch(one_device_run):
    whole, whole_metrics = one_device_run
    accumulated, acc_metrics = _train(one_device_mesh(), _config(micro_batches=4))
    assert int(accumulated.step) == 2
    assert_trees_close(acc_metrics, whole_metrics, rtol=2e-5, atol=1e-6)
    assert_trees_close(accumulated.params, whole.params, rtol=1e-4, atol=1e-6)
    # The accumulated gradient sums themselves agree to float32 reassociation error: they are sums over
    # ~90 tokens of O(1) terms, so an element near zero can differ by ~1e-6 absolute (seen: 1.4e-6).
    params, batch = T.init_params(MODEL, jax.random.key(0)), _batch()
    sums = {m: jax.jit(lambda p, b, m=m: steps.summed_grads(losses.lm_loss, MODEL, p, b, m))(params, batch)
            for m in (1, 4)}
    assert_trees_close(sums[4], sums[1], rtol=1e-5, atol=1e-5)


def test_2x2x2_mesh_matches_one_device(one_device_run):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, sharded_metrics = _train(mesh, _config(micro_batches=1))
    single, single_metrics = one_device_run
    assert_trees_close(sharded_metrics, single_metrics, rtol=2e-5, atol=1e-6)
    assert_trees_close(sharded.params, single.params, rtol=1e-4, atol=1e-6)
    # The state really is sharded: an MLP kernel is split over fsdp and tensor.
    tx = state_lib.make_optimizer(_config().optim, 20)
    shardings = state_lib.state_shardings(MODEL, tx, mesh)
    assert tuple(shardings.params["layers"]["mlp"]["up_proj"]["kernel"].spec) == (None, "fsdp", "tensor")
    mu = shardings.opt_state[1][0].mu  # clip, then adamw's (scale_by_adam, ...): moments mirror params
    assert mu["layers"]["mlp"]["up_proj"]["kernel"] == shardings.params["layers"]["mlp"]["up_proj"]["kernel"]


def test_loss_is_the_exact_weighted_token_mean_with_span_losses():
    config = _config()
    _, history = _train(one_device_mesh(), config, kind="sft", num_steps=1, with_spans=True)
    params = T.init_params(MODEL, jax.random.key(0))  # what create_state(rng=key(0)) starts from
    batch = _batch(0, with_spans=True)
    logits = np.asarray(jax.jit(T.forward, static_argnums=0)(
        MODEL, params, batch["tokens_BxL"], batch["positions_BxL"], batch["segment_ids_BxL"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets_BxL"][..., None], -1)[..., 0]
    w = batch["loss_weights_BxL"]
    metrics = history[0]
    np.testing.assert_allclose(metrics["loss"], (w * nll).sum() / w.sum(), rtol=1e-5)
    assert metrics["tokens"] == w.sum()
    for name, span_id in losses.SFT_SPANS.items():
        ws = w * (batch["span_ids_BxL"] == span_id)
        np.testing.assert_allclose(metrics[f"loss_{name}"], (ws * nll).sum() / ws.sum(), rtol=1e-5)
        assert metrics[f"tokens_{name}"] == ws.sum()
    assert metrics["lr"] == pytest.approx(1e-2) and metrics["grad_norm"] > 0


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_skips_norms_biases_and_optionally_embeddings(decay_embeddings):
    """With every loss weight 0 the gradients are 0, so only decoupled weight decay moves parameters."""
    model = dataclasses.replace(MODEL, qkv_bias=True)
    config = _config(weight_decay=0.5, decay_embeddings=decay_embeddings, clip_norm=0.0)
    mesh = one_device_mesh()
    tx = state_lib.make_optimizer(config.optim, config.train.steps)
    state = state_lib.create_state(model, tx, mesh, rng=jax.random.key(0))
    before = jax.device_get(state.params)
    batch = _batch()
    batch["loss_weights_BxL"] = np.zeros_like(batch["loss_weights_BxL"])
    state, metrics = steps.make_train_step(config, model, mesh, "mid_train")(state, place_batch(mesh, batch))
    after = jax.device_get(state.params)
    assert float(metrics["tokens"]) == 0 and float(metrics["grad_norm"]) == 0
    shrink = 1 - 1e-2 * 0.5
    np.testing.assert_allclose(after["layers"]["mlp"]["up_proj"]["kernel"],
                               before["layers"]["mlp"]["up_proj"]["kernel"] * shrink, rtol=1e-6)
    np.testing.assert_allclose(after["lm_head"]["kernel"], before["lm_head"]["kernel"] * shrink, rtol=1e-6)
    np.testing.assert_array_equal(after["final_norm"]["scale"], before["final_norm"]["scale"])
    np.testing.assert_array_equal(after["layers"]["attn_norm"]["scale"], before["layers"]["attn_norm"]["scale"])
    np.testing.assert_array_equal(after["layers"]["attn"]["q_proj"]["bias"], before["layers"]["attn"]["q_proj"]["bias"])
    expected_embed = before["embed"]["embedding"] * (shrink if decay_embeddings else 1.0)
    np.testing.assert_allclose(after["embed"]["embedding"], expected_embed, rtol=1e-6)


def test_learning_rate_schedules():
    optim = _config().optim
    optim.update(dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1))
    for name, mid in (("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)):
        optim.schedule = name
        lr = state_lib.learning_rate_schedule(optim, 110)
        assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
        assert float(lr(60)) == pytest.approx(mid, abs=1e-6), name
        assert float(lr(110)) == pytest.approx(0.1 if name != "constant" else 1.0, abs=1e-6), name


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_init_from_checkpoint_grows_vocab_for_new_tags(tmp_path, source):
    saved = T.init_params(MODEL, jax.random.key(3))
    path = tmp_path / "ckpt"
    if source == "orbax":
        checkpoint.save_params(path, MODEL, saved)
    else:
        hf.save_hf(path, MODEL, saved)
    config = _config()
    config.init.source = f"{source}:{path}"
    config.model.remat_policy = "full"  # numerics from the config, shapes from the checkpoint
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # 8 tags new to the checkpoint: 2 land on spare rows 62, 63 of its padded embedding, 6 are appended.
    new_tag_ids = list(range(MODEL.vocab_size - 2, MODEL.vocab_size + 6))
    model_cfg, params = state_lib.initial_params(config, mesh, MODEL.vocab_size + 6, new_tag_ids)
    assert model_cfg == dataclasses.replace(MODEL, vocab_size=MODEL.vocab_size + 6, remat_policy="full")
    embedding, head = np.asarray(params["embed"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
    # hf: the spare rows never saw training, so they start at the mean row too; orbax rows are kept.
    kept = MODEL.vocab_size - 2 if source == "hf" else MODEL.vocab_size
    np.testing.assert_array_equal(embedding[:kept], saved["embed"]["embedding"][:kept])
    mean_row = saved["embed"]["embedding"][:kept].mean(0, keepdims=True)
    np.testing.assert_allclose(embedding[kept:], np.repeat(mean_row, MODEL.vocab_size + 6 - kept, 0), rtol=1e-5)
    mean_col = saved["lm_head"]["kernel"][:, :kept].mean(1, keepdims=True)
    np.testing.assert_allclose(head[:, kept:], np.repeat(mean_col, MODEL.vocab_size + 6 - kept, 1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]),
                                  saved["layers"]["mlp"]["up_proj"]["kernel"])
    tx = state_lib.make_optimizer(config.optim, config.train.steps)
    state = state_lib.create_state(model_cfg, tx, mesh, params=params)
    assert int(state.step) == 0  # fresh optimiser
    assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(state.opt_state[1][0].mu))
    assert state.params["layers"]["mlp"]["up_proj"]["kernel"].sharding == \
        state_lib.state_shardings(model_cfg, tx, mesh).params["layers"]["mlp"]["up_proj"]["kernel"]


def test_scratch_vocab_comes_from_the_tokenizer():
    config = _config()
    model_cfg, params = state_lib.initial_params(config, one_device_mesh(), tokenizer_vocab_size=77)
    assert params is None and model_cfg.vocab_size == 77
    config.model.vocab_size = 50
    with pytest.raises(config_lib.ConfigError, match="model.vocab_size"):
        state_lib.initial_params(config, one_device_mesh(), tokenizer_vocab_size=77)
