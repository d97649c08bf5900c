"""SQuAD normalisation and the QA metrics."""
import pytest

from fwm.envs.scoring import exact_match, f1, normalize_answer, substring_match


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   Apple,  a day!! ", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("Rock-'n'-roll", "rocknroll"),
    ("A", ""),
    ("Anathema\tand\nthen", "anathema and then"),
    ("São Paulo", "são paulo"),
])
def test_normalize_answer_squad_cases(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_takes_the_best_gold():
    assert exact_match("the eiffel tower.", ["Big Ben", "Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("Paris", ("paris",)) == 1.0


def test_f1_is_token_overlap():
    assert f1("Eiffel", "Eiffel Tower") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1("the tower of Eiffel", ["Eiffel Tower", "nothing"]) == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1))
    assert f1("", "Eiffel") == 0.0 and f1("", "the") == 1.0  # both empty after normalisation
    assert f1("tower tower", "tower") == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_substring_match():
    assert substring_match("It is the Eiffel Tower, in Paris", ["eiffel tower"]) == 1.0
    assert substring_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert substring_match("anything", ["the"]) == 0.0  # an empty gold matches nothing
