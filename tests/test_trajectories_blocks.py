"""World-model blocks: Monte Carlo confidence against its own continuations, the rule writer's placeholders
and grounded keywords, no spoiler in any emitted block (fuzzed), and counted rejections of a leaking writer."""
import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from fwm.envs.retrievers import BM25Retriever
from fwm.envs.synthetic import ArithmeticConfig, KnowledgeWorldConfig, generate_arithmetic_tasks, generate_knowledge_world
from fwm.envs.base import Task
from fwm.schema import Action, WorldModelBlock
from fwm.trajectories import blocks, collect
from fwm.trajectories.policies import ArithmeticMoves, KnowledgeMoves, make_policy, off_gold_steps
from fwm.trajectories.spoilers import BlockRejected, StepContext, contains_term, find_spoilers, spoiler_terms

SMALL = KnowledgeWorldConfig(num_people=14, num_cities=6, num_countries=2, num_companies=4, num_universities=3,
                             num_train_questions=120, num_test_questions=10, name_overlap=0.3,
                             hop_weights=(0.1, 0.3, 0.3, 0.3))
MATH_SPEC = collect.EnvSpec("python", max_turns=8, isolation="audit")


@pytest.fixture(scope="module")
def world():
    return generate_knowledge_world(SMALL, seed=11)


@pytest.fixture(scope="module")
def search_spec(world, tmp_path_factory):
    directory = tmp_path_factory.mktemp("index") / "bm25"
    BM25Retriever.build(world.corpus(), directory)
    return collect.EnvSpec("search", max_turns=8, index_dir=str(directory))


@pytest.fixture(scope="module")
def noisy_rows(world, search_spec):
    policies = {name: make_policy(name, KnowledgeMoves.from_world(world)) for name in ("noisy", "random")}
    job = collect.CollectJob(search_spec, policies, seed=3)
    items = collect.episode_items("mid_train", world.train_tasks, ("noisy", "random"), 1)
    return collect.collect(job, items, progress=False), policies


def _names(world):
    return tuple(entity.name for entity in world.entities)


def test_percent_rounds_half_up():
    assert [blocks.percent(n, 8) for n in range(9)] == [0, 13, 25, 38, 50, 63, 75, 88, 100]
    assert blocks.percent(1, 3) == 33 and blocks.percent(2, 3) == 67 and blocks.percent(1, 200) == 1


@pytest.mark.parametrize("conditioning", ["q", "v"])
def test_monte_carlo_confidence_is_the_success_rate_of_its_own_continuations(world, search_spec, noisy_rows,
                                                                             conditioning):
    """q: Q(s_t, a_t), continuations replay actions[:t+1] (after a_t); at the last step one replay, whose outcome
    is a_t's own (the answer's correctness). v: V(s_t), continuations replay actions[:t] (before a_t)."""
    rows, policies = noisy_rows
    env = collect.make_env(search_spec)
    checked = set()
    for row in rows[:40:3]:
        record = collect.record_from_row(row)
        for step in range(len(record.actions)):
            estimate = blocks.monte_carlo_confidence(env, policies[row["policy"]], record, step, 6, 0, row["id"],
                                                     conditioning)
            last = step == len(record.actions) - 1
            k = 1 if conditioning == "q" and last else 6
            prefix = record.actions[:step + 1] if conditioning == "q" else record.actions[:step]
            outcomes = []
            for j in range(k):  # rerun each continuation independently, from the recorded state
                seed = blocks.continuation_seed(0, row["id"], step, j)
                assert estimate.seeds[j] == seed
                continuation = collect.run_episode(env, policies[row["policy"]], record.task,
                                                   np.random.default_rng(seed), prefix=prefix)
                assert continuation.actions[:len(prefix)] == list(prefix)
                outcomes.append(continuation.score == 1.0)
            assert list(estimate.successes) == outcomes and estimate.k == k
            assert estimate.confidence == round(100 * np.mean(outcomes) + 1e-9)
            assert estimate.conditioning == conditioning
            if conditioning == "q" and last:  # the final answer (or last turn): q is its own outcome
                assert estimate.confidence == (100 if record.score == 1.0 else 0)
            checked.add(estimate.confidence)
    assert len(checked) > 2  # the states differ in how promising they are
    oracle = make_policy("oracle", KnowledgeMoves.from_world(world))
    record = collect.run_episode(env, oracle, world.train_tasks[0], np.random.default_rng(0))
    assert blocks.monte_carlo_confidence(env, oracle, record, 0, 4, 0, "x", conditioning).confidence == 100
    with pytest.raises(ValueError, match="conditioning"):
        blocks.monte_carlo_confidence(env, oracle, record, 0, 4, 0, "x", "w")


