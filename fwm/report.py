"""`fwm report WORKDIR`: the table of rows x metrics over seeds and the figures of a pipeline or sweep workdir.

Reads what `fwm pipeline` left (fwm/runs.py): every runs/ROW/seedS/row.json, the eval.json of its eval stage,
the metrics.jsonl of its rl stage, and sweep.json (the rows and seeds a sweep asked for). Writes
WORKDIR/report.md and WORKDIR/figures/{reliability,risk_coverage,rl_curves,table}.png; whatever has finished
is reported, and the rows and seeds that have not are listed with their state; a second table gives every
finished seed's own values.

Metrics (greedy episodes on the held-out tasks, fwm/eval/): task score, format adherence, ECE / Brier /
AUROC of every step's q against the episode's success, keyword grounding, planning horizon, recovery rate,
response tokens per episode, and with sampled episodes selected@k, mean@k, pass@k. Each cell is the mean
over the seeds that finished, +- the sample standard deviation when there are two or more (n in its own
column); a metric undefined for a seed (no q written, one outcome only) is left out of that cell's mean.
A row whose mean format adherence is below MIN_FORMAT is marked (†): the paper compares rows at equal format
(its FE-SFT alone reaches 99.9 %), so such a row's gap may be format rather than capability.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fwm import figures, runs
from fwm.files import atomic_open, read_json, read_jsonl

PCT, NUM = "pct", "num"
MIN_FORMAT = 0.95   # below it a row's score may measure format, not capability (module docstring)
FORMAT_MARK = "†"
FORMAT_NOTE = (f"{FORMAT_MARK} format adherence below {MIN_FORMAT:.0%}: the paper compares rows at equal format (its "
               "FE-SFT alone reaches 99.9 %), so this row's gap may be format, not capability.")
RESULTS_HEADER = "| row | n | "   # the first cells of the results table's header (table_text finds it by them)


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    header: str
    kind: str                                         # pct (shown x100) | num
    get: Callable[[Mapping[str, Any]], Any]           # eval.json -> value (None when absent)
    digits: int = 1                                   # decimals shown


def _path(*keys: str) -> Callable[[Mapping[str, Any]], Any]:
    def get(results: Mapping[str, Any]) -> Any:
        node: Any = results
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None
    return get


def _at_k(name: str, within: str = "") -> Callable[[Mapping[str, Any]], Any]:
    """NAME@k of the sampled episodes (`within`: of that record of them, such as expected_q, not by_source)."""
    def get(results: Mapping[str, Any]) -> Any:
        sampled = results.get("sampled")
        if not sampled:
            return None
        keys = (within,) if within else ("by_source", "all")
        return _path("sampled", *keys, f"{name}@{sampled['k']}")(results)
    return get


METRICS = (
    Metric("score", "score %", PCT, _path("greedy", "by_source", "all", "score")),
    Metric("format", "format %", PCT, _path("greedy", "by_source", "all", "format_adherence")),
    Metric("ece", "ECE", NUM, _path("greedy", "calibration", "steps", "ece"), 3),
    Metric("brier", "Brier", NUM, _path("greedy", "calibration", "steps", "brier"), 3),
    Metric("auroc", "AUROC", NUM, _path("greedy", "calibration", "steps", "auroc"), 3),
    # E[q] (eval foresight.expected_q): the model's belief rather than the greedy mode; shown where it ran
    Metric("ece_expected", "ECE E[q]", NUM, _path("greedy", "expected_q", "steps", "ece"), 3),
    Metric("auroc_expected", "AUROC E[q]", NUM, _path("greedy", "expected_q", "steps", "auroc"), 3),
    Metric("grounding", "grounding %", PCT, _path("greedy", "keyword_grounding", "rate")),
    Metric("horizon", "horizon", NUM, _path("greedy", "planning_horizon", "horizon"), 2),
    Metric("recovery", "recovery %", PCT, _path("greedy", "recovery", "rate")),
    # how many episodes the recovery rate is over (those with an unproductive step): often a few dozen
    Metric("recovery_episodes", "recovery n", NUM, _path("greedy", "recovery", "episodes"), 0),
    Metric("tokens", "tokens/episode", NUM, _path("greedy", "by_source", "all", "response_tokens")),
    Metric("selected_at_k", "selected@k %", PCT, _at_k("selected")),
    # best-of-k by the E[q] of each sample's last step, where the eval scored it (the written q may not vary)
    Metric("selected_at_k_expected", "selected@k E[q] %", PCT, _at_k("selected", "expected_q")),
    Metric("mean_at_k", "mean@k %", PCT, _at_k("mean")),
    Metric("pass_at_k", "pass@k %", PCT, _at_k("pass")),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
BAR_METRICS = ("score", "format", "auroc", "ece", "grounding", "recovery")


@dataclasses.dataclass
class RowRuns:
    """One row's seeds: their records, eval results and RL curves."""

    row: str
    label: str
    reference: str
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)       # seed -> eval.json
    rl: dict[int, list[tuple[int, float, float]]] = dataclasses.field(default_factory=dict)  # seed -> (step, reward, correct)


