"""How well a confidence q predicts a binary outcome: the Brier score, the AUROC and the expected
calibration error (with the reliability bins it is computed from).

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


ECE_BINS = 10  # equal-width bins over [0, 1]: [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]


def reliability_bins(confidences_N: Sequence[float], outcomes_N: Sequence[float], bins: int = ECE_BINS
                     ) -> list[dict[str, float]]:
    """The reliability diagram: `bins` equal-width bins over [0, 1]; bin b holds the q in
    [b / bins, (b + 1) / bins), the last bin also q = 1 (b = min(floor(q * bins), bins - 1)).
    One {"lo", "hi", "count", "mean_q", "accuracy"} per non-empty bin, in order of q."""
    q_N, y_N = _checked(confidences_N, outcomes_N)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    bin_N = np.minimum(np.floor(q_N * bins).astype(np.int64), bins - 1)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": int(np.sum(bin_N == b)),
             "mean_q": float(q_N[bin_N == b].mean()), "accuracy": float(y_N[bin_N == b].mean())}
            for b in range(bins) if np.any(bin_N == b)]


def expected_calibration_error(confidences_N: Sequence[float], outcomes_N: Sequence[float],
                               bins: int = ECE_BINS) -> float:
    """ECE = sum over the bins b of `reliability_bins` of (n_b / N) * |mean q in b - share of y = 1 in b|.

    0 is perfect calibration (per bin); a constant q = p against a success rate s gives |p - s|.
    """
    rows = reliability_bins(confidences_N, outcomes_N, bins)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] / total * abs(row["mean_q"] - row["accuracy"]) for row in rows))
