"""Sampled step samples -> the arrays `rl_step` reads, one step sample per row.

Layout (the input-aligned convention of fwm/data/features.py, as the SFT samples): a row holds the
sequence s = prompt ids (as fed to the sampler, BOS included) + response ids (as sampled, EOS
included when the sampler stopped there), right-padded; at position t the model reads s[t] and is
scored on s[t+1], so the labels of position t (weight, span id, old log-prob, advantage) describe the
token s[t+1]. Response tokens are trained (weight 1), prompt tokens never are; padding is segment 0.
With `pack=True` (config rl.pack) a row holds several samples, placed first-fit longest first
(`first_fit_rows`), as segments 1, 2, ... whose positions restart at 0: attention stays within a
segment, so each token is scored exactly as in a row of its own, and a row of 768 tokens is not spent
on one 300-token step. Per-token losses and token-mean aggregation are unchanged by packing (the loss
of `sequence_mean_token_mean` treats a row as one sequence, so the config refuses that pairing).
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


def first_fit_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Sample indices per row: each sample, longest first, goes into the first row with room for it
    (first-fit decreasing; a row holds at most seq_len tokens, a longer sample is an error of rl_batch)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(seq_len - lengths[index])
    return rows


def rl_batch(samples: Sequence[StepSample], *, rows: int, seq_len: int, pad_id: int = 0,
             pack: bool = False) -> dict[str, np.ndarray]:
    """The rl_step arrays (all but ref_logprobs_BxL) of `samples`, padded to `rows` x `seq_len`; one
    sample per row, or several (`pack`, module docstring).

    Rows past the samples are all padding (weight 0), so a mini-batch can be rounded up to a
    compiled shape.
    """
    for index, sample in enumerate(samples):
        num_prompt, num_response = len(sample.prompt_ids), len(sample.response_ids)
        if not len(sample.response_span_ids) == len(sample.response_logprobs) == num_response:
            raise ValueError(f"step sample {index}: {num_response} response ids, {len(sample.response_span_ids)} "
                             f"span ids and {len(sample.response_logprobs)} log-probs")
        if num_prompt < 1:
            raise ValueError(f"step sample {index}: an empty prompt (it needs at least BOS)")
        if num_prompt + num_response > seq_len:
            raise ValueError(f"step sample {index}: {num_prompt} prompt + {num_response} response tokens exceed "
                             f"seq_len={seq_len}")
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    placement = first_fit_rows(lengths, seq_len) if pack else [[index] for index in range(len(samples))]
    if len(placement) > rows:
        raise ValueError(f"{len(samples)} step samples do not fit in {rows} rows"
                         + (f" of {seq_len} tokens (packed into {len(placement)})" if pack else ""))
    tokens_BxL = np.full((rows, seq_len), pad_id, np.int32)
    targets_BxL = np.full((rows, seq_len), pad_id, np.int32)
    segment_ids_BxL = np.zeros((rows, seq_len), np.int32)
    positions_BxL = np.zeros((rows, seq_len), np.int32)
    weights_BxL = np.zeros((rows, seq_len), np.float32)
    span_ids_BxL = np.zeros((rows, seq_len), np.int8)
    old_logprobs_BxL = np.zeros((rows, seq_len), np.float32)
    advantages_BxL = np.zeros((rows, seq_len), np.float32)
    for row, indices in enumerate(placement):
        start = 0
        for segment, index in enumerate(indices, start=1):
            sample, length = samples[index], lengths[index]
            num_prompt = len(sample.prompt_ids)
            sequence = np.concatenate([np.asarray(sample.prompt_ids), np.asarray(sample.response_ids)]).astype(np.int32)
            where = slice(start, start + length)
            tokens_BxL[row, where] = sequence
            targets_BxL[row, start:start + length - 1] = sequence[1:]  # a segment's last token predicts nothing
            segment_ids_BxL[row, where] = segment
            positions_BxL[row, where] = np.arange(length)
            # Position t predicts s[t + 1]: the response's token j is the target of position num_prompt - 1 + j.
            labels = slice(start + num_prompt - 1, start + length - 1)
            weights_BxL[row, labels] = 1.0
            span_ids_BxL[row, labels] = np.asarray(sample.response_span_ids, np.int8)
            old_logprobs_BxL[row, labels] = np.asarray(sample.response_logprobs, np.float32)
            advantages_BxL[row, where] = token_advantages(
                span_ids_BxL[row:row + 1, where], weights_BxL[row:row + 1, where],
                np.asarray([sample.world_model_advantage]), np.asarray([sample.policy_advantage]))[0]
            start += length
    return {"tokens_BxL": tokens_BxL, "targets_BxL": targets_BxL, "segment_ids_BxL": segment_ids_BxL,
            "positions_BxL": positions_BxL, "loss_weights_BxL": weights_BxL, "span_ids_BxL": span_ids_BxL,
            "old_logprobs_BxL": old_logprobs_BxL, "advantages_BxL": advantages_BxL}
