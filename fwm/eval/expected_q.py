"""The model's expected confidence E[q_t]: the values its <confidence> span could hold, weighted by the probability
the model gives each after the prefix it wrote up to <confidence>.

Greedy decoding writes the mode of the confidence; calibration should score the belief. A FE-SFT model whose
training q was 100 on most steps writes 100 at every greedy step (AUROC 0.5 whatever it believes), while the
probability it leaves for 50 or 0 still ranks its steps. With x_t = prompt_t + the response up to <confidence>:

    p(v | x_t) = prod_j p(tok_j(v) | x_t, tok_<j(v)) * p(</confidence> | x_t, tok(v))   (tok(v): v's digit tokens)
    E[q_t]     = sum_v (v / 100) p(v | x_t) / mass_t,   mass_t = sum_v p(v | x_t),   v in `values`

`values` is a grid (eval config `foresight.expected_q_values`, default 0, 10, ..., 100). The log-probabilities
come from `fwm.rollout.sampler.score_continuations`: one prefill of x_t, its KV cache branched over the values
(a few tokens each), so a finer grid costs little more than a coarse one. mass_t says how much of the model's
probability the grid covers (1 when it writes only grid values); a step whose response has no <confidence> tag
has no E[q] (None).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fwm.schema import CONFIDENCE

OPEN_TAG, CLOSE_TAG = f"<{CONFIDENCE}>", f"</{CONFIDENCE}>"


def value_token_ids(tokenizer: Any, values: Sequence[int]) -> list[list[int]]:
    """Per value: the tokens a response writes after <confidence> for it, closing tag included (tokenized in
    context, as a rendered block is)."""
    open_id, close_id = tokenizer.tag_ids[OPEN_TAG], tokenizer.tag_ids[CLOSE_TAG]
    out = []
    for value in values:
        ids = tokenizer.encode(f"{OPEN_TAG}{int(value)}{CLOSE_TAG}")
        start = ids.index(open_id) + 1
        out.append(ids[start:ids.index(close_id, start) + 1])
    return out


def confidence_prefix(prompt_ids: Sequence[int], response_ids: Sequence[int], open_id: int) -> list[int] | None:
    """x_t: the prompt and the response through its first <confidence> token (None: the response has none)."""
    response = list(response_ids)
    if open_id not in response:
        return None
    return list(prompt_ids) + response[:response.index(open_id) + 1]


def expected_from_logprobs(value_logprobs_NxV: np.ndarray, values: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(E[q]_N in [0, 1], mass_N) from log p(v | x_n) per step and value (module docstring)."""
    logp_NxV = np.asarray(value_logprobs_NxV, np.float64)
    top_N = logp_NxV.max(axis=1, keepdims=True)
    weights_NxV = np.exp(logp_NxV - top_N)  # shifted: the ratio is exact even where every p(v) underflows
    expected_N = weights_NxV @ (np.asarray(values, np.float64) / 100.0) / weights_NxV.sum(axis=1)
    return expected_N, np.exp(top_N[:, 0]) * weights_NxV.sum(axis=1)
