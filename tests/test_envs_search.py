"""Retrievers (BM25, HTTP against a local server), the search env, and answering synthetic questions by hops."""
import json
import socket
import time

import pytest

from fwm.envs.base import MALFORMED_OBSERVATION, EpisodeRecord
from fwm.envs.jsonl import DataFormatError
from fwm.envs.retrievers import BM25Retriever, Doc, HTTPRetriever, RetrievalError, format_docs, read_corpus
from fwm.envs.search import SearchEnv
from fwm.envs.synthetic.knowledge import KnowledgeWorldConfig, generate_knowledge_world
from fwm.schema import Action
from local_http import LocalJSONServer

SMALL = KnowledgeWorldConfig(num_people=12, num_cities=5, num_countries=2, num_companies=4, num_universities=3,
                             num_train_questions=60, num_test_questions=20, name_overlap=0.3)


@pytest.fixture(scope="module")
def world():
    return generate_knowledge_world(SMALL, seed=3)


@pytest.fixture(scope="module")
def bm25(world, tmp_path_factory):
    return BM25Retriever.build(world.corpus(), tmp_path_factory.mktemp("index") / "bm25")


def test_bm25_finds_each_entity_document_by_name(world, bm25):
    for entity in world.entities:
        [docs] = bm25.search([entity.name], topk=3)
        assert docs[0].id == entity.id and docs[0].title == entity.name
        assert docs[0].score >= docs[-1].score
    assert bm25.search(["the of and"], topk=3) == [[]]  # only stop words: nothing matches


def test_bm25_saves_loads_and_replaces(world, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "contents": d.contents}) + "\n" for d in world.corpus()))
    built = BM25Retriever.build_from_corpus(corpus, tmp_path / "index")
    loaded = BM25Retriever.load(tmp_path / "index")
    query = [world.entities[0].name, world.entities[-1].name]
    assert loaded.search(query, 2) == built.search(query, 2) and len(loaded) == len(world.documents)
    BM25Retriever.build([Doc("only", "Only Doc\nsome words here")], tmp_path / "index")  # replaces the old one
    assert len(BM25Retriever.load(tmp_path / "index")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "index"]  # no staging left behind


