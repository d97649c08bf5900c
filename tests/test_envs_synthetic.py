"""Synthetic worlds: deterministic, consistent gold hops / step chains, knobs, splits, files."""
import collections
import dataclasses
import json
import re

import numpy as np
import pytest

from fwm.envs.base import read_tasks
from fwm.envs.math import MathEnv
from fwm.envs.retrievers import BM25Retriever, read_corpus
from fwm.envs.synthetic import (ArithmeticConfig, KnowledgeWorldConfig, generate_arithmetic_tasks,
                                generate_knowledge_world, write_arithmetic_tasks, write_knowledge_world)
from fwm.envs.synthetic.knowledge import RELATION_BY_NAME, SYLLABLES
from fwm.schema import Action
from fwm.tokenizer import train_sentencepiece
from fwm.trajectories import collect
from fwm.trajectories.blocks import RuleBlockWriter
from fwm.trajectories.policies import KnowledgeMoves, make_policy
from fwm.trajectories.spoilers import StepContext, spoiler_terms

TINY = KnowledgeWorldConfig(num_people=10, num_cities=4, num_countries=2, num_companies=3, num_universities=2,
                            num_train_questions=40, num_test_questions=15)


def test_knowledge_world_is_a_pure_function_of_config_and_seed():
    world = generate_knowledge_world(TINY, seed=5)
    assert world == generate_knowledge_world(TINY, seed=5)
    other = generate_knowledge_world(TINY, seed=6)
    assert [e.name for e in other.entities] != [e.name for e in world.entities]


def test_knowledge_world_is_consistent():
    world = generate_knowledge_world(TINY, seed=1)
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names) and len(world.documents) == len(world.entities)
    assert collections.Counter(e.type for e in world.entities) == {"person": 10, "city": 4, "country": 2,
                                                                   "company": 3, "university": 2}
    for entity in world.entities:
        document = world.document(entity.id)
        assert document.title == entity.name and document.entity_ids[0] == entity.id
        for relation, object_id in entity.relations:
            assert RELATION_BY_NAME[relation].subject_type == entity.type
            assert world.entity(object_id).type == RELATION_BY_NAME[relation].object_type
            assert object_id in document.entity_ids
        for name in world.document_entity_names(entity.id):
            assert name in document.contents  # every listed entity is really mentioned
        if entity.type == "country":  # the capital lies in the country
            assert world.entity(entity.object_of("capital")).object_of("located_in") == entity.id
        if entity.type == "person":
            assert entity.object_of("mentored_by") != entity.id


def test_questions_gold_hops_and_splits():
    world = generate_knowledge_world(TINY, seed=2)
    keys = set()
    for split, tasks in (("train", world.train_tasks), ("test", world.test_tasks)):
        assert len(tasks) == {"train": 40, "test": 15}[split]
        for task in tasks:
            hops = task.metadata["hops"]
            assert task.metadata["split"] == split and task.metadata["num_hops"] == len(hops)
            chain = [hops[0]["subject_id"]] + [hop["object_id"] for hop in hops]
            assert len(set(chain)) == len(chain)  # no loops back to an earlier entity
            for hop in hops:
                subject = world.entity(hop["subject_id"])
                assert subject.name == hop["subject"] and subject.object_of(hop["relation"]) == hop["object_id"]
                assert world.entity(hop["object_id"]).name == hop["object"]
            assert task.answers == (hops[-1]["object"],) and hops[0]["subject"] in task.question
            assert task.metadata["answer_id"] == chain[-1]
            key = (hops[0]["subject_id"], tuple(hop["relation"] for hop in hops))
            assert key not in keys  # distinct questions, so the splits share none
            keys.add(key)


