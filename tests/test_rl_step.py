"""FC-RL loss and rl_step: against an independent NumPy implementation, masking, sharding parity, config."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwm import config as config_lib
from fwm import schema
from fwm.mesh import make_mesh, place_batch
from fwm.model import transformer as T
from fwm.rl import losses as rl_losses
from fwm.rl.step import make_rl_step, make_token_logprobs
from fwm.train import state as state_lib
from fwm.train.losses import target_nll
from mesh_checks import assert_trees_close, one_device_mesh

B, L, V = 4, 8, 11
EPS_LOW, EPS_HIGH = 0.2, 0.28


# ------------------------------------------------------------------ the independent NumPy reference
def np_objective(logp, old, adv, w, ref, beta, aggregation):
    """Float64 loss: PPO-clip per token, k3 KL, token mean or mean over rows of row token means."""
    r = np.exp(np.where(w > 0, logp - old, 0.0))
    per = -np.minimum(r * adv, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    if beta:
        with np.errstate(invalid="ignore", over="ignore"):  # untrained slots hold -inf refs
            per = per + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    per = np.where(w > 0, per, 0.0)  # only trained tokens are summed
    if aggregation == "token_mean":
        return (w * per).sum() / w.sum()
    rows = w.sum(1) > 0
    return ((w * per).sum(1)[rows] / w.sum(1)[rows]).mean()


def np_grad(logp, old, adv, w, ref, beta, aggregation):
    """d loss / d logp by hand: the unclipped term r A is the minimum (gradient -A r) unless the ratio
    left the band in the direction the advantage pushes (A > 0 above 1 + eps_high, A < 0 below
    1 - eps_low), where the clipped constant wins and the gradient is 0; k3 adds beta (1 - e^(ref - logp))."""
    r = np.exp(np.where(w > 0, logp - old, 0.0))
    cut = ((adv > 0) & (r > 1 + EPS_HIGH)) | ((adv < 0) & (r < 1 - EPS_LOW))
    g = np.where(cut, 0.0, -adv * r)
    if beta:
        g = g + beta * (1 - np.exp(ref - logp))
    g = np.where(w > 0, g, 0.0)
    if aggregation == "token_mean":
        return w * g / w.sum()
    row_w = w.sum(1, keepdims=True)
    return np.where(row_w > 0, w * g / np.maximum(row_w, 1e-300), 0.0) / (row_w > 0).sum()


def _inputs(seed):
    rng = np.random.default_rng(seed)
    w = (rng.random((B, L)) > 0.25).astype(np.float64)
    w[:, :2] = 0  # the prompt
    w[3] = 0  # a row without a trained token (padding row)
    logp = rng.uniform(-3.0, -0.1, (B, L))
    old = logp + rng.normal(0, 0.3, (B, L))  # ratios on both sides of the clip band
    old[w == 0] = rng.choice([0.0, -np.inf, 1e9], (w == 0).sum())  # whatever sits there must not matter
    ref = logp + rng.normal(0, 0.5, (B, L))
    ref[w == 0] = -np.inf
    adv = rng.normal(0, 1, (B, L)) * (rng.random((B, L)) > 0.1)
    span = np.where(rng.random((B, L)) > 0.5, schema.SPAN_WM, schema.SPAN_POLICY) * (w > 0)
    return logp, old, adv, w, ref, span


def _batch(old, adv, w, ref, span):
    return {"old_logprobs_BxL": jnp.asarray(old, jnp.float32), "advantages_BxL": jnp.asarray(adv, jnp.float32),
            "loss_weights_BxL": jnp.asarray(w, jnp.float32), "ref_logprobs_BxL": jnp.asarray(ref, jnp.float32),
            "span_ids_BxL": jnp.asarray(span, jnp.int8)}


def _mean_loss(logp, batch, beta, aggregation):
    total, (count, aux) = rl_losses.grpo_objective(logp, batch, eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_beta=beta,
                                                   aggregation=aggregation)
    return total / count, aux


def test_numpy_reference_gradient_matches_its_finite_differences():
    logp, old, adv, w, ref, _ = _inputs(0)
    for beta in (0.0, 0.1):
        for aggregation in rl_losses.AGGREGATIONS:
            analytic = np_grad(logp, old, adv, w, ref, beta, aggregation)
            numeric = np.zeros_like(logp)
            for index in np.ndindex(logp.shape):
                step = np.zeros_like(logp)
                step[index] = 1e-6
                numeric[index] = (np_objective(logp + step, old, adv, w, ref, beta, aggregation)
                                  - np_objective(logp - step, old, adv, w, ref, beta, aggregation)) / 2e-6
            np.testing.assert_allclose(analytic, numeric, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("aggregation", rl_losses.AGGREGATIONS)
def test_loss_and_gradient_match_numpy(seed, beta, aggregation):
    logp, old, adv, w, ref, span = _inputs(seed)
    batch = _batch(old, adv, w, ref, span)
    loss = lambda x: _mean_loss(x, batch, beta, aggregation)[0]  # noqa: E731
    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(value, np_objective(logp, old, adv, w, ref, beta, aggregation), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, np_grad(logp, old, adv, w, ref, beta, aggregation), rtol=2e-5, atol=1e-7)
    # Both sides of the band occur, so both branches of the rule are exercised.
    r = np.exp(np.where(w > 0, logp - old, 0))[w > 0]
    assert (r > 1 + EPS_HIGH).any() and (r < 1 - EPS_LOW).any()


def test_metrics_match_numpy():
    logp, old, adv, w, ref, span = _inputs(1)
    total, (count, aux) = rl_losses.grpo_objective(jnp.asarray(logp, jnp.float32), _batch(old, adv, w, ref, span),
                                                   eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_beta=0.05,
                                                   aggregation="token_mean")
    aux["entropy"] = jnp.float32(0.0)
    metrics = jax.device_get(rl_losses.rl_metrics(total, count, aux))
    trained = w > 0
    r = np.exp(logp - old)[trained]
    a = adv[trained]
    cut = ((a > 0) & (r > 1 + EPS_HIGH)) | ((a < 0) & (r < 1 - EPS_LOW))
    np.testing.assert_allclose(metrics["clip_fraction"], cut.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction_high"], (cut & (r > 1)).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction_low"], (cut & (r < 1)).mean(), rtol=1e-6)
    np.testing.assert_allclose([metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"]],
                               [r.mean(), r.min(), r.max()], rtol=1e-5)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(metrics["kl"], k3[trained].mean(), rtol=1e-5)
    assert metrics["tokens"] == trained.sum()
    for name, span_id in rl_losses.RL_SPANS.items():
        in_span = trained & (span == span_id)
        assert metrics[f"tokens_{name}"] == in_span.sum()
        np.testing.assert_allclose(metrics[f"advantage_{name}"], adv[in_span].mean(), rtol=1e-5)


def test_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(0, 2, (B, L, V))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(rl_losses.entropy_from_logits(jnp.asarray(logits, jnp.float32)),
                               -(p * np.log(p)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("aggregation", rl_losses.AGGREGATIONS)
def test_untrained_positions_get_exactly_zero_gradient(aggregation):
    """Prompt, observation and padding positions (weight 0) get no gradient at their logits, whatever
    their old/ref log-probs, targets and advantages hold."""
    logp, old, adv, w, ref, span = _inputs(2)
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(0, 2, (B, L, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    adv[w == 0] = 5.0  # nonzero advantages there too: only the weight may silence them
    batch = _batch(old, adv, w, ref, span)

    def loss(x):
        return _mean_loss(-target_nll(x, targets), batch, 0.05, aggregation)[0]

    grad = np.asarray(jax.grad(loss)(logits))
    assert np.isfinite(grad).all()
    assert np.all(grad[w == 0] == 0.0)
    assert np.abs(grad[w > 0]).sum(-1).min() > 0  # the response tokens do learn (no advantage there is 0 by luck)


# ----------------------------------------------------------------------------- rl_step on a tiny model
MODEL = T.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=64)
ROWS, LEN = 8, 16


def _config(micro_batches=1, aggregation="sequence_mean_token_mean", kl_beta=0.01):
    config = config_lib.default_config()
    config.train.steps = 20
    config.optim.update(dict(lr=1e-2, warmup_steps=0, micro_batches=micro_batches, eps=1e-3))
    config.rl.update(dict(loss_aggregation=aggregation, kl_beta=kl_beta, clip_eps_high=0.28))
    return config_lib.validate(config)


def _rl_batch(seed=0):
    """Left-padded step samples: padding, a prompt, then a response of world-model and policy tokens."""
    rng = np.random.default_rng(seed)
    segments = np.ones((ROWS, LEN), np.int32)
    pad = np.arange(ROWS) % 3
    segments[np.arange(LEN)[None, :] < pad[:, None]] = 0
    response_start = 8
    weights = ((np.arange(LEN)[None, :] >= response_start) & (segments > 0)).astype(np.float32)
    span_ids = np.where(np.arange(LEN)[None, :] < 12, schema.SPAN_WM, schema.SPAN_POLICY) * (weights > 0)
    advantages = np.where(span_ids == schema.SPAN_WM, rng.normal(0, 1, (ROWS, 1)), rng.normal(0, 1, (ROWS, 1)))
    return {"tokens_BxL": rng.integers(0, MODEL.vocab_size, (ROWS, LEN)).astype(np.int32),
            "targets_BxL": rng.integers(0, MODEL.vocab_size, (ROWS, LEN)).astype(np.int32),
            "segment_ids_BxL": segments, "positions_BxL": np.asarray(T.positions_from_segments(segments)),
            "loss_weights_BxL": weights, "span_ids_BxL": span_ids.astype(np.int8),
            "advantages_BxL": (advantages * weights).astype(np.float32)}


def _run(mesh, config, num_steps=2):
    """Two mini-batch passes over one rollout: old log-probs from the starting policy, the reference a
    perturbed copy of it."""
    tx = state_lib.make_optimizer(config.optim, config.train.steps)
    state = state_lib.create_state(MODEL, tx, mesh, rng=jax.random.key(0))
    logprobs = make_token_logprobs(MODEL, mesh)
    batch = _rl_batch()
    placed = place_batch(mesh, batch)
    batch["old_logprobs_BxL"] = np.asarray(logprobs(state.params, placed))
    ref_params = jax.tree.map(lambda x: x * 1.05, state.params)
    batch["ref_logprobs_BxL"] = np.asarray(logprobs(ref_params, placed))
    step = make_rl_step(config, MODEL, mesh)
    history = []
    for _ in range(num_steps):
        state, metrics = step(state, place_batch(mesh, batch))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history, batch


@pytest.fixture(scope="module")
def one_device_run():
    return _run(one_device_mesh(), _config())


def test_rl_step_first_pass_is_on_policy(one_device_run):
    state, history, batch = one_device_run
    first, second = history
    w = batch["loss_weights_BxL"]
    # Old log-probs are the starting policy's: ratio 1 everywhere, nothing clipped, and the loss is
    # the mean over rows of the row means of -A + beta * k3 (to the reference).
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["clip_fraction"] == 0.0 and first["tokens"] == w.sum()
    old, ref = batch["old_logprobs_BxL"], batch["ref_logprobs_BxL"]
    k3 = np.exp(ref - old) - (ref - old) - 1
    np.testing.assert_allclose(first["kl"], (w * k3).sum() / w.sum(), rtol=1e-4)
    per_token = -batch["advantages_BxL"] + 0.01 * k3
    np.testing.assert_allclose(first["loss"], ((w * per_token).sum(1) / w.sum(1)).mean(), rtol=1e-4, atol=1e-6)
    assert 0 < first["entropy"] <= np.log(MODEL.vocab_size)
    # The second pass sees the policy the first one moved: the ratio leaves 1.
    assert second["ratio_max"] > 1.0 + 1e-4 or second["ratio_min"] < 1.0 - 1e-4
    assert int(state.step) == 2
    # The updates moved probability toward positive-advantage tokens and away from negative ones.
    mesh = one_device_mesh()
    new = np.asarray(make_token_logprobs(MODEL, mesh)(state.params, place_batch(mesh, batch)))
    change = (new - old) * w
    positive, negative = batch["advantages_BxL"] > 0, batch["advantages_BxL"] < 0
    assert change[positive].sum() / positive.sum() > 0 > change[negative].sum() / negative.sum()


def test_rl_step_2x2x2_mesh_with_micro_batches_matches_one_device(one_device_run):
    """The same two updates on a (data, fsdp, tensor) = (2, 2, 2) mesh, the mini-batch accumulated over
    2 micro-batches there: sums and counts (row means, and min/max of the ratio) add up exactly."""
    single, single_metrics, _ = one_device_run
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, sharded_metrics, _ = _run(mesh, _config(micro_batches=2))
    assert_trees_close(sharded_metrics, single_metrics, rtol=2e-4, atol=2e-6)
    assert_trees_close(sharded.params, single.params, rtol=1e-4, atol=1e-6)
    tx = state_lib.make_optimizer(_config().optim, 20)
    kernel = state_lib.state_shardings(MODEL, tx, mesh).params["layers"]["mlp"]["up_proj"]["kernel"]
    assert tuple(kernel.spec) == (None, "fsdp", "tensor")  # the state really is sharded


def test_without_kl_no_reference_is_read():
    assert rl_losses.REF_KEY not in rl_losses.batch_keys(0.0)
    logp, old, adv, w, ref, span = _inputs(0)
    batch = _batch(old, adv, w, ref, span)
    del batch[rl_losses.REF_KEY]
    value, aux = _mean_loss(jnp.asarray(logp, jnp.float32), batch, 0.0, "token_mean")
    assert "kl" not in aux
    np.testing.assert_allclose(value, np_objective(logp, old, adv, w, ref, 0.0, "token_mean"), rtol=2e-5)
    step = make_rl_step(_config(kl_beta=0.0), MODEL, one_device_mesh())
    rl_batch = _rl_batch()
    with pytest.raises(KeyError, match="old_logprobs_BxL"):
        step(None, rl_batch)
    rl_batch["old_logprobs_BxL"] = np.zeros((ROWS, LEN), np.float32)
    step = make_rl_step(_config(micro_batches=4, kl_beta=0.0), MODEL, one_device_mesh())
    with pytest.raises(ValueError, match="micro_batches"):
        step(None, {k: v[:6] for k, v in rl_batch.items()})


@pytest.mark.parametrize("key, value, message", [
    ("loss_aggregation", "mean", "rl.loss_aggregation"),
    ("advantage", "ppo", "rl.advantage"),
    ("wm_advantage", "ppo", "rl.wm_advantage"),
    ("ground_match", "fuzzy", "rl.ground_match"),
    ("rollout_batch", 12, "rl.rollout_batch"),
    ("group_size", 1, "rl.group_size"),
    ("clip_eps_low", 1.0, "rl.clip_eps_low"),
    ("outcome_metric", "bleu", "rl.outcome_metric"),
    ("future_start", "now", "rl.future_start"),
    ("future_start", "action", "rl.future_start.*new_evidence"),  # no action is new evidence
    ("ground_no_future", "mean", "rl.ground_no_future"),
    ("old_logprobs", "reference", "rl.old_logprobs"),
])
def test_rl_config_values_are_checked(key, value, message):
    config = config_lib.default_config()
    config.rl[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_packing_needs_token_mean():
    config = config_lib.default_config()
    config.rl.update(dict(pack=True, loss_aggregation="sequence_mean_token_mean"))
    with pytest.raises(config_lib.ConfigError, match="rl.loss_aggregation.*rl.pack"):
        config_lib.validate(config)
    config.rl.loss_aggregation = "token_mean"
    config_lib.validate(config)


def test_rl_config_rewards_must_fit_the_variant():
    config = config_lib.default_config()
    config.rl.variant = "state"
    with pytest.raises(config_lib.ConfigError, match="rl.calib_reward"):
        config_lib.validate(config)
    config.rl.update(dict(calib_reward=False, omega=0.0))
    config_lib.validate(config)  # state: grounding only
    config.rl.variant = "plain"
    with pytest.raises(config_lib.ConfigError, match="rl.ground_reward"):
        config_lib.validate(config)
    config.rl.ground_reward = False
    config_lib.validate(config)  # plain GRPO


def test_supervised_modules_do_not_import_the_rl_ones():
    code = ("import sys, fwm.config, fwm.train.state, fwm.train.steps, fwm.train.loop, fwm.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('fwm.rl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]"


def test_rl_experiment_variants_validate():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "rl.py")
    spec = importlib.util.spec_from_file_location("rl_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(config_lib.ConfigError, match="init.source"):
        config_lib.validate(module.get_config())  # the SFT checkpoint must be named
    for variant in module.VARIANTS:
        config = module.get_config(f"{variant},runlocal" if variant != "runlocal" else variant)
        config.init.source = "orbax:/sft/checkpoints"
        config_lib.validate(config)
    grpo = module.get_config("grpo")
    assert grpo.rl.omega == 0 and not grpo.rl.calib_reward and not grpo.rl.ground_reward
