"""Behaviour policies and collection: oracle / noisy / random on both synthetic worlds, continuation from a
mid-episode state, and collection that is deterministic whatever the number of workers."""
import numpy as np
import pytest

from fwm.envs.retrievers import BM25Retriever
from fwm.envs.synthetic import ArithmeticConfig, KnowledgeWorldConfig, generate_arithmetic_tasks, generate_knowledge_world
from fwm.schema import Action
from fwm.trajectories import collect
from fwm.trajectories.policies import (MISTAKE_KINDS, POLICY_NAMES, ArithmeticMoves, KnowledgeMoves, NoisyPolicy,
                                       RandomPolicy, _value, make_policy, progress)

SMALL = KnowledgeWorldConfig(num_people=12, num_cities=5, num_countries=2, num_companies=4, num_universities=3,
                             num_train_questions=80, num_test_questions=10, name_overlap=0.3)


@pytest.fixture(scope="module")
def world():
    return generate_knowledge_world(SMALL, seed=5)


@pytest.fixture(scope="module")
def search_spec(world, tmp_path_factory):
    directory = tmp_path_factory.mktemp("index") / "bm25"
    BM25Retriever.build(world.corpus(), directory)
    return collect.EnvSpec("search", max_turns=8, index_dir=str(directory))


@pytest.fixture(scope="module")
def arithmetic_tasks():
    train, _ = generate_arithmetic_tasks(ArithmeticConfig(num_train_tasks=40, num_test_tasks=0), seed=2)
    return train


MATH_SPEC = collect.EnvSpec("python", max_turns=8, isolation="audit")


def _policies(moves, **kwargs):
    return {name: make_policy(name, moves, **kwargs) for name in POLICY_NAMES}


def _collect(spec, policies, tasks, names=POLICY_NAMES, episodes=1, workers=0, seed=0):
    job = collect.CollectJob(spec, policies, seed)
    return collect.collect(job, collect.episode_items("mid_train", tasks, names, episodes), workers=workers,
                           chunk_size=8, progress=False)


def test_oracle_follows_the_gold_chain_and_succeeds_in_both_worlds(world, search_spec, arithmetic_tasks):
    moves = KnowledgeMoves.from_world(world)
    rows = _collect(search_spec, _policies(moves), world.train_tasks[:40], names=("oracle",))
    for row in rows:
        hops = row["task"]["metadata"]["hops"]
        assert [a["argument"] for a in row["actions"]] == [hop["subject"] for hop in hops] + row["task"]["answers"]
        assert row["score"] == 1.0 and row["reason"] == "answer"
    rows = _collect(MATH_SPEC, _policies(ArithmeticMoves()), arithmetic_tasks[:6], names=("oracle",))
    for row in rows:
        steps = row["task"]["metadata"]["steps"]
        assert [o.strip() for o in row["observations"][:-1]] == [str(step["after"]) for step in steps]
        assert row["actions"][-1] == {"kind": "answer", "argument": row["task"]["answers"][0]}
        assert row["score"] == 1.0


def test_success_rates_order_oracle_noisy_random(world, search_spec):
    rows = _collect(search_spec, _policies(KnowledgeMoves.from_world(world)), world.train_tasks, episodes=2)
    rate = {name: np.mean([r["score"] for r in rows if r["policy"] == name]) for name in POLICY_NAMES}
    assert rate["oracle"] == 1.0
    assert 0.4 < rate["noisy"] < 0.95
    assert rate["random"] < 0.15


def test_noisy_policy_errs_at_its_rate_recovers_and_answers_wrongly(world, search_spec):
    moves = KnowledgeMoves.from_world(world)
    policy = NoisyPolicy(moves, p_error=0.3, p_recover=0.7)
    rows = _collect(search_spec, {"noisy": policy}, world.train_tasks, names=("noisy",), episodes=3)
    on_track = mistakes = recoveries = wrong_answers = 0
    for row in rows:
        record = collect.record_from_row(row)
        history = list(zip(record.actions, record.observations))
        for t in range(len(history)):
            k_before, advanced_before = progress(moves, record.task, history[:t])
            _, advanced = progress(moves, record.task, history[:t + 1])
            if advanced_before:
                on_track += 1
                mistakes += not advanced
            elif advanced:
                recoveries += 1
        last = record.actions[-1]
        wrong_answers += last.kind == "answer" and record.score == 0.0
    assert abs(mistakes / on_track - 0.3) < 0.06, (mistakes, on_track)
    assert recoveries > 20 and wrong_answers > 10
    recovered_and_won = [r for r in rows if r["score"] == 1.0 and len(r["actions"]) > len(r["task"]["metadata"]["hops"]) + 1]
    assert recovered_and_won  # some successes went through a mistake first