def test_hop_knob_and_bad_configs():
    config = dataclasses.replace(TINY, hop_weights=(1.0,), test_hop_weights=(0, 0, 0, 1))
    world = generate_knowledge_world(config, seed=0)
    assert {t.metadata["num_hops"] for t in world.train_tasks} == {1}
    assert {t.metadata["num_hops"] for t in world.test_tasks} == {4}
    with pytest.raises(ValueError, match="hop_weights"):
        KnowledgeWorldConfig(hop_weights=(0, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="num_cities"):
        KnowledgeWorldConfig(num_cities=1, num_countries=2)
    with pytest.raises(ValueError, match="distinct train questions"):
        generate_knowledge_world(dataclasses.replace(TINY, hop_weights=(1.0,), num_train_questions=500), seed=0)


def test_knowledge_world_files(tmp_path):
    world = generate_knowledge_world(TINY, seed=4)
    paths = write_knowledge_world(world, tmp_path / "world")
    corpus = read_corpus(paths["corpus"])
    assert [(d.id, d.contents) for d in corpus] == [(d.id, d.contents) for d in world.documents]
    assert tuple(read_tasks(paths["train"])) == world.train_tasks
    assert tuple(read_tasks(paths["test"])) == world.test_tasks
    rows = [json.loads(line) for line in open(paths["world"])]
    assert rows[0]["mentions"] == list(world.documents[0].entity_ids) and rows[0]["name"] == world.entities[0].name
    meta = json.load(open(paths["meta"]))
    assert meta["seed"] == 4 and meta["config"]["num_people"] == 10


def test_arithmetic_tasks_chain_and_knobs(tmp_path):
    config = ArithmeticConfig(num_train_tasks=60, num_test_tasks=20, step_weights=(0, 0, 1), max_digits=2,
                              test_step_weights=(0, 0, 0, 0, 1))
    train, test = generate_arithmetic_tasks(config, seed=3)
    assert (train, test) == generate_arithmetic_tasks(config, seed=3)
    assert {t.metadata["num_steps"] for t in train} == {3} and {t.metadata["num_steps"] for t in test} == {5}
    assert not {t.question for t in train} & {t.question for t in test}
    for task in train + test:
        value = task.metadata["start"]
        assert value < 100
        for step in task.metadata["steps"]:
            assert step["before"] == value and eval(step["expression"]) == step["after"] >= 0  # noqa: S307
            value = step["after"]
        assert task.answers == (str(value),)
    paths = write_arithmetic_tasks(config, 3, train, test, tmp_path)
    assert tuple(read_tasks(paths["train"])) == train
    with pytest.raises(ValueError, match="operations"):
        ArithmeticConfig(operations=("exponentiate",))


def test_arithmetic_task_solved_through_the_python_tool():
    [task], _ = generate_arithmetic_tasks(ArithmeticConfig(num_train_tasks=1, num_test_tasks=0), seed=9)
    env = MathEnv(max_turns=3)
    env.reset(task)
    code = "x = {}\n".format(task.metadata["start"]) + "".join(
        "x = " + step["expression"].replace(str(step["before"]), "x", 1) + "\n" for step in task.metadata["steps"])
    observation, done, _ = env.step(Action("python", code + "print(x)"))
    assert observation.strip() == task.answers[0] and not done
    _, done, info = env.step(Action("answer", observation.strip()))
    assert done and info["score"] == 1.0


# ------------------------------------------------------------------------------------ fresh-entity world
FRESH = KnowledgeWorldConfig(fresh_entities=True, num_train_questions=60, num_test_questions=20,
                             hop_weights=(0.5, 0.5), incoming_mentions=0, filler_sentences=0)


def _chain_ids(task):
    hops = task.metadata["hops"]
    return [hops[0]["subject_id"]] + [hop["object_id"] for hop in hops]


def test_fresh_world_shares_no_entity_name_or_answer_between_questions():
    world = generate_knowledge_world(FRESH, seed=0)
    assert world == generate_knowledge_world(FRESH, seed=0)
    tasks = world.train_tasks + world.test_tasks
    owner = {}  # entity id -> the task whose cluster holds it (its chain or its documents)
    for task in tasks:
        cluster = set(_chain_ids(task))
        for hop in task.metadata["hops"]:
            cluster |= set(world.document(hop["subject_id"]).entity_ids)
        for entity_id in cluster:
            assert owner.setdefault(entity_id, task.id) == task.id, f"{entity_id} in {owner[entity_id]} and {task.id}"
    assert set(owner) == {e.id for e in world.entities}
    words = [w for e in world.entities for w in e.name.split()
             if w not in {"Labs", "Works", "Systems", "Industries", "Group", "Dynamics", "University", "Institute",
                          "College", "Academy"}]
    assert len(set(words)) == len(words)  # every name word is fresh, so a search finds one question's document
    answers = collections.Counter(task.answers[0] for task in tasks)
    assert answers.most_common(1)[0][1] == 1  # the constant answer is right on at most one question
    assert collections.Counter(t.metadata["num_hops"] for t in tasks).keys() == {1, 2}


def test_fresh_world_documents_state_several_relations_one_asked():
    world = generate_knowledge_world(FRESH, seed=1)
    for task in world.train_tasks:
        assert task.metadata["world"] == "knowledge" and task.answers == (task.metadata["hops"][-1]["object"],)
        for hop in task.metadata["hops"]:
            subject, document = world.entity(hop["subject_id"]), world.document(hop["subject_id"])
            relations = dict(subject.relations)
            assert document.title == subject.name and len(relations) == FRESH.facts_per_document
            assert relations[hop["relation"]] == hop["object_id"]
            for relation, object_id in relations.items():  # each fact is one plain sentence
                assert RELATION_BY_NAME[relation].sentence.format(s=subject.name, o=world.entity(object_id).name) \
                    in document.contents
            asked_type = RELATION_BY_NAME[hop["relation"]].object_type
            same_type = [r for r in relations if RELATION_BY_NAME[r].object_type == asked_type]
            assert len(same_type) == 2  # a sibling of the asked type: the object's type does not give it away


def test_fresh_world_names_are_few_regular_syllables_and_tokenize_into_few_pieces(tmp_path):
    world = generate_knowledge_world(FRESH, seed=2)
    syllable_word = re.compile("(?:" + "|".join(SYLLABLES) + "){2,3}")
    for entity in world.entities:
        stem = entity.name.split()[0]
        stem = stem[:-len(suffix)] if entity.type == "country" and (suffix := next(
            s for s in ("ia", "land", "mark", "stan", "ara") if stem.endswith(s))) else stem
        for word in [stem] + (entity.name.split()[1:] if entity.type == "person" else []):
            assert syllable_word.fullmatch(word.lower()), entity.name
    texts = [d.contents for d in world.documents] + [t.question for t in world.train_tasks]
    tokenizer = train_sentencepiece(texts, str(tmp_path / "sp.model"), vocab_size=512)
    pieces = [len(tokenizer.encode(" " + word)) for entity in world.entities for word in entity.name.split()]
    # BPE cuts syllable strings at no fixed place, but into few pieces: no name word falls back to bytes
    # (a 3-syllable word + country suffix has up to 10 characters); measured here: mean 3.6, max 7.
    assert max(pieces) <= 7 and np.mean(pieces) <= 4.5


def test_fresh_world_oracle_solves_by_search_and_blocks_pass_the_spoiler_check(tmp_path):
    world = generate_knowledge_world(FRESH, seed=3)
    spec = collect.EnvSpec("search", max_turns=6, index_dir=str(tmp_path / "bm25"), topk=1)
    BM25Retriever.build(world.corpus(), spec.index_dir)
    env = collect.make_env(spec)
    oracle = make_policy("oracle", KnowledgeMoves.from_world(world))
    names = tuple(e.name for e in world.entities)
    for task in world.train_tasks[:20]:
        record = collect.run_episode(env, oracle, task, np.random.default_rng(0))
        assert record.score == 1.0 and len(record.actions) == task.metadata["num_hops"] + 1
        for hop, observation in zip(task.metadata["hops"], record.observations):
            assert RELATION_BY_NAME[hop["relation"]].sentence.format(s=hop["subject"], o=hop["object"]) in observation
        for step in range(len(record.actions)):
            context = StepContext.from_record(record, step)
            RuleBlockWriter()(context, 100, spoiler_terms(context, names))  # raises BlockRejected on a leak