def test_q_after_a_wrong_step_is_below_v_before_it(world, search_spec, noisy_rows):
    """Conditioning on a_t is what makes q tell an erring step: after a premature wrong answer q is 0 while V
    of the state before it is not; across steps, q is lower on erring steps than on the rest."""
    rows, policies = noisy_rows
    env = collect.make_env(search_spec)
    moves = KnowledgeMoves.from_world(world)
    q_err, q_ok, wrong_answers = [], [], 0
    for row in rows[:60]:
        if row["policy"] != "noisy":
            continue
        record = collect.record_from_row(row)
        erring = off_gold_steps(moves, record.task, record.actions)
        for step, err in enumerate(erring):
            q = blocks.monte_carlo_confidence(env, policies["noisy"], record, step, 4, 0, row["id"], "q").confidence
            (q_err if err else q_ok).append(q)
            if err and record.actions[step].kind == "answer":
                wrong_answers += 1
                assert q == 0
                v = blocks.monte_carlo_confidence(env, policies["noisy"], record, step, 8, 0, row["id"], "v")
                assert v.confidence > 0
    assert wrong_answers > 0 and np.mean(q_err) + 20 < np.mean(q_ok)


def test_rule_blocks_use_placeholders_then_name_what_was_seen(world, search_spec):
    env = collect.make_env(search_spec)
    oracle = make_policy("oracle", KnowledgeMoves.from_world(world))
    task = next(t for t in world.train_tasks if t.metadata["num_hops"] == 3)
    record = collect.run_episode(env, oracle, task, np.random.default_rng(0))
    hops = task.metadata["hops"]
    writer = blocks.RuleBlockWriter()
    for step in range(len(record.actions)):
        context = StepContext.from_record(record, step)
        block = writer(context, 50, spoiler_terms(context, _names(world)))
        assert block.confidence == 50
        assert block.roadmap.startswith(f"Search {hops[step]['subject']}" if step < 3 else f"Answer {task.answers[0]}")
        for later in hops[step:]:  # entities not yet reached appear only as placeholders
            assert later["object"] not in block.roadmap + block.analysis
        remaining = 3 - step  # the oracle's search at each step retrieves the linking sentence
        assert block.roadmap.count("[") == (3 * remaining - 1 if remaining else 0)
        if step < 3:  # the searched name is in the document the search retrieves: grounded
            assert all(contains_term(context.future_text("observation"), k) for k in block.keywords)
            assert block.keywords[0] == record.actions[step].argument
        else:  # nothing follows the final answer, so no keyword is grounded (the answer's own text is not)
            assert block.keywords == []
    assert "Missing: nothing" in block.analysis and "[" not in block.roadmap
    loose = blocks.RuleBlockWriter(future_start="action")(context, 50, spoiler_terms(context, _names(world)))
    assert loose.keywords[0] == task.answers[0]  # tau_{>=t}: a_t's own text counts


