"""The teacher-LLM block writer against a real local chat-completions server with scripted replies."""
import dataclasses
import json
import os
import random
import re
import socket
import threading
import time

import ml_collections
import pytest

from fwm.envs.base import Task
from fwm.schema import Action, render_world_model
from fwm.trajectories.spoilers import BlockRejected, StepContext, spoiler_terms
from fwm.trajectories.teacher import (SYSTEM_PROMPT, TeacherBlockWriter, TeacherError, block_from_reply,
                                      check_confidence, ground_keywords)
from local_http import LocalJSONServer

TASK = Task(id="knowledge-train-00007", question="Where was the founder of Orbix Labs born?", answers=("Velmora",),
            metadata={"hops": [{"subject": "Orbix Labs", "relation": "founder", "object": "Ada Quill"},
                               {"subject": "Ada Quill", "relation": "birthplace", "object": "Velmora"}]})
CONTEXT = StepContext(
    task=TASK, step=0, score=1.0,
    actions=(Action("search", "founder of Orbix Labs"), Action("search", "Ada Quill birthplace"),
             Action("answer", "Velmora")),
    observations=("Doc 1(Title: Orbix Labs) Orbix Labs was founded by Ada Quill.",
                  "Doc 1(Title: Ada Quill) Ada Quill was born in Velmora.", ""))


def context_at(step):
    return StepContext(task=TASK, step=step, actions=CONTEXT.actions, observations=CONTEXT.observations, score=1.0)


FORBIDDEN = spoiler_terms(CONTEXT)  # ["Ada Quill", "Velmora"]: not yet seen at step 0

GOOD = ("<imaginary>Search Orbix Labs to find [the founder]; then search [the founder] for [the birthplace]; "
        "answer with [the birthplace].</imaginary><keyword>Orbix Labs; founded by; founder</keyword>"
        "<analysis>Known: the company is Orbix Labs. Missing: its founder and where the founder was born."
        "</analysis>")
LEAKING = GOOD.replace("[the founder]; then", "Ada Quill; then")
MALFORMED = [
    "Sure! " + GOOD,                                                      # text outside the tags
    GOOD + "<confidence>80</confidence>",                                 # the confidence is not the teacher's
    GOOD + "<think>plan</think><action><search>Orbix Labs</search></action>",  # a policy span
    GOOD.replace("<keyword>Orbix Labs; founded by; founder</keyword>", ""),     # an element missing
    GOOD.replace("Orbix Labs; founded by; founder", " ; "),               # no keyword
    GOOD.replace("</analysis>", ""),                                      # unclosed
    "<keyword>a</keyword><imaginary>b</imaginary><analysis>c</analysis>",  # out of order
    GOOD + GOOD,                                                          # two blocks
    "```\n" + GOOD + "\n```",                                             # code fence
    "<imaginary>x</imaginary><keyword>y</keyword><analysis>z <information>d</information></analysis>",
    "", "   ", None, 42, ["text"],
]


class ChatServer:
    """POST /v1/chat/completions on 127.0.0.1: each request takes the next scripted reply.

    A script entry is a str (the completion's content), None (content null), or a dict with optional
    "status", "content", "body" (raw body text) and "delay" (seconds before answering). Requests past
    the script get HTTP 500 "unscripted", so a test that sends more than it expects fails.
    """

    def __init__(self):
        self.script, self.requests = [], []  # requests: (headers dict, body dict, path) as received
        self._http = LocalJSONServer(self._respond)
        self.base_url = self._http.address + "/v1"

    def _respond(self, path, headers, body):
        self.requests.append((headers, body, path))
        entry = self.script.pop(0) if self.script else {"status": 500, "body": "unscripted"}
        if not isinstance(entry, dict):
            entry = {"content": entry}
        payload = entry.get("body")
        if payload is None:
            payload = {"id": "c", "object": "chat.completion", "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": entry["content"]}}]}
        return entry.get("status", 200), payload, entry.get("delay", 0.0)

    def close(self):
        self._http.close()


@pytest.fixture()
def server():
    server = ChatServer()
    yield server
    server.close()


def make_writer(server, tmp_path, **overrides):
    arguments = dict(base_url=server.base_url, model="teacher-7b", timeout_s=2.0, max_retries=2, backoff_s=0.01,
                     cache_dir=str(tmp_path / "cache"))
    arguments.update(overrides)
    return TeacherBlockWriter(**arguments)


