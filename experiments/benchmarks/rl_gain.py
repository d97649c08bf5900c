"""RL's held-out gain over its SFT checkpoint, per seed and over seeds, from a finished sweep workdir.

Reads WORKDIR/runs/ROW/seedS/row.json of every finished (row, seed) (`fwm pipeline --sweep ...`, e.g.
experiments/sweeps/rl_arms.py, whose seeds vary RL only), pairs each row's greedy held-out episodes with the
baseline row's per question (fwm.eval.compare), and prints per row: every seed's gain with its 95% interval, and
the gain of the seeds' mean success with its interval (over questions; the per-seed spread is the seed-to-seed
variation it does not cover).

    python experiments/benchmarks/rl_gain.py /tmp/fwm_arms [--baseline fe_sft] [--require fc_rl --min_gain 0.01]

--require ROW: exit 1 unless every seed of ROW gains and the lower bound of its seed-mean gain's interval is at
least --min_gain (a share: 0.01 = 1 pp).
"""
import os
import sys

from absl import app, flags

from fwm import runs
from fwm.eval.compare import mean_task_success, paired_gain, task_success

flags.DEFINE_string("baseline", "fe_sft", "the row every other row is compared with (its seeds' mean success)")
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
    baseline = mean_task_success([task_success(p) for p in evals[FLAGS.baseline].values()])
    print(f"baseline {FLAGS.baseline}: {100 * sum(baseline.values()) / len(baseline):.1f}% greedy on "
          f"{len(baseline)} questions ({len(evals[FLAGS.baseline])} seed(s))\n")
    print("| row | seeds | per seed: gain pp [95%] | seed mean % | its gain pp [95%] (up / down) |")
    print("|---|---|---|---|---|")
    verdict = None
    for row, seeds in evals.items():
        if row == FLAGS.baseline:
            continue
        runs = {seed: task_success(path) for seed, path in sorted(seeds.items())}
        per_seed = {seed: paired_gain(baseline, run) for seed, run in runs.items()}
        pooled = paired_gain(baseline, mean_task_success(list(runs.values())))
        cells = "; ".join(f"{s}: {100 * g.gain:+.1f} [{100 * g.low:+.1f}, {100 * g.high:+.1f}]"
                          for s, g in per_seed.items())
        print(f"| {row} | {len(runs)} | {cells} | {100 * pooled.after:.1f} | {100 * pooled.gain:+.1f} "
              f"[{100 * pooled.low:+.1f}, {100 * pooled.high:+.1f}] ({pooled.improved} / {pooled.worsened}) |")
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
