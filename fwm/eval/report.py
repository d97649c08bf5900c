"""The evaluation results (fwm.eval.run's dict) as a markdown page: one table per run mode, the best
constant answer beside every score, the gold-chain rate per step, and the world model's table (calibration
of q, grounding, foresight, planning horizon, recovery, risk-coverage)."""
from __future__ import annotations

from typing import Any, Mapping

from fwm.eval.metrics import ALL


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _rows(label: str, by_source: Mapping[str, Mapping[str, Any]], constants: Mapping[str, Mapping[str, Any]],
          extra: tuple[str, ...]) -> list[str]:
    head = (f"| {label} | episodes | score (const) | EM (const) | F1 (const) | format % | turns | tool calls | "
            "tokens/episode |" + "".join(f" {name} |" for name in extra))
    lines = [head, "|" + "---|" * (9 + len(extra))]
    for source, s in by_source.items():
        const = constants.get(source, {})
        cell = lambda key: f"{_pct(s.get(key))} ({_pct(const.get(key, {}).get('value'))})"  # noqa: E731
        episodes = s.get("episodes", 0)
        lines.append(f"| {source} | {episodes:g} | {cell('score')} | {cell('exact_match')} | {cell('f1')} | "
                     f"{_pct(s.get('format_adherence'))} | {_num(s.get('turns'))} | {_num(s.get('tool_calls'))} | "
                     f"{_num(s.get('response_tokens'))} |" + "".join(f" {_pct(s.get(name))} |" for name in extra))
    return lines


def _int(value: Any) -> str:
    return "-" if value is None else str(value)


def _share_of(value: Any, count: Any) -> str:
    return f"{_pct(value)} ({count})" if isinstance(value, (int, float)) else f"- ({count})"


def expected_q_lines(expected: Mapping[str, Any] | None) -> list[str]:
    """The E[q] rows of the world-model table (fwm.eval.expected_q; none unless foresight.expected_q ran)."""
    if not expected:
        return []
    lines = []
    last, grid = expected["last_step"], f"grid {_num(expected['mean_mass'])} of the probability"
    if "steps" in expected:  # greedy: every step; sampled: the last steps only, and selected@k by E[q]
        steps = expected["steps"]
        lines.append(f"| E[q] (every step): ECE / Brier / AUROC | {_num(steps['ece'])} / {_num(steps['brier'])} / "
                     f"{_num(steps['auroc'])} over {steps['count']} steps; mean E[q] {_num(steps['mean_q'])}, {grid} |")
    mean = "" if "steps" in expected else f"; mean E[q] {_num(last['mean_q'])}, {grid}"
    lines.append(f"| E[q] (last step): ECE / Brier / AUROC | {_num(last['ece'])} / {_num(last['brier'])} / "
                 f"{_num(last['auroc'])} over {last['count']} episodes{mean} |")
    lines += [f"| {name} by E[q] % | {_pct(value)} |" for name, value in expected.items()
              if name.startswith("selected@")]
    return lines


