"""Evaluation metrics of finished episodes: pure functions of episodes (fwm.rollout.episodes.Episode) and tasks.

- `summarize`: score, exact match, F1, success, format adherence, turns, tool calls, tokens per episode.
- `by_data_source`: `summarize` per task.data_source, over all episodes ("all", micro) and the mean of the
  sources ("average", macro: the paper's "search avg").
- `best_constant_answer`: the single answer string, chosen from the gold answers, that maximises the mean
  score over the tasks -- what "always say X" gets, printed beside every score.
- `mean_and_pass_at_k`: mean@k and pass@k (unbiased estimator, Chen et al. 2021) over k samples per task.
- `gold_chain_following`: for tasks with gold hops (the synthetic knowledge world), per step index, how
  often the step is the gold chain's next action: first the question's subject, then each next hop's
  subject, then the gold answer (SQuAD-normalised comparison).
Calibration (q_t), planning horizon and recovery are left to a later module; q_t is in the episode records.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fwm.envs.base import Task
from fwm.envs.scoring import exact_match, f1, normalize_answer
from fwm.rollout.episodes import Episode

TOOL_KINDS = ("search", "python")
ScoreFn = Callable[[str, Sequence[str]], float]
ALL, AVERAGE = "all", "average"
MAX_CONSTANT_CANDIDATES = 500  # distinct gold answers tried as the constant (the most frequent first)


def answer_scores(episode: Episode) -> dict[str, float]:
    """score (the env's), exact_match and f1 of the final answer (0 without one)."""
    answer, golds = episode.record.final_answer, episode.slot.task.answers
    return {"score": float(episode.record.score),
            "exact_match": exact_match(answer, golds) if answer is not None else 0.0,
            "f1": f1(answer, golds) if answer is not None else 0.0}


def summarize(episodes: Sequence[Episode]) -> dict[str, float]:
    """Means over episodes (format adherence: over steps; q_missing: share of steps without a confidence)."""
    if not episodes:
        return {"episodes": 0}
    scores = [answer_scores(e) for e in episodes]
    steps = [step for e in episodes for step in e.steps]
    mean = lambda values: float(np.mean(values)) if len(values) else 0.0  # noqa: E731
    return {
        "episodes": len(episodes),
        "score": mean([s["score"] for s in scores]),
        "exact_match": mean([s["exact_match"] for s in scores]),
        "f1": mean([s["f1"] for s in scores]),
        "success": mean([e.success for e in episodes]),
        "answered": mean([e.record.reason == "answer" for e in episodes]),
        "format_adherence": mean([step.format_ok for step in steps]),
        "format_ok_episodes": mean([all(step.format_ok for step in e.steps) for e in episodes]),
        "malformed_steps": mean([step.action is None for step in steps]),
        "q_missing": mean([step.q is None for step in steps]),
        "turns": mean([len(e.steps) for e in episodes]),
        "tool_calls": mean([sum(step.action is not None and step.action.kind in TOOL_KINDS for step in e.steps)
                            for e in episodes]),
        "response_tokens": mean([sum(len(step.response_ids) for step in e.steps) for e in episodes]),
        "prompt_tokens": mean([sum(len(step.prompt_ids) for step in e.steps) for e in episodes]),
        "truncated_prompts": mean([step.prompt_truncated for step in steps]),
    }


def by_data_source(episodes: Sequence[Episode], summary: Callable[[Sequence[Episode]], dict[str, Any]] = summarize
                   ) -> dict[str, dict[str, Any]]:
    """summary per data source ('' is named 'default'), then ALL (every episode) and AVERAGE (mean of the
    sources' numeric entries, 'episodes' summed)."""
    groups: dict[str, list[Episode]] = collections.defaultdict(list)
    for episode in episodes:
        groups[episode.slot.task.data_source or "default"].append(episode)
    out = {source: summary(group) for source, group in sorted(groups.items())}
    per_source = list(out.values())
    out[ALL] = summary(episodes)
    average: dict[str, Any] = {}
    for key in out[ALL]:
        values = [s[key] for s in per_source if isinstance(s.get(key), (int, float))]
        if len(values) == len(per_source) and values:
            average[key] = float(sum(values)) if key == "episodes" else float(np.mean(values))
    out[AVERAGE] = average
    return out


def best_constant_answer(tasks: Sequence[Task], score: ScoreFn = exact_match) -> tuple[str, float]:
    """(answer, mean score over tasks) of the best single answer string among the tasks' gold answers.

    Candidates are the distinct gold answers (first spelling of each normalised form), the
    MAX_CONSTANT_CANDIDATES most frequent ones (counted once per task) when there are more; ties go to the
    more frequent, then the earlier one. ('', 0.0) for no tasks.
    """
    if not tasks:
        return "", 0.0
    counts: collections.Counter[str] = collections.Counter()
    spelling: dict[str, str] = {}
    for task in tasks:
        for form in dict.fromkeys(normalize_answer(a) for a in task.answers):
            counts[form] += 1
        for answer in task.answers:
            spelling.setdefault(normalize_answer(answer), answer)
    best, best_score = "", -1.0
    for form, _ in counts.most_common(MAX_CONSTANT_CANDIDATES):
        candidate = spelling[form]
        value = float(np.mean([score(candidate, task.answers) for task in tasks]))
        if value > best_score:
            best, best_score = candidate, value
    return best, best_score


def constant_baselines(tasks: Sequence[Task], score_fns: Mapping[str, ScoreFn]) -> dict[str, dict[str, Any]]:
    """best_constant_answer per named score function: {name: {"answer", "value"}}."""
    return {name: dict(zip(("answer", "value"), best_constant_answer(tasks, fn))) for name, fn in score_fns.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_and_pass_at_k(episodes: Sequence[Episode], k: int) -> dict[str, float]:
    """mean@k (mean success of the samples, averaged over tasks) and pass@k (per task from its n >= k samples)."""
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for episode in episodes:
        groups[episode.slot.task.id].append(episode.success)
    if not groups:
        return {"tasks": 0}
    return {"tasks": len(groups), "k": k,
            f"mean@{k}": float(np.mean([np.mean(s) for s in groups.values()])),
            f"pass@{k}": float(np.mean([pass_at_k(len(s), sum(s), k) for s in groups.values()]))}


def chain_steps_followed(episode: Episode) -> list[bool] | None:
    """Per step, whether it is the gold chain's next action (None for tasks without metadata['hops'])."""
    task = episode.slot.task
    hops = task.metadata.get("hops") if isinstance(task.metadata, Mapping) else None
    if not hops:
        return None
    k, followed = 0, []
    for step in episode.steps:
        action = step.action
        if action is None:
            ok = False
        elif k < len(hops):
            ok = action.kind == "search" and normalize_answer(action.argument) == normalize_answer(hops[k]["subject"])
        else:
            ok = action.kind == "answer" and exact_match(action.argument, task.answers) == 1.0
        followed.append(ok)
        k += ok
    return followed


def gold_chain_following(episodes: Sequence[Episode]) -> dict[str, Any]:
    """{"by_step": [{"step", "episodes", "followed"}], "overall": share of steps, "episodes": counted}."""
    per_step: dict[int, list[bool]] = collections.defaultdict(list)
    counted = 0
    for episode in episodes:
        followed = chain_steps_followed(episode)
        if followed is None:
            continue
        counted += 1
        for t, ok in enumerate(followed):
            per_step[t].append(ok)
    everything = [ok for values in per_step.values() for ok in values]
    return {"episodes": counted,
            "overall": float(np.mean(everything)) if everything else 0.0,
            "by_step": [{"step": t + 1, "episodes": len(per_step[t]), "followed": float(np.mean(per_step[t]))}
                        for t in sorted(per_step)]}
