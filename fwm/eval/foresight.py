"""The world-model block against what really happened, and q used at test time: pure functions of finished
episodes (fwm.rollout.episodes.Episode). Every step's text comes from its StepRecord (action, observation,
keywords, q, response_text for the roadmap); a malformed step (no q, no keywords, no action) is scored.

- Calibration of q (`q_calibration`): two populations, both against the episode's success y (score 1):
  "steps": every step's q_t, pooled over the steps of all episodes (each step of an episode gets the
  episode's y; the quantity FC-RL's R_calib trains); "last_step": the q of each episode's last step (the
  confidence that comes with the final action, before an answer the answer's own estimate). Steps without
  a parsed <confidence> are counted (`missing`, `missing_share`) and left out; so is an episode whose last
  step has no q. ECE (10 equal-width bins), Brier score and AUROC from fwm.calibration.
- Keyword grounding (`keyword_grounding`): the share of all predicted keywords, pooled over steps, that
  occur in what follows their step, tau_{>t} = fwm.trajectories.future.what_follows (from observation_t:
  observation_t, a_{t+1}, observation_{t+1}, ...) under keyword_found -- R_ground's match.
- Foresight precision (`foresight`): the share of predicted keywords that occur in the *revealed* future,
  the observations of tau_{>t} only (what_follows with the agent's actions left out): what the environment
  confirms, not what the agent itself goes on to type. At most the grounding rate.
- Foresight recall (`foresight`, tasks with gold metadata only): the gold items of the synthetic worlds --
  the knowledge chain's entities after the question's subject (hop objects), the arithmetic steps' values
  -- that tau_{>t} newly reveals: the item's name occurs in the revealed future (observations from t on)
  and nowhere in what the agent saw before step t (the question, earlier actions and observations). Recall
  = the share of (step, newly revealed item) pairs where the step's roadmap or keywords name the item: its
  name or its chain placeholder as the blocks write it ('[person B]', '[result of step 2]';
  fwm.trajectories.blocks), found with keyword_found. Tasks without such metadata are counted and skipped.
- Planning horizon (`planning_horizon`): offset h >= 0 from step t; the text of offset 0 is observation_t
  (a_t's own result, never a_t itself), of offset h >= 1 the action and observation of step t+h only (not
  cumulative). rate(h) = the share of (step t, keyword of t) pairs, over the steps t with keywords for
  which step t+h exists, whose keyword is found in the text of offset h. The horizon is the largest h such
  that rate(h') >= 1/2 for every h' <= h -- how far ahead the keywords *stay* right (None when rate(0) < 1/2).
  The literal "largest h with rate(h) >= 1/2" is reported beside it (`largest_offset_at_half`): far offsets
  rest on few long episodes and their rates are noisy (rule-written blocks on noisy synthetic episodes:
  horizon 1, but rate(7) = 1/2 over 20 pairs). Every rate is reported with its number of pairs.
- q at test time: `selected_at_k` (best-of-k by the last step's q) and `risk_coverage` (answer only when
  the last step's q reaches a threshold).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fwm.calibration import auroc, brier_score, expected_calibration_error, reliability_bins
from fwm.rollout.episodes import Episode
from fwm.schema import parse_response
from fwm.trajectories.blocks import arithmetic_placeholder, knowledge_placeholder
from fwm.trajectories.future import action_text, keyword_found, what_follows
from fwm.trajectories.spoilers import StepContext

FUTURE_START = "observation"  # tau_{>t} from the observation of a_t on: the blocks' default grounding
HALF = 0.5  # the planning horizon's bar: found at least half the time
RISK_COVERAGE_THRESHOLDS = tuple(i / 10 for i in range(11))  # q thresholds 0, 0.1, ..., 1


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


# ----------------------------------------------------------------------------------------- texts of an episode
def step_context(episode: Episode, step: int) -> StepContext:
    """The step as the block writers see it (fwm.trajectories.spoilers.StepContext): visible_text() is what the
    agent had seen (the question, earlier actions and observations), future_text("observation") is tau_{>t}."""
    return StepContext(task=episode.slot.task, step=step, actions=tuple(s.action for s in episode.steps),
                       observations=tuple(s.observation for s in episode.steps), score=episode.record.score)


def revealed_future(episode: Episode, step: int) -> str:
    """The observations of tau_{>t} only (observation_t, observation_{t+1}, ...): what_follows with the
    agent's own actions left out (an absent action reads as '')."""
    return what_follows([None] * len(episode.steps), [s.observation for s in episode.steps], step)


def offset_text(episode: Episode, step: int, offset: int) -> str:
    """Offset 0: observation_t; offset h >= 1: the action and observation of step t+h (planning horizon)."""
    if offset == 0:
        return episode.steps[step].observation
    later = episode.steps[step + offset]
    return action_text(later.action) + "\n" + later.observation