def test_malformed_corpus_names_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": "1", "contents": "A\\nb"}\n{"id": 2, "contents": \n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_corpus(bad_json)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": "1", "contents": "A\\nb"}\n\n{"id": "3", "text": "x"}\n')
    with pytest.raises(DataFormatError, match=r"missing.jsonl, line 3: field 'contents'"):
        BM25Retriever.build_from_corpus(missing, tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_format_docs_follows_search_r1():
    docs = [Doc("a", '"Alpha"\nfirst text'), Doc("b", "Beta\nsecond\nline")]
    assert format_docs(docs) == 'Doc 1(Title: "Alpha") first text\nDoc 2(Title: Beta) second\nline\n'


class _Server:
    """A Search-R1-style /retrieve endpoint on 127.0.0.1 backed by a real retriever; `mode` picks behaviour."""

    def __init__(self, retriever):
        self.retriever, self.mode, self.requests, self.fail_first = retriever, "ok", 0, 0
        self._http = LocalJSONServer(self._respond)
        self.url = self._http.address + "/retrieve"

    def _respond(self, path, headers, body):
        self.requests += 1
        delay_s = 1.0 if self.mode == "slow" else 0.0
        if self.fail_first > 0:
            self.fail_first -= 1
            return 503, "", delay_s
        results = self.retriever.search(body["queries"], body["topk"])
        return 200, {"result": [[{"document": {"id": d.id, "contents": d.contents}, "score": d.score}
                                 for d in docs] for docs in results]}, delay_s

    def close(self):
        self._http.close()


@pytest.fixture()
def server(bm25):
    server = _Server(bm25)
    yield server
    server.close()


def test_http_retriever_matches_the_local_index(world, bm25, server):
    client = HTTPRetriever(server.url, timeout_s=2.0, retries=0)
    queries = [e.name for e in world.entities[:5]]
    assert client.search(queries, 3) == bm25.search(queries, 3)


def test_http_retriever_retries_server_errors_with_backoff(world, server):
    server.fail_first = 2
    client = HTTPRetriever(server.url, timeout_s=2.0, retries=2, backoff_s=0.05)
    start = time.monotonic()
    [docs] = client.search([world.entities[0].name], 3)
    assert docs[0].id == world.entities[0].id and server.requests == 3
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s
    server.fail_first = 5
    with pytest.raises(RetrievalError, match="3 attempts"):
        client.search(["x"], 3)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_down_or_slow_server_becomes_a_counted_failed_search(world, server):
    task = world.test_tasks[0]
    down = SearchEnv(HTTPRetriever(f"http://127.0.0.1:{_closed_port()}/retrieve", timeout_s=0.2, retries=1,
                                   backoff_s=0.01), max_turns=3)
    down.reset(task)
    observation, done, info = down.step(Action("search", task.metadata["hops"][0]["subject"]))
    assert observation.startswith("Search failed:") and not done
    assert info["failed_search"] and info["num_failed_searches"] == 1 and down.record.num_failed_searches == 1

    server.mode = "slow"
    slow = SearchEnv(HTTPRetriever(server.url, timeout_s=0.2, retries=0), max_turns=3)
    slow.reset(task)
    start = time.monotonic()
    observation, done, info = slow.step(Action("search", "anything"))
    assert time.monotonic() - start < 0.9
    assert observation.startswith("Search failed:") and info["num_failed_searches"] == 1
    observation, done, info = slow.step(Action("answer", task.answers[0]))
    assert done and info["reason"] == "answer" and info["score"] == 1.0 and slow.record.num_failed_searches == 1


def test_search_env_episode_bookkeeping(world, bm25):
    task = world.test_tasks[0]
    env = SearchEnv(bm25, topk=2, max_turns=4)
    assert env.reset(task) == task.question
    observation, done, info = env.step(None)
    assert observation == MALFORMED_OBSERVATION and info["malformed"] and info["num_malformed"] == 1
    observation, done, info = env.step(Action("python", "print(1)"))
    assert info["invalid_action"] and "not available" in observation and info["observation_kind"] == "search"
    observation, done, info = env.step(Action("search", "  "))
    assert info["tool_error"] and not info["failed_search"]
    observation, done, info = env.step(Action("search", task.metadata["hops"][0]["subject"]))
    assert done and info["reason"] == "turn_budget" and info["score"] == 0.0
    assert observation.startswith("Doc 1(Title: ")
    record = env.record
    assert (record.num_turns, record.num_malformed, record.num_invalid_actions, record.num_tool_errors) == (4, 1, 1, 1)
    assert record.actions[0] is None and record.to_dict()["reason"] == "turn_budget"
    assert EpisodeRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(RuntimeError, match="is over"):
        env.step(Action("answer", "x"))
    env.reset(task)
    _, done, info = env.step(Action("answer", f"The {task.answers[0]}!"))
    assert done and info["exact_match"] == 1.0 and info["score"] == 1.0
    env.reset(task)
    _, _, info = env.step(Action("answer", f"it is {task.answers[0]}"))
    assert info["exact_match"] == 0.0 and info["substring_match"] == 1.0 and 0 < info["f1"] < 1


def test_questions_are_answerable_by_following_gold_hops(world, bm25):
    """An oracle that searches each hop's subject finds the object in the results and answers correctly."""
    env = SearchEnv(bm25, topk=3, max_turns=5)
    for task in world.train_tasks + world.test_tasks:
        env.reset(task)
        hops = task.metadata["hops"]
        assert 1 <= len(hops) == task.metadata["num_hops"] <= 4
        for i, hop in enumerate(hops):
            if i:
                assert hop["subject"] == hops[i - 1]["object"]
            observation, done, _ = env.step(Action("search", hop["subject"]))
            assert not done and f"(Title: {hop['subject']})" in observation and hop["object"] in observation
        _, done, info = env.step(Action("answer", hops[-1]["object"]))
        assert done and info["score"] == 1.0 and task.answers == (hops[-1]["object"],)


def test_bm25_never_touches_jax_backends(tmp_path):
    """bm25s runs a jax op at import when it can; in a data worker on a TPU/GPU host that claims the chips."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        from fwm.envs.retrievers import BM25Retriever, Doc
        from jax._src import xla_bridge
        index = BM25Retriever.build([Doc("a", "Alpha\\\\nthe alpha river"), Doc("b", "Beta\\\\nbeta city")],
                                    {str(tmp_path / "index")!r})
        assert index.search(["alpha river"], 1)[0][0].id == "a"
        assert not xla_bridge._backends, "a jax backend was initialised"
        assert not sys.modules["bm25s.selection"].JAX_IS_AVAILABLE
        import jax.lax  # jax itself still imports normally afterwards
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
