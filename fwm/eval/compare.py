"""Paired comparison of two `fwm eval` runs on the same tasks: the success gain with a bootstrap interval.

`fwm compare BEFORE AFTER [--min_gain G]` reads the episodes each run wrote (episodes_greedy.jsonl,
episodes_sampled.jsonl) and, per kind present in both, pairs the tasks by id (a task's success is the
mean over its episodes: 0/1 for greedy, mean@k for sampled), then reports

  gain = mean over shared tasks of (success_after - success_before)

with a paired bootstrap 95% interval (tasks resampled with replacement, `resamples` times, seeded). A
paired interval is much tighter than comparing the two success rates' own intervals, because the
task's difficulty cancels. A check passes when the interval's lower bound is at least `min_gain`
(0 by default: the after run is better beyond resampling noise).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from fwm.files import DataFormatError, read_jsonl

KINDS = ("greedy", "sampled")


@dataclasses.dataclass(frozen=True)
class PairedGain:
    """The gain of `after` over `before` on `tasks` shared tasks (shares in [0, 1]); low/high bound the
    paired bootstrap interval at `confidence`."""

    kind: str
    tasks: int
    before: float
    after: float
    gain: float
    low: float
    high: float
    confidence: float
    improved: int  # tasks whose success rose
    worsened: int  # tasks whose success fell

    def passes(self, min_gain: float) -> bool:
        return self.low >= min_gain


def task_success(path: str) -> dict[str, float]:
    """Task id -> mean success of its episodes in an eval episodes file (DataFormatError naming the file
    and line for a row without a task_id or a boolean success)."""
    per_task: dict[str, list[float]] = {}
    for line, row in read_jsonl(path):
        task_id, success = row.get("task_id"), row.get("success")
        if not isinstance(task_id, str) or not isinstance(success, bool):
            raise DataFormatError(f"{path}, line {line}: expected 'task_id' (a string) and 'success' (true/false), "
                                  f"got {task_id!r} and {success!r}")
        per_task.setdefault(task_id, []).append(float(success))
    return {task_id: float(np.mean(values)) for task_id, values in per_task.items()}


def paired_gain(before: Mapping[str, float], after: Mapping[str, float], *, kind: str = "greedy",
                resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedGain:
    """The mean per-task gain over the tasks both runs scored, with a paired bootstrap interval."""
    shared = sorted(set(before) & set(after))
    if not shared:
        raise ValueError(f"{kind}: the two runs share no task id; compare evaluations of the same tasks file")
    before_N = np.asarray([before[t] for t in shared])
    after_N = np.asarray([after[t] for t in shared])
    diff_N = after_N - before_N
    rng = np.random.default_rng(seed)
    means = diff_N[rng.integers(0, len(shared), size=(resamples, len(shared)))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    return PairedGain(kind=kind, tasks=len(shared), before=float(before_N.mean()), after=float(after_N.mean()),
                      gain=float(diff_N.mean()), low=float(np.quantile(means, tail)),
                      high=float(np.quantile(means, 1.0 - tail)), confidence=confidence,
                      improved=int((diff_N > 0).sum()), worsened=int((diff_N < 0).sum()))


def mean_task_success(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Task id -> mean success over `runs` (e.g. one eval per RL seed), over the tasks every run scored: paired
    with the baseline by `paired_gain`, its interval covers the questions for the seeds' mean policy, while the
    spread of the runs' own gains shows the seed-to-seed variation it does not cover."""
    if not runs:
        raise ValueError("mean_task_success needs at least one run")
    shared = set(runs[0]).intersection(*runs[1:])
    return {task_id: float(np.mean([run[task_id] for run in runs])) for task_id in sorted(shared)}


def seed_baselines(baseline_by_seed: Mapping[int, Mapping[str, float]], seeds: Sequence[int]
                   ) -> tuple[dict[int, Mapping[str, float]], dict[str, float], tuple[int, ...]]:
    """What each seed of a row and the row's seed mean are paired with, given the baseline row's runs by seed.

    A seed that the baseline also ran is paired with the baseline's same seed (when seeds vary the whole
    pipeline, seed s of both rows shares its data and stage-0 model); any other seed with the mean over all the
    baseline's seeds. The row's seed mean is paired with the baseline's mean over the same seeds when the baseline
    ran every one of them, else over all its seeds. Returns (seed -> baseline, seed-mean baseline, the baseline
    seeds that mean covers)."""
    if not baseline_by_seed:
        raise ValueError("seed_baselines needs at least one baseline run")
    everything = mean_task_success([baseline_by_seed[s] for s in sorted(baseline_by_seed)])
    per_seed = {seed: baseline_by_seed.get(seed, everything) for seed in seeds}
    pooled_seeds = tuple(sorted(seeds)) if seeds and set(seeds) <= set(baseline_by_seed) \
        else tuple(sorted(baseline_by_seed))
    return per_seed, mean_task_success([baseline_by_seed[s] for s in pooled_seeds]), pooled_seeds


def compare_runs(before_dir: str, after_dir: str, **kwargs) -> list[PairedGain]:
    """One PairedGain per episode kind that both eval workdirs hold (FileNotFoundError when none is shared)."""
    gains = []
    for kind in KINDS:
        paths = [os.path.join(d, f"episodes_{kind}.jsonl") for d in (before_dir, after_dir)]
        if all(os.path.exists(p) for p in paths):
            gains.append(paired_gain(task_success(paths[0]), task_success(paths[1]), kind=kind, **kwargs))
    if not gains:
        raise FileNotFoundError(f"{before_dir} and {after_dir} share no episodes_greedy.jsonl or episodes_sampled.jsonl "
                                f"(the files `fwm eval` writes into its workdir)")
    return gains


def markdown(gains: list[PairedGain], min_gain: float) -> str:
    """A table of the gains in percentage points and whether each passes `min_gain`."""
    lines = ["| episodes | tasks | before % | after % | gain (pp) | 95% interval (pp) | tasks up / down | "
             f"lower bound >= {100 * min_gain:g} pp |", "|---|---|---|---|---|---|---|---|"]
    for g in gains:
        lines.append(f"| {g.kind} | {g.tasks} | {100 * g.before:.1f} | {100 * g.after:.1f} | {100 * g.gain:+.1f} | "
                     f"[{100 * g.low:+.1f}, {100 * g.high:+.1f}] | {g.improved} / {g.worsened} | "
                     f"{'yes' if g.passes(min_gain) else 'no'} |")
    return "\n".join(lines)
