"""The text R_ground searches (fwm.trajectories.future.ground_text): what_follows or only the new evidence."""
import pytest

from fwm.schema import Action
from fwm.trajectories import future

ACTIONS = [Action("search", "A"), Action("search", "B"), Action("search", "A"), None, Action("answer", "x")]
OBSERVATIONS = ["passage A", "passage B", " passage A\n", "Your previous response was malformed.", ""]


def test_new_evidence_keeps_only_observations_not_returned_before():
    assert future.new_evidence(OBSERVATIONS, 0) == "passage A\npassage B\n passage A\n\n" \
        "Your previous response was malformed."
    # From step 1: passage A was read before the block (step 0), so its repeat at step 2 is no evidence.
    assert future.new_evidence(OBSERVATIONS, 1) == "passage B\nYour previous response was malformed."
    assert future.new_evidence(OBSERVATIONS, 2) == "Your previous response was malformed."
    assert future.new_evidence(OBSERVATIONS, 4) == ""  # nothing follows the answer
    with pytest.raises(ValueError, match="step 5 outside"):
        future.new_evidence(OBSERVATIONS, 5)


def test_ground_text_by_match():
    # 'found' and 'beyond_action' search what_follows: later actions included ("search: A", "answer: x").
    for match in ("found", "beyond_action"):
        assert future.ground_text(ACTIONS, OBSERVATIONS, 1, "observation", match) == \
            future.what_follows(ACTIONS, OBSERVATIONS, 1, "observation")
    assert "answer: x" in future.ground_text(ACTIONS, OBSERVATIONS, 1, "observation", "found")
    assert future.ground_text(ACTIONS, OBSERVATIONS, 1, "observation", "new_evidence") == \
        future.new_evidence(OBSERVATIONS, 1)
    assert not future.keyword_grounded("x", future.ground_text(ACTIONS, OBSERVATIONS, 1, match="new_evidence"),
                                       ACTIONS[1], "new_evidence")
    assert future.keyword_grounded("x", future.ground_text(ACTIONS, OBSERVATIONS, 1), ACTIONS[1], "found")
    with pytest.raises(ValueError, match="R_match"):
        future.ground_text(ACTIONS, OBSERVATIONS, 1, match="fuzzy")
    with pytest.raises(ValueError, match="5 actions but 4 observations"):
        future.ground_text(ACTIONS, OBSERVATIONS[:4], 1, match="new_evidence")