def test_the_roadmap_follows_the_real_future_on_erring_steps(world, search_spec, noisy_rows):
    """The roadmap's first intent is a_t itself, also where a_t errs (a wrong entity, a vague query, a premature
    wrong answer), and it has one clause per action that really follows: the block never plans the gold step
    while the agent does another."""
    rows, _ = noisy_rows
    moves = KnowledgeMoves.from_world(world)
    types = {entity.name: entity.type for entity in world.entities}
    writer = blocks.RuleBlockWriter(entity_types=types)
    seen_kinds = set()
    for row in rows:
        if row["policy"] != "noisy":
            continue
        record = collect.record_from_row(row)
        hops = record.task.metadata["hops"]
        chain = [hops[0]["subject"]] + [hop["object"] for hop in hops]
        chain_types = [hops[0]["subject_id"].split("-")[0]] + [hop["object_id"].split("-")[0] for hop in hops]
        for step, err in enumerate(off_gold_steps(moves, record.task, record.actions)):
            if not err:
                continue
            context = StepContext.from_record(record, step)
            block = writer(context, 0, spoiler_terms(context, _names(world)))
            action = record.actions[step]
            known = blocks.knowledge_established(record.task, record.observations[:step])
            if action.argument in chain:
                j = chain.index(action.argument)
                expected = action.argument if j <= known else f"[{chain_types[j]} {'ABCDE'[j]}]"
            elif action.argument in types:
                expected = action.argument if _raw_mentions(context.visible_text(), action.argument) \
                    else f"[another {types[action.argument]}]"
            else:
                expected = f'"{action.argument}"'
            first = block.roadmap.split("; then ")[0]
            assert first.startswith(f"{action.kind.capitalize()} {expected}"), (action, block.roadmap)
            clauses = len(record.actions) - step + (record.actions[-1].kind != "answer")
            assert block.roadmap.count("; then ") == clauses - 1, block.roadmap
            seen_kinds.add("vague" if expected.startswith('"') else action.kind)
    assert seen_kinds == {"search", "vague", "answer"}


def test_a_keyword_equal_to_the_steps_own_query_is_not_grounded():
    """future.what_follows starts at a_t's observation: repeating a_t's query earns no grounding unless the query
    comes back in what follows; blocks.future_start="action" is the looser reading."""
    task = Task(id="t", question="Who is the mentor of Ava Lin?", answers=("Bo Reyes",), metadata={})
    context = StepContext(task=task, step=0, score=1.0,
                          actions=(Action("search", "the mentor of"), Action("search", "Ava Lin"),
                                   Action("answer", "Bo Reyes")),
                          observations=("Ava Lin is a painter.", "Ava Lin was mentored by Bo Reyes.", ""))
    candidates = ["the mentor of", "mentored by", "Ava Lin", "painter"]
    assert blocks.grounded_keywords(candidates, context, [], 4) == ["mentored by", "Ava Lin", "painter"]
    assert blocks.grounded_keywords(candidates, context, [], 4, "action") == candidates
    last = dataclasses.replace(context, step=2)
    assert blocks.grounded_keywords(["Bo Reyes"], last, [], 4) == []  # the answer's own text
    assert blocks.grounded_keywords(["Bo Reyes"], last, [], 4, "action") == ["Bo Reyes"]
    assert blocks.grounded_keywords(["Bo Reyes"], last, ["Bo Reyes"], 4, "action") == []  # forbidden wins


def _raw_mentions(text, name):
    return re.search(r"(?<![\w])" + re.escape(name.lower()) + r"(?![\w])", text.lower()) is not None


