"""`fwm data` with blocks.writer="teacher" end to end: the runlocal search config, in process, against a local
chat-completions server whose replies are a function of the request (so worker scheduling changes nothing).

The server plays a teacher that is mostly good and sometimes bad, by a hash of the step's request: a step may
get a reply that leaks the task's answer, a malformed reply or an HTTP 503 before a good one, or leak on every
try (rejected). The pipeline's summed teacher counters must match what the server saw; the corpora must hold
the teacher's blocks; a rerun must take every accepted block from the cache.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import threading

import pytest

from fwm.envs.synthetic.knowledge import generate_knowledge_world
from fwm.schema import render_world_model
from fwm.trajectories import blocks as blocks_lib
from fwm.trajectories import pipeline
from local_http import LocalJSONServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "experiments", "synthetic_search.py")
MAX_RETRIES = 2  # three tries per step

# A generic block: placeholders only, so it can spoil no step.
ROADMAP = "Search for [the next entity]; then follow [the next link] to [the final answer]; answer it."
# "Doc" is in every search result (grounded wherever a search follows), "nowhere" in nothing (always dropped).
GOOD = (f"<imaginary>{ROADMAP}</imaginary><keyword>Doc; nowhere</keyword>"
        "<analysis>Known: the question. Missing: [the next entity] and [the final answer].</analysis>")
MALFORMED = "Sure! " + GOOD  # text outside the tags


def _step_plan(first_message):
    """What the server does for a step, by a hash of the step's first user message (about 1 in 10 each)."""
    h = int(hashlib.sha256(first_message.encode()).hexdigest(), 16) % 10
    return {0: "always_bad", 1: "leak_first", 2: "malformed_first", 3: "http503_first"}.get(h, "good")


class ScriptedTeacher:
    """POST /v1/chat/completions on 127.0.0.1. Each request is logged as (first user message, kind served),
    kind one of good, leak, malformed, http503. A step's n-th request (n counted per first user message,
    across runs) gets: always_bad -> leak the answer every time (malformed when the answer is no longer
    forbidden); *_first -> that failure on the first request, good afterwards; good -> good."""

    def __init__(self, answer_by_question):
        self.log, self.lock = [], threading.Lock()
        self.answer_by_question = answer_by_question
        self._http = LocalJSONServer(self._respond)
        self.base_url = self._http.address + "/v1"

    def _respond(self, path, headers, body):
        status, content = self.reply(body["messages"][1]["content"])
        if status != 200:
            return status, {"error": "overloaded"}, 0.0
        return status, {"id": "c", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}]}, 0.0

    def reply(self, user_message):
        question = user_message.split("\n", 1)[0].removeprefix("Question: ")
        answer = self.answer_by_question[question]
        forbidden_line = next(line for line in user_message.splitlines() if line.startswith("Forbidden terms"))
        with self.lock:
            tries = sum(1 for message, _ in self.log if message == user_message)
            plan = _step_plan(user_message)
            if plan == "always_bad" or (plan.endswith("_first") and tries == 0):
                kind = plan.split("_")[0] if plan != "always_bad" else "leak"
                if kind == "leak" and json.dumps(answer, ensure_ascii=False) not in forbidden_line:
                    kind = "malformed"  # the agent has seen the answer: naming it is no spoiler
            else:
                kind = "good"
            self.log.append((user_message, kind))
        if kind == "http503":
            return 503, None
        if kind == "leak":
            return 200, GOOD.replace("[the final answer]; answer it.", f"{answer}; answer it.")
        return 200, MALFORMED if kind == "malformed" else GOOD

    def close(self):
        self._http.close()


