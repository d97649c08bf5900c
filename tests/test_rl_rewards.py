"""FC-RL rewards on hand-computed cases: R_calib, R_ground, outcome, format adherence, garbage steps."""
import math

import numpy as np
import pytest

from fwm import schema
from fwm.rl import rewards
from fwm.rl.rewards import EpisodeOutcome, StepOutcome
from fwm.schema import Action, StepResponse, WorldModelBlock


def _response(action, keywords, confidence, variant="full"):
    step = StepResponse("reasoning", action, WorldModelBlock("roadmap [X]", keywords, "gap", confidence))
    return schema.render_response(step, variant)


GARBAGE = "I think the answer is <confidence>high"  # no action, no keywords, malformed confidence
# Three good steps and the observation each got; the gold answer is "Anne Hidalgo".
STEPS = [
    (Action("search", "capital of France"), ["Paris", "mayor"], 60, "Paris is the capital. Its mayor is Anne."),
    (Action("search", "mayor of Paris"), ["Anne", "Lyon"], 80, "Anne Hidalgo is the mayor of Paris."),
    (Action("answer", "Anne Hidalgo"), ["Anne Hidalgo"], 90, ""),
]


def _episode(steps=STEPS, score=1.0, final_answer="Anne Hidalgo", garbage_at=None):
    outcomes = []
    for i, (action, keywords, confidence, observation) in enumerate(steps):
        if i == garbage_at:
            outcomes.append(StepOutcome.from_response(GARBAGE, "Your previous response was malformed.", "full"))
        outcomes.append(StepOutcome.from_response(_response(action, keywords, confidence), observation, "full"))
    return EpisodeOutcome(tuple(outcomes), score, final_answer, ("Anne Hidalgo",))


@pytest.mark.parametrize("q, correct, expected", [
    (0.7, True, 0.91), (0.7, False, -0.49), (1.0, True, 1.0), (0.0, True, 0.0), (0.0, False, 0.0),
    (1.0, False, -1.0), (0.5, True, 0.75), (0.5, False, -0.25),
])
def test_r_calib_is_the_brier_reward(q, correct, expected):
    assert rewards.r_calib(q, correct) == pytest.approx(expected)


@pytest.mark.parametrize("q", [None, math.nan, math.inf, 1.5, -0.1, True, "73"])
def test_r_calib_of_a_missing_or_malformed_confidence_is_the_worst_value(q):
    assert rewards.r_calib(q, True) == 0.0 == rewards.worst_calib(True)
    assert rewards.r_calib(q, False) == -1.0 == rewards.worst_calib(False)
    # The worst over every stated q in [0, 1]: never better to leave the confidence out.
    grid = np.linspace(0, 1, 101)
    for correct in (True, False):
        assert rewards.worst_calib(correct) == pytest.approx(min(rewards.r_calib(q, correct) for q in grid))


def test_r_ground_is_the_share_of_keywords_found():
    future = "Doc 1 (Title: Paris) The mayor of Paris is Anne. Population 120."
    assert rewards.r_ground(["Paris", "mayor", "Berlin"], future) == pytest.approx(2 / 3)
    assert rewards.r_ground(["paris,", "MAYOR"], future) == 1.0  # normalised matching
    assert rewards.r_ground(["12"], future) == 0.0  # word boundaries: "12" is not in "120"
    assert rewards.r_ground(["Paris", "Paris", " Paris ", "Berlin"], future) == 0.5  # a repeat earns nothing
    assert rewards.r_ground([], future) == 0.0  # no keywords: nothing grounded
    assert rewards.r_ground(["", "  "], future) == 0.0