def cache_files(tmp_path):
    return sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_a_good_reply_becomes_a_block_with_the_given_confidence(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FWM_TEST_TEACHER_KEY", "sk-test-123")
    server.script = [GOOD]
    writer = make_writer(server, tmp_path, api_key_env="FWM_TEST_TEACHER_KEY", temperature=0.3, max_tokens=300)
    block = writer(CONTEXT, 73, FORBIDDEN)
    # "founder" occurs nowhere in what follows the search ("founded by" does): dropped and counted
    assert block.confidence == 73 and block.keywords == ["Orbix Labs", "founded by"]
    assert block.roadmap.startswith("Search Orbix Labs to find [the founder]") and block.analysis.endswith("born.")
    assert render_world_model(block, with_confidence=True).endswith("<confidence>73</confidence>")
    [(headers, body, path)] = server.requests
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-test-123"
    assert body["model"] == "teacher-7b" and body["temperature"] == 0.3 and body["max_tokens"] == 300
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT} and user["role"] == "user"
    assert "placeholder" in system["content"] and "'; '" in system["content"]
    text = user["content"]
    assert TASK.question in text and "only the question (this is its first step)" in text
    assert "Step 2 observation: Doc 1(Title: Ada Quill) Ada Quill was born in Velmora." in text  # the real future
    assert 'Forbidden terms (the agent has not seen them; use placeholders instead): "Ada Quill"; "Velmora"' in text
    assert "Final score of the episode: 1 " in text and "73" not in text  # no confidence asked
    assert writer.stats.as_dict() == dict(blocks=1, requests=1, cache_hits=0, corrupt_cache_entries=0, retries=0,
                                          http_failures=0, malformed_replies=0, spoiler_replies=0, rejections=0,
                                          ungrounded_keywords=1, ungrounded_replies=0)
    assert "sk-test-123" not in repr(writer)


def test_later_steps_show_the_visible_history_and_allow_seen_names(server, tmp_path):
    context = context_at(1)
    forbidden = spoiler_terms(context)
    assert forbidden == ["Velmora"]
    seen = GOOD.replace("[the founder]", "Ada Quill")  # seen in step 1's observation: allowed
    # Nothing after step 2's search mentions Orbix Labs or founders: no keyword is grounded, so the reply is
    # retried; the second one's keywords occur in step 2's observation.
    grounded = seen.replace("Orbix Labs; founded by; founder", "Ada Quill; born in; Orbix Labs")
    server.script = [seen, grounded]
    writer = make_writer(server, tmp_path, cache_dir="")
    block = writer(context, 40, forbidden)
    assert "Ada Quill" in block.roadmap and block.keywords == ["Ada Quill", "born in"]
    assert (writer.stats.ungrounded_replies, writer.stats.ungrounded_keywords, writer.stats.retries) == (1, 1, 1)
    assert "no keyword occurs in what follows" in server.requests[1][1]["messages"][3]["content"]
    text = server.requests[0][1]["messages"][1]["content"]
    assert "What the agent has seen (steps 1 to 1):\nStep 1 action: search: founder of Orbix Labs" in text
    assert "Step 2 action (the action right after your block): search: Ada Quill birthplace" in text


def test_a_leaking_reply_is_retried_with_feedback_then_accepted(server, tmp_path):
    server.script = [LEAKING, GOOD]
    writer = make_writer(server, tmp_path)
    block = writer(CONTEXT, 55, FORBIDDEN)
    assert "Ada Quill" not in block.roadmap and block.confidence == 55
    stats = writer.stats
    assert (stats.requests, stats.retries, stats.spoiler_replies, stats.rejections) == (2, 1, 1, 0)
    first, second = (body["messages"] for _, body, _ in server.requests)
    assert second[:2] == first and second[2] == {"role": "assistant", "content": LEAKING}
    assert "rejected" in second[3]["content"] and "roadmap: Ada Quill" in second[3]["content"]


def test_a_reply_that_keeps_leaking_is_rejected_and_counted(server, tmp_path):
    server.script = [LEAKING] * 3
    writer = make_writer(server, tmp_path, retry_with_feedback=False)
    with pytest.raises(BlockRejected, match=r"no valid block after 3 tries .*spoiler: roadmap: Ada Quill"):
        writer(CONTEXT, 55, FORBIDDEN)
    stats = writer.stats
    assert (stats.requests, stats.retries, stats.spoiler_replies, stats.rejections) == (3, 2, 3, 1)
    assert all(len(body["messages"]) == 2 for _, body, _ in server.requests)  # no feedback when it is off
    assert cache_files(tmp_path) == []  # a rejected step leaves no cache entry


