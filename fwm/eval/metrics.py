"""Evaluation metrics of finished episodes: pure functions of episodes (fwm.rollout.episodes.Episode) and tasks.

- `summarize`: score, exact match, F1, success, format adherence, turns, tool calls, tokens per episode.
- `by_data_source`: `summarize` per task.data_source, over all episodes ("all", micro) and the mean of the
  sources ("average", macro: the paper's "search avg"); `by_hops`: per number of gold hops / steps.
- `best_constant_answer`: the single answer string, chosen from the gold answers, that maximises the mean
  score over the tasks -- what "always say X" gets, printed beside every score.
- `mean_and_pass_at_k`: mean@k and pass@k (unbiased estimator, Chen et al. 2021) over k samples per task.
- `gold_chain_following`: for tasks with gold hops (the synthetic knowledge world), per step index, how
  often the step is the gold chain's next action: first the question's subject, then each next hop's
  subject, then the gold answer (SQuAD-normalised comparison).
- `recovery`: of the episodes with an unproductive step (`unproductive_steps`, `has_unproductive_step`), the
  share that still succeed.
The world-model block's metrics (calibration of q, grounding, foresight, planning horizon, best-of-k by q,
risk-coverage) are in fwm.eval.foresight.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fwm.envs.base import Task
from fwm.envs.scoring import exact_match, f1, normalize_answer
from fwm.rollout.episodes import Episode

_PASSAGE_RE = re.compile(r"^Doc \d+\((.*)$")  # fwm.envs.retrievers.format_docs: `Doc i(Title: t) text`

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
        "repeated_searches": mean(_repeated_searches(episodes)),
        "top_answer_share": top_answer_share(episodes),
    }


def _repeated_searches(episodes: Sequence[Episode]) -> list[bool]:
    """Per search action, whether the same episode searched the same (normalised) query before."""
    repeats = []
    for episode in episodes:
        seen: set[str] = set()
        for step in episode.steps:
            if step.action is not None and step.action.kind == "search":
                query = normalize_answer(step.action.argument)
                repeats.append(query in seen)
                seen.add(query)
    return repeats


def top_answer_share(episodes: Sequence[Episode]) -> float:
    """Share of final answers equal (normalised) to the most common one: near 1 is a collapsed policy that
    says one thing whatever the question (compare with the best constant answer's score)."""
    answers = [normalize_answer(e.record.final_answer) for e in episodes if e.record.final_answer is not None]
    return collections.Counter(answers).most_common(1)[0][1] / len(answers) if answers else 0.0


def by_data_source(episodes: Sequence[Episode], summary: Callable[[Sequence[Episode]], dict[str, Any]] = summarize
                   ) -> dict[str, dict[str, Any]]:
    """summary per data source ('' is named 'default'), then ALL (every episode) and AVERAGE (mean of the
    sources' numeric entries, 'episodes' summed)."""
    return _grouped(episodes, source_label, summary)


def source_label(task: Task) -> str:
    return task.data_source or "default"


def num_hops(task: Task) -> int | None:
    """Gold hops (knowledge world) or steps (arithmetic world) of a synthetic task; None otherwise."""
    metadata = task.metadata if isinstance(task.metadata, Mapping) else {}
    for key in ("hops", "steps"):
        if isinstance(metadata.get(key), list):
            return len(metadata[key])
    return None


def by_hops(episodes: Sequence[Episode], summary: Callable[[Sequence[Episode]], dict[str, Any]] = summarize
            ) -> dict[str, dict[str, Any]]:
    """summary per number of gold hops ('1 hop', '2 hops', ...; 'unknown' without them), ALL and AVERAGE."""
    return _grouped(episodes, hops_label, summary)


def hops_label(task: Task) -> str:
    hops = num_hops(task)
    return "unknown" if hops is None else f"{hops} hop" + ("s" if hops != 1 else "")


def _grouped(episodes: Sequence[Episode], key: Callable[[Task], str],
             summary: Callable[[Sequence[Episode]], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Episode]] = collections.defaultdict(list)
    for episode in episodes:
        groups[key(episode.slot.task)].append(episode)
    out = {name: summary(group) for name, group in sorted(groups.items())}
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


def passages(observation: str) -> set[str]:
    """The retrieved passages of a search observation (format_docs lines without their rank 'Doc i'); empty
    for anything else (no results, a failed search, the empty-query notice)."""
    return {found.group(1).strip() for found in map(_PASSAGE_RE.match, observation.splitlines()) if found}


def unproductive_steps(episode: Episode) -> list[bool]:
    """Per step, whether it is unproductive: a malformed step (no action); a search that brought nothing new
    (no passage that an earlier observation of the episode had not shown already: a repeated search, no
    results, a failed search, an empty query); for tasks with gold hops, a search off the gold chain (not the
    chain's next subject, `chain_steps_followed`). Answers and python steps count only when malformed."""
    followed = chain_steps_followed(episode)
    seen: set[str] = set()
    out = []
    for t, step in enumerate(episode.steps):
        found = passages(step.observation)
        if step.action is None:
            bad = True
        elif step.action.kind == "search":
            bad = not (found - seen) or (followed is not None and not followed[t])
        else:
            bad = False
        seen |= found
        out.append(bad)
    return out


def has_unproductive_step(episode: Episode) -> bool:
    """An unproductive step (`unproductive_steps`), or one the env's record counts: a malformed response, an
    invalid action, a failed search or a tool error (a python run that failed)."""
    r = episode.record
    return any(unproductive_steps(episode)) or (r.num_malformed + r.num_invalid_actions + r.num_failed_searches
                                                + r.num_tool_errors) > 0


def recovery(episodes: Sequence[Episode]) -> dict[str, Any]:
    """{"rate": recovery rate = successes / episodes with an unproductive step (None without any),
    "episodes": how many have one, "share": their share of all episodes, "success_without": success of the
    others (None without any), "unproductive_steps": share of all steps that are unproductive}."""
    flagged = [has_unproductive_step(e) for e in episodes]
    hit = [e.success for e, bad in zip(episodes, flagged) if bad]
    clean = [e.success for e, bad in zip(episodes, flagged) if not bad]
    steps = [bad for e in episodes for bad in unproductive_steps(e)]
    return {"rate": float(np.mean(hit)) if hit else None, "episodes": len(hit),
            "share": len(hit) / len(episodes) if episodes else None,
            "success_without": float(np.mean(clean)) if clean else None,
            "unproductive_steps": float(np.mean(steps)) if steps else None}