def test_no_emitted_block_contains_a_spoiler_fuzzed(world, search_spec, noisy_rows):
    rows, policies = noisy_rows
    job = blocks.BlockJob(search_spec, policies, "rule", {}, seed=0, mc_k=2, entity_names=_names(world))
    items = [blocks.BlockItem(row, tuple(range(len(row["actions"])))) for row in rows]
    annotated = [r for done in blocks.annotate_chunk(job, items) for r in done.rows]
    by_id = {row["id"]: collect.record_from_row(row) for row in rows}
    assert len(annotated) > 600
    assert all(r["rejection"] is None for r in annotated)  # the rule writer writes clean blocks, not rejected ones
    with_keywords = non_final = 0
    for r in annotated:
        context = StepContext.from_record(by_id[r["trajectory_id"]], r["step"])
        block = blocks.block_from_dict(r["block"])
        assert not find_spoilers(block, spoiler_terms(context, _names(world)))
        # independently of the shared normalisation: no gold-chain entity, answer or world entity that the agent
        # has not seen, matched on raw lower-cased text
        visible, text = context.visible_text(), " ".join([block.roadmap, *block.keywords, block.analysis])
        chain = [hop["object"] for hop in context.task.metadata["hops"]] + list(context.task.answers)
        for name in set(chain) | set(_names(world)):
            if not _raw_mentions(visible, name):
                assert not _raw_mentions(text, name), (name, text)
        if r["step"] < len(context.actions) - 1:  # nothing follows the last step, so nothing can be grounded
            with_keywords += bool(block.keywords)
            non_final += 1
    assert with_keywords > 0.9 * non_final


def test_arithmetic_blocks_hide_unseen_values(arithmetic_env_rows):
    rows, policies = arithmetic_env_rows
    job = blocks.BlockJob(MATH_SPEC, policies, "rule", {}, seed=0, mc_k=2)
    annotated = [r for done in blocks.annotate_chunk(job, [blocks.BlockItem(row, tuple(range(len(row["actions"]))))
                                                  for row in rows]) for r in done.rows]
    assert annotated and all(r["rejection"] is None for r in annotated)
    for row, r in ((next(x for x in rows if x["id"] == r["trajectory_id"]), r) for r in annotated):
        context = StepContext.from_record(collect.record_from_row(row), r["step"])
        text = " ".join([r["block"]["roadmap"], *r["block"]["keywords"], r["block"]["analysis"]])
        for step in row["task"]["metadata"]["steps"]:
            if not contains_term(context.visible_text(), str(step["after"])):
                assert not contains_term(text, str(step["after"])), (step, text)
    first = next(r for r in annotated if r["step"] == 0)
    assert "[result of step" in first["block"]["roadmap"] or len(rows[0]["task"]["metadata"]["steps"]) == 1
    erring = 0
    for row in rows:  # the first intent is a_t as the agent runs it: its operator and operand, right or wrong
        record = collect.record_from_row(row)
        flags = off_gold_steps(ArithmeticMoves(), record.task, record.actions)
        for r in (r for r in annotated if r["trajectory_id"] == row["id"]):
            action, intent = record.actions[r["step"]], r["block"]["roadmap"].split("; then ")[0]
            erring += flags[r["step"]]
            if action.kind == "answer":
                assert intent.startswith("Answer "), intent
            elif action.argument.startswith("x = "):
                _, op, operand = action.argument.split("\n")[0][len("x = "):].split(" ")
                assert intent.startswith("Compute ") and intent.replace(",", "").split(" ")[2:4] == [op, operand], intent
    assert erring > 0


@pytest.fixture(scope="module")
def arithmetic_env_rows():
    train, _ = generate_arithmetic_tasks(ArithmeticConfig(num_train_tasks=8, num_test_tasks=0), seed=4)
    policies = {"noisy": make_policy("noisy", ArithmeticMoves())}
    job = collect.CollectJob(MATH_SPEC, policies, seed=0)
    return collect.collect(job, collect.episode_items("mid_train", train, ("noisy",), 1), progress=False), policies


@dataclasses.dataclass
class LeakyWriter:
    """Writes the answer into the roadmap and skips check_block: a writer that must not be trusted."""

    calls: int = 0

    def __call__(self, context, confidence, forbidden):
        self.calls += 1
        return WorldModelBlock(roadmap=f"then answer {context.task.answers[0]}", keywords=["x"], analysis="a",
                               confidence=confidence)