def test_noisy_without_errors_is_the_oracle_and_mistakes_are_never_the_right_step(world, arithmetic_tasks):
    rng = np.random.default_rng(0)
    for moves, tasks in ((KnowledgeMoves.from_world(world), world.train_tasks), (ArithmeticMoves(), arithmetic_tasks)):
        quiet = NoisyPolicy(moves, p_error=0.0)
        for task in tasks[:20]:
            for k in range(moves.num_steps(task) + 1):
                history = [(moves.correct(task, i), "") for i in range(k)]
                assert quiet(task, history, rng) == moves.correct(task, k)
                for kind in MISTAKE_KINDS:
                    assert moves.mistake(kind, task, k, history, rng) != moves.correct(task, k)
    for task in arithmetic_tasks:  # wrong expressions compute wrong values (not just other text)
        for step in task.metadata["steps"]:
            assert all(_value(e) != step["after"] for e in ArithmeticMoves.wrong_expressions(step))


def test_policies_continue_from_any_mid_episode_state(world, search_spec):
    env = collect.make_env(search_spec)
    policy = make_policy("noisy", KnowledgeMoves.from_world(world))
    for task in world.train_tasks[:15]:
        record = collect.run_episode(env, policy, task, np.random.default_rng(7))
        actions, observations = list(record.actions), list(record.observations)
        for t in range(len(actions)):
            continued = collect.run_episode(env, policy, task, np.random.default_rng(t), prefix=actions[:t])
            assert continued.actions[:t] == actions[:t] and continued.observations[:t] == observations[:t]
            assert continued.done and len(continued.actions) > t
        # same seed, same episode: the policy keeps no state between calls
        again = collect.run_episode(env, policy, task, np.random.default_rng(7))
        assert again.actions == actions
    with pytest.raises(ValueError, match="past the end"):
        collect.run_episode(env, policy, world.train_tasks[0], np.random.default_rng(0),
                            prefix=[Action("answer", "x"), Action("answer", "y")])


def test_collection_is_deterministic_whatever_the_worker_count(world, search_spec):
    policies = _policies(KnowledgeMoves.from_world(world))
    tasks = world.train_tasks[:24]
    serial = _collect(search_spec, policies, tasks, workers=0)
    parallel = _collect(search_spec, policies, tasks, workers=2)
    assert serial == parallel
    assert [row["id"] for row in serial] == [f"mid_train/{p}/{t.id}/0" for t in tasks for p in POLICY_NAMES]
    assert _collect(search_spec, policies, tasks, workers=0, seed=1) != serial
    for row in serial:  # rows are EpisodeRecord.to_dict plus the collection keys, and round-trip
        assert collect.record_from_row(row).to_dict().items() <= row.items()
        assert {"id", "split", "policy", "episode", "seed"} <= row.keys()


def test_random_policy_uses_visible_numbers_and_memoised_math_env_matches_plain(arithmetic_tasks):
    task = arithmetic_tasks[0]
    policy = RandomPolicy(ArithmeticMoves(), p_answer=0.0)
    action = policy(task, [], np.random.default_rng(0))
    assert action.kind == "python"
    a, _, b = action.argument.splitlines()[0][len("x = "):].split(" ")
    assert a in task.question and b in task.question
    env = collect.make_env(MATH_SPEC)
    env.reset(task)
    first = env.step(action)
    env.reset(task)
    assert env.step(action) == first  # served from the memo: same observation and flags


def test_bad_policy_parameters_name_the_field():
    with pytest.raises(ValueError, match="p_error"):
        NoisyPolicy(ArithmeticMoves(), p_error=1.5)
    with pytest.raises(ValueError, match="mistake_weights"):
        NoisyPolicy(ArithmeticMoves(), mistake_weights=(1.0, 0.0))
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("greedy", ArithmeticMoves())
    with pytest.raises(ValueError, match="index_dir"):
        collect.EnvSpec("search")