@pytest.mark.parametrize("script, spoiler", [([MALFORMED[0], LEAKING, LEAKING], True),
                                             ([LEAKING, LEAKING, MALFORMED[0]], False)], ids=["ends_leaking", "ends_malformed"])
def test_a_rejection_is_a_spoiler_rejection_when_the_last_try_leaked(server, tmp_path, script, spoiler):
    server.script = list(script)
    with pytest.raises(BlockRejected) as rejected:
        make_writer(server, tmp_path)(CONTEXT, 55, FORBIDDEN)
    assert rejected.value.spoiler is spoiler


@pytest.mark.parametrize("reply", MALFORMED, ids=range(len(MALFORMED)))
def test_each_malformed_reply_is_only_ever_rejected(reply):
    with pytest.raises(BlockRejected, match="malformed reply"):
        block_from_reply(reply, 50)


def test_random_edits_of_a_good_reply_never_raise_anything_but_rejection():
    pieces = ["<imaginary>", "</imaginary>", "<keyword>", "</keyword>", "<analysis>", "</analysis>", "<think>",
              "</action>", "<action>", "<confidence>", "text", " ; ", ";", "[the x]", "\n", "<", ">", "</", "&lt;"]
    good_parts = re.split(r"(<[^>]*>|; )", GOOD)
    rng = random.Random(0)
    accepted = rejected = 0
    for _ in range(600):
        parts = list(good_parts)
        for _ in range(rng.randint(0, 3)):  # drop, duplicate or insert a piece anywhere
            i, edit = rng.randrange(len(parts) + 1), rng.choice(["drop", "duplicate", "insert"])
            if edit == "drop" and i < len(parts):
                del parts[i]
            elif edit == "duplicate" and i < len(parts):
                parts.insert(i, parts[i])
            else:
                parts.insert(i, rng.choice(pieces))
        try:
            block = block_from_reply("".join(parts), 9)
        except BlockRejected:
            rejected += 1
            continue
        accepted += 1
        assert render_world_model(block, with_confidence=True).endswith("<confidence>9</confidence>")
    assert accepted > 50 and rejected > 200, (accepted, rejected)


def test_malformed_replies_over_http_end_in_rejection(server, tmp_path):
    server.script = ["Sure! " + GOOD, None, {"body": "not json"}, {"body": json.dumps({"choices": []})}]
    writer = make_writer(server, tmp_path, max_retries=3)
    with pytest.raises(BlockRejected, match="no valid block after 4 tries"):
        writer(CONTEXT, 50, FORBIDDEN)
    assert writer.stats.malformed_replies == 2 and writer.stats.http_failures == 2 and writer.stats.rejections == 1
    assert writer.stats.requests == 4


def test_a_malformed_reply_is_retried_then_accepted(server, tmp_path):
    server.script = [GOOD + "<confidence>80</confidence>", GOOD]
    writer = make_writer(server, tmp_path)
    assert writer(CONTEXT, 20, FORBIDDEN).confidence == 20
    assert writer.stats.malformed_replies == 1 and writer.stats.retries == 1
    assert "only <imaginary>, <keyword> and <analysis>" in server.requests[1][1]["messages"][3]["content"]


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    server.script = [{"status": 503, "body": "overloaded"}, {"status": 429, "body": "slow down"}, GOOD]
    writer = make_writer(server, tmp_path, backoff_s=0.1)
    start = time.monotonic()
    assert writer(CONTEXT, 50, FORBIDDEN).keywords[0] == "Orbix Labs"
    assert time.monotonic() - start >= 0.1 + 0.2  # 0.1 s, then 0.2 s
    assert (writer.stats.requests, writer.stats.http_failures, writer.stats.retries) == (3, 2, 2)
    server.script = [{"status": 503, "body": "overloaded"}] * 3
    with pytest.raises(BlockRejected, match=r"after 3 tries .*HTTP 503"):
        writer(context_at(1), 50, ["Velmora"])


