"""FC-RL rewards of one episode: outcome, format adherence, and per step R_calib and R_ground.

Inputs are plain Python, filled from the episode runner's records (`fwm.rl.rollout_data.episode_outcome`
from a `fwm.rollout.episodes.Episode`; `StepOutcome.from_response` from a response text): per step the
action, observation, parsed confidence, keywords and format flag, per episode the env's recorded
score, the final answer and the gold answers. Model output is input: a step without an action,
confidence or keywords is scored, never an error.

Per episode (PAPER.md, FC-RL; the choices the paper leaves open are config keys of `rl`):
- outcome reward (`rl.outcome_metric`): 'score' takes the score the env recorded (exact match or F1
  for search as the env was built, math-verify for math; 0 when the turn budget ran out), or
  'exact_match' / 'f1' / 'substring_match' recompute it from the final answer with
  `fwm.envs.scoring` (0 without a final answer).
- correctness I (for R_calib): 1 iff the outcome reward >= `rl.correct_threshold` (default 1.0: an
  exact match, a correct math answer, or a perfect F1; the same rule as `trajectories.collect.succeeded`).
- format adherence: the share of steps whose response passes `schema.format_ok` for the variant.
- episode reward R_E = outcome - `rl.format_penalty` * (1 - format adherence); the penalty defaults to
  0 (the paper's reward is the outcome alone, as far as it is known).

Per step t: `r_calib` (Brier reward of q_t) and `r_ground` (share of the keywords of z_t found in what
follows a_t, `fwm.trajectories.future`). A step whose action is the episode's final answer has nothing after
it to ground in: `rl.ground_no_future` decides its R_ground ('zero': 0, the literal reading, which makes every
answer's block lose to any search's block of its step group; 'group_mean': NaN here, the mean of its step
group's grounded steps in `fwm.rl.advantages.world_model_advantage`, so answering is neutral to R_ground).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from fwm import schema
from fwm.envs.scoring import QA_METRICS
from fwm.schema import Action
from fwm.trajectories.future import ground_text, keyword_grounded

# 'score': the env's recorded score; the others recompute it from the final answer.
OUTCOME_METRICS = ("score",) + tuple(sorted(QA_METRICS))
# R_ground of the final answer's step (rl.ground_no_future; module docstring).
NO_FUTURE_RULES = ("zero", "group_mean")


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """One step as the runner recorded it.

    action: the parsed action the env received (None: no valid action in the response);
    observation: the raw observation the env returned for it ("" after the final answer);
    confidence_q: parsed q in [0, 1] (None: missing or malformed <confidence>);
    keywords: the <keyword> entries of the block (empty: none written);
    format_ok: `schema.format_ok` of the response for the run's variant.
    """

    action: Action | None
    observation: str
    confidence_q: float | None
    keywords: tuple[str, ...]
    format_ok: bool

    @classmethod
    def from_response(cls, response: str, observation: str, variant: str) -> "StepOutcome":
        """Parses one response (never raises on any string) and pairs it with its observation."""
        parsed = schema.parse_response(response)
        return cls(action=parsed.action, observation=observation, confidence_q=parsed.confidence_q,
                   keywords=tuple(parsed.keywords), format_ok=schema.format_ok(parsed, variant))


@dataclasses.dataclass(frozen=True)
class EpisodeOutcome:
    """One finished episode: its steps, the env's recorded score, final answer and gold answers."""

    steps: tuple[StepOutcome, ...]
    score: float
    final_answer: str | None
    answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EpisodeRewards:
    """Every reward of one episode. Per-step arrays have one entry per step (T = len(episode.steps)).

    r_ground_T: NaN at the final answer's step under ground_no_future='group_mean' (nothing follows it);
    q_T: the confidence each step stated, 0.0 where it is missing or malformed (the lowest
    confidence; `confidence_ok_T` says which); format_ok_T: per-step format adherence (a missing
    confidence counts as a format failure in the full variant).
    """

    outcome: float
    reward: float
    correct: bool
    format_adherence: float
    r_calib_T: np.ndarray
    r_ground_T: np.ndarray
    q_T: np.ndarray
    confidence_ok_T: np.ndarray
    format_ok_T: np.ndarray


def outcome_reward(episode: EpisodeOutcome, metric: str = "score") -> float:
    """The task reward: the env's recorded score ('score'), or a QA metric of the final answer (0 if none)."""
    if metric == "score":
        return float(episode.score)
    if metric not in QA_METRICS:
        raise ValueError(f"unknown outcome metric {metric!r}; expected one of {OUTCOME_METRICS}")
    if episode.final_answer is None:
        return 0.0
    return float(QA_METRICS[metric](episode.final_answer, episode.answers))


def valid_confidence(q: float | None) -> bool:
    """Whether q is a usable confidence: a finite number in [0, 1]."""
    return isinstance(q, (int, float, np.floating, np.integer)) and not isinstance(q, bool) \
        and math.isfinite(q) and 0.0 <= q <= 1.0


