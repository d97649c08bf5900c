"""Finished episodes of one rollout -> rewards, span advantages, step samples, rl_step mini-batches, metrics.

The link between the episode runner (`fwm.rollout.episodes.run_episodes`, whose `Episode`s record per
step the prompt and response ids, span ids, sampler log-probs, q_t, keywords, action, observation and
format flag) and the FC-RL pieces (`fwm.rl.rewards`, `fwm.rl.advantages`, `fwm.rl.batch`). Episodes of
the same task form an episode group (keyed by task id; a rollout batch holds distinct tasks).
Everything here is host-side NumPy.
"""
from __future__ import annotations

from typing import Callable, Sequence

import ml_collections
import numpy as np

from fwm.rl.advantages import StepAdvantages, span_advantages
from fwm.rl.batch import StepSample, first_fit_rows, rl_batch
from fwm.rl.rewards import EpisodeOutcome, EpisodeRewards, StepOutcome, episode_rewards
from fwm.rollout.episodes import Episode


def episode_outcome(episode: Episode) -> EpisodeOutcome:
    """The reward inputs of a runner's episode (its steps were parsed by the runner; nothing re-parsed)."""
    steps = tuple(StepOutcome(action=step.action, observation=step.observation, confidence_q=step.q,
                              keywords=tuple(step.keywords), format_ok=step.format_ok) for step in episode.steps)
    record = episode.record
    return EpisodeOutcome(steps=steps, score=float(record.score), final_answer=record.final_answer,
                          answers=tuple(record.task.answers))


def rollout_advantages(episodes: Sequence[Episode], rl: ml_collections.ConfigDict
                       ) -> tuple[list[EpisodeRewards], StepAdvantages]:
    """Every episode's rewards and every step's span advantages, with the `rl` config's choices."""
    rewards = [episode_rewards(episode_outcome(e), outcome_metric=rl.outcome_metric,
                               correct_threshold=float(rl.correct_threshold), format_penalty=float(rl.format_penalty),
                               future_start=rl.future_start, variant=rl.variant,
                               ground_match=rl.ground_match, ground_no_future=rl.ground_no_future)
               for e in episodes]
    advantages = span_advantages(rewards, [e.slot.task.id for e in episodes], estimator=rl.advantage,
                                 eps=float(rl.advantage_eps), omega=float(rl.omega), calib=bool(rl.calib_reward),
                                 ground=bool(rl.ground_reward), wm_estimator=rl.wm_advantage)
    return rewards, advantages


