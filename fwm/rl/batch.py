"""Sampled step samples -> the arrays `rl_step` reads, one step sample per row.

Layout (the input-aligned convention of fwm/data/features.py, as the SFT samples): a row holds the
sequence s = prompt ids (as fed to the sampler, BOS included) + response ids (as sampled, EOS
included when the sampler stopped there), right-padded; at position t the model reads s[t] and is
scored on s[t+1], so the labels of position t (weight, span id, old log-prob, advantage) describe the
token s[t+1]. Response tokens are trained (weight 1), prompt tokens never are; padding is segment 0.
Nothing is truncated: a sample longer than the row is an error (the loop's prompt budget plus
`rl.max_new_tokens` must fit), because a cut prompt would not be the context the log-probs were
sampled in.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fwm.rl.advantages import token_advantages


@dataclasses.dataclass(frozen=True)
class StepSample:
    """One sampled agent step.

    prompt_ids: what the sampler was fed; response_ids: what it generated; response_span_ids: the
    span id of each response token (schema.token_span_ids of the response text; an EOS token takes
    the span of the token before it); response_logprobs: the sampler's log-prob of each response
    token (the rollout policy, pi_old); world_model_advantage / policy_advantage: the step's span
    advantages (`fwm.rl.advantages.span_advantages`).
    """

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    response_span_ids: Sequence[int]
    response_logprobs: Sequence[float]
    world_model_advantage: float
    policy_advantage: float


def rl_batch(samples: Sequence[StepSample], *, rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The rl_step arrays (all but ref_logprobs_BxL) of `samples`, padded to `rows` x `seq_len`.

    Rows past the samples are all padding (weight 0), so a mini-batch can be rounded up to a
    compiled shape.
    """
    if len(samples) > rows:
        raise ValueError(f"{len(samples)} step samples do not fit in {rows} rows")
    tokens_BxL = np.full((rows, seq_len), pad_id, np.int32)
    targets_BxL = np.full((rows, seq_len), pad_id, np.int32)
    segment_ids_BxL = np.zeros((rows, seq_len), np.int32)
    weights_BxL = np.zeros((rows, seq_len), np.float32)
    span_ids_BxL = np.zeros((rows, seq_len), np.int8)
    old_logprobs_BxL = np.zeros((rows, seq_len), np.float32)
    world_model_B, policy_B = np.zeros(rows), np.zeros(rows)
    for row, sample in enumerate(samples):
        num_prompt, num_response = len(sample.prompt_ids), len(sample.response_ids)
        if not len(sample.response_span_ids) == len(sample.response_logprobs) == num_response:
            raise ValueError(f"step sample {row}: {num_response} response ids, {len(sample.response_span_ids)} "
                             f"span ids and {len(sample.response_logprobs)} log-probs")
        if num_prompt < 1:
            raise ValueError(f"step sample {row}: an empty prompt (it needs at least BOS)")
        length = num_prompt + num_response
        if length > seq_len:
            raise ValueError(f"step sample {row}: {num_prompt} prompt + {num_response} response tokens exceed "
                             f"seq_len={seq_len}")
        sequence = np.concatenate([np.asarray(sample.prompt_ids), np.asarray(sample.response_ids)]).astype(np.int32)
        tokens_BxL[row, :length] = sequence
        targets_BxL[row, :length - 1] = sequence[1:]
        segment_ids_BxL[row, :length] = 1
        # Position t predicts s[t + 1]: the response's token j is the target of position num_prompt - 1 + j.
        labels = slice(num_prompt - 1, length - 1)
        weights_BxL[row, labels] = 1.0
        span_ids_BxL[row, labels] = np.asarray(sample.response_span_ids, np.int8)
        old_logprobs_BxL[row, labels] = np.asarray(sample.response_logprobs, np.float32)
        world_model_B[row], policy_B[row] = sample.world_model_advantage, sample.policy_advantage
    # One sequence per row from position 0, so positions are plain indices (padding's do not matter).
    positions_BxL = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
    return {"tokens_BxL": tokens_BxL, "targets_BxL": targets_BxL, "segment_ids_BxL": segment_ids_BxL,
            "positions_BxL": positions_BxL, "loss_weights_BxL": weights_BxL, "span_ids_BxL": span_ids_BxL,
            "old_logprobs_BxL": old_logprobs_BxL,
            "advantages_BxL": token_advantages(span_ids_BxL, weights_BxL, world_model_B, policy_B)}
