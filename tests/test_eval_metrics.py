"""Evaluation metrics on hand-made episodes: numbers worked out by hand."""
import pytest

from fwm.envs.base import EpisodeRecord, Task
from fwm.eval import metrics
from fwm.rollout.episodes import Episode, EpisodeSlot, StepRecord
from fwm.schema import Action


def _step(action, format_ok=True, q=0.5, response_len=10, prompt_len=30):
    return StepRecord(prompt_ids=[2] * prompt_len, response_ids=[5] * response_len, response_text="", span_ids=[2] * response_len,
                      logprobs=None, sampling_logprobs=None, stopped=True, q=q, keywords=[], action=action,
                      observation="", observation_kind="search", format_ok=format_ok, malformed=[] if format_ok else ["x"],
                      prompt_truncated=False)


def _episode(task, actions, score=None, formats=None, sample=0, response_len=10):
    formats = formats or [True] * len(actions)
    final = actions[-1].argument if actions and actions[-1] is not None and actions[-1].kind == "answer" else None
    record = EpisodeRecord(task=task, actions=list(actions), observations=[""] * len(actions), final_answer=final,
                           score=score if score is not None else (1.0 if final in task.answers else 0.0),
                           num_turns=len(actions), done=True, reason="answer" if final is not None else "turn_budget")
    steps = [_step(a, f, response_len=response_len) for a, f in zip(actions, formats)]
    return Episode(EpisodeSlot(task, sample, 0), steps, record)


def _task(i, answers, source="", hops=None):
    return Task(f"t{i}", f"question {i}?", tuple(answers), {"hops": hops} if hops else {}, data_source=source)


def search(q):
    return Action("search", q)


def answer(a):
    return Action("answer", a)


def test_summarize_counts_scores_format_turns_tools_and_tokens():
    right = _episode(_task(0, ["Ines Loko"]), [search("x"), search("y"), answer("ines loko")], score=1.0)
    partial = _episode(_task(1, ["Tomas Vel Ardo"]), [None, answer("Tomas Kiri")], formats=[False, True],
                       response_len=4)
    s = metrics.summarize([right, partial])
    assert s["episodes"] == 2 and s["score"] == 0.5 and s["success"] == 0.5 and s["exact_match"] == 0.5
    # F1 of "Tomas Kiri" vs "Tomas Vel Ardo": precision 1/2, recall 1/3 -> 0.4.
    assert s["f1"] == pytest.approx((1.0 + 0.4) / 2)
    assert s["format_adherence"] == pytest.approx(4 / 5) and s["format_ok_episodes"] == 0.5
    assert s["malformed_steps"] == pytest.approx(1 / 5)
    assert s["turns"] == 2.5 and s["tool_calls"] == 1.0 and s["response_tokens"] == (30 + 8) / 2
    assert s["answered"] == 1.0 and s["q_missing"] == 0.0
    no_answer = _episode(_task(2, ["a"]), [search("x")] * 3)
    assert metrics.answer_scores(no_answer) == {"score": 0.0, "exact_match": 0.0, "f1": 0.0}


def test_by_data_source_average_is_the_mean_of_sources_and_all_pools():
    eps = [_episode(_task(0, ["a"], "nq"), [answer("a")]), _episode(_task(1, ["b"], "nq"), [answer("a")]),
           _episode(_task(2, ["c"], "nq"), [answer("a")]), _episode(_task(3, ["d"], "hotpotqa"), [answer("d")])]
    out = metrics.by_data_source(eps)
    assert list(out) == ["hotpotqa", "nq", "all", "average"]
    assert out["nq"]["exact_match"] == pytest.approx(1 / 3) and out["hotpotqa"]["exact_match"] == 1.0
    assert out["all"]["exact_match"] == 0.5
    assert out["average"]["exact_match"] == pytest.approx((1 / 3 + 1) / 2) and out["average"]["episodes"] == 4


def test_best_constant_answer_is_the_best_gold_string():
    tasks = [_task(0, ["Paris"]), _task(1, ["paris"]), _task(2, ["London"]), _task(3, ["Rome", "The Paris"])]
    assert metrics.best_constant_answer(tasks) == ("Paris", 0.75)
    tasks = [_task(0, ["New York"]), _task(1, ["York"]), _task(2, ["Boston"]), _task(3, ["York City"])]
    best, value = metrics.best_constant_answer(tasks, metrics.f1)
    # "York": 2/3 + 1 + 0 + 2/3 = 7/3 -> 7/12; "New York": 1 + 2/3 + 0 + 1/2 -> 13/24 (less).
    assert best == "York" and value == pytest.approx(7 / 12)
    assert metrics.best_constant_answer([]) == ("", 0.0)


def test_pass_at_k_and_mean_at_k():
    assert metrics.pass_at_k(4, 1, 1) == 0.25 and metrics.pass_at_k(4, 1, 4) == 1.0
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10) and metrics.pass_at_k(3, 0, 2) == 0.0
    with pytest.raises(ValueError):
        metrics.pass_at_k(2, 1, 3)
    t0, t1 = _task(0, ["a"]), _task(1, ["b"])
    eps = [_episode(t0, [answer(x)], sample=g) for g, x in enumerate("aazz")]
    eps += [_episode(t1, [answer("z")], sample=g) for g in range(4)]
    out = metrics.mean_and_pass_at_k(eps, 4)
    assert out == {"tasks": 2, "k": 4, "mean@4": 0.25, "pass@4": 0.5}
    assert metrics.mean_and_pass_at_k(eps, 2)["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)


def test_gold_chain_following_per_step():
    hops = [{"subject": "Ada Vel", "object": "Bo Kim"}, {"subject": "Bo Kim", "object": "Cora"}]
    task = _task(0, ["Cora"], hops=hops)
    good = _episode(task, [search("ada vel"), search("Lima"), search("Bo Kim."), answer("Cora")])
    bad = _episode(task, [search("Bo Kim"), None, answer("Cora")])
    assert metrics.chain_steps_followed(good) == [True, False, True, True]
    assert metrics.chain_steps_followed(bad) == [False, False, False]  # the answer comes before the chain
    assert metrics.chain_steps_followed(_episode(_task(1, ["x"]), [answer("x")])) is None
    out = metrics.gold_chain_following([good, bad, _episode(_task(1, ["x"]), [answer("x")])])
    assert out["episodes"] == 2 and out["overall"] == pytest.approx(3 / 7)
    assert out["by_step"] == [{"step": 1, "episodes": 2, "followed": 0.5}, {"step": 2, "episodes": 2, "followed": 0.0},
                              {"step": 3, "episodes": 2, "followed": 0.5}, {"step": 4, "episodes": 1, "followed": 1.0}]
