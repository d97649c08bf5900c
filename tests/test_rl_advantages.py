"""FC-RL advantages on hand-computed cases: the estimators, A_E, A_S, A_WM, the policy advantage, token layout."""
import dataclasses

import numpy as np
import pytest

from fwm.rl import advantages as adv
from fwm.rl.rewards import EpisodeRewards


@pytest.mark.parametrize("estimator, rewards, expected", [
    # mean 0.5; std (ddof 1) = sqrt(1/3) = 0.5773503; 0.5 / 0.5773503 = 0.8660254
    ("grpo", [1, 0, 0, 1], [0.8660254, -0.8660254, -0.8660254, 0.8660254]),
    # mean 2; deviations -1, 1, 0; std (ddof 1) = 1
    ("grpo", [1, 3, 2], [-1.0, 1.0, 0.0]),
    ("dr_grpo", [1, 0, 0, 1], [0.5, -0.5, -0.5, 0.5]),
    ("dr_grpo", [1, 3, 2], [-1.0, 1.0, 0.0]),
    # r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3
    ("rloo", [1, 0, 0, 1], [0.6666667, -0.6666667, -0.6666667, 0.6666667]),
    ("rloo", [3, 1, 2], [1.5, -1.5, 0.0]),
])
def test_estimators_by_hand(estimator, rewards, expected):
    np.testing.assert_allclose(adv.ESTIMATORS[estimator](np.asarray(rewards, float), 0.0), expected, rtol=1e-6)


@pytest.mark.parametrize("estimator", sorted(adv.ESTIMATORS))
def test_singleton_and_all_equal_groups_get_zero(estimator):
    assert adv.ESTIMATORS[estimator](np.asarray([0.7]), 1e-6).tolist() == [0.0]
    assert adv.ESTIMATORS[estimator](np.asarray([0.3, 0.3, 0.3]), 1e-6).tolist() == [0.0, 0.0, 0.0]


def test_grpo_eps_is_added_to_the_std():
    np.testing.assert_allclose(adv.grpo(np.asarray([0.0, 2.0]), 1.0), [-1 / (np.sqrt(2) + 1), 1 / (np.sqrt(2) + 1)])


def test_group_advantages_normalise_within_each_group_only():
    # Two interleaved groups: "a" = [1, 3] (mean 2), "b" = [10, 20, 30] (mean 20), "c" alone.
    values = [1, 10, 3, 20, 30, 5]
    keys = ["a", "b", "a", "b", "b", "c"]
    np.testing.assert_allclose(adv.group_advantages(values, keys, "dr_grpo"), [-1, -10, 1, 0, 10, 0])
    with pytest.raises(ValueError, match="estimator"):
        adv.group_advantages(values, keys, "ppo")


def _rewards(reward, q, calib, ground):
    n = len(q)
    return EpisodeRewards(outcome=reward, reward=reward, correct=reward > 0, format_adherence=1.0,
                          r_calib_T=np.asarray(calib, float), r_ground_T=np.asarray(ground, float),
                          q_T=np.asarray(q, float), confidence_ok_T=np.ones(n, bool), format_ok_T=np.ones(n, bool))


# One task, G = 3 episodes of 2, 1 and 3 steps.
GROUP = [
    _rewards(1.0, q=[0.5, 0.9], calib=[0.75, 0.99], ground=[0.5, 1.0]),
    _rewards(0.0, q=[0.2], calib=[-0.04], ground=[0.0]),
    _rewards(1.0, q=[0.4, 0.6, 1.0], calib=[0.64, 0.84, 1.0], ground=[0.5, 0.0, 0.0]),
]


def test_span_advantages_by_hand():
    out = adv.span_advantages(GROUP, [0, 0, 0], estimator="dr_grpo", omega=0.5)
    assert out.episode_index_N.tolist() == [0, 0, 1, 2, 2, 2]
    assert out.step_index_N.tolist() == [0, 1, 0, 0, 1, 2]
    # A_E: rewards 1, 0, 1, mean 2/3.
    np.testing.assert_allclose(out.episode_N, [1 / 3, 1 / 3, -2 / 3, 1 / 3, 1 / 3, 1 / 3])
    # A_S: step 0 q = 0.5, 0.2, 0.4 (mean 0.36667); step 1 q = 0.9, 0.6 (mean 0.75); step 2 only
    # episode 2 reached it: a singleton step group, 0.
    np.testing.assert_allclose(out.confidence_N, [0.13333333, 0.15, -0.16666667, 0.03333333, -0.15, 0.0],
                               atol=1e-7)
    # Policy: A_E + 0.5 * A_S.
    np.testing.assert_allclose(out.policy_N, [0.4, 0.40833333, -0.75, 0.35, 0.25833333, 0.33333333], atol=1e-7)
    # World model: R_WM = calib + ground; step 0: 1.25, -0.04, 1.14 (mean 0.78333); step 1: 1.99, 0.84.
    np.testing.assert_allclose(out.world_model_N, [0.46666667, 0.575, -0.82333333, 0.35666667, -0.575, 0.0],
                               atol=1e-7)


