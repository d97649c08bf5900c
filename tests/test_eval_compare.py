"""fwm compare: the paired gain of two eval runs on hand-made episode files, its interval, and bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fwm.eval import compare
from fwm.files import DataFormatError


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_paired_gain_on_hand_computed_tasks():
    before = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 0.0}
    after = {"a": 1.0, "b": 1.0, "c": 0.75, "d": 0.0, "only_after": 1.0}  # unshared ids are left out
    gain = compare.paired_gain(before, after, resamples=2000)
    assert gain.tasks == 4 and gain.improved == 2 and gain.worsened == 0
    assert gain.before == pytest.approx(0.375) and gain.after == pytest.approx(0.6875)
    assert gain.gain == pytest.approx((1.0 + 0.0 + 0.25 + 0.0) / 4)
    # every resampled mean lies between the smallest and largest task difference
    assert 0.0 <= gain.low <= gain.gain <= gain.high <= 1.0
    assert gain.passes(0.0) and not gain.passes(gain.low + 1e-9)
    same = compare.paired_gain(before, before)
    assert same.gain == same.low == same.high == 0.0 and same.passes(0.0) and not same.passes(0.01)
    with pytest.raises(ValueError, match="share no task"):
        compare.paired_gain({"a": 1.0}, {"b": 1.0})


def test_the_interval_narrows_with_more_tasks_and_covers_the_true_gain():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        before = {str(i): float(rng.random() < 0.4) for i in range(n)}
        after = {t: 1.0 if rng.random() < 0.2 else v for t, v in before.items()}  # true gain 0.6 * 0.2 = 0.12
        gain = compare.paired_gain(before, after)
        widths.append(gain.high - gain.low)
    assert widths[1] < widths[0] / 2
    assert gain.low < 0.12 < gain.high


def test_compare_runs_reads_eval_workdirs_and_the_cli_exits_on_a_small_gain(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir(), after.mkdir()
    tasks = [f"t{i}" for i in range(40)]
    _write(before / "episodes_greedy.jsonl", [{"task_id": t, "success": i % 4 == 0} for i, t in enumerate(tasks)])
    _write(after / "episodes_greedy.jsonl", [{"task_id": t, "success": i % 2 == 0} for i, t in enumerate(tasks)])
    # sampled: 2 episodes per task, mean@2 per task
    _write(before / "episodes_sampled.jsonl", [{"task_id": t, "success": s} for t in tasks for s in (True, False)])
    _write(after / "episodes_sampled.jsonl", [{"task_id": t, "success": s} for t in tasks for s in (True, False)])
    greedy, sampled = compare.compare_runs(str(before), str(after))
    assert (greedy.kind, greedy.before, greedy.after, greedy.gain) == ("greedy", 0.25, 0.5, 0.25)
    assert (sampled.kind, sampled.before, sampled.gain) == ("sampled", 0.5, 0.0)
    command = [sys.executable, "-m", "fwm.cli", "compare", str(before), str(after)]
    done = subprocess.run(command + ["--min_gain", "0.05"], capture_output=True, text=True)
    assert done.returncode == 1 and "sampled" in done.stderr and "| greedy | 40 | 25.0 | 50.0 | +25.0 |" in done.stdout
    _write(after / "episodes_greedy.jsonl", [{"task_id": "t0", "success": "yes"}])
    with pytest.raises(DataFormatError, match=r"episodes_greedy.jsonl, line 1: expected 'task_id'"):
        compare.compare_runs(str(before), str(after))
    with pytest.raises(FileNotFoundError, match="share no episodes"):
        compare.compare_runs(str(before), str(tmp_path))


def test_mean_task_success_over_seeds_by_hand():
    seeds = [{"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0}]
    # d was scored by one run only: left out; a is 1 then 0 -> 0.5.
    assert compare.mean_task_success(seeds) == {"a": 0.5, "b": 0.0, "c": 1.0}
    gain = compare.paired_gain({"a": 0.0, "b": 0.0, "c": 1.0}, compare.mean_task_success(seeds))
    assert (gain.gain, gain.improved, gain.worsened) == (pytest.approx(0.5 / 3), 1, 0)
    with pytest.raises(ValueError, match="at least one run"):
        compare.mean_task_success([])


def test_seed_baselines_pairs_a_seed_with_the_baselines_same_seed():
    baseline = {1: {"a": 1.0, "b": 0.0}, 2: {"a": 0.0, "b": 0.0}, 5: {"a": 1.0, "b": 1.0}}
    per_seed, pooled, pooled_seeds = compare.seed_baselines(baseline, [1, 2])
    # Seeds 1 and 2 meet their own baseline seed; the seed mean meets the baseline's mean over seeds 1-2, not 5.
    assert per_seed == {1: baseline[1], 2: baseline[2]}
    assert (pooled, pooled_seeds) == ({"a": 0.5, "b": 0.0}, (1, 2))
    # Seed 3 has no baseline twin: it and the seed mean meet the mean over all three baseline seeds.
    per_seed, pooled, pooled_seeds = compare.seed_baselines(baseline, [1, 3])
    everything = {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    assert per_seed[1] == baseline[1] and per_seed[3] == everything
    assert (pooled, pooled_seeds) == (everything, (1, 2, 5))
    # A row seed 2 that solves a only: +0.5 over baseline seed 2, +0.0 over the three seeds' mean.
    assert compare.paired_gain(baseline[2], {"a": 1.0, "b": 0.0}).gain == pytest.approx(0.5)
    assert compare.paired_gain(per_seed[3], {"a": 1.0, "b": 0.0}).gain == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one baseline run"):
        compare.seed_baselines({}, [0])
