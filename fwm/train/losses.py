"""Supervised losses as (sum, token count) pairs: weighted next-token NLL on the data pipeline's batches.

Batches follow the input-aligned convention of fwm/data/features.py: at position t the model reads
`tokens_BxL[:, :t+1]` and is scored on `targets_BxL[:, t]` with weight `loss_weights_BxL[:, t]`; no
shifting happens here. A loss returns the weighted SUM of NLLs and the SUM of weights, never a mean,
so micro-batch accumulation and data parallelism add sums and divide once by the total count: the
exact token mean of the whole step, however the batch was split.

Registry: `LOSSES` maps a stage name (config `stage`) to its loss function. Every loss has the
signature `loss(model_cfg, params, batch, chunk_size=0) -> (loss_sum, (token_count, aux))` where aux is a
dict of further sums (e.g. SFT's per-span sums and counts) that the step adds up like the loss, and
chunk_size (config train.loss_chunk_size) > 0 computes the cross-entropy a chunk of positions at a time
(`chunked_nll`: no batch x seq_len x vocab float32 logits).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from fwm import schema
from fwm.mesh import constrain
from fwm.model import transformer

LM_BATCH_KEYS = ("tokens_BxL", "targets_BxL", "segment_ids_BxL", "positions_BxL", "loss_weights_BxL")
SFT_BATCH_KEYS = LM_BATCH_KEYS + ("span_ids_BxL",)
# Span ids (fwm.schema) with their own loss in SFT metrics: the foresight part and the acting part.
SFT_SPANS = {"world_model": schema.SPAN_WORLD_MODEL, "policy": schema.SPAN_POLICY}

LossOutput = tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]


def batch_logits(model_cfg: transformer.ModelConfig, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """logits_BxLxV (float32) of a batch's tokens within each packed segment."""
    return transformer.forward(model_cfg, params, batch["tokens_BxL"], batch["positions_BxL"],
                               batch["segment_ids_BxL"])


def target_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """nll_BxL: logsumexp(logits) - logits[target] at every position."""
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    # One-hot contraction rather than a gather: it stays a local reduce when the vocab is sharded.
    onehot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=logits_BxLxV.dtype)
    target_logit_BxL = jnp.sum(logits_BxLxV * onehot_BxLxV, axis=-1)
    return log_z_BxL - target_logit_BxL


