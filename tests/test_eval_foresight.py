"""fwm.eval.foresight and metrics.recovery on hand-made episodes: every number worked out by hand."""
import pytest

from fwm.envs.base import EpisodeRecord, Task
from fwm.eval import foresight, metrics
from fwm.rollout.episodes import Episode, EpisodeSlot, StepRecord
from fwm.schema import Action

NO_RESULTS = "No documents matched the query."
HOPS = [{"subject": "Ada Vel", "subject_id": "person-1", "relation": "mentored_by", "object": "Bo Kim",
         "object_id": "person-2"},
        {"subject": "Bo Kim", "subject_id": "person-2", "relation": "works_for", "object": "Acme",
         "object_id": "company-3"}]


def _step(action, observation="", keywords=(), q=None, roadmap=None):
    text = f"<imaginary>{roadmap}</imaginary>" if roadmap is not None else "garbage"
    return StepRecord(prompt_ids=[2], response_ids=[5], response_text=text, span_ids=[2], logprobs=None,
                      sampling_logprobs=None, stopped=True, q=q, keywords=list(keywords), action=action,
                      observation=observation, observation_kind="search", format_ok=action is not None,
                      malformed=[] if action is not None else ["no action"], prompt_truncated=False)


def _episode(task, steps, success, sample=0, **counts):
    record = EpisodeRecord(task=task, actions=[s.action for s in steps],
                           observations=[s.observation for s in steps], score=1.0 if success else 0.0,
                           num_turns=len(steps), done=True, **counts)
    return Episode(EpisodeSlot(task, sample, 0), steps, record)


def _task(name="t0", metadata=None, question="question?"):
    return Task(name, question, ("Acme",), metadata or {})


def search(q):
    return Action("search", q)


def answer(a):
    return Action("answer", a)


def _knowledge_episode():
    """Ada Vel -mentored by-> Bo Kim -works for-> Acme, with a detour (search Lima, no results) at step 1."""
    task = _task("k", {"world": "knowledge", "hops": HOPS}, "Who is the employer of the mentor of Ada Vel?")
    steps = [
        _step(search("Ada Vel"), "Doc 1(Title: Ada Vel) Ada Vel was mentored by Bo Kim.\n", ["mentored by", "Lima"],
              0.6, "Search Ada Vel to find [person B], the mentor of Ada Vel; then search [person B] to find [company C]."),
        _step(search("Lima"), NO_RESULTS, ["Bo Kim", "works for"], 0.3, "Search Lima, which adds no link."),
        _step(search("Bo Kim"), "Doc 1(Title: Bo Kim) Bo Kim works for Acme.\n", ["Acme", "Zed"], 0.8,
              "Search Bo Kim to find Acme."),
        _step(answer("Acme"), "", [], 0.9, None),
    ]
    return _episode(task, steps, True)


def test_q_calibration_steps_and_last_step_by_hand():
    t = _task()
    eps = [_episode(t, [_step(search("a"), q=0.2), _step(answer("x"), q=0.9)], True),
           _episode(t, [_step(None, q=None), _step(answer("y"), q=0.3)], False),
           _episode(t, [_step(search("b"), q=0.6), _step(None, q=None)], False)]
    out = foresight.q_calibration(eps)
    steps, last = out["steps"], out["last_step"]
    # pooled steps: (0.2, 1), (0.9, 1), (0.3, 0), (0.6, 0); two steps without q
    assert steps["count"] == 4 and steps["missing"] == 2 and steps["missing_share"] == pytest.approx(2 / 6)
    assert steps["ece"] == pytest.approx((0.8 + 0.1 + 0.3 + 0.6) / 4)  # one pair per bin
    assert steps["brier"] == pytest.approx((0.64 + 0.01 + 0.09 + 0.36) / 4)
    assert steps["auroc"] == pytest.approx(0.5)  # 0.9 beats both failures, 0.2 neither
    assert steps["mean_q"] == pytest.approx(0.5) and steps["success"] == 0.5 and len(steps["reliability"]) == 4
    # last steps: (0.9, 1), (0.3, 0); the third episode's last step has no q
    assert last["count"] == 2 and last["missing"] == 1
    assert last["ece"] == pytest.approx(0.2) and last["brier"] == pytest.approx(0.05) and last["auroc"] == 1.0
    empty = foresight.q_calibration([_episode(t, [_step(None)], False)])
    assert empty["steps"]["ece"] is None and empty["steps"]["missing_share"] == 1.0 and empty["last_step"]["auroc"] is None