def _config(workdir, base_url, workers):
    spec = importlib.util.spec_from_file_location("synthetic_search", SEARCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.workdir, config.workers, config.progress = str(workdir), workers, False
    config.blocks.writer = "teacher"
    config.blocks.teacher.update(dict(base_url=base_url, model="teacher-test", timeout_s=10.0,
                                      max_retries=MAX_RETRIES, backoff_s=0.01))
    return config


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _tally(log):
    """kind -> count, and the steps (first user messages) with their kinds in order."""
    kinds, steps = {}, {}
    for message, kind in log:
        kinds[kind] = kinds.get(kind, 0) + 1
        steps.setdefault(message, []).append(kind)
    return kinds, steps


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """The first run (two worker processes, each chunk with its own writer), with a snapshot of what it saw."""
    workdir = tmp_path_factory.mktemp("teacher_pipeline") / "search"
    config = _config(workdir, "http://127.0.0.1:9/v1", workers=2)
    world = generate_knowledge_world(pipeline.world_config(config), config.world.seed)
    server = ScriptedTeacher({task.question: task.answers[0] for task in world.train_tasks})
    config.blocks.teacher.base_url = server.base_url
    try:
        stats = pipeline.run(config)
        yield {"config": config, "server": server, "stats": stats, "log": list(server.log),
               "blocks": _rows(os.path.join(workdir, "blocks", "blocks.jsonl")), "workdir": workdir}
    finally:
        server.close()


def test_teacher_counters_match_what_the_server_saw(teacher_run):
    stats, log, rows = teacher_run["stats"], teacher_run["log"], teacher_run["blocks"]
    kinds, steps = _tally(log)
    assert all(kinds.get(kind, 0) > 0 for kind in ("good", "leak", "malformed", "http503")), kinds
    rejected_steps = [message for message, served in steps.items() if "good" not in served]
    assert rejected_steps and all(len(steps[m]) == MAX_RETRIES + 1 for m in rejected_steps)
    b, t = stats["blocks"], stats["blocks"]["teacher"]
    assert len(steps) == b["annotated_steps"]  # every step asked once at least (no two steps share a request)
    assert t == dict(blocks=b["blocks_written"], requests=len(log), cache_hits=0, corrupt_cache_entries=0,
                     retries=len(log) - len(steps), http_failures=kinds["http503"],
                     malformed_replies=kinds["malformed"], spoiler_replies=kinds["leak"],
                     rejections=len(rejected_steps), ungrounded_keywords=sum(
                         2 - len(row["block"]["keywords"]) for row in rows if row["block"] is not None),
                     ungrounded_replies=0)
    kept = [row["block"]["keywords"] for row in rows if row["block"] is not None]
    assert set(map(tuple, kept)) == {(), ("Doc",)}  # nothing follows a final answer: no keyword is grounded
    assert b["rejections"] == len(rejected_steps) == sum(row["rejection"] is not None for row in rows)
    leaked_to_the_end = [m for m in rejected_steps if steps[m][-1] == "leak"]
    assert leaked_to_the_end and b["spoiler_rejections"] == len(leaked_to_the_end)
    for row in rows:  # a rejected step says why; an accepted one holds the teacher's block
        if row["rejection"] is not None:
            assert row["block"] is None and f"no valid block after {MAX_RETRIES + 1} tries" in row["rejection"]
        else:
            assert row["block"]["roadmap"] == ROADMAP and row["block"]["confidence"] == row["confidence"]
    with open(os.path.join(teacher_run["workdir"], "stats.json")) as f:
        assert json.load(f)["blocks"]["teacher"] == t
    assert (f"  teacher: {t['blocks']} blocks, 0 from the cache (0 corrupt entries); {t['requests']} requests, "
            f"{t['retries']} retries, {t['http_failures']} HTTP failures; {t['malformed_replies']} malformed and "
            f"{t['spoiler_replies']} leaking replies; {t['rejections']} steps rejected") in pipeline.format_stats(stats)


def test_the_corpora_hold_the_teacher_blocks(teacher_run):
    stats, workdir, rows = teacher_run["stats"], teacher_run["workdir"], teacher_run["blocks"]
    summary = stats["corpora"]["corpora"]
    for name, entry in summary.items():
        assert entry["records"] > 0, name
    mid_ids = {row["id"] for row in _rows(os.path.join(workdir, "trajectories", "mid_train.jsonl"))}
    accepted_mid = [row for row in rows if row["trajectory_id"] in mid_ids and row["block"] is not None]
    texts = [segment["text"] for name in ("mid_train_wm.jsonl", "mid_train_wm_eval.jsonl")
             for record in _rows(os.path.join(workdir, "corpora", name))
             for segment in record["segments"] if segment["role"] == "world_model"]
    expected = sorted(render_world_model(blocks_lib.block_from_dict(row["block"]), with_confidence=True)
                      for row in accepted_mid)
    assert len(texts) == stats["corpora"]["wm_blocks_inserted"] == len(accepted_mid) > 0
    assert sorted(texts) == expected and all(f"<imaginary>{ROADMAP}</imaginary>" in text for text in texts)
    full = _rows(os.path.join(workdir, "corpora", "sft_full.jsonl"))
    assert all(f"<imaginary>{ROADMAP}</imaginary>" in record["response"] for record in full)
    assert stats["corpora"]["skipped_trajectories"]["sft_missing_block"] > 0  # the rejected steps cost SFT steps


def test_a_rerun_takes_every_accepted_block_from_the_cache(teacher_run, tmp_path):
    """Same workdir (a copy, so the other tests keep theirs; the default cache WORKDIR/teacher_cache comes
    along), a teacher key the cache key does not hold (timeout_s) changed so the blocks stage runs again, in
    this process: only steps rejected before are asked again (a rejection leaves no cache entry) and they fail
    the same way; the blocks file is unchanged."""
    server, first = teacher_run["server"], teacher_run["stats"]
    workdir = tmp_path / "search"
    shutil.copytree(teacher_run["workdir"], workdir)
    blocks_path = os.path.join(workdir, "blocks", "blocks.jsonl")
    with open(blocks_path, "rb") as f:
        first_blocks = f.read()
    assert os.path.isdir(os.path.join(workdir, "teacher_cache"))
    config = _config(workdir, server.base_url, workers=0)
    config.blocks.teacher.timeout_s = 9.0
    seen = len(server.log)
    stats = pipeline.run(config)
    assert stats["stages"] == {"world": "skipped", "collect": "skipped", "blocks": "ran", "tokenizer": "ran",
                              "corpora": "ran"}
    new_kinds, new_steps = _tally(server.log[seen:])
    _, old_steps = _tally(teacher_run["log"])
    rejected_before = {m for m, served in old_steps.items() if "good" not in served}
    assert set(new_steps) == rejected_before and "good" not in new_kinds
    t, b = stats["blocks"]["teacher"], first["blocks"]
    assert t["cache_hits"] == t["blocks"] == b["blocks_written"] and t["requests"] == len(server.log) - seen
    assert t["rejections"] == b["rejections"] and stats["blocks"]["rejections"] == b["rejections"]
    with open(blocks_path, "rb") as f:
        assert f.read() == first_blocks
    # An unrelated key: the blocks stage is skipped, nobody is asked, its stats (teacher counters too) stay.
    config.corpora.eval_fraction = 0.3
    seen = len(server.log)
    again = pipeline.run(config)
    assert again["stages"] == {"world": "skipped", "collect": "skipped", "blocks": "skipped", "tokenizer": "skipped",
                               "corpora": "ran"}
    assert len(server.log) == seen and again["blocks"]["teacher"] == t