def test_a_slow_reply_times_out_and_is_retried(server, tmp_path):
    server.script = [{"content": GOOD, "delay": 1.0}, GOOD]
    writer = make_writer(server, tmp_path, timeout_s=0.2)
    start = time.monotonic()
    assert writer(CONTEXT, 50, FORBIDDEN).confidence == 50
    assert time.monotonic() - start < 0.9 and writer.stats.http_failures == 1 and writer.stats.requests == 2


def test_a_server_that_is_down_is_a_rejection(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    writer = TeacherBlockWriter(f"http://127.0.0.1:{port}/v1", "m", timeout_s=0.5, max_retries=1, backoff_s=0.01)
    with pytest.raises(BlockRejected, match="ConnectionError"):
        writer(CONTEXT, 50, FORBIDDEN)
    assert writer.stats.http_failures == 2 and writer.stats.rejections == 1


def test_a_misconfigured_endpoint_fails_loudly_and_a_refused_request_is_rejected_at_once(server, tmp_path):
    server.script = [{"status": 401, "body": "bad key"}]
    writer = make_writer(server, tmp_path)
    with pytest.raises(TeacherError, match=r"HTTP 401 .*check base_url, model 'teacher-7b'"):
        writer(CONTEXT, 50, FORBIDDEN)
    server.script = [{"status": 400, "body": "context length exceeded"}]
    with pytest.raises(BlockRejected, match="HTTP 400.*context length exceeded"):
        writer(CONTEXT, 50, FORBIDDEN)
    assert writer.stats.requests == 2 and writer.stats.retries == 0 and writer.stats.rejections == 1


def test_an_identical_call_is_served_from_the_cache_whatever_the_base_url(server, tmp_path):
    server.script = [LEAKING, GOOD]
    writer = make_writer(server, tmp_path)
    first = writer(CONTEXT, 60, FORBIDDEN)
    assert len(server.requests) == 2 and len(cache_files(tmp_path)) == 1  # one entry per step, not per try
    again = writer(CONTEXT, 35, FORBIDDEN)  # the confidence is the caller's, not part of the key
    assert len(server.requests) == 2 and writer.stats.cache_hits == 1 and writer.stats.blocks == 2
    assert (again.roadmap, again.keywords, again.confidence) == (first.roadmap, first.keywords, 35)
    elsewhere = make_writer(server, tmp_path, base_url="http://127.0.0.1:9/v1", max_retries=0)  # nothing there
    assert elsewhere(CONTEXT, 60, FORBIDDEN) == first and elsewhere.stats.requests == 0
    [name] = cache_files(tmp_path)
    key = writer.cache_key(writer.messages(CONTEXT, FORBIDDEN))
    assert name == f"{key[:2]}/{key}.json"
    assert json.loads((tmp_path / "cache" / name).read_text())["reply"] == GOOD


def test_what_changes_the_request_changes_the_key(server, tmp_path):
    base = make_writer(server, tmp_path)
    key = base.cache_key(base.messages(CONTEXT, FORBIDDEN))
    assert key != base.cache_key(base.messages(CONTEXT, ["Velmora"]))
    assert key != base.cache_key(base.messages(context_at(1), FORBIDDEN))
    for change in ({"model": "other"}, {"temperature": 0.7}, {"max_tokens": 99}, {"max_observation_chars": 10}):
        other = make_writer(server, tmp_path, **change)
        assert other.cache_key(other.messages(CONTEXT, FORBIDDEN)) != key, change
    same = make_writer(server, tmp_path, base_url="https://elsewhere.example/v1", timeout_s=9.0, max_retries=0)
    assert same.cache_key(same.messages(CONTEXT, FORBIDDEN)) == key


@pytest.mark.parametrize("content", ['{"key": "abc", "rep', "", "\x00\xff", '{"key": "%s", "reply": "Sure!"}',
                                     '["a list"]', json.dumps({"key": "%s", "reply": LEAKING})])
def test_a_corrupt_cache_entry_is_a_miss_and_is_overwritten(server, tmp_path, content):
    writer = make_writer(server, tmp_path)
    key = writer.cache_key(writer.messages(CONTEXT, FORBIDDEN))
    path = tmp_path / "cache" / key[:2] / f"{key}.json"
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("%s", key), encoding="latin-1")
    server.script = [GOOD]
    assert writer(CONTEXT, 50, FORBIDDEN).keywords == ["Orbix Labs", "founded by"]
    assert len(server.requests) == 1 and writer.stats.corrupt_cache_entries == 1 and writer.stats.cache_hits == 0
    assert json.loads(path.read_text())["reply"] == GOOD and cache_files(tmp_path) == [f"{key[:2]}/{key}.json"]
    assert writer(CONTEXT, 50, FORBIDDEN) and writer.stats.cache_hits == 1