def test_grounding_precision_and_recall_by_hand():
    k = _knowledge_episode()
    plain = _episode(_task("p"), [_step(search("q"), "Doc 1(Title: X) x y\n", ["x"])], False)
    # grounding (tau_{>t}, agent actions included): t0 2/2 ("Lima" is the next query), t1 2/2, t2 1/2, plain 1/1
    assert [foresight.keywords_grounded(k, t) for t in range(4)] == [[True, True], [True, True], [True, False], []]
    g = foresight.keyword_grounding([k, plain])
    assert g["rate"] == pytest.approx(6 / 7) and g["keywords"] == 7
    assert g["steps_with_keywords"] == pytest.approx(4 / 5)
    # precision (observations only): "Lima" is only ever typed by the agent -> t0 1/2, t1 2/2, t2 1/2, plain 1/1
    assert foresight.keywords_confirmed(k, 0) == [True, False]
    # recall: t0 names both future entities by placeholder; at t1 Bo Kim is already seen and Acme is not
    # named; t2 names Acme; the answer step reveals nothing
    assert [foresight.items_revealed(k, t) for t in range(4)] == [
        [("Bo Kim", "[person B]"), ("Acme", "[company C]")], [("Acme", "[company C]")], [("Acme", "[company C]")], []]
    assert [foresight.items_named(k, t) for t in range(4)] == [[True, True], [False], [True], []]
    assert foresight.items_named(plain, 0) is None
    f = foresight.foresight([k, plain])
    assert f == {"precision": pytest.approx(5 / 7), "keywords": 7, "recall": 0.75, "revealed_items": 4,
                 "episodes_without_metadata": 1}
    arithmetic = {"world": "arithmetic", "start": 3, "steps": [{"expression": "3 * 4", "after": 12}]}
    e = _episode(_task("a", arithmetic), [_step(Action("python", "x = 3 * 4\nprint(x)"), "12\n", [], 0.5,
                                                "compute 3 * 4 to get [result of step 1]")], False)
    assert foresight.items_named(e, 0) == [True]


def test_planning_horizon_by_hand():
    k = _knowledge_episode()
    # t0 ["mentored by", "Lima"]: h0 1/2, h1 1/2, h2 0/2, h3 0/2; t1 ["Bo Kim", "works for"]: h0 0/2, h1 2/2,
    # h2 0/2; t2 ["Acme", "Zed"]: h0 1/2, h1 1/2 ("answer: Acme")
    out = foresight.planning_horizon([k])
    assert out["by_offset"] == [{"offset": 0, "pairs": 6, "rate": pytest.approx(2 / 6)},
                                {"offset": 1, "pairs": 6, "rate": pytest.approx(4 / 6)},
                                {"offset": 2, "pairs": 4, "rate": 0.0}, {"offset": 3, "pairs": 2, "rate": 0.0}]
    assert out["horizon"] is None and out["largest_offset_at_half"] == 1  # rate(0) = 1/3 already fails
    # "far" is found exactly two steps ahead, not before, not after (not cumulative); "near" in the step's
    # own result and in the next step
    t = _task()
    far = _episode(t, [_step(search("a"), "aa near", ["far", "near"]), _step(search("near"), "bb"),
                       _step(search("far"), "cc"), _step(search("d"), "dd")], False)
    out = foresight.planning_horizon([far])
    assert [row["rate"] for row in out["by_offset"]] == [0.5, 0.5, 0.5, 0.0]
    assert out["horizon"] == 2 and out["largest_offset_at_half"] == 2
    gap = _episode(t, [_step(search("a"), "aa near", ["far", "near"]), _step(search("b"), "bb"),
                       _step(search("far"), "cc")], False)  # offsets: 1/2, 0, 1/2
    out = foresight.planning_horizon([gap])
    assert out["horizon"] == 0 and out["largest_offset_at_half"] == 2
    assert foresight.planning_horizon([_episode(t, [_step(None)], False)]) == {
        "horizon": None, "largest_offset_at_half": None, "by_offset": []}


