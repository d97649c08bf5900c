"""Validated records -> per-example token arrays (tokens, targets, loss weights, span ids), before packing.

Convention (shared by every stage and by the training step): arrays are input-aligned. At position t
the model reads `tokens[t]` and is trained to predict `targets[t]`, the next token of the same
example, with weight `loss_weights[t]`; `span_ids[t]` is the span of `targets[t]`. So every
per-position label describes the token being predicted, the last position of an example has weight 0
(its target is 0), and the model sees exactly `tokens` -- no L+1 shifting in the training step:
`loss = sum(loss_weights * xent(logits(tokens), targets))`. Because targets are computed here, before
packing, a document split across two packed rows keeps the target at the cut.
"""
from __future__ import annotations

from typing import Any, Collection, Sequence

import numpy as np

from fwm import schema

DEFAULT_TRAINED_ROLES = ("document", "prompt", "world_model", "policy", "action")  # all but "observation"


def token_weights_from_chars(char_weights: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per-token 0/1 weights: a token is trained only if every character it covers is trained.

    A token that touches any untrained character (e.g. a piece straddling an observation boundary)
    is masked, so observation text is never a target. Tokens with an empty character span (e.g. a
    dummy-prefix piece) take the weight of the character they sit at.
    """
    num_chars = len(char_weights)
    if len(offsets) == 0:
        return np.zeros(0, np.float32)
    if num_chars == 0:
        return np.zeros(len(offsets), np.float32)
    spans = np.clip(np.asarray(offsets, np.int64).reshape(-1, 2), 0, num_chars)
    starts, ends = spans[:, 0], spans[:, 1]
    untrained_before = np.concatenate([[0], np.cumsum(char_weights <= 0)])
    all_trained = (untrained_before[ends] - untrained_before[starts]) == 0
    at_char = char_weights[np.minimum(starts, num_chars - 1)] > 0
    return np.where(ends > starts, all_trained, at_char).astype(np.float32)


def _shift_to_targets(tokens: np.ndarray, target_weights: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Input-aligned arrays from per-token arrays where weight[i] says whether token i is trained as a target."""
    targets = np.empty_like(tokens)
    targets[:-1], targets[-1:] = tokens[1:], pad_id
    loss_weights = np.zeros(len(tokens), np.float32)
    loss_weights[:-1] = target_weights[1:]
    return {"tokens": tokens, "targets": targets, "loss_weights": loss_weights}


def lm_example(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    trained_roles: Collection[str] = DEFAULT_TRAINED_ROLES,
    add_bos: bool = True,
    add_eos: bool = True,
) -> dict[str, np.ndarray]:
    """One LM document (record from records.validate_lm) as input-aligned arrays of length n.

    The segment texts are joined without separators and tokenized once (so tokenization does not
    depend on where segments start); each token's weight comes from the roles of the characters it
    covers. BOS is never a target; EOS takes the weight of the last non-empty segment.
    """
    segments = record["segments"]
    text = "".join(segment_text for _, segment_text in segments)
    segment_weights = [1.0 if role in trained_roles else 0.0 for role, _ in segments]
    char_weights = np.repeat(
        np.asarray(segment_weights, np.float32), [len(segment_text) for _, segment_text in segments]
    )
    ids, offsets = tokenizer.encode_with_offsets(text)
    weights = token_weights_from_chars(char_weights, offsets)
    tokens = list(ids)
    weight_list = list(weights)
    if add_bos:
        tokens.insert(0, tokenizer.bos_id)
        weight_list.insert(0, 0.0)
    if add_eos:
        last_weight = next(w for (_, t), w in zip(reversed(segments), reversed(segment_weights)) if t)
        tokens.append(tokenizer.eos_id)
        weight_list.append(last_weight)
    return _shift_to_targets(
        np.asarray(tokens, np.int32), np.asarray(weight_list, np.float32), tokenizer.pad_id
    )


def sft_example(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    seq_len: int,
    add_bos: bool = True,
    add_eos: bool = True,
) -> dict[str, np.ndarray]:
    """One SFT step sample (record from records.validate_sft) as input-aligned arrays of length <= seq_len.

    Prompt and response are tokenized separately (the prompt exactly as the sampler will see it at
    inference); prompt tokens are never targets, response tokens (+ EOS) are. `span_ids` come from
    schema.token_span_ids over the response characters (prompt: SPAN_NONE; EOS: the span of the
    response's last token). Truncation keeps the response: the prompt loses tokens from its left
    (after BOS, which stays); a response longer than seq_len minus BOS is cut on the right (losing EOS).
    """
    prompt_ids = list(tokenizer.encode(record["prompt"]))
    response = record["response"]
    response_ids, offsets = tokenizer.encode_with_offsets(response)
    response_ids = list(response_ids)
    response_spans = list(
        np.asarray(schema.token_span_ids(schema.char_span_ids(response), offsets), np.int8)
    )
    if add_eos:
        response_ids.append(tokenizer.eos_id)
        response_spans.append(response_spans[-1] if response_spans else np.int8(schema.SPAN_NONE))
    head = [tokenizer.bos_id] if add_bos else []
    response_budget = seq_len - len(head)
    if response_budget < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for a response")
    response_ids, response_spans = response_ids[:response_budget], response_spans[:response_budget]
    prompt_budget = response_budget - len(response_ids)
    # LEAD'S FIX (08:40 UTC; commit it with your work): the old slice start len - budget went negative
    # whenever the prompt fit, cutting the first (budget - len) tokens of ~60% of learnable-world SFT
    # prompts (instruction/question lost). Retrain SFT runs made before this fix.
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - prompt_budget):] if prompt_budget > 0 else []
    prompt_len = len(head) + len(prompt_ids)
    tokens = np.asarray(head + prompt_ids + response_ids, np.int32)
    is_response = np.zeros(len(tokens), np.float32)
    is_response[prompt_len:] = 1.0
    token_spans = np.full(len(tokens), schema.SPAN_NONE, np.int8)
    token_spans[prompt_len:] = response_spans
    example = _shift_to_targets(tokens, is_response, tokenizer.pad_id)
    span_ids = np.full(len(tokens), schema.SPAN_NONE, np.int8)
    span_ids[:-1] = token_spans[1:]
    example["span_ids"] = span_ids
    return example