def test_parallel_writers_share_one_cache_entry(server, tmp_path):
    server.script = [GOOD] * 4
    writers = [make_writer(server, tmp_path) for _ in range(4)]
    blocks = [None] * 4
    threads = [threading.Thread(target=lambda i=i: blocks.__setitem__(i, writers[i](CONTEXT, 50, FORBIDDEN)))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(block is not None and block.roadmap == blocks[0].roadmap for block in blocks)
    [name] = cache_files(tmp_path)  # one valid entry, no temporary files left
    assert json.loads((tmp_path / "cache" / name).read_text())["reply"] == GOOD


def test_observations_are_cut_for_the_teacher(server, tmp_path):
    context = StepContext(task=TASK, step=1, actions=CONTEXT.actions, score=1.0,
                          observations=("x" * 50,) + CONTEXT.observations[1:])
    writer = make_writer(server, tmp_path, max_observation_chars=20)
    text = writer.messages(context, ["Velmora"])[1]["content"]
    assert f"Step 1 observation: {'x' * 20} ... [30 characters cut]" in text


def test_a_named_but_unset_key_variable_is_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.delenv("FWM_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match=r"api_key_env names the environment variable 'FWM_TEST_MISSING_KEY', "
                                         r"which is unset or empty"):
        make_writer(server, tmp_path, api_key_env="FWM_TEST_MISSING_KEY")
    server.script = [GOOD]
    make_writer(server, tmp_path, api_key_env="")(CONTEXT, 50, FORBIDDEN)  # no key: no Authorization header
    assert "authorization" not in server.requests[0][0]


def test_from_config_takes_the_constructor_arguments_and_names_unknown_keys(server, tmp_path):
    config = ml_collections.ConfigDict(dict(base_url=server.base_url, model="teacher-7b", api_key_env="",
                                            temperature=0.0, max_tokens=256, timeout_s=5.0, max_retries=1,
                                            backoff_s=0.01, cache_dir=str(tmp_path / "c")))
    writer = TeacherBlockWriter.from_config(config)
    assert (writer.model, writer.max_tokens, writer.max_retries, writer.cache_dir) == ("teacher-7b", 256, 1,
                                                                                      str(tmp_path / "c"))
    assert os.path.isdir(tmp_path / "c")
    with pytest.raises(ValueError, match=r"unknown key 'max_retry'; did you mean 'max_retries'"):
        TeacherBlockWriter.from_config({**config.to_dict(), "max_retry": 2})
    with pytest.raises(ValueError, match=r"missing required key\(s\) 'model'"):
        TeacherBlockWriter.from_config({"base_url": server.base_url})
    with pytest.raises(ValueError, match=r"base_url must be an http:// or https:// URL, got 'localhost:8000'"):
        TeacherBlockWriter.from_config({"base_url": "localhost:8000", "model": "m"})
    with pytest.raises(ValueError, match=r"max_retries must be an int >= 0, got -1"):
        TeacherBlockWriter.from_config({"base_url": server.base_url, "model": "m", "max_retries": -1})


@pytest.mark.parametrize("confidence", [-1, 101, 50.5, True, "50", None])
def test_a_confidence_outside_0_to_100_is_the_callers_error(confidence):
    with pytest.raises(ValueError, match="confidence must be an int in"):
        check_confidence(confidence)


def test_teacher_keywords_pass_the_rule_writers_grounding_test():
    """Keywords are kept only if found in what follows a_t (future.what_follows); where nothing follows (the final
    answer) the block keeps none, as the rule writer's; the looser start="action" counts a_t's own text."""
    block = block_from_reply(GOOD.replace("Orbix Labs; founded by; founder", "Velmora; founded by"), 10)
    assert ground_keywords(block, context_at(2), "observation") == (dataclasses.replace(block, keywords=[]), 2)
    assert ground_keywords(block, context_at(2), "action")[0].keywords == ["Velmora"]
    assert ground_keywords(block, context_at(0), "observation")[0].keywords == ["Velmora", "founded by"]
    with pytest.raises(BlockRejected, match="no keyword occurs in what follows"):
        ground_keywords(dataclasses.replace(block, keywords=["founder"]), context_at(1), "observation")