def step_samples(episodes: Sequence[Episode], advantages: StepAdvantages) -> list[StepSample]:
    """One StepSample per step, in the order of `advantages` (episodes in order, steps in order).

    The sampler's raw log-probs (temperature 1) are carried as the rollout policy's; a step without
    them (a scripted policy) carries zeros, which the loop replaces by recomputed log-probs.
    """
    samples = []
    for n, (i, t) in enumerate(zip(advantages.episode_index_N, advantages.step_index_N)):
        step = episodes[i].steps[t]
        logprobs = step.logprobs if step.logprobs is not None else [0.0] * len(step.response_ids)
        samples.append(StepSample(prompt_ids=step.prompt_ids, response_ids=step.response_ids,
                                  response_span_ids=step.span_ids, response_logprobs=logprobs,
                                  world_model_advantage=float(advantages.world_model_N[n]),
                                  policy_advantage=float(advantages.policy_N[n])))
    return samples


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_rows(rows: int, multiple: int) -> int:
    """The compiled row count for `rows` rows: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two
    and their 1.5x: at most a third of the rows are padding, a handful of shapes to compile), rounded up
    to `multiple`."""
    bucket = 1
    while bucket < rows:
        power_of_two = bucket & (bucket - 1) == 0
        bucket = bucket + max(1, bucket // 2) if power_of_two else bucket * 4 // 3
    return _round_up(bucket, multiple)


def _same(values: np.ndarray) -> np.ndarray:
    return values


def mini_batches(samples: Sequence[StepSample], num_mini_batches: int, rng: np.random.Generator, *,
                 row_multiple: int, max_seq_len: int, pad_id: int = 0, pack: bool = False,
                 agree: Callable[[np.ndarray], np.ndarray] = _same) -> list[dict[str, np.ndarray]]:
    """The samples shuffled and split into num_mini_batches near-equal mini-batches (fewer if there
    are fewer samples), each an rl_batch (one sample per row, or packed: `pack`).

    Shapes are bucketed to bound recompiles: the length is the next power of two of the longest sample
    (at most max_seq_len), the rows of the fullest mini-batch go to `bucket_rows` and a multiple of
    `row_multiple` (the data-parallel size times optim.micro_batches; extra rows are padding).

    agree: with several processes, each holding its own samples, the elementwise maximum over processes
    (fwm.mesh.process_reduce) of [mini-batches] and then of [length, rows]: every process then returns
    the same number of mini-batches of one shape (a process short of samples pads with empty rows), the
    parts of one global mini-batch each.
    """
    order = rng.permutation(len(samples))
    count = int(agree(np.asarray([min(num_mini_batches, len(samples))]))[0])
    if not count:
        return []
    parts = np.array_split(order, count)  # one process: never an empty part (count <= samples)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    seq_len = min(1 << max(0, max(lengths, default=1) - 1).bit_length(), max_seq_len)
    needed = max(len(first_fit_rows([lengths[k] for k in part], seq_len)) if pack else len(part) for part in parts)
    seq_len, needed = (int(n) for n in agree(np.asarray([seq_len, needed])))
    rows = bucket_rows(needed, row_multiple)
    return [rl_batch([samples[k] for k in part], rows=rows, seq_len=seq_len, pad_id=pad_id, pack=pack)
            for part in parts]


def rollout_metrics(episodes: Sequence[Episode], rewards: Sequence[EpisodeRewards], advantages: StepAdvantages,
                    total: Callable[[np.ndarray], np.ndarray] = _same) -> dict[str, float]:
    """Means over the rollout's episodes (reward, outcome, correct, format adherence, steps, response
    tokens) and steps (R_calib, R_ground, q, usable confidences, span advantages and their spread).

    total: with several processes, the sum over processes (fwm.mesh.process_reduce with np.sum) of a
    (2, metrics) array of this process's sums and counts: the means are then over every process's
    episodes and steps, weighted by their counts (processes' step counts differ)."""
    sums: list[float] = []
    counts: list[float] = []

    def mean(values) -> int:  # records the sum and count; the index of its mean, computed below
        values = np.asarray(list(values), np.float64)
        sums.append(float(values.sum()))
        counts.append(float(values.size))
        return len(sums) - 1

    steps = [step for episode in episodes for step in episode.steps]
    index = {
        "reward": mean(r.reward for r in rewards),
        "outcome": mean(r.outcome for r in rewards),
        "correct": mean(r.correct for r in rewards),
        "format_adherence": mean(r.format_adherence for r in rewards),
        "steps_per_episode": mean(len(e.steps) for e in episodes),
        "response_tokens": mean(len(s.response_ids) for s in steps),
        "truncated_responses": mean(not s.stopped for s in steps),
        "r_calib": mean(np.concatenate([r.r_calib_T for r in rewards]) if rewards else ()),
        # over the steps R_ground is defined for (NaN: a final answer's step, nothing follows it)
        "r_ground": mean(g for r in rewards for g in r.r_ground_T if not np.isnan(g)),
        "q": mean(np.concatenate([r.q_T for r in rewards]) if rewards else ()),
        "confidence_ok": mean(np.concatenate([r.confidence_ok_T for r in rewards]) if rewards else ()),
        "advantage_world_model_abs": mean(np.abs(advantages.world_model_N)),
        "advantage_policy_abs": mean(np.abs(advantages.policy_N)),
    }
    sums_M, counts_M = total(np.asarray([sums, counts], np.float64))
    return {name: float(sums_M[i] / counts_M[i]) if counts_M[i] else 0.0 for name, i in index.items()}