def worst_calib(correct: bool) -> float:
    """The lowest R_calib over q in [0, 1] for outcome I: 0 when I = 1 (at q = 0), -1 when I = 0 (at q = 1).

    The score of a step whose confidence is missing or malformed: as bad as the most wrong
    confidence the model could have stated, so that leaving the confidence out never pays.
    """
    return 0.0 if correct else -1.0


def r_calib(q: float | None, correct: bool) -> float:
    """R_calib(i, t) = I - (q_t - I)^2 (the Brier reward of RLCR), I = 1 if the episode ends correct.

    q in [0, 1]: R in [0, 1] when I = 1 and in [-1, 0] when I = 0. A missing or malformed q (None,
    NaN, outside [0, 1]) scores `worst_calib(correct)` (and is a format failure, see step_rewards).
    """
    indicator = 1.0 if correct else 0.0
    if not valid_confidence(q):
        return worst_calib(correct)
    return indicator - (float(q) - indicator) ** 2


def r_ground(keywords: Sequence[str], future_text: str, own_action: Action | None = None,
             match: str = "found") -> float:
    """R_ground(i, t) = |{k in K_t : R_match(k, tau_{>t})}| / |K_t|, the share of keywords found.

    K_t is the step's keyword list with repeats removed (by exact text after stripping, so that
    writing a found keyword twice earns nothing more); empty entries are dropped. R_match is
    `fwm.trajectories.future.keyword_grounded` (`rl.ground_match`): 'found' = normalised, word-boundary
    match in tau_{>t}; 'beyond_action' also refuses a keyword that occurs in a_t's own argument
    (`own_action`), which its search results would echo; 'new_evidence' is 'beyond_action' over only
    the observations the episode had not returned before (`future_text` = `future.ground_text`). A step with
    no keywords gets 0: no foresight stated, nothing grounded.
    """
    unique = list(dict.fromkeys(k.strip() for k in keywords if k and k.strip()))
    if not unique:
        return 0.0
    return sum(keyword_grounded(k, future_text, own_action, match) for k in unique) / len(unique)


def step_format_ok(step: StepOutcome, variant: str) -> bool:
    """Format adherence of one step: `schema.format_ok` held and, in the full variant, a usable confidence
    (a missing or malformed confidence is a format failure even if the runner's flag says otherwise)."""
    return bool(step.format_ok) and (variant != schema.FULL or valid_confidence(step.confidence_q))


def format_adherence(episode: EpisodeOutcome, variant: str) -> float:
    """The share of the episode's steps that pass `step_format_ok` (0 for an episode without steps)."""
    if not episode.steps:
        return 0.0
    return sum(step_format_ok(step, variant) for step in episode.steps) / len(episode.steps)


def ends_with_answer(episode: EpisodeOutcome, step: int) -> bool:
    """Whether `step` is the episode's last step and its action the final answer (nothing follows it)."""
    action = episode.steps[step].action
    return step == len(episode.steps) - 1 and action is not None and action.kind == schema.ANSWER


def episode_rewards(episode: EpisodeOutcome, *, outcome_metric: str = "score", correct_threshold: float = 1.0,
                    format_penalty: float = 0.0, future_start: str = "observation",
                    variant: str = schema.FULL, ground_match: str = "found",
                    ground_no_future: str = "zero") -> EpisodeRewards:
    """All rewards of one episode (module docstring); `future_start` is where tau_{>t} begins,
    `ground_match` R_ground's R_match (`r_ground`), `ground_no_future` the final answer's R_ground
    (`NO_FUTURE_RULES`). The defaults are the paper's literal reading; `fwm.config`'s are our choice."""
    if ground_no_future not in NO_FUTURE_RULES:
        raise ValueError(f"unknown rule {ground_no_future!r} for the final answer's R_ground; "
                         f"expected one of {NO_FUTURE_RULES}")
    outcome = outcome_reward(episode, outcome_metric)
    correct = outcome >= correct_threshold
    actions = [step.action for step in episode.steps]
    observations = [step.observation for step in episode.steps]
    confidence_ok = [valid_confidence(step.confidence_q) for step in episode.steps]
    adherence = format_adherence(episode, variant)
    r_ground_T = [math.nan if ground_no_future == "group_mean" and ends_with_answer(episode, t) else
                  r_ground(step.keywords, ground_text(actions, observations, t, future_start, ground_match),
                           step.action, ground_match) for t, step in enumerate(episode.steps)]
    return EpisodeRewards(
        outcome=outcome,
        reward=outcome - format_penalty * (1.0 - adherence),
        correct=bool(correct),
        format_adherence=adherence,
        r_calib_T=np.asarray([r_calib(step.confidence_q, correct) for step in episode.steps], np.float64),
        r_ground_T=np.asarray(r_ground_T, np.float64),
        q_T=np.asarray([float(step.confidence_q) if ok else 0.0 for step, ok in zip(episode.steps, confidence_ok)],
                       np.float64),
        confidence_ok_T=np.asarray(confidence_ok, bool),
        format_ok_T=np.asarray([step_format_ok(step, variant) for step in episode.steps], bool),
    )
