"""FC-RL advantages: group estimators by name, A_E, A_S, the world-model and policy span advantages.

Groups (PAPER.md, FC-RL): the *episode group* is the G episodes sampled for one task; the *step
group* of (task, t) is the members of that episode group that reached step t (same prompt, same
step index). Every advantage is an estimator of `ESTIMATORS` (config `rl.advantage`) applied within
a group:
- 'grpo'    A_i = (r_i - mean(r)) / (std(r) + eps)   (std with Bessel's correction, as TRL and verl)
- 'dr_grpo' A_i = r_i - mean(r)                        (Dr. GRPO: no std normalisation)
- 'rloo'    A_i = r_i - mean_{j != i} r_j              (leave-one-out baseline)
A group of one member (a step only one episode reached, or G = 1) has nothing to be compared with:
every estimator gives it advantage 0, explicitly (the formulas would give NaN, 0 and NaN). So does a
group whose members all have the same value, exactly (the formulas leave float rounding residue,
which grpo's division by a near-zero std would blow up to eps-sized noise).

Span advantages per step (episode i, step t), from `fwm.rl.rewards.EpisodeRewards`:
- A_E(i)      = estimator over the episode group of the episode rewards R_E
- A_S(i, t)   = estimator over the step group of the confidences q_t (0 where q_t is missing)
- A_WM(i, t)  = estimator over the step group of R_WM = [calib] R_calib + [ground] R_ground, where the
                R_ground of a final answer's step (NaN: nothing follows it, `rl.ground_no_future`
                'group_mean') is the mean R_ground of its step group's other steps (0 if none has one);
                with both terms switched off the world-model span takes A_E (plain GRPO). Its
                estimator may differ from the others' (`rl.wm_advantage`; PAPER.md only says
                "normalised within the group"): grpo's division by the step group's std turns the small
                R_ground differences of a group whose episodes all failed (R_calib ~ -1 for all when
                q ~ 1) into unit-sized advantages on ~80% of the trained tokens; dr_grpo keeps them
                at their own size.
- A_pol(i, t) = A_E(i) + omega * A_S(i, t)
omega = 0 with both world-model terms off is plain GRPO: every response token gets A_E.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence

import numpy as np

from fwm.rl.rewards import EpisodeRewards
from fwm.schema import SPAN_WM


def _no_contrast(rewards_G: np.ndarray) -> bool:
    """A group of one, or of equal rewards: nothing to prefer, every advantage exactly 0."""
    return rewards_G.size < 2 or bool(np.all(rewards_G == rewards_G[0]))


def grpo(rewards_G: np.ndarray, eps: float) -> np.ndarray:
    """(r - mean) / (std + eps), std with ddof=1; 0 for a singleton or all-equal group."""
    rewards_G = np.asarray(rewards_G, np.float64)
    if _no_contrast(rewards_G):
        return np.zeros_like(rewards_G)
    return (rewards_G - rewards_G.mean()) / (rewards_G.std(ddof=1) + eps)


def dr_grpo(rewards_G: np.ndarray, eps: float) -> np.ndarray:
    """r - mean (eps unused); 0 for a singleton or all-equal group."""
    del eps
    rewards_G = np.asarray(rewards_G, np.float64)
    if _no_contrast(rewards_G):
        return np.zeros_like(rewards_G)
    return rewards_G - rewards_G.mean()


def rloo(rewards_G: np.ndarray, eps: float) -> np.ndarray:
    """r_i - mean of the other members = G / (G - 1) * (r_i - mean) (eps unused); 0 for a singleton or
    all-equal group."""
    del eps
    rewards_G = np.asarray(rewards_G, np.float64)
    if _no_contrast(rewards_G):
        return np.zeros_like(rewards_G)
    return rewards_G - (rewards_G.sum() - rewards_G) / (rewards_G.size - 1)


ESTIMATORS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"grpo": grpo, "dr_grpo": dr_grpo,
                                                                    "rloo": rloo}


def _group_rows(group_keys_N: Sequence[Hashable]) -> list[list[int]]:
    """The indices of each group of equal keys, groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(group_keys_N):
        members.setdefault(key, []).append(i)
    return list(members.values())


def group_advantages(values_N: Sequence[float], group_keys_N: Sequence[Hashable], estimator: str,
                     eps: float = 1e-6) -> np.ndarray:
    """advantages_N: the estimator applied to `values_N` within each group of equal keys."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}")
    values_N = np.asarray(values_N, np.float64)
    if len(group_keys_N) != values_N.shape[0]:
        raise ValueError(f"{values_N.shape[0]} values but {len(group_keys_N)} group keys")
    advantages_N = np.zeros_like(values_N)
    for rows in _group_rows(group_keys_N):
        advantages_N[rows] = ESTIMATORS[estimator](values_N[rows], eps)
    return advantages_N


def episode_advantage(episode_rewards_E: Sequence[float], group_ids_E: Sequence[Hashable], estimator: str,
                      eps: float = 1e-6) -> np.ndarray:
    """A_E(i) = estimator(R_E) over episode i's episode group (episodes with the same group id)."""
    return group_advantages(episode_rewards_E, list(group_ids_E), estimator, eps)


def step_confidence_advantage(q_N: Sequence[float], group_ids_N: Sequence[Hashable], step_index_N: Sequence[int],
                              estimator: str, eps: float = 1e-6) -> np.ndarray:
    """A_S(i, t) = estimator(q_t) over the step group (same group id, same step index t)."""
    return group_advantages(q_N, list(zip(group_ids_N, step_index_N)), estimator, eps)