def test_reward_switches_and_plain_grpo():
    no_calib = adv.span_advantages(GROUP, [0, 0, 0], estimator="dr_grpo", omega=0.5, calib=False)
    # R_WM = R_ground: step 0: 0.5, 0, 0.5 (mean 1/3); step 1: 1.0, 0.0.
    np.testing.assert_allclose(no_calib.world_model_N, [1 / 6, 0.5, -1 / 3, 1 / 6, -0.5, 0.0], atol=1e-7)
    no_ground = adv.span_advantages(GROUP, [0, 0, 0], estimator="dr_grpo", ground=False)
    # R_WM = R_calib: step 0: 0.75, -0.04, 0.64 (mean 0.45); step 1: 0.99, 0.84.
    np.testing.assert_allclose(no_ground.world_model_N, [0.3, 0.075, -0.49, 0.19, -0.075, 0.0], atol=1e-7)
    # omega = 0 with both world-model terms off: every span of every step gets A_E (the paper's "RL").
    plain = adv.span_advantages(GROUP, [0, 0, 0], estimator="grpo", omega=0.0, calib=False, ground=False)
    a_e = adv.grpo(np.asarray([1.0, 0.0, 1.0]), 1e-6)
    np.testing.assert_allclose(plain.policy_N, a_e[plain.episode_index_N])
    np.testing.assert_allclose(plain.world_model_N, a_e[plain.episode_index_N])
    with pytest.raises(ValueError, match="calib or ground"):
        adv.world_model_advantage([0.0], [0.0], [0], [0], "grpo", calib=False, ground=False)


def test_a_final_answer_without_future_takes_its_step_groups_mean_r_ground():
    # Episode 0 answers at step 1 (R_ground NaN: nothing follows); in its step group, episode 2's step 1 has 0.0.
    imputed = adv.ground_with_no_future_imputed([0.5, np.nan, 0.0, np.nan, 1.0, np.nan],
                                                [(0, 0), (0, 1), (0, 0), (0, 1), (0, 1), (0, 2)])
    # step 1: the defined values 1.0 -> both NaNs take 1.0; step 2: none defined -> 0.
    np.testing.assert_allclose(imputed, [0.5, 1.0, 0.0, 1.0, 1.0, 0.0])
    group = [GROUP[0], GROUP[1], GROUP[2]]
    answered = dataclasses.replace(GROUP[0], r_ground_T=np.asarray([0.5, np.nan]))
    out = adv.span_advantages([answered] + group[1:], [0, 0, 0], estimator="dr_grpo", omega=0.5)
    # step 1: R_WM = 0.99 + 0.0 (imputed: episode 2's 0.0) and 0.84 + 0.0 -> +-0.075; step 0 as before.
    np.testing.assert_allclose(out.world_model_N, [0.46666667, 0.075, -0.82333333, 0.35666667, -0.075, 0.0],
                               atol=1e-7)
    # Without R_ground the NaN is not read at all.
    no_ground = adv.span_advantages([answered] + group[1:], [0, 0, 0], estimator="dr_grpo", ground=False)
    assert np.isfinite(no_ground.world_model_N).all()


def test_world_model_span_can_take_its_own_estimator():
    # A_E and A_S by grpo, A_WM by dr_grpo: the world-model advantages are those of the dr_grpo case
    # above (test_span_advantages_by_hand), the policy ones those of plain grpo.
    mixed = adv.span_advantages(GROUP, [0, 0, 0], estimator="grpo", omega=0.5, wm_estimator="dr_grpo")
    np.testing.assert_allclose(mixed.world_model_N, [0.46666667, 0.575, -0.82333333, 0.35666667, -0.575, 0.0],
                               atol=1e-7)
    grpo_only = adv.span_advantages(GROUP, [0, 0, 0], estimator="grpo", omega=0.5)
    np.testing.assert_allclose(mixed.policy_N, grpo_only.policy_N)
    # A_E by grpo: rewards 1, 0, 1 -> (r - 2/3) / std(ddof=1) with std = 0.57735.
    np.testing.assert_allclose(mixed.episode_N[[0, 2]], [0.57735027, -1.15470054], atol=1e-5)  # eps = 1e-6
    assert not np.allclose(grpo_only.world_model_N, mixed.world_model_N)


def test_groups_of_different_tasks_do_not_mix():
    # The same three episodes under two tasks: task 0 holds episodes 0 and 2, task 1 episode 1 alone.
    out = adv.span_advantages(GROUP, [0, 1, 0], estimator="dr_grpo", omega=1.0)
    np.testing.assert_allclose(out.episode_N, [0, 0, 0, 0, 0, 0])  # equal rewards in task 0; task 1 alone
    # Step 0 of task 0: q 0.5, 0.4 -> +-0.05; episode 1's step 0 is alone in its step group.
    np.testing.assert_allclose(out.confidence_N, [0.05, 0.15, 0.0, -0.05, -0.15, 0.0], atol=1e-7)
    empty = adv.span_advantages([], [], estimator="grpo")
    assert empty.policy_N.shape == (0,) and empty.world_model_N.shape == (0,)


def test_token_advantages_choose_by_span_and_zero_untrained_tokens():
    span_ids = np.asarray([[0, 0, 1, 1, 2, 2, 0, 0], [0, 1, 1, 2, 2, 0, 0, 0]])
    weights = np.asarray([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0, 0]])
    out = adv.token_advantages(span_ids, weights, world_model_B=[0.5, 2.0], policy_B=[-1.0, 3.0])
    # Row 0: prompt, two world-model tokens, two policy tokens, the trained end token (policy), padding.
    np.testing.assert_array_equal(out, [[0, 0, 0.5, 0.5, -1, -1, -1, 0], [0, 2, 2, 3, 3, 3, 0, 0]])
    assert out.dtype == np.float32
