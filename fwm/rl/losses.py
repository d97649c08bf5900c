"""The FC-RL loss: the clipped GRPO surrogate on both spans, an optional k3 KL, as a (sum, count) pair.

Batch (input-aligned like every fwm batch: at position t the model reads tokens_BxL[:, :t+1] and is
scored on targets_BxL[:, t]); one step sample (prompt + response) per row, or several packed:
- tokens_BxL, targets_BxL, segment_ids_BxL, positions_BxL: as in the SFT batches;
- loss_weights_BxL: 1 on the response tokens the model generated, 0 on the prompt (question,
  history, observations) and padding: only weighted tokens carry loss or gradient;
- span_ids_BxL: SPAN_WM / SPAN_POLICY / SPAN_NONE of each target (used for per-span metrics);
- advantages_BxL: each trained token's advantage, by span (`fwm.rl.advantages.token_advantages`);
- old_logprobs_BxL: log pi_old(target) recorded for the rollout (the policy that sampled it);
- ref_logprobs_BxL: log pi_ref(target) of the frozen reference model, only when kl_beta > 0.
  Computed by the loop from the reference params (`fwm.rl.step.make_token_logprobs`) and passed in,
  rather than closing over a second parameter tree: the step keeps the supervised steps' signature
  `(state, batch)` and the reference forward runs once per rollout, not once per mini-batch pass.

Per trained token, with r = exp(logp - old_logp) and A its advantage:
    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3,
    k3 = exp(ref - logp) - (ref - logp) - 1        (GRPO's unbiased, non-negative KL estimate)
Aggregation (`rl.loss_aggregation`), both as (sum, count) so accumulation and data parallelism give
the exact mean of the whole mini-batch:
- 'token_mean': sum of w l over every trained token / number of trained tokens (DAPO, Dr. GRPO);
- 'sequence_mean_token_mean': each row's token mean, averaged over rows with a trained token (the
  original GRPO; with packing a "sequence" is a row).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fwm.model import transformer
from fwm.schema import SPAN_POLICY, SPAN_WM
from fwm.train.losses import LossOutput, batch_logits, chunked_nll, target_nll

AGGREGATIONS = ("token_mean", "sequence_mean_token_mean")
RL_BATCH_KEYS = ("tokens_BxL", "targets_BxL", "segment_ids_BxL", "positions_BxL", "loss_weights_BxL",
                 "span_ids_BxL", "advantages_BxL", "old_logprobs_BxL")
REF_KEY = "ref_logprobs_BxL"
RL_SPANS = {"world_model": SPAN_WM, "policy": SPAN_POLICY}


def batch_keys(kl_beta: float) -> tuple[str, ...]:
    """The arrays rl_step reads: RL_BATCH_KEYS, plus the reference log-probs when kl_beta > 0."""
    return RL_BATCH_KEYS + ((REF_KEY,) if kl_beta > 0 else ())


def k3_kl(logprobs_BxL: jax.Array, ref_logprobs_BxL: jax.Array) -> jax.Array:
    """k3_BxL = exp(ref - logp) - (ref - logp) - 1 >= 0, an unbiased estimate of KL(pi || pi_ref)."""
    log_ratio_BxL = ref_logprobs_BxL - logprobs_BxL
    return jnp.exp(log_ratio_BxL) - log_ratio_BxL - 1.0


def clipped_surrogate(ratio_BxL: jax.Array, advantages_BxL: jax.Array, eps_low: float, eps_high: float
                      ) -> tuple[jax.Array, jax.Array]:
    """(loss_BxL, clipped_BxL): -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and where the clipped
    term is the smaller one (the token's gradient is cut off)."""
    unclipped_BxL = ratio_BxL * advantages_BxL
    clipped_BxL = jnp.clip(ratio_BxL, 1.0 - eps_low, 1.0 + eps_high) * advantages_BxL
    return -jnp.minimum(unclipped_BxL, clipped_BxL), clipped_BxL < unclipped_BxL


def aggregate(per_token_BxL: jax.Array, weights_BxL: jax.Array, aggregation: str) -> tuple[jax.Array, jax.Array]:
    """(sum, count) whose ratio is the token mean or the sequence mean of token means (module docstring)."""
    if aggregation == "token_mean":
        return jnp.sum(weights_BxL * per_token_BxL), jnp.sum(weights_BxL)
    if aggregation == "sequence_mean_token_mean":
        row_weight_B = jnp.sum(weights_BxL, axis=-1)
        row_sum_B = jnp.sum(weights_BxL * per_token_BxL, axis=-1)
        return jnp.sum(row_sum_B / jnp.maximum(row_weight_B, 1e-9)), jnp.sum((row_weight_B > 0).astype(jnp.float32))
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def entropy_from_logits(logits_BxLxV: jax.Array) -> jax.Array:
    """entropy_BxL = -sum_v p_v log p_v of the next-token distribution."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    return -jnp.sum(jnp.exp(logp_BxLxV) * logp_BxLxV, axis=-1)


def grpo_objective(logprobs_BxL: jax.Array, batch: Mapping[str, jax.Array], *, eps_low: float, eps_high: float,
                   kl_beta: float, aggregation: str) -> LossOutput:
    """The loss as a function of the policy's target log-probs: (sum, (count, aux sums)).

    Tokens with weight 0 are cut out before the ratio is formed (log-ratio 0 there), so whatever sits
    in their old/ref log-probs (0, -inf from a padded sampler) gives neither loss nor gradient.
    aux: tokens, clipped (count), clipped_low / clipped_high (ratio below / above the band with the
    gradient cut), ratio (sum), min_ratio, max_ratio, kl (sum of k3, when kl_beta > 0), and per span
    tokens_X / surrogate_X sums.
    """
    weights_BxL = batch["loss_weights_BxL"].astype(jnp.float32)
    trained_BxL = weights_BxL > 0
    advantages_BxL = batch["advantages_BxL"].astype(jnp.float32)
    log_ratio_BxL = jnp.where(trained_BxL, logprobs_BxL - batch["old_logprobs_BxL"].astype(jnp.float32), 0.0)
    ratio_BxL = jnp.exp(log_ratio_BxL)
    surrogate_BxL, clipped_BxL = clipped_surrogate(ratio_BxL, advantages_BxL, eps_low, eps_high)
    per_token_BxL = surrogate_BxL
    aux: dict[str, jax.Array] = {}
    if kl_beta > 0:
        ref_BxL = jnp.where(trained_BxL, batch[REF_KEY].astype(jnp.float32), logprobs_BxL)
        kl_BxL = k3_kl(logprobs_BxL, ref_BxL)
        per_token_BxL = per_token_BxL + kl_beta * kl_BxL
        aux["kl"] = jnp.sum(weights_BxL * jax.lax.stop_gradient(kl_BxL))
    loss_sum, count = aggregate(per_token_BxL, weights_BxL, aggregation)

    ratio_BxL = jax.lax.stop_gradient(ratio_BxL)
    clipped_BxL = clipped_BxL.astype(jnp.float32)
    aux.update(
        tokens=jnp.sum(weights_BxL),
        clipped=jnp.sum(weights_BxL * clipped_BxL),
        clipped_low=jnp.sum(weights_BxL * clipped_BxL * (ratio_BxL < 1.0)),
        clipped_high=jnp.sum(weights_BxL * clipped_BxL * (ratio_BxL > 1.0)),
        ratio=jnp.sum(weights_BxL * ratio_BxL),
        min_ratio=jnp.min(jnp.where(trained_BxL, ratio_BxL, jnp.inf)),
        max_ratio=jnp.max(jnp.where(trained_BxL, ratio_BxL, -jnp.inf)),
    )
    for name, span_id in RL_SPANS.items():
        in_span_BxL = weights_BxL * (batch["span_ids_BxL"] == span_id).astype(jnp.float32)
        aux[f"tokens_{name}"] = jnp.sum(in_span_BxL)
        aux[f"advantage_{name}"] = jnp.sum(in_span_BxL * advantages_BxL)
    return loss_sum, (count, aux)


def rl_loss(model_cfg: transformer.ModelConfig, params: Any, batch: Mapping[str, jax.Array], *, eps_low: float,
            eps_high: float, kl_beta: float, aggregation: str, chunk_size: int = 0) -> LossOutput:
    """`grpo_objective` of the model's log-probs, plus the entropy at trained tokens (aux sum 'entropy');
    chunk_size > 0: both without the full logits (fwm.train.losses.chunked_nll)."""
    if chunk_size > 0:
        nll_BxL, entropy_BxL = chunked_nll(model_cfg, params, batch, chunk_size, with_entropy=True)
        logprobs_BxL = -nll_BxL
    else:
        logits_BxLxV = batch_logits(model_cfg, params, batch)
        logprobs_BxL = -target_nll(logits_BxLxV, batch["targets_BxL"])
        entropy_BxL = entropy_from_logits(jax.lax.stop_gradient(logits_BxLxV))
    loss_sum, (count, aux) = grpo_objective(logprobs_BxL, batch, eps_low=eps_low, eps_high=eps_high,
                                            kl_beta=kl_beta, aggregation=aggregation)
    aux["entropy"] = jnp.sum(batch["loss_weights_BxL"].astype(jnp.float32) * entropy_BxL)
    return loss_sum, (count, aux)


def rl_metrics(loss_sum: jax.Array, count: jax.Array, aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from the summed aux: clip_fraction (and _low / _high), ratio_mean/min/max, entropy, kl, per-span
    mean advantages, tokens (trained tokens; the loss denominator may count rows instead)."""
    tokens = jnp.maximum(aux["tokens"], 1.0)
    metrics = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "tokens": aux["tokens"],
        "clip_fraction": aux["clipped"] / tokens,
        "clip_fraction_low": aux["clipped_low"] / tokens,
        "clip_fraction_high": aux["clipped_high"] / tokens,
        "ratio_mean": aux["ratio"] / tokens,
        # No trained token at all leaves +-inf: report 1 (the ratio of an untouched policy).
        "ratio_min": jnp.where(jnp.isfinite(aux["min_ratio"]), aux["min_ratio"], 1.0),
        "ratio_max": jnp.where(jnp.isfinite(aux["max_ratio"]), aux["max_ratio"], 1.0),
        "entropy": aux["entropy"] / tokens,
    }
    if "kl" in aux:
        metrics["kl"] = aux["kl"] / tokens
    for name in RL_SPANS:
        metrics[f"tokens_{name}"] = aux[f"tokens_{name}"]
        metrics[f"advantage_{name}"] = aux[f"advantage_{name}"] / jnp.maximum(aux[f"tokens_{name}"], 1.0)
    return {k: v.astype(jnp.float32) for k, v in metrics.items()}
