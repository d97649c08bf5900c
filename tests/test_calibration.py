"""fwm.calibration on hand-computed values."""
import pytest

from fwm.calibration import auroc, brier_score


def test_brier_score_by_hand():
    # (0.1-0)^2 + (0.4-0)^2 + (0.35-1)^2 + (0.8-1)^2 = 0.01 + 0.16 + 0.4225 + 0.04 = 0.6325; / 4
    assert brier_score([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.158125)
    assert brier_score([1.0, 0.0], [True, False]) == 0.0 and brier_score([0.5] * 3, [0, 1, 1]) == 0.25


def test_auroc_by_hand_with_ties_counted_half():
    # positive/negative pairs: (0.35, 0.1) won, (0.35, 0.4) lost, (0.8, 0.1) won, (0.8, 0.4) won -> 3 / 4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # 0.5 vs the two negatives at 0.5: two ties (1/2 each); 0.9 beats both -> (1 + 2) / 4
    assert auroc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)
    assert auroc([0.9, 0.8, 0.1], [0, 0, 1]) == 0.0 and auroc([0.3] * 4, [0, 1, 0, 1]) == 0.5
    assert auroc([0.2, 0.7], [1, 1]) is None  # one class only: undefined


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="divide a 0-100"):
        brier_score([73], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.5, 0.5], [0, 2])
    with pytest.raises(ValueError, match="shapes"):
        brier_score([0.5], [0, 1])