def world_model_lines(run: Mapping[str, Any]) -> list[str]:
    """The world-model table of one run mode (fwm.eval.foresight's definitions), then risk-coverage."""
    steps, last = run["calibration"]["steps"], run["calibration"]["last_step"]
    horizon, recovery, grounding, sight = (run["planning_horizon"], run["recovery"], run["keyword_grounding"],
                                           run["foresight"])
    rates = ", ".join(f"{row['offset']}: {_pct(row['rate'])} ({row['pairs']})" for row in horizon["by_offset"])
    lines = ["| world model | value |", "|---|---|",
             f"| q (every step): ECE / Brier / AUROC | {_num(steps['ece'])} / {_num(steps['brier'])} / "
             f"{_num(steps['auroc'])} over {steps['count']} steps, {_pct(steps['missing_share'])}% without q |",
             f"| q (last step): ECE / Brier / AUROC | {_num(last['ece'])} / {_num(last['brier'])} / "
             f"{_num(last['auroc'])} over {last['count']} episodes, {last['missing']} without q |",
             *expected_q_lines(run.get("expected_q")),
             f"| keyword grounding % (keywords) | {_share_of(grounding['rate'], grounding['keywords'])} |",
             f"| foresight precision % (keywords) | {_share_of(sight['precision'], sight['keywords'])} |",
             f"| foresight recall % (revealed gold items) | {_share_of(sight['recall'], sight['revealed_items'])} |",
             f"| planning horizon (steps) | {_int(horizon['horizon'])} (any offset: "
             f"{_int(horizon['largest_offset_at_half'])}){'; found % by offset (pairs): ' + rates if rates else ''} |",
             f"| recovery % (episodes with an unproductive step) | {_share_of(recovery['rate'], recovery['episodes'])}"
             f"; success without one {_pct(recovery['success_without'])} |", ""]
    lines += ["Risk-coverage (answer only when the last step's q >= threshold): "
              + ", ".join(f"{row['threshold']:.1f}: {_pct(row['coverage'])}% answered, {_pct(row['accuracy'])}% right"
                          for row in run["risk_coverage"]) + ".", ""]
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    """The page written to WORKDIR/eval.md."""
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"{results['num_tasks']} tasks from `{results['tasks_file']}`; env {results['env']['tool']} "
             f"(max {results['env']['max_turns']} turns, score = {results['score_metric']}); prompt variant "
             f"{results['prompt']['variant']}, {results['prompt']['max_prompt_tokens']} prompt tokens at most, "
             f"{results['sampling']['max_new_tokens']} new tokens per step.", "",
             "Scores in %; in brackets the best constant answer on the same tasks (the single gold answer string "
             "that maximises the mean score: what always saying it would get). `all` pools every episode, "
             "`average` is the mean over the rows above it. repeated_searches: share of searches repeating an "
             "earlier one of the episode; top_answer_share: share of answers equal to the model's most common "
             "answer (near 100: one answer whatever the question). selected@k: success of the sample with the highest "
             "last-step q. World model: ECE (10 bins), Brier and AUROC of q against the episode's success; keyword "
             "grounding = share of keywords found in what follows their step; foresight precision = share found in "
             "the later observations; recall = share of newly revealed gold items the step's roadmap or keywords name; "
             "planning horizon = largest h such that, at every offset up to h, keywords are found in step t+h itself "
             "(offset 0: the step's own result) at least half the time; recovery = "
             "success of episodes with an unproductive step (fwm/eval/foresight.py, metrics.recovery).", ""]
    constants = results["constant_answer"]
    for mode, title in (("greedy", "Greedy (one episode per task)"), ("sampled", "Sampled")):
        if mode not in results:
            continue
        run = results[mode]
        extra: tuple[str, ...] = ("repeated_searches", "top_answer_share")
        if mode == "sampled":
            k = run["k"]
            title = f"Sampled: {k} episodes per task (temperature {results['sampling']['temperature']})"
            extra += (f"mean@{k}", f"pass@{k}", f"selected@{k}")
        lines += [f"## {title}", ""] + _rows("data source", run["by_source"], constants, extra) + [""]
        if "by_hops" in run:
            lines += _rows("gold hops", run["by_hops"], results.get("constant_answer_by_hops", {}), extra) + [""]
        chain = run.get("gold_chain")
        if chain and chain["episodes"]:
            lines += [f"Gold chain followed (knowledge world; step = the next gold hop's subject, last the gold "
                      f"answer): {_pct(chain['overall'])}% of steps over {chain['episodes']} episodes.", "",
                      "| step | episodes | followed % |", "|---|---|---|"]
            lines += [f"| {row['step']} | {row['episodes']} | {_pct(row['followed'])} |" for row in chain["by_step"]]
            lines.append("")
        if "calibration" in run:
            lines += world_model_lines(run)
    best = constants.get(ALL, {})
    if best:
        lines.append("Best constant answers over all tasks: " + ", ".join(
            f"{name} {v['answer']!r} ({_pct(v['value'])}%)" for name, v in best.items()) + ".")
    lines.append("")
    return "\n".join(lines)