def gather(workdir: str) -> tuple[list[RowRuns], dict[str, Any] | None]:
    """Every row with a record, in the sweep's order (then by name), and the sweep record (None if none)."""
    sweep = runs.read_sweep(workdir)
    by_row: dict[str, RowRuns] = {}
    for record in runs.read_rows(workdir):
        entry = by_row.setdefault(record["row"], RowRuns(record["row"], record.get("label") or record["row"],
                                                         record.get("reference", "")))
        entry.records.append(record)
        seed = int(record["seed"])
        eval_dir = record.get("eval_dir")
        if record["status"] == "finished" and eval_dir and os.path.isfile(os.path.join(eval_dir, "eval.json")):
            entry.evals[seed] = read_json(os.path.join(eval_dir, "eval.json"))
        for stage in record["stages"]:
            metrics_file = os.path.join(stage["dir"], "metrics.jsonl")
            if stage["stage"] == "rl" and os.path.isfile(metrics_file):
                entry.rl[seed] = [(int(r["step"]), float(r.get("reward", np.nan)), float(r.get("correct", np.nan)))
                                  for _, r in read_jsonl(metrics_file, stop_at_bad_line=True)]
    order = {name: i for i, name in enumerate((sweep or {}).get("rows", []))}
    return sorted(by_row.values(), key=lambda r: (order.get(r.row, len(order)), r.row)), sweep


def mean_and_spread(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None below two values, count) of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None, 0
    spread = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), spread, len(present)


def _cell(mean: float | None, spread: float | None, metric: Metric) -> str:
    if mean is None:
        return "-"
    scale, form = (100.0 if metric.kind == PCT else 1.0), f".{metric.digits}f"
    text = format(mean * scale, form)
    return text + (f" ± {format(spread * scale, form)}" if spread is not None else "")


def table(rows: Sequence[RowRuns]) -> tuple[list[Metric], dict[str, dict[str, tuple[float | None, float | None, int]]]]:
    """The metrics some row has, and per row label each metric's (mean, spread, seeds)."""
    values = {r.row: {m.key: mean_and_spread([m.get(results) for results in r.evals.values()]) for m in METRICS}
              for r in rows if r.evals}
    shown = [m for m in METRICS if any(cells[m.key][0] is not None for cells in values.values())]
    return shown, values


def below_format(format_adherence: float | None) -> bool:
    """Whether a format adherence (a share) is below MIN_FORMAT: the row is marked FORMAT_MARK."""
    return format_adherence is not None and format_adherence < MIN_FORMAT


def format_limited(cells: Mapping[str, tuple[float | None, float | None, int]]) -> bool:
    """Whether a row's mean format adherence (its `table` cells) is below MIN_FORMAT."""
    return below_format(cells.get("format", (None, None, 0))[0])