def chunked_nll(model_cfg: transformer.ModelConfig, params: Any, batch: Mapping[str, jax.Array], chunk_size: int,
                with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """(nll_BxL, entropy_BxL or None), float32, equal to `target_nll` of the full logits (and
    fwm.rl.losses' entropy of them), computed `chunk_size` positions at a time.

    The logits of one chunk (B x chunk x V, float32) exist at a time: `jax.checkpoint` makes the backward
    pass recompute them from the chunk's hidden states instead of keeping every chunk's, so the peak
    holds one chunk's logits and softmax, not batch x seq_len x vocab of each. The target logit is a
    select-and-sum over the vocabulary (fused by XLA, local when the vocab is sharded), never a one-hot
    array. The entropy (a metric) carries no gradient. Rows are padded to a multiple of chunk_size.
    """
    hidden_BxLxD = transformer.hidden_states(model_cfg, params, batch["tokens_BxL"], batch["positions_BxL"],
                                             batch["segment_ids_BxL"])
    compute = jnp.dtype(model_cfg.compute_dtype)
    # Cast once, as the head's Dense does per call: the same products as `forward`'s logits.
    kernel_DxV = transformer.output_kernel(model_cfg, params).astype(compute)
    b, length, d = hidden_BxLxD.shape
    pad = -length % chunk_size
    targets_BxL = jnp.pad(batch["targets_BxL"], ((0, 0), (0, pad)))
    hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
    n = (length + pad) // chunk_size
    hidden_NxBxCxD = jnp.swapaxes(hidden_BxLxD.reshape(b, n, chunk_size, d), 0, 1)
    targets_NxBxC = jnp.swapaxes(targets_BxL.reshape(b, n, chunk_size), 0, 1)
    vocab_V = jnp.arange(kernel_DxV.shape[1], dtype=jnp.int32)

    @jax.checkpoint
    def one(chunk: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x_BxCxD, targets_BxC = chunk
        # Through the model's `matmul`, as the head's Linear does: the same products and the same cheap gradient.
        logits_BxCxV = transformer.matmul(x_BxCxD.astype(compute).reshape(-1, d), kernel_DxV).reshape(
            x_BxCxD.shape[:2] + (kernel_DxV.shape[1],)).astype(jnp.float32)
        logits_BxCxV = constrain(logits_BxCxV, ("batch", "length", "act_vocab"))
        log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        target_BxC = jnp.sum(jnp.where(vocab_V == targets_BxC[..., None], logits_BxCxV, 0.0), axis=-1)
        if not with_entropy:
            return log_z_BxC - target_BxC, jnp.zeros_like(log_z_BxC)
        fixed_BxCxV = jax.lax.stop_gradient(logits_BxCxV)
        probs_BxCxV = jax.nn.softmax(fixed_BxCxV, axis=-1)
        entropy_BxC = jax.lax.stop_gradient(log_z_BxC) - jnp.sum(probs_BxCxV * fixed_BxCxV, axis=-1)
        return log_z_BxC - target_BxC, entropy_BxC

    nll_NxBxC, entropy_NxBxC = jax.lax.map(one, (hidden_NxBxCxD, targets_NxBxC))
    unchunk = lambda x_NxBxC: jnp.swapaxes(x_NxBxC, 0, 1).reshape(b, n * chunk_size)[:, :length]  # noqa: E731
    return unchunk(nll_NxBxC), unchunk(entropy_NxBxC) if with_entropy else None


def token_nll(model_cfg: transformer.ModelConfig, params: Any, batch: Mapping[str, jax.Array],
              chunk_size: int = 0) -> jax.Array:
    """nll_BxL (float32): -log p(targets_BxL[b, t] | tokens_BxL[b, :t+1]) within each packed segment;
    chunk_size > 0 computes it without the full logits (`chunked_nll`)."""
    if chunk_size > 0:
        return chunked_nll(model_cfg, params, batch, chunk_size)[0]
    return target_nll(batch_logits(model_cfg, params, batch), batch["targets_BxL"])


def lm_loss(model_cfg: transformer.ModelConfig, params: Any, batch: Mapping[str, jax.Array],
            chunk_size: int = 0) -> LossOutput:
    """Pretraining / mid-training: sum of loss_weights * NLL, and the sum of weights."""
    weights_BxL = batch["loss_weights_BxL"].astype(jnp.float32)
    nll_BxL = token_nll(model_cfg, params, batch, chunk_size)
    return jnp.sum(weights_BxL * nll_BxL), (jnp.sum(weights_BxL), {})


def sft_loss(model_cfg: transformer.ModelConfig, params: Any, batch: Mapping[str, jax.Array],
             chunk_size: int = 0) -> LossOutput:
    """SFT: the LM loss on response tokens (the pipeline's weights mask the prompt), plus per-span sums."""
    weights_BxL = batch["loss_weights_BxL"].astype(jnp.float32)
    nll_BxL = token_nll(model_cfg, params, batch, chunk_size)
    aux = {}
    for name, span_id in SFT_SPANS.items():
        in_span_BxL = weights_BxL * (batch["span_ids_BxL"] == span_id).astype(jnp.float32)
        aux[f"loss_sum_{name}"] = jnp.sum(in_span_BxL * nll_BxL)
        aux[f"tokens_{name}"] = jnp.sum(in_span_BxL)
    return jnp.sum(weights_BxL * nll_BxL), (jnp.sum(weights_BxL), aux)


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "pretrain": lm_loss,
    "mid_train": lm_loss,
    "sft": sft_loss,
}
BATCH_KEYS: dict[str, tuple[str, ...]] = {"pretrain": LM_BATCH_KEYS, "mid_train": LM_BATCH_KEYS,
                                          "sft": SFT_BATCH_KEYS}


def span_metrics(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-span mean losses from summed aux entries (`loss_sum_X` / `tokens_X`; 0 where a span is empty)."""
    out = {}
    for key, value in aux.items():
        if key.startswith("loss_sum_"):
            name = key[len("loss_sum_"):]
            count = aux[f"tokens_{name}"]
            out[f"loss_{name}"] = value / jnp.maximum(count, 1.0)
            out[f"tokens_{name}"] = count
    return out
