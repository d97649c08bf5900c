"""RL's held-out gain over its SFT checkpoint, per seed and over seeds, from a finished sweep workdir.

Reads WORKDIR/runs/ROW/seedS/row.json of every finished (row, seed) (`fwm pipeline --sweep ...`, e.g.
experiments/sweeps/rl_arms.py, whose seeds vary RL only), pairs each row's greedy held-out episodes with the
baseline row's per question (fwm.eval.compare), and prints per row: every seed's gain with its 95% interval, and
the gain of the seeds' mean success with its interval (over questions; the per-seed spread is the seed-to-seed
variation it does not cover). A seed is paired with the baseline's same seed when the baseline ran it, else
with the baseline's seed mean (marked "vs mean"); the seeds' mean with the baseline's mean over the same seeds
when it ran them all (`fwm.eval.compare.seed_baselines`).

    python experiments/benchmarks/rl_gain.py /tmp/fwm_arms [--baseline fe_sft] [--require fc_rl --min_gain 0.01]

--require ROW: exit 1 unless every seed of ROW gains and the lower bound of its seed-mean gain's interval is at
least --min_gain (a share: 0.01 = 1 pp).
"""
import os
import sys

from absl import app, flags

from fwm import runs
from fwm.eval.compare import mean_task_success, paired_gain, seed_baselines, task_success

flags.DEFINE_string("baseline", "fe_sft", "the row every other row is compared with (seed by seed where it "
                     "ran the same seed)")
flags.DEFINE_string("require", "", "a row that must gain (exit 1 otherwise)")
flags.DEFINE_float("min_gain", 0.0, "--require: the least lower bound of the seed-mean gain's interval (a share)")
FLAGS = flags.FLAGS


def finished_evals(workdir: str) -> dict[str, dict[int, str]]:
    """row -> seed -> greedy episodes file of every finished (row, seed) in the workdir."""
    out: dict[str, dict[int, str]] = {}
    for record in runs.read_rows(workdir):
        if record.get("status") != "finished" or not record.get("eval_dir"):
            continue
        episodes = os.path.join(record["eval_dir"], "episodes_greedy.jsonl")
        if os.path.exists(episodes):
            out.setdefault(record["row"], {})[int(record["seed"])] = episodes
    return out


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: rl_gain.py WORKDIR [--baseline ROW] [--require ROW --min_gain G]")
    evals = finished_evals(argv[1])
    if FLAGS.baseline not in evals:
        raise app.UsageError(f"{argv[1]}: no finished row {FLAGS.baseline!r} (finished: {sorted(evals)})")
    baseline_by_seed = {seed: task_success(path) for seed, path in sorted(evals[FLAGS.baseline].items())}
    everything = mean_task_success(list(baseline_by_seed.values()))
    print(f"baseline {FLAGS.baseline}: {100 * sum(everything.values()) / len(everything):.1f}% greedy on "
          f"{len(everything)} questions, seeds {','.join(map(str, baseline_by_seed))}\n")
    print("| row | seeds | per seed: gain pp [95%] | seed mean % | its gain pp [95%] (up / down) | baseline seeds |")
    print("|---|---|---|---|---|---|")
    verdict = None
    for row, seeds in evals.items():
        if row == FLAGS.baseline:
            continue
        successes = {seed: task_success(path) for seed, path in sorted(seeds.items())}
        per_seed_baseline, pooled_baseline, pooled_seeds = seed_baselines(baseline_by_seed, list(successes))
        per_seed = {seed: paired_gain(per_seed_baseline[seed], run) for seed, run in successes.items()}
        pooled = paired_gain(pooled_baseline, mean_task_success(list(successes.values())))
        cells = "; ".join(f"{s}{'' if s in baseline_by_seed else ' vs mean'}: {100 * g.gain:+.1f} "
                          f"[{100 * g.low:+.1f}, {100 * g.high:+.1f}]" for s, g in per_seed.items())
        print(f"| {row} | {','.join(map(str, successes))} | {cells} | {100 * pooled.after:.1f} | "
              f"{100 * pooled.gain:+.1f} [{100 * pooled.low:+.1f}, {100 * pooled.high:+.1f}] "
              f"({pooled.improved} / {pooled.worsened}) | {','.join(map(str, pooled_seeds))} |")
        if row == FLAGS.require:
            verdict = all(g.gain > 0 for g in per_seed.values()) and pooled.passes(FLAGS.min_gain)
    if FLAGS.require:
        if verdict is None:
            print(f"\n{FLAGS.require}: no finished seed in {argv[1]}")
            sys.exit(1)
        print(f"\n{FLAGS.require}: every seed gains and the seed-mean gain's lower bound >= "
              f"{100 * FLAGS.min_gain:g} pp: {'yes' if verdict else 'NO'}")
        sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    app.run(main)