def _pooled_bins(evals: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Reliability bins of every step's q pooled over seeds (count-weighted per bin)."""
    pooled: dict[float, dict[str, float]] = {}
    for results in evals:
        for b in results.get("greedy", {}).get("calibration", {}).get("steps", {}).get("reliability", []):
            slot = pooled.setdefault(b["lo"], {"lo": b["lo"], "hi": b["hi"], "count": 0, "q": 0.0, "y": 0.0})
            slot["count"] += b["count"]
            slot["q"] += b["mean_q"] * b["count"]
            slot["y"] += b["accuracy"] * b["count"]
    return [{"lo": s["lo"], "hi": s["hi"], "count": s["count"], "mean_q": s["q"] / s["count"],
             "accuracy": s["y"] / s["count"]} for _, s in sorted(pooled.items()) if s["count"]]


def _risk_coverage(evals: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(coverage, accuracy) per threshold, means over seeds (thresholds nobody answered at are left out)."""
    by_threshold: dict[float, list[tuple[float, float]]] = {}
    for results in evals:
        for point in results.get("greedy", {}).get("risk_coverage", []):
            if point.get("accuracy") is not None:
                by_threshold.setdefault(point["threshold"], []).append((point["coverage"], point["accuracy"]))
    return [(float(np.mean([c for c, _ in pts])), float(np.mean([a for _, a in pts])))
            for _, pts in sorted(by_threshold.items())]


def _plan_text(plan: Mapping[str, Any]) -> str:
    parts = ["stage 0"] if plan.get("pretrain") else []
    if plan.get("mid_train", "none") != "none":
        parts.append({"standard": "mid-train", "wm": "WM-AMT", "iwm": "IWM"}[plan["mid_train"]])
    if plan.get("sft"):
        parts.append(f"SFT {plan['format']}")
    if plan.get("rl", "none") != "none":
        parts.append({"grpo": "GRPO", "fc_rl": "FC-RL"}[plan["rl"]] + ("" if plan.get("sft") else f" ({plan['format']})"))
    return " + ".join(parts) + (" + eval" if plan.get("eval") else "")


def _state(record: Mapping[str, Any]) -> str:
    done = [s["label"] for s in record["stages"]]
    where = f" after {done[-1]}" if done else ""
    error = f": {record['error']}" if record.get("error") else ""
    return f"{record['status']}{where}{error}"


def per_seed_table(rows: Sequence[RowRuns], shown: Sequence[Metric]) -> list[str]:
    """The '## Per seed' section: each finished (row, seed) with the table's columns, so the spread can be read
    (which seed moved a row) and seeds reported in different workdirs can be combined."""
    lines = ["## Per seed", "", "| row | seed | " + " | ".join(m.header for m in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for r in rows:
        for seed in sorted(r.evals):
            marked = below_format(METRIC_BY_KEY["format"].get(r.evals[seed]))
            label = f"{r.label} {FORMAT_MARK}" if marked else r.label
            lines.append(f"| {label} | {seed} | "
                         + " | ".join(_cell(m.get(r.evals[seed]), None, m) for m in shown) + " |")
    return lines + [""]


def markdown(workdir: str, rows: Sequence[RowRuns], sweep: Mapping[str, Any] | None,
             figure_paths: Mapping[str, str | None]) -> str:
    """The page written to WORKDIR/report.md."""
    shown, values = table(rows)
    title = f"# Report: {sweep['name']}" if sweep else "# Pipeline report"
    lines = [title, "", f"Workdir `{os.path.abspath(workdir)}`.", ""]
    if sweep and sweep.get("note"):
        lines += [f"> {sweep['note']}", ""]
    lines += ["Greedy episodes on the held-out evaluation tasks. Cells: mean over the seeds that finished ± sample "
              "standard deviation (n = seeds). ECE / Brier / AUROC: every step's q against the episode's success; "
              "grounding: share of keywords found in what follows their step; horizon: planning horizon in steps; "
              "recovery: success of episodes with an unproductive step (definitions: fwm/eval/foresight.py, "
              "fwm/eval/metrics.py). `paper`: the paper's search average (math mean@30 / pass@30) for the row.", ""]
    finished = [r for r in rows if r.evals]
    if finished:
        has_reference = any(r.reference for r in finished)
        lines.append(RESULTS_HEADER + " | ".join(m.header for m in shown) + (" | paper |" if has_reference else " |"))
        lines.append("|---|---|" + "---|" * len(shown) + ("---|" if has_reference else ""))
        for r in finished:
            cells = values[r.row]
            n = max((cells[m.key][2] for m in shown), default=len(r.evals))
            label = f"{r.label} {FORMAT_MARK}" if format_limited(cells) else r.label
            lines.append(f"| {label} | {n} | " + " | ".join(_cell(*cells[m.key][:2], m) for m in shown)
                         + (f" | {r.reference or '-'} |" if has_reference else " |"))
        lines.append("")
        if any(format_limited(values[r.row]) for r in finished):
            lines += [FORMAT_NOTE, ""]
        lines += per_seed_table(finished, shown)
    else:
        lines += ["No row has finished its evaluation yet.", ""]
    expected_rows = list((sweep or {}).get("rows", [])) or [r.row for r in rows]
    expected_seeds = list((sweep or {}).get("seeds", []))
    records = {(rec["row"], int(rec["seed"])): rec for r in rows for rec in r.records}
    evaluated = {(r.row, seed) for r in rows for seed in r.evals}
    missing = []
    for name in expected_rows:
        seeds = expected_seeds or sorted({int(rec["seed"]) for (row, _), rec in records.items() if row == name})
        for seed in seeds:
            rec = records.get((name, seed))
            if rec is None:
                missing.append(f"- {name} seed {seed}: not started")
            elif rec["status"] != "finished" or (rec.get("plan", {}).get("eval") and not rec.get("eval_dir")):
                missing.append(f"- {name} seed {seed}: {_state(rec)}")
            elif rec.get("eval_dir") and (name, seed) not in evaluated:
                # gathered without its eval stage's directory: finished, but nothing here to report
                stage = os.path.basename(os.path.normpath(rec["eval_dir"]))
                missing.append(f"- {name} seed {seed}: finished, but its eval.json is in neither "
                               f"{os.path.join(runs.STAGES_DIR, stage)} here nor {rec['eval_dir']} (copy that "
                               f"stage directory into this workdir's {runs.STAGES_DIR}/)")
    lines += ["## Missing rows", ""] + (missing or ["None: every row and seed asked for has finished."]) + [""]
    lines += ["## Figures", ""]
    captions = {"table": "The table as bars", "reliability": "Reliability diagram of q per row",
                "risk_coverage": "Risk-coverage per row", "rl_curves": "Success and reward over RL steps"}
    for name, caption in captions.items():
        path = figure_paths.get(name)
        lines.append(f"![{caption}]({os.path.relpath(path, workdir)})" if path else f"- {caption}: no data yet.")
        lines.append("")
    lines += ["## Configuration", "", "| row | label | plan | seeds | status | record |", "|---|---|---|---|---|---|"]
    for r in rows:
        plan = r.records[0].get("plan", {})
        seeds = ", ".join(str(rec["seed"]) for rec in r.records)
        status = ", ".join(f"{rec['seed']}: {rec['status']}" for rec in r.records)
        record_path = os.path.relpath(os.path.join(runs.row_dir(workdir, r.row, r.records[0]["seed"]),
                                                   runs.ROW_RECORD), workdir)
        lines.append(f"| {r.row} | {r.label} | {_plan_text(plan)} | {seeds} | {status} | `{record_path}` |")
    lines += ["", "Every row's full config is in its row.json (`config`); each stage's in the stage "
              "directory's stage.json.", "", "## Wall time per stage (seconds; `reused`: finished earlier, by this "
              "or another row or seed)", ""]
    for r in rows:
        for rec in r.records:
            cells = [f"{s['label']} {'reused' if s['skipped'] else format(s.get('seconds') or 0.0, '.0f')}"
                     for s in rec["stages"]]
            total = rec.get("seconds")
            lines.append(f"- {r.row} seed {rec['seed']}: " + ", ".join(cells)
                         + (f"; total {total:.0f} s" if isinstance(total, (int, float)) else ""))
    lines.append("")
    return "\n".join(lines)


def _scaled(cell: tuple[float | None, float | None], metric: Metric) -> tuple[float | None, float | None]:
    """(mean, spread) as the table shows them (percent metrics x 100)."""
    scale = 100.0 if metric.kind == PCT else 1.0
    return tuple(None if v is None else v * scale for v in cell)  # type: ignore[return-value]


def write_report(workdir: str) -> str:
    """Writes WORKDIR/report.md and WORKDIR/figures/*.png from what has finished; returns the report's path."""
    rows, sweep = gather(workdir)
    shown, values = table(rows)
    finished = [r for r in rows if r.evals]
    figures_dir = os.path.join(workdir, runs.FIGURES_DIR)
    figure_paths = {
        "table": figures.table_bars([r.label for r in finished],
                                    {m.header: [_scaled(values[r.row][m.key][:2], m) for r in finished]
                                     for m in shown if m.key in BAR_METRICS},
                                    os.path.join(figures_dir, "table.png")),
        "reliability": figures.reliability({r.label: _pooled_bins(list(r.evals.values())) for r in finished},
                                           os.path.join(figures_dir, "reliability.png")),
        "risk_coverage": figures.risk_coverage({r.label: _risk_coverage(list(r.evals.values())) for r in finished},
                                               os.path.join(figures_dir, "risk_coverage.png")),
        "rl_curves": figures.rl_curves({r.label: list(r.rl.values()) for r in rows},
                                       os.path.join(figures_dir, "rl_curves.png")),
    }
    path = os.path.join(workdir, runs.REPORT)
    with atomic_open(path, "w") as f:
        f.write(markdown(workdir, rows, sweep, figure_paths))
    return path


def table_text(report_path: str) -> str:
    """The report's table of rows x metrics (what `fwm pipeline` prints at the end), with its format note."""
    with open(report_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    table_lines: list[str] = []
    for line in lines:
        if line.startswith(RESULTS_HEADER) or (table_lines and line.startswith("|")):
            table_lines.append(line)
        elif table_lines:
            break
    note = [line for line in lines if line == FORMAT_NOTE]
    return "\n".join(table_lines + note) or "(no row has finished its evaluation yet)"