def test_r_ground_beyond_action_refuses_keywords_that_repeat_the_query():
    # A search for "Paris" returns the passage titled Paris: "Paris" is found whatever the block foresaw.
    future = "Doc 1 (Title: Paris) The mayor of Paris is Anne. Population 120."
    query = Action("search", "Paris")
    assert rewards.r_ground(["Paris", "mayor"], future, query) == 1.0  # 'found' (the default) counts it
    assert rewards.r_ground(["Paris", "mayor"], future, query, "beyond_action") == 0.5
    assert rewards.r_ground(["paris!", "Anne"], future, query, "beyond_action") == 0.5  # normalised as the match
    # Word boundaries: "Pari" is in neither the query nor the passage. A keyword that holds the query
    # and more is not a repeat: "Paris mayor" (the passage normalises to "... title paris mayor of ...").
    assert rewards.r_ground(["Pari"], future, query, "beyond_action") == 0.0
    assert rewards.r_ground(["Paris mayor"], future, query, "beyond_action") == 1.0
    assert rewards.r_ground(["mayor of Paris"], future, query, "beyond_action") == 1.0
    assert rewards.r_ground(["Paris"], future, None, "beyond_action") == 1.0  # no action: nothing to repeat
    with pytest.raises(ValueError, match="R_match"):
        rewards.r_ground(["Paris"], future, query, "fuzzy")
    # Episode level: step 1 searches "mayor of Paris" and names "Paris" among its keywords.
    steps = [STEPS[0], (Action("search", "mayor of Paris"), ["Paris", "Anne"], 80, STEPS[1][3]), STEPS[2]]
    np.testing.assert_allclose(rewards.episode_rewards(_episode(steps)).r_ground_T, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(rewards.episode_rewards(_episode(steps), ground_match="beyond_action").r_ground_T,
                               [1.0, 0.5, 0.0])


# FC-RL's R_ground shortcuts, as the policy found them (README, "What FC-RL learned from R_ground"): the answer
# is known after step 1, and the agent searches on instead of answering. Step 2 searches the question's
# relation phrase (found in any passage), step 3 repeats step 1's search (the passage it already read).
DETOUR = [
    (Action("search", "Vezera"), ["Vezera", "mayor"], 100,
     "Doc 1(Title: Vezera) The mayor of Vezera is Repava Tiboza."),
    (Action("search", "the mayor of"), ["the mayor of", "Repava Tiboza"], 100,
     "Doc 1(Title: Butaro) The mayor of Butaro is Lilare Fuloge."),
    (Action("search", "Vezera"), ["Repava Tiboza", "Vezera"], 100,
     "Doc 1(Title: Vezera) The mayor of Vezera is Repava Tiboza."),
    (Action("answer", "Repava Tiboza"), ["Repava Tiboza"], 100, ""),
]


def test_new_evidence_closes_the_shortcuts_that_found_rewards():
    episode = _episode(DETOUR, final_answer="Repava Tiboza")
    # 'found' over tau_{>t}: step 0's "Vezera" and "mayor" are in its own search's passage; step 1's "the mayor of"
    # is in any passage and "Repava Tiboza" in the repeated passage and in the answer action; step 2's keywords are
    # in the answer action; the answer's keyword has nothing after it.
    found = rewards.episode_rewards(episode)
    np.testing.assert_allclose(found.r_ground_T, [1.0, 1.0, 1.0, 0.0])
    # 'new_evidence': no own query (step 0's "Vezera", step 1's "the mayor of", step 2's "Vezera"), no action text
    # (the answer), no passage read before (step 2's is step 0's): only step 0's "mayor" and step 1's
    # "Repava Tiboza"... which only the repeated passage holds, so it is not new evidence either.
    new = rewards.episode_rewards(episode, ground_match="new_evidence")
    np.testing.assert_allclose(new.r_ground_T, [0.5, 0.0, 0.0, 0.0])
    # The final answer's block: 0 by the literal rule, NaN (its step group's mean) by 'group_mean'.
    neutral = rewards.episode_rewards(episode, ground_match="new_evidence", ground_no_future="group_mean")
    np.testing.assert_allclose(neutral.r_ground_T, [0.5, 0.0, 0.0, np.nan])
    # Only the last step, and only an answer: a search cut off by the turn budget keeps its R_ground.
    cut = _episode(DETOUR[:3], score=0.0, final_answer=None)
    assert not np.isnan(rewards.episode_rewards(cut, ground_no_future="group_mean").r_ground_T).any()
    with pytest.raises(ValueError, match="final answer's R_ground"):
        rewards.episode_rewards(episode, ground_no_future="mean")


def test_episode_rewards_by_hand():
    r = rewards.episode_rewards(_episode())
    assert (r.outcome, r.reward, r.correct, r.format_adherence) == (1.0, 1.0, True, 1.0)
    np.testing.assert_allclose(r.r_calib_T, [1 - 0.4 ** 2, 1 - 0.2 ** 2, 1 - 0.1 ** 2])
    # Step 0's future (from its observation on) holds Paris and mayor; step 1's holds Anne, not Lyon;
    # after the answer nothing follows, so its keyword is not grounded by the answer it gave itself.
    np.testing.assert_allclose(r.r_ground_T, [1.0, 0.5, 0.0])
    np.testing.assert_allclose(r.q_T, [0.6, 0.8, 0.9])
    assert r.confidence_ok_T.all() and r.format_ok_T.all()
    # tau_{>t} starting at the action: the answer's own text now grounds its keyword.
    np.testing.assert_allclose(rewards.episode_rewards(_episode(), future_start="action").r_ground_T, [1, 0.5, 1])


def test_outcome_metric_threshold_and_format_penalty():
    partial = _episode(score=0.0, final_answer="Anne")  # the env scored exact match: 0
    assert rewards.outcome_reward(partial) == 0.0
    assert rewards.outcome_reward(partial, "exact_match") == 0.0
    assert rewards.outcome_reward(partial, "f1") == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert rewards.outcome_reward(partial, "substring_match") == 0.0
    assert not rewards.episode_rewards(partial, outcome_metric="f1").correct
    f1_half = rewards.episode_rewards(partial, outcome_metric="f1", correct_threshold=0.5)
    assert f1_half.correct and f1_half.r_calib_T[0] == pytest.approx(0.84)
    no_answer = _episode(score=0.0, final_answer=None)
    assert rewards.outcome_reward(no_answer, "f1") == 0.0
    with pytest.raises(ValueError, match="outcome metric"):
        rewards.outcome_reward(partial, "bleu")
    # One garbage step among four: adherence 3/4; the penalty takes 0.5 * 1/4 off the outcome.
    penalised = rewards.episode_rewards(_episode(garbage_at=1), format_penalty=0.5)
    assert penalised.format_adherence == 0.75 and penalised.reward == pytest.approx(1.0 - 0.125)


@pytest.mark.parametrize("score, worst", [(1.0, 0.0), (0.0, -1.0)])
def test_a_garbage_step_gets_the_documented_worst_rewards(score, worst):
    episode = _episode(score=score, garbage_at=1)
    garbage = episode.steps[1]
    assert garbage == StepOutcome(None, "Your previous response was malformed.", None, (), False)
    r = rewards.episode_rewards(episode)
    assert len(r.r_calib_T) == 4
    assert r.r_calib_T[1] == worst and r.r_ground_T[1] == 0.0
    assert r.q_T[1] == 0.0 and not r.confidence_ok_T[1] and not r.format_ok_T[1]
    assert r.format_adherence == 0.75
    # The steps around it are scored normally; the garbage step's None action reads as "" in tau_{>t}.
    assert r.r_ground_T[0] == 1.0
    # An episode of nothing but garbage (a non-string response too) still scores without error.
    steps = (StepOutcome.from_response(GARBAGE, "x", "full"), StepOutcome.from_response(None, "y", "full"))
    only_garbage = rewards.episode_rewards(EpisodeOutcome(steps, 0.0, None, ("a",)))
    assert only_garbage.format_adherence == 0.0 and list(only_garbage.r_calib_T) == [-1.0, -1.0]
    assert list(only_garbage.r_ground_T) == [0.0, 0.0]


def test_a_missing_confidence_fails_the_format_only_in_the_full_variant():
    state_text = _response(Action("answer", "a"), ["a"], None, variant="state")
    step = StepOutcome.from_response(state_text, "", "state")
    assert step.format_ok and step.confidence_q is None
    assert rewards.step_format_ok(step, "state")
    assert not rewards.step_format_ok(step, "full")
    # A runner that flags the step ok without a confidence is overruled in the full variant.
    lying = StepOutcome(Action("answer", "a"), "", None, ("a",), True)
    assert not rewards.step_format_ok(lying, "full")
    assert rewards.step_format_ok(StepOutcome(Action("answer", "a"), "", 0.5, ("a",), True), "full")
