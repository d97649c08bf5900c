"""The evaluation results (fwm.eval.run's dict) as a markdown page: one table per run mode, the best
constant answer beside every score, the gold-chain rate per step."""
from __future__ import annotations

from typing import Any, Mapping

from fwm.eval.metrics import ALL


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _rows(by_source: Mapping[str, Mapping[str, Any]], constants: Mapping[str, Mapping[str, Any]],
          extra: tuple[str, ...]) -> list[str]:
    head = ("| data source | episodes | score (const) | EM (const) | F1 (const) | format % | turns | tool calls | "
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


def markdown(results: Mapping[str, Any]) -> str:
    """The page written to WORKDIR/eval.md."""
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"{results['num_tasks']} tasks from `{results['tasks_file']}`; env {results['env']['tool']} "
             f"(max {results['env']['max_turns']} turns, score = {results['score_metric']}); prompt variant "
             f"{results['prompt']['variant']}, {results['prompt']['max_prompt_tokens']} prompt tokens at most, "
             f"{results['sampling']['max_new_tokens']} new tokens per step.", "",
             "Scores in %; in brackets the best constant answer on the same tasks (the single gold answer string "
             "that maximises the mean score: what always saying it would get). `all` pools every episode, "
             "`average` is the mean over data sources.", ""]
    constants = results["constant_answer"]
    for mode, title in (("greedy", "Greedy (one episode per task)"), ("sampled", "Sampled")):
        if mode not in results:
            continue
        run = results[mode]
        extra: tuple[str, ...] = ()
        if mode == "sampled":
            k = run["k"]
            title = f"Sampled: {k} episodes per task (temperature {results['sampling']['temperature']})"
            extra = (f"mean@{k}", f"pass@{k}")
        lines += [f"## {title}", ""] + _rows(run["by_source"], constants, extra) + [""]
        chain = run.get("gold_chain")
        if chain and chain["episodes"]:
            lines += [f"Gold chain followed (knowledge world; step = the next gold hop's subject, last the gold "
                      f"answer): {_pct(chain['overall'])}% of steps over {chain['episodes']} episodes.", "",
                      "| step | episodes | followed % |", "|---|---|---|"]
            lines += [f"| {row['step']} | {row['episodes']} | {_pct(row['followed'])} |" for row in chain["by_step"]]
            lines.append("")
    best = constants.get(ALL, {})
    if best:
        lines.append("Best constant answers over all tasks: " + ", ".join(
            f"{name} {v['answer']!r} ({_pct(v['value'])}%)" for name, v in best.items()) + ".")
    lines.append("")
    return "\n".join(lines)