def roadmap_and_keywords(episode: Episode, step: int) -> str:
    """The roadmap ('' without one) and the keywords of a step, where recall looks for named items."""
    roadmap = parse_response(episode.steps[step].response_text).roadmap or ""
    return "\n".join([roadmap, *episode.steps[step].keywords])


# ---------------------------------------------------------------------------------------------- calibration
def step_confidences(episodes: Sequence[Episode]) -> tuple[list[float], list[bool], int]:
    """(q_t, episode success) for every step with a q, pooled over episodes; and the steps without one."""
    pairs = [(step.q, e.success) for e in episodes for step in e.steps if step.q is not None]
    missing = sum(step.q is None for e in episodes for step in e.steps)
    return [q for q, _ in pairs], [y for _, y in pairs], missing


def last_step_confidences(episodes: Sequence[Episode]) -> tuple[list[float], list[bool], int]:
    """(q of the last step, success) per episode whose last step has a q; and the episodes without one."""
    last = [(e.steps[-1].q if e.steps else None, e.success) for e in episodes]
    return [q for q, _ in last if q is not None], [y for q, y in last if q is not None], sum(q is None for q, _ in last)


def calibration(confidences: Sequence[float], outcomes: Sequence[bool], missing: int) -> dict[str, Any]:
    """{count, missing, missing_share, mean_q, success, ece, brier, auroc, reliability} of (q, y) pairs;
    the scores are None without pairs (auroc also when every y is the same)."""
    count = len(confidences)
    out: dict[str, Any] = {"count": count, "missing": missing, "missing_share": _share(missing, count + missing)}
    if not count:
        return {**out, "mean_q": None, "success": None, "ece": None, "brier": None, "auroc": None, "reliability": []}
    return {**out, "mean_q": float(np.mean(confidences)), "success": float(np.mean(outcomes)),
            "ece": expected_calibration_error(confidences, outcomes), "brier": brier_score(confidences, outcomes),
            "auroc": auroc(confidences, outcomes), "reliability": reliability_bins(confidences, outcomes)}


def q_calibration(episodes: Sequence[Episode]) -> dict[str, dict[str, Any]]:
    """{"steps": calibration of every step's q_t, "last_step": of each episode's last q} (module docstring)."""
    return {"steps": calibration(*step_confidences(episodes)),
            "last_step": calibration(*last_step_confidences(episodes))}


# ------------------------------------------------------------------------------------ grounding and foresight
def keywords_grounded(episode: Episode, step: int) -> list[bool]:
    """Per keyword of the step: found in tau_{>t} (what_follows from the observation of a_t on)."""
    future = step_context(episode, step).future_text(FUTURE_START)
    return [keyword_found(k, future) for k in episode.steps[step].keywords]


def keywords_confirmed(episode: Episode, step: int) -> list[bool]:
    """Per keyword of the step: found in the revealed future (revealed_future: observations only)."""
    future = revealed_future(episode, step)
    return [keyword_found(k, future) for k in episode.steps[step].keywords]


def keyword_grounding(episodes: Sequence[Episode]) -> dict[str, Any]:
    """{"rate": found keywords / keywords (pooled; None without any), "keywords", "steps_with_keywords":
    share of steps with at least one keyword}."""
    found = [ok for e in episodes for t in range(len(e.steps)) for ok in keywords_grounded(e, t)]
    steps = [bool(step.keywords) for e in episodes for step in e.steps]
    return {"rate": _share(sum(found), len(found)), "keywords": len(found),
            "steps_with_keywords": _share(sum(steps), len(steps))}


def gold_items(episode: Episode) -> list[tuple[str, str]] | None:
    """(name, placeholder) of each gold item of a synthetic task: the knowledge chain's entities after the
    question's subject ('[person B]', ...), the arithmetic steps' values ('[result of step 1]', ...); None
    for a task without that metadata. The names are spoilers.gold_chain_terms without the answers (the
    last item); the placeholders need the metadata's ids and positions, hence this reading of it."""
    metadata = episode.slot.task.metadata if isinstance(episode.slot.task.metadata, Mapping) else {}
    hops, steps = metadata.get("hops"), metadata.get("steps")
    if isinstance(hops, list) and hops:
        return [(hop["object"], knowledge_placeholder(hop["object_id"], j + 1)) for j, hop in enumerate(hops)]
    if isinstance(steps, list) and steps:
        return [(str(s["after"]), arithmetic_placeholder(j + 1)) for j, s in enumerate(steps)]
    return None