def ground_with_no_future_imputed(r_ground_N: Sequence[float], group_keys_N: Sequence[Hashable]) -> np.ndarray:
    """R_ground with every NaN (a final answer's step, `fwm.rl.rewards.episode_rewards`) replaced by the mean of
    the defined values of its group (0 where the group has none): a step with nothing after it to ground in
    is neither preferred to nor preferred over the steps it is compared with."""
    r_ground_N = np.asarray(r_ground_N, np.float64).copy()
    missing_N = np.isnan(r_ground_N)
    if not missing_N.any():
        return r_ground_N
    for rows in _group_rows(group_keys_N):
        defined = [r_ground_N[i] for i in rows if not missing_N[i]]
        fill = float(np.mean(defined)) if defined else 0.0
        r_ground_N[[i for i in rows if missing_N[i]]] = fill
    return r_ground_N


def world_model_advantage(r_calib_N: Sequence[float], r_ground_N: Sequence[float], group_ids_N: Sequence[Hashable],
                          step_index_N: Sequence[int], estimator: str, eps: float = 1e-6, *, calib: bool = True,
                          ground: bool = True) -> np.ndarray:
    """A_WM(i, t) = estimator(R_WM) over the step group, R_WM = [calib] R_calib + [ground] R_ground.

    NaN R_ground (nothing follows the step) takes its step group's mean (`ground_with_no_future_imputed`).
    Needs at least one term on (with both off the world-model span takes A_E; see `span_advantages`).
    """
    if not (calib or ground):
        raise ValueError("world_model_advantage needs calib or ground on; with both off the span takes A_E")
    keys = list(zip(group_ids_N, step_index_N))
    r_wm_N = np.asarray(r_calib_N, np.float64) * calib
    if ground:
        r_wm_N = r_wm_N + ground_with_no_future_imputed(r_ground_N, keys)
    return group_advantages(r_wm_N, keys, estimator, eps)


def policy_advantage(a_e_N: np.ndarray, a_s_N: np.ndarray, omega: float) -> np.ndarray:
    """A_pol(i, t) = A_E(i) + omega * A_S(i, t) (A_E repeated over the episode's steps)."""
    return np.asarray(a_e_N, np.float64) + omega * np.asarray(a_s_N, np.float64)


@dataclasses.dataclass(frozen=True)
class StepAdvantages:
    """Per step sample n of a rollout batch (episodes in order, steps in order within each):
    episode_index_N / step_index_N locate it; world_model_N / policy_N are the advantages of its two
    spans; episode_N (A_E), confidence_N (A_S) and the rewards are kept for metrics."""

    episode_index_N: np.ndarray
    step_index_N: np.ndarray
    world_model_N: np.ndarray
    policy_N: np.ndarray
    episode_N: np.ndarray
    confidence_N: np.ndarray


def span_advantages(rewards: Sequence[EpisodeRewards], group_ids_E: Sequence[Hashable], *, estimator: str = "grpo",
                    eps: float = 1e-6, omega: float = 0.0, calib: bool = True, ground: bool = True,
                    wm_estimator: str = "") -> StepAdvantages:
    """Both span advantages of every step of a rollout batch (module docstring).

    rewards[i] belongs to episode i of the episode group group_ids_E[i] (e.g. its task id); the config
    keys are rl.advantage, rl.advantage_eps, rl.omega, rl.calib_reward, rl.ground_reward and
    rl.wm_advantage (A_WM's estimator; '' = `estimator`).
    """
    if len(rewards) != len(group_ids_E):
        raise ValueError(f"{len(rewards)} episodes but {len(group_ids_E)} group ids")
    a_e_E = episode_advantage([r.reward for r in rewards], group_ids_E, estimator, eps)
    lengths_E = np.asarray([len(r.q_T) for r in rewards], np.int64)
    episode_index_N = np.repeat(np.arange(len(rewards)), lengths_E)
    step_index_N = np.concatenate([np.arange(n) for n in lengths_E]) if len(rewards) else np.zeros(0, np.int64)
    group_N = np.asarray(group_ids_E)[episode_index_N] if len(rewards) else np.zeros(0, np.int64)

    def steps(field: str) -> np.ndarray:
        return np.concatenate([getattr(r, field) for r in rewards]) if rewards else np.zeros(0)

    a_e_N = a_e_E[episode_index_N]
    a_s_N = step_confidence_advantage(steps("q_T"), group_N, step_index_N, estimator, eps)
    if calib or ground:
        a_wm_N = world_model_advantage(steps("r_calib_T"), steps("r_ground_T"), group_N, step_index_N,
                                       wm_estimator or estimator, eps, calib=calib, ground=ground)
    else:
        a_wm_N = a_e_N
    return StepAdvantages(episode_index_N=episode_index_N, step_index_N=step_index_N, world_model_N=a_wm_N,
                          policy_N=policy_advantage(a_e_N, a_s_N, omega), episode_N=a_e_N, confidence_N=a_s_N)


def token_advantages(span_ids_BxL: np.ndarray, loss_weights_BxL: np.ndarray, world_model_B: np.ndarray,
                     policy_B: np.ndarray) -> np.ndarray:
    """advantages_BxL (float32) of a batch of one step sample per row, chosen by span id.

    World-model span tokens (SPAN_WM) take their row's world-model advantage; every other trained
    token takes the policy advantage: the policy span (span 2) and any response token outside both
    spans (stray text of a malformed response, the end-of-sequence token), so that a response
    without tags is judged as the action it failed to be. Untrained tokens (weight 0: prompt, history,
    observations, padding) get 0.
    """
    span_ids_BxL = np.asarray(span_ids_BxL)
    chosen_BxL = np.where(span_ids_BxL == SPAN_WM, np.asarray(world_model_B, np.float64)[:, None],
                          np.asarray(policy_B, np.float64)[:, None])
    return np.where(np.asarray(loss_weights_BxL) > 0, chosen_BxL, 0.0).astype(np.float32)