def test_rejections_are_counted_for_a_leaking_or_failing_writer(world, search_spec, noisy_rows):
    rows, policies = noisy_rows
    env = collect.make_env(search_spec)
    leaky = LeakyWriter()
    expected = annotated = 0
    for row in rows[:30]:
        record = collect.record_from_row(row)
        steps = range(len(record.actions))
        out = blocks.annotate_steps(env, policies[row["policy"]], leaky, record, row["id"], steps, k=1, seed=0,
                                    entity_names=_names(world))
        for r in out:
            context = StepContext.from_record(record, r["step"])
            leaks = not contains_term(context.visible_text(), record.task.answers[0])
            expected += leaks
            assert (r["block"] is None) == leaks and r["spoiler_rejection"] == leaks
            annotated += 1
    assert expected > 20 and leaky.calls == annotated

    def refusing(context, confidence, forbidden):
        raise BlockRejected("teacher gave up")

    def overconfident(context, confidence, forbidden):
        return WorldModelBlock(roadmap="r", keywords=[], analysis="a", confidence=(confidence + 50) % 101)

    record = collect.record_from_row(rows[0])
    for writer, reason in ((refusing, "teacher gave up"), (overconfident, "changed the confidence")):
        out = blocks.annotate_steps(env, policies["noisy"], writer, record, rows[0]["id"], [0], k=1, seed=0)
        assert out[0]["block"] is None and reason in out[0]["rejection"] and not out[0]["spoiler_rejection"]


def test_evidence_roadmap_quotes_the_sentence_the_next_name_was_read_from(world, search_spec):
    env = collect.make_env(search_spec)
    oracle = make_policy("oracle", KnowledgeMoves.from_world(world))
    task = next(t for t in world.train_tasks if t.metadata["num_hops"] == 2)
    record = collect.run_episode(env, oracle, task, np.random.default_rng(0))
    names = _names(world)
    plain, quoting = blocks.RuleBlockWriter(), blocks.RuleBlockWriter(roadmap="evidence")
    for step in range(len(record.actions)):
        context = StepContext.from_record(record, step)
        forbidden = spoiler_terms(context, names)
        base, quoted = plain(context, 50, forbidden), quoting(context, 50, forbidden)
        argument = record.actions[step].argument
        if step == 0:  # the first search's subject comes from the question: nothing to quote
            assert quoted == base
            continue
        # the sentence of the previous observation that names the argument, then the unchanged roadmap
        sentence = next(s.strip() for s in re.split(r"(?<=[.!?])\s+", record.observations[step - 1])
                        if contains_term(s, argument) and "Title:" not in s)
        assert quoted.roadmap == f"{sentence} {base.roadmap}"
        assert contains_term(quoted.roadmap.split(base.roadmap)[0], argument)
        assert (quoted.keywords, quoted.analysis) == (base.keywords, base.analysis)
        assert not find_spoilers(quoted, forbidden)
    with pytest.raises(ValueError, match="roadmap"):
        blocks.RuleBlockWriter(roadmap="quote")
    with pytest.raises(ValueError, match="teacher"):
        blocks.make_block_writer("teacher", {"base_url": "http://127.0.0.1:9/v1", "model": "m"}, roadmap="evidence")


def test_writer_choice_and_lazy_teacher_import():
    assert isinstance(blocks.make_block_writer("rule"), blocks.RuleBlockWriter)
    teacher = blocks.make_block_writer("teacher", {"base_url": "http://127.0.0.1:9/v1", "model": "m"})
    assert type(teacher).__name__ == "TeacherBlockWriter"
    with pytest.raises(ValueError, match="unknown block writer"):
        blocks.make_block_writer("oracle")
    with pytest.raises(ValueError, match="confidence"):
        blocks.RuleBlockWriter()(None, 101, [])
    code = "import sys, fwm.trajectories.blocks; assert 'fwm.trajectories.teacher' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