def items_revealed(episode: Episode, step: int) -> list[tuple[str, str]] | None:
    """The gold items that tau_{>t} newly reveals: named in the revealed future, not in what the agent had
    seen before the step (StepContext.visible_text)."""
    items = gold_items(episode)
    if items is None:
        return None
    future, before = revealed_future(episode, step), step_context(episode, step).visible_text()
    return [item for item in items if keyword_found(item[0], future) and not keyword_found(item[0], before)]


def items_named(episode: Episode, step: int) -> list[bool] | None:
    """Per item of items_revealed: whether the step's roadmap or keywords name it (name or placeholder)."""
    revealed = items_revealed(episode, step)
    if revealed is None:
        return None
    text = roadmap_and_keywords(episode, step)
    return [keyword_found(name, text) or keyword_found(placeholder, text) for name, placeholder in revealed]


def foresight(episodes: Sequence[Episode]) -> dict[str, Any]:
    """{"precision": confirmed keywords / keywords, "keywords", "recall": named / newly revealed items over
    the steps of tasks with gold metadata, "revealed_items", "episodes_without_metadata"} (None: no data)."""
    confirmed = [ok for e in episodes for t in range(len(e.steps)) for ok in keywords_confirmed(e, t)]
    named: list[bool] = []
    without = 0
    for episode in episodes:
        if gold_items(episode) is None:
            without += 1
            continue
        named += [ok for t in range(len(episode.steps)) for ok in items_named(episode, t) or []]
    return {"precision": _share(sum(confirmed), len(confirmed)), "keywords": len(confirmed),
            "recall": _share(sum(named), len(named)), "revealed_items": len(named),
            "episodes_without_metadata": without}


def keyword_hits_by_offset(episodes: Sequence[Episode]) -> dict[int, list[bool]]:
    """Offset h -> per (step t with keywords and a step t+h, keyword of t): found in offset_text(t, h)."""
    hits: dict[int, list[bool]] = collections.defaultdict(list)
    for episode in episodes:
        for t, step in enumerate(episode.steps):
            for h in range(len(episode.steps) - t):
                text = offset_text(episode, t, h)
                hits[h] += [keyword_found(k, text) for k in step.keywords]
    return {h: found for h, found in sorted(hits.items()) if found}


def planning_horizon(episodes: Sequence[Episode]) -> dict[str, Any]:
    """{"horizon": the largest offset h with rate(h') >= 1/2 for every h' = 0..h (None when rate(0) < 1/2),
    "largest_offset_at_half": the largest h with rate(h) >= 1/2 alone (None if none), "by_offset":
    [{"offset", "pairs", "rate"}]} (module docstring)."""
    rows = [{"offset": h, "pairs": len(found), "rate": float(np.mean(found))}
            for h, found in keyword_hits_by_offset(episodes).items()]
    horizon = None
    for expected, row in enumerate(rows):
        if row["offset"] != expected or row["rate"] < HALF:
            break
        horizon = expected
    reached = [row["offset"] for row in rows if row["rate"] >= HALF]
    return {"horizon": horizon, "largest_offset_at_half": max(reached) if reached else None, "by_offset": rows}


# ---------------------------------------------------------------------------------------- q at test time
def last_q(episode: Episode) -> float | None:
    """The q of the episode's last step (None: no steps, or no parsed confidence)."""
    return episode.steps[-1].q if episode.steps else None


def selected_at_k(episodes: Sequence[Episode], q_of: Callable[[Episode], float | None] = last_q) -> float | None:
    """Best-of-k by q: per task, the success of the sample with the highest last-step q, averaged over tasks.

    Ties (and a task whose samples all lack q) count as a uniform pick among the tied samples: their mean
    success. A sample without q loses to any sample with one. None without episodes. q_of: the episode's q
    (default its last step's written q; the eval's E[q] of that step where it ran).
    """
    groups: dict[str, list[Episode]] = collections.defaultdict(list)
    for episode in episodes:
        groups[episode.slot.task.id].append(episode)
    values = []
    for group in groups.values():
        qs = [q_of(e) for e in group]
        known = [q for q in qs if q is not None]
        chosen = [e for e, q in zip(group, qs) if q == max(known)] if known else group
        values.append(np.mean([e.success for e in chosen]))
    return float(np.mean(values)) if values else None


def risk_coverage(episodes: Sequence[Episode], thresholds: Sequence[float] = RISK_COVERAGE_THRESHOLDS
                  ) -> list[dict[str, Any]]:
    """Per threshold tau: the agent answers only the episodes whose last-step q >= tau (an episode without
    q abstains); coverage = answered / episodes, accuracy = success among the answered (None if none)."""
    qs = [last_q(e) for e in episodes]
    rows = []
    for tau in thresholds:
        answered = [e.success for e, q in zip(episodes, qs) if q is not None and q >= tau]
        rows.append({"threshold": float(tau), "coverage": _share(len(answered), len(episodes)),
                     "accuracy": _share(sum(answered), len(answered))})
    return rows
