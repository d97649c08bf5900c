"""Runner episodes -> rewards, advantages, step samples and mini-batches (hand-made episodes, no model)."""
import numpy as np
import pytest

from fwm import config as config_lib
from fwm import schema
from fwm.envs.base import EpisodeRecord, Task
from fwm.rl import rollout_data
from fwm.rollout.episodes import Episode, EpisodeSlot, StepRecord
from fwm.schema import Action


def _step(q, keywords, action, observation, num_response=3, ok=True):
    return StepRecord(prompt_ids=[1, 4, 5], response_ids=list(range(10, 10 + num_response)), response_text="",
                      span_ids=[schema.SPAN_WM] + [schema.SPAN_POLICY] * (num_response - 1),
                      logprobs=[-0.5] * num_response, sampling_logprobs=None, stopped=True, q=q,
                      keywords=list(keywords), action=action, observation=observation, observation_kind="search",
                      format_ok=ok, malformed=[], prompt_truncated=False)


def _episode(task, sample, steps, score, answer):
    record = EpisodeRecord(task=task, actions=[s.action for s in steps], observations=[s.observation for s in steps],
                           final_answer=answer, score=score, num_turns=len(steps), done=True, reason="answer")
    return Episode(EpisodeSlot(task, sample, seed=sample), steps, record)


TASK_A = Task("a", "Where is X?", ("Paris",))
TASK_B = Task("b", "Who is Y?", ("Anne",))
EPISODES = [
    _episode(TASK_A, 0, [_step(0.8, ["Paris"], Action("search", "X"), "X is in Paris."),
                         _step(0.9, ["Paris"], Action("answer", "Paris"), "")], 1.0, "Paris"),
    _episode(TASK_A, 1, [_step(0.6, ["Lyon"], Action("answer", "Lyon"), "")], 0.0, "Lyon"),
    _episode(TASK_B, 0, [_step(None, [], None, "malformed", ok=False),
                         _step(0.5, ["Anne"], Action("answer", "Anne"), "")], 1.0, "Anne"),
    _episode(TASK_B, 1, [_step(0.5, ["Anne"], Action("answer", "Anne"), "", num_response=5)], 1.0, "Anne"),
]


def _rl(**overrides):
    config = config_lib.default_config()
    config.rl.update(dict(advantage="dr_grpo", omega=0.5, **overrides))
    return config_lib.validate(config).rl


def test_rewards_and_advantages_group_by_task():
    rewards, adv = rollout_data.rollout_advantages(EPISODES, _rl())
    assert [r.outcome for r in rewards] == [1.0, 0.0, 1.0, 1.0]
    np.testing.assert_allclose(rewards[0].r_calib_T, [1 - 0.2 ** 2, 1 - 0.1 ** 2])
    # Paris is observed after step 0; nothing follows the answer (NaN: its step group's mean stands in)
    np.testing.assert_allclose(rewards[0].r_ground_T, [1.0, np.nan])
    assert rewards[2].r_calib_T[0] == 0.0 and rewards[2].format_adherence == 0.5  # the garbage step
    # Task a: rewards 1, 0 -> A_E +-0.5; task b: 1, 1 -> 0 (not mixed with task a's mean 0.5).
    np.testing.assert_allclose(adv.episode_N, [0.5, 0.5, -0.5, 0, 0, 0])
    # Step 0 of task a: q 0.8, 0.6 -> A_S +-0.1; step 1 of task a: alone -> 0; task b step 0: q 0 (missing)
    # and 0.5 -> -+0.25; policy = A_E + 0.5 A_S.
    np.testing.assert_allclose(adv.confidence_N, [0.1, 0.0, -0.1, -0.25, 0.0, 0.25])
    np.testing.assert_allclose(adv.policy_N, [0.55, 0.5, -0.55, -0.125, 0.0, 0.125])
    # World model, task b step 0: R_WM = 0 + 0 (garbage) vs 0.75 + 0 (nothing follows the answer: the group's
    # mean R_ground over steps that have a future, the garbage step's 0) -> -+0.375.
    np.testing.assert_allclose(adv.world_model_N[[3, 5]], [-0.375, 0.375])


def test_step_samples_and_mini_batches_cover_every_step_once():
    _, adv = rollout_data.rollout_advantages(EPISODES, _rl())
    samples = rollout_data.step_samples(EPISODES, adv)
    assert len(samples) == 6 and samples[5].response_ids == [10, 11, 12, 13, 14]
    assert samples[0].world_model_advantage == pytest.approx(adv.world_model_N[0])
    assert samples[0].policy_advantage == pytest.approx(0.55)
    batches = rollout_data.mini_batches(samples, 2, np.random.default_rng(0), row_multiple=4, max_seq_len=64)
    assert len(batches) == 2
    for batch in batches:
        assert batch["tokens_BxL"].shape == (4, 8)  # 3 samples -> 4 rows; 3 + 5 tokens -> length 8
    weights = sum(batch["loss_weights_BxL"].sum() for batch in batches)
    assert weights == sum(len(s.response_ids) for s in samples)
    # The advantages travel with their tokens: the total over trained tokens is preserved.
    total = sum(batch["advantages_BxL"].sum() for batch in batches)
    expected = sum(s.world_model_advantage + s.policy_advantage * (len(s.response_ids) - 1) for s in samples)
    assert total == pytest.approx(expected, abs=1e-5)
    assert rollout_data.mini_batches([], 2, np.random.default_rng(0), row_multiple=4, max_seq_len=64) == []
    # packed: the 3 samples of a mini-batch (8, 7 or 6 tokens) share rows of 8 -> 2 or 3 rows, bucketed to 3
    packed = rollout_data.mini_batches(samples, 2, np.random.default_rng(0), row_multiple=1, max_seq_len=64, pack=True)
    assert all(batch["tokens_BxL"].shape[1] == 8 for batch in packed)
    assert sum(batch["loss_weights_BxL"].sum() for batch in packed) == weights
    assert sum(batch["advantages_BxL"].sum() for batch in packed) == pytest.approx(expected, abs=1e-5)
    assert sum(len(np.unique(b["segment_ids_BxL"][b["segment_ids_BxL"] > 0])) for b in packed) >= 2


def test_row_buckets_waste_at_most_a_third():
    assert [rollout_data.bucket_rows(n, 1) for n in range(1, 18)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16,
                                                                      16, 16, 24]
    assert [rollout_data.bucket_rows(n, 4) for n in (1, 5, 9, 17, 33)] == [4, 8, 12, 24, 48]
    for n in range(1, 300):
        assert n <= rollout_data.bucket_rows(n, 1) <= max(n + 1, 1.5 * n)


def test_rollout_metrics():
    rewards, adv = rollout_data.rollout_advantages(EPISODES, _rl())
    metrics = rollout_data.rollout_metrics(EPISODES, rewards, adv)
    assert metrics["outcome"] == 0.75 and metrics["correct"] == 0.75
    assert metrics["steps_per_episode"] == 1.5 and metrics["format_adherence"] == pytest.approx(0.875)
    assert metrics["confidence_ok"] == pytest.approx(5 / 6)
    # R_ground over the 2 steps it is defined for (4 of the 6 end an episode with its answer): 1 and 0.
    assert metrics["r_ground"] == pytest.approx(0.5)
    zero_rule = rollout_data.rollout_advantages(EPISODES, _rl(ground_no_future="zero"))
    assert rollout_data.rollout_metrics(EPISODES, *zero_rule)["r_ground"] == pytest.approx(1 / 6)
