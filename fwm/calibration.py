"""How well a confidence q predicts a binary outcome: the Brier score and the AUROC.

Pure numpy functions of (confidences, outcomes), with no dependency on any stage, so that `fwm data`
(Monte Carlo labels against recorded episodes), FC-RL (R_calib is 1 - a Brier term) and evaluation
(the model's <confidence> against its episodes) share one definition. Confidences are in [0, 1]
(divide a 0-100 <confidence> by 100 first); outcomes are 0/1 (or bools).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _checked(confidences_N: Sequence[float], outcomes_N: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    q_N = np.asarray(confidences_N, np.float64)
    y_N = np.asarray(outcomes_N, np.float64)
    if q_N.ndim != 1 or q_N.shape != y_N.shape:
        raise ValueError(f"expected two 1-D arrays of one length, got shapes {q_N.shape} and {y_N.shape}")
    if q_N.size == 0:
        raise ValueError("no confidences to score")
    if not np.all((q_N >= 0) & (q_N <= 1)):
        raise ValueError(f"confidences must be in [0, 1] (divide a 0-100 confidence by 100), got range "
                         f"[{q_N.min()}, {q_N.max()}]")
    if not np.all((y_N == 0) | (y_N == 1)):
        raise ValueError("outcomes must be 0 or 1")
    return q_N, y_N


def brier_score(confidences_N: Sequence[float], outcomes_N: Sequence[float]) -> float:
    """Brier score: mean over i of (q_i - y_i)^2; 0 is perfect, 0.25 is a constant 0.5."""
    q_N, y_N = _checked(confidences_N, outcomes_N)
    return float(np.mean((q_N - y_N) ** 2))


def auroc(confidences_N: Sequence[float], outcomes_N: Sequence[float]) -> float | None:
    """Area under the ROC curve of q as a score for y = 1:

        AUROC = P(q_pos > q_neg) + 1/2 P(q_pos == q_neg)
              = (sum of the mid-ranks of the positives - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    over all (positive, negative) pairs (the Mann-Whitney U statistic, ties counted half). 0.5 is a
    q that does not separate outcomes. None when one class is absent (the area is undefined).
    """
    q_N, y_N = _checked(confidences_N, outcomes_N)
    n_pos = int(y_N.sum())
    n_neg = y_N.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order_N = np.argsort(q_N, kind="stable")
    sorted_q_N = q_N[order_N]
    ranks_N = np.empty_like(q_N)
    # Mid-ranks (1-based): tied values share the mean of the ranks they span.
    _, first_N, counts_N = np.unique(sorted_q_N, return_index=True, return_counts=True)
    mid_N = first_N + (counts_N + 1) / 2.0
    ranks_N[order_N] = np.repeat(mid_N, counts_N)
    return float((ranks_N[y_N == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