def test_selected_at_k_by_hand():
    def group(name, qs_and_success):
        return [_episode(_task(name), [_step(answer("a"), q=q)], s, sample=g)
                for g, (q, s) in enumerate(qs_and_success)]
    eps = (group("t1", [(0.9, False), (0.4, True), (None, True)])   # picks 0.9 -> 0
           + group("t2", [(0.7, True), (0.7, False), (0.2, False)])  # tie at 0.7 -> 1/2
           + group("t3", [(None, False), (None, True), (None, False)])  # no q at all: uniform -> 1/3
           + group("t4", [(0.1, False), (0.8, True), (None, False)]))  # picks 0.8 -> 1
    assert foresight.selected_at_k(eps) == pytest.approx((0 + 0.5 + 1 / 3 + 1) / 4)
    assert foresight.selected_at_k(group("t5", [(0.5, True)])) == 1.0 and foresight.selected_at_k([]) is None
    # by another q (the eval's E[q]): here 1 - the written q, so t1 picks 0.6 -> 1, t2 0.8 -> 0, t3 1/3, t4 0.9 -> 0
    flipped = foresight.selected_at_k(eps, lambda e: None if foresight.last_q(e) is None else 1 - foresight.last_q(e))
    assert flipped == pytest.approx((1 + 0 + 1 / 3 + 0) / 4)


def test_risk_coverage_by_hand():
    t = _task()
    eps = [_episode(t, [_step(answer("a"), q=q)], s) for q, s in
           [(0.9, True), (0.5, False), (0.5, True), (None, True), (0.05, False)]]
    rows = {row["threshold"]: (row["coverage"], row["accuracy"]) for row in foresight.risk_coverage(eps)}
    assert len(rows) == 11
    assert rows[0.0] == (pytest.approx(4 / 5), 0.5)  # the episode without q never answers
    assert rows[0.1] == rows[0.5] == (pytest.approx(3 / 5), pytest.approx(2 / 3))
    assert rows[0.6] == rows[0.9] == (pytest.approx(1 / 5), 1.0) and rows[1.0] == (0.0, None)


def test_recovery_by_hand():
    t = _task()
    docs = "Doc 1(Title: P) p\nDoc 2(Title: Q) q\n"
    k = _knowledge_episode()  # step 1 searches off the chain, with no results; succeeds
    assert metrics.unproductive_steps(k) == [False, True, False, False]
    repeat = _episode(t, [_step(search("a"), docs), _step(search("b"), "Doc 1(Title: Q) q\nDoc 2(Title: P) p\n")],
                      False)  # the second search shows the same passages in another order
    assert metrics.passages(docs) == {"Title: P) p", "Title: Q) q"} and metrics.passages(NO_RESULTS) == set()
    assert metrics.unproductive_steps(repeat) == [False, True]
    tool_error = _episode(t, [_step(search("a"), docs), _step(answer("Acme"))], True, num_tool_errors=1)
    assert metrics.unproductive_steps(tool_error) == [False, False] and metrics.has_unproductive_step(tool_error)
    clean_win = _episode(t, [_step(search("a"), docs), _step(answer("Acme"))], True)
    clean_loss = _episode(t, [_step(search("a"), docs), _step(answer("x"))], False)
    malformed = _episode(t, [_step(None, "malformed"), _step(answer("Acme"))], True, num_malformed=1)
    out = metrics.recovery([k, repeat, tool_error, clean_win, clean_loss, malformed])
    assert out == {"rate": 0.75, "episodes": 4, "share": pytest.approx(4 / 6), "success_without": 0.5,
                   "unproductive_steps": pytest.approx(3 / 14)}
    assert metrics.recovery([clean_win])["rate"] is None
