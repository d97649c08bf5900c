"""World-model blocks written by a teacher LLM over an OpenAI-compatible chat-completions endpoint.

`TeacherBlockWriter` is a `fwm.trajectories.spoilers.BlockWriter`. For one step of a recorded episode
it asks the teacher (POST {base_url}/chat/completions) for the three text elements of the block --
roadmap, keywords, gap analysis -- showing it the question, what the agent has seen, the *real
future* of the trajectory (so the roadmap is grounded) and the terms it must not write (PAPER.md,
WM-AMT block rules). The confidence is not the teacher's to choose: the caller passes it (a Monte
Carlo estimate) and the writer puts it in the block.

The teacher's reply is input like any model output: it is parsed with fwm.schema, checked for
spoilers with check_block, its keywords are grounded like the rule writer's (kept only if they occur in
what follows a_t, fwm.trajectories.future.what_follows from `future_start`; the others are dropped and
counted, and a reply with no grounded keyword where something follows is retried like a malformed
one), and a malformed or
leaking reply is retried (telling the teacher what was
wrong unless retry_with_feedback is off); connection errors, timeouts, 408/429 and 5xx answers are
retried with exponential backoff. When every try fails the writer raises BlockRejected with the
reasons. Only a misconfigured endpoint (401/403/404: wrong URL, model or key), which would fail every
step alike, raises TeacherError instead.

Accepted replies are cached on disk, one JSON file per key, keyed by the first request of the step
(model, messages, temperature, max_tokens; not base_url, so a mirror of the same model shares the
cache). A cached reply is re-validated before use, so a corrupt or stale entry is only a miss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import time
from typing import Any, Sequence

import requests

from fwm.configlib import nearest
from fwm.envs.jsonl import write_json
from fwm.schema import (ANALYSIS, IMAGINARY, KEYWORD, STATE, Action, WorldModelBlock, check_confidence, format_ok,
                        parse_response, render_world_model)
from fwm.trajectories.future import FUTURE_STARTS, keyword_found
from fwm.trajectories.spoilers import BlockRejected, StepContext, check_block

__all__ = ["TeacherBlockWriter", "TeacherError", "TeacherStats", "block_from_reply", "check_confidence",
           "ground_keywords", "user_message", "SYSTEM_PROMPT", "MAX_BACKOFF_S"]

# The longest wait between two tries, whatever the backoff base and the number of failures.
MAX_BACKOFF_S = 60.0
# Status codes a later try may get past: request timeout, rate limit (and every 5xx).
_TRANSIENT_STATUS = (408, 429)
# Status codes that mean the endpoint, model or key is wrong: every step would fail the same way.
_CONFIG_STATUS = (401, 403, 404)
_BLOCK_ELEMENTS = (IMAGINARY, KEYWORD, ANALYSIS)
# A fixed, well-formed policy span appended to a reply so that fwm.schema.format_ok -- the one
# definition of format adherence -- can judge the reply as the world-model span of a state-variant
# response (a response without a policy span is malformed by definition).
_POLICY_PROBE = "<think>-</think><action><answer>-</answer></action>"

SYSTEM_PROMPT = """\
You write the world-model block that an agent writes before its next action: a compact simulation \
of the future which the agent will learn to produce on its own. You are shown the agent's question, \
the steps it has taken so far, and -- hidden from the agent -- what actually happens from this step \
on, so that your block is grounded in the real future.

Rules:
1. <imaginary>: a roadmap of the steps this trajectory really takes, from the next action to the end \
of the episode, in a few short sentences: each action as it actually happens -- detours, mistakes, \
recoveries and a wrong or missing final answer included -- with what it finds. Its first step is a \
concrete description of the action right after your block (the action marked below) and what it \
finds; never describe the ideal plan where the agent does something else. Every entity, number or \
answer the agent has not seen yet appears only as an abstract placeholder in square brackets, such \
as [the company], [the founder's birthplace] or [the final answer]; never its real value.
2. <keyword>: two to five terms, separated by '; ', that occur in what follows the next action: its \
result and the later steps (a term that only repeats the next action's own query or answer does not \
count). Use relation words, kinds of entities, and names the agent has already seen.
3. <analysis>: a gap analysis in one or two sentences: what is already known, and what is still \
missing to answer the question.
4. Never write any of the forbidden terms listed in the request, in any element.
5. Write from the agent's point of view, as a plan; do not mention that you were shown the future.
6. Reply with exactly <imaginary>...</imaginary><keyword>...</keyword><analysis>...</analysis> and \
nothing else: no other tags, no confidence, no reasoning, no code fences, no text before or after.

Example, for the question "Where was the director of Film X born?" before the first step:
<imaginary>Search for Film X to find [the director]; then search [the director] to find \
[the birthplace]; answer with [the birthplace].</imaginary><keyword>Film X; directed by; \
director</keyword><analysis>Known: the film is Film X. Missing: its director and where the director \
was born.</analysis>"""


class TeacherError(RuntimeError):
    """The teacher endpoint is misconfigured (wrong base_url, model or key): no step can succeed."""


class _TransientFailure(Exception):
    """A request failed in a way a later try may not (network, timeout, 408/429/5xx, unreadable body)."""


@dataclasses.dataclass
class TeacherStats:
    """What a writer did so far (per writer object; workers in other processes keep their own)."""

    blocks: int = 0                  # blocks returned (from the cache or the teacher)
    requests: int = 0                # HTTP requests sent
    cache_hits: int = 0              # blocks served from the cache without a request
    corrupt_cache_entries: int = 0   # cache files that could not be read or no longer validate
    retries: int = 0                 # tries after the first one of a step
    http_failures: int = 0           # requests that failed transiently (network, timeout, 408/429/5xx)
    malformed_replies: int = 0       # replies that were not exactly the three block elements
    spoiler_replies: int = 0         # well-formed replies that named a forbidden term
    rejections: int = 0              # steps that ended in BlockRejected
    ungrounded_keywords: int = 0     # keywords dropped from accepted blocks: not found in what follows a_t
    ungrounded_replies: int = 0      # otherwise valid replies with no grounded keyword (retried)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def block_from_reply(reply: Any, confidence: int) -> WorldModelBlock:
    """The block a reply describes, with `confidence` put in; BlockRejected naming what is wrong.

    The reply must be exactly <imaginary>..</imaginary><keyword>..</keyword><analysis>..</analysis>
    (surrounding white space allowed) with a non-empty roadmap, analysis and at least one keyword.
    Never raises anything but BlockRejected for any reply; spoilers are not checked here.
    """
    if not isinstance(reply, str):
        raise BlockRejected(f"malformed reply: expected text, got {type(reply).__name__}")
    text = reply.strip()
    extra = [name for name in parse_response(text).elements if name not in _BLOCK_ELEMENTS]
    if extra:
        raise BlockRejected(f"malformed reply: only <imaginary>, <keyword> and <analysis> may be written, "
                            f"found {', '.join(f'<{name}>' for name in dict.fromkeys(extra))}")
    parsed = parse_response(text + _POLICY_PROBE)
    if not format_ok(parsed, STATE):
        found = [name for name in parsed.elements if name in _BLOCK_ELEMENTS]
        problems = parsed.malformed or [f"expected <imaginary>, <keyword>, <analysis> in this order, found "
                                        f"{', '.join(f'<{name}>' for name in found) or 'no element'}"]
        raise BlockRejected("malformed reply: " + "; ".join(problems))
    roadmap, analysis = parsed.roadmap.strip(), parsed.analysis.strip()
    empty = [name for name, value in ((IMAGINARY, roadmap), (KEYWORD, parsed.keywords), (ANALYSIS, analysis))
             if not value]
    if empty:
        raise BlockRejected(f"malformed reply: empty {', '.join(f'<{name}>' for name in empty)}")
    block = WorldModelBlock(roadmap=roadmap, keywords=list(parsed.keywords), analysis=analysis,
                            confidence=confidence)
    try:  # the returned block must render; the parse above should already guarantee it
        render_world_model(block, with_confidence=True)
    except ValueError as error:
        raise BlockRejected(f"malformed reply: {error}") from None
    return block


def ground_keywords(block: WorldModelBlock, context: StepContext, future_start: str) -> tuple[WorldModelBlock, int]:
    """(the block with only its keywords found in what follows a_t, how many were dropped), by the rule
    writer's grounding test (fwm.trajectories.future). BlockRejected when none is left although something
    follows; where nothing does (the final answer, with future_start "observation") the block keeps no
    keyword, as the rule writer's does."""
    future = context.future_text(future_start)
    kept = [keyword for keyword in block.keywords if keyword_found(keyword, future)]
    if not kept and future.strip():
        raise BlockRejected(f"no keyword occurs in what follows the next action (keywords "
                            f"{'; '.join(block.keywords)!r}); write terms its result or later steps contain")
    return dataclasses.replace(block, keywords=kept), len(block.keywords) - len(kept)


def _truncate(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return f"{text[:max_chars]} ... [{len(text) - max_chars} characters cut]"


def _describe_action(action: Action | None) -> str:
    return "(malformed response; no action)" if action is None else f"{action.kind}: {action.argument}"


def _describe_steps(steps: Sequence[tuple[Action | None, str]], first_number: int, max_observation_chars: int,
                    next_step_note: str = "") -> list[str]:
    lines = []
    for number, (action, observation) in enumerate(steps, start=first_number):
        note = next_step_note if number == first_number else ""
        lines.append(f"Step {number} action{note}: {_describe_action(action)}")
        if observation:
            lines.append(f"Step {number} observation: {_truncate(observation, max_observation_chars)}")
        elif action is not None and action.kind == "answer":
            lines.append(f"Step {number} observation: (none; the answer ends the episode)")
    return lines


def user_message(context: StepContext, forbidden: Sequence[str], max_observation_chars: int) -> str:
    """The request for one block: question, visible steps, the real future, forbidden terms."""
    step_number = context.step + 1
    past = _describe_steps(context.past, 1, max_observation_chars)
    future = _describe_steps(context.future, step_number, max_observation_chars,
                             next_step_note=" (the action right after your block)")
    forbidden_text = "; ".join(json.dumps(term, ensure_ascii=False) for term in forbidden) or "none"
    parts = [
        f"Question: {context.task.question}",
        "\n".join([f"What the agent has seen (steps 1 to {step_number - 1}):"] + past) if past
        else "What the agent has seen: only the question (this is its first step).",
        "\n".join(["What actually happens from here on (hidden from the agent; ground the block in it, but "
                   "name nothing the agent has not seen):"] + future
                  + [f"Final score of the episode: {context.score:g} (1 = correct answer, 0 = wrong or none)."]),
        f"Forbidden terms (the agent has not seen them; use placeholders instead): {forbidden_text}",
        f"Write the world-model block the agent writes before step {step_number}.",
    ]
    return "\n\n".join(parts)


class TeacherBlockWriter:
    """A BlockWriter that asks a teacher LLM (OpenAI-compatible chat completions) for each block.

    base_url: e.g. "http://localhost:8000/v1" (the writer posts to base_url + "/chat/completions").
    api_key_env: name of the environment variable holding the key, read once here; "" means no key.
    max_retries: tries after the first for one block, whatever failed (network or reply).
    backoff_s: wait before the n-th try after a transient failure: backoff_s * 2**(n-1), at most
      MAX_BACKOFF_S. A malformed or leaking reply is retried at once.
    cache_dir: directory of the reply cache ("" disables it).
    retry_with_feedback: on a bad reply, the next try shows the teacher its reply and what was wrong.
    max_observation_chars: each observation shown to the teacher is cut to this many characters (0: no cut).
    future_start: where "what follows" starts for keyword grounding (fwm.trajectories.future.FUTURE_STARTS).

    One writer per thread (the HTTP session and the stats are not shared-safe); the cache may be
    shared by any number of writers and processes.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "", temperature: float = 0.0,
                 max_tokens: int = 512, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
                 cache_dir: str = "", retry_with_feedback: bool = True, max_observation_chars: int = 2000,
                 future_start: str = "observation"):
        for name, value, ok, expected in (
                ("base_url", base_url, isinstance(base_url, str) and base_url.startswith(("http://", "https://")),
                 "an http:// or https:// URL"),
                ("model", model, isinstance(model, str) and bool(model.strip()), "a non-empty model name"),
                ("api_key_env", api_key_env, isinstance(api_key_env, str), "an environment variable name or ''"),
                ("temperature", temperature, _is_number(temperature) and temperature >= 0, "a number >= 0"),
                ("max_tokens", max_tokens, _is_int(max_tokens) and max_tokens >= 1, "an int >= 1"),
                ("timeout_s", timeout_s, _is_number(timeout_s) and timeout_s > 0, "a number > 0"),
                ("max_retries", max_retries, _is_int(max_retries) and max_retries >= 0, "an int >= 0"),
                ("backoff_s", backoff_s, _is_number(backoff_s) and backoff_s >= 0, "a number >= 0"),
                ("cache_dir", cache_dir, isinstance(cache_dir, (str, os.PathLike)), "a directory path or ''"),
                ("retry_with_feedback", retry_with_feedback, isinstance(retry_with_feedback, bool), "a bool"),
                ("max_observation_chars", max_observation_chars,
                 _is_int(max_observation_chars) and max_observation_chars >= 0, "an int >= 0"),
                ("future_start", future_start, future_start in FUTURE_STARTS, f"one of {FUTURE_STARTS}")):
            if not ok:
                raise ValueError(f"TeacherBlockWriter: {name} must be {expected}, got {value!r}")
        api_key = ""
        if api_key_env:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise ValueError(f"TeacherBlockWriter: api_key_env names the environment variable {api_key_env!r}, "
                                 f"which is unset or empty; export it, or set api_key_env to '' for an endpoint "
                                 f"without a key")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.cache_dir = os.fspath(cache_dir)
        self.retry_with_feedback, self.max_observation_chars = retry_with_feedback, int(max_observation_chars)
        self.future_start = future_start
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)  # a bad cache_dir fails here, not after a paid request
        self.stats = TeacherStats()
        self._url = self.base_url + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session = requests.Session()

    def __repr__(self) -> str:  # never shows the key
        return (f"TeacherBlockWriter(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, cache_dir={self.cache_dir!r})")

    @classmethod
    def from_config(cls, config: Any) -> "TeacherBlockWriter":
        """From a mapping or ml_collections.ConfigDict whose keys are the constructor's arguments."""
        if not hasattr(config, "items"):
            raise TypeError(f"teacher config must be a mapping or ConfigDict, got {type(config).__name__}")
        values = dict(config.items())
        parameters = {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
        for key in values:
            if key not in parameters:
                raise ValueError(f"teacher config: unknown key {key!r}; {nearest(key, parameters)}")
        missing = [name for name, p in parameters.items() if p.default is p.empty and name not in values]
        if missing:
            raise ValueError(f"teacher config: missing required key(s) {', '.join(map(repr, missing))}")
        return cls(**values)

    # ------------------------------------------------------------------------------------- requests
    def messages(self, context: StepContext, forbidden: Sequence[str]) -> list[dict[str, str]]:
        """The first request's chat messages for this step (later tries may add feedback)."""
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user_message(context, forbidden, self.max_observation_chars)}]

    def cache_key(self, messages: Sequence[dict[str, str]]) -> str:
        """sha256 of what decides the reply: model, messages, temperature, max_tokens (not base_url)."""
        request = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def cache_path(self, key: str) -> str:
        """One file per key, under a two-character shard so no directory grows huge."""
        return os.path.join(self.cache_dir, key[:2], f"{key}.json")

    def __call__(self, context: StepContext, confidence: int, forbidden: Sequence[str]) -> WorldModelBlock:
        confidence = check_confidence(confidence)
        forbidden = list(forbidden)
        messages = self.messages(context, forbidden)
        key = self.cache_key(messages)
        cached = self._read_cache(key, confidence, forbidden, context)
        if cached is not None:
            self.stats.cache_hits += 1
            self.stats.blocks += 1
            return cached
        conversation, problems, transient_failures, last_leaked = list(messages), [], 0, False
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            if transient_failures:
                time.sleep(min(self.backoff_s * 2 ** (transient_failures - 1), MAX_BACKOFF_S))
            try:
                reply = self._post(conversation)
            except _TransientFailure as failure:
                self.stats.http_failures += 1
                transient_failures += 1
                problems.append(f"try {attempt + 1}: {failure}")
                last_leaked = False
                continue
            except BlockRejected as rejection:  # a request the endpoint refuses for this step: no retry
                self.stats.rejections += 1
                raise BlockRejected(f"teacher {self.model}, task {context.task.id} step {context.step}: "
                                    f"{rejection}") from None
            transient_failures = 0
            try:
                block = block_from_reply(reply, confidence)
            except BlockRejected as rejection:
                self.stats.malformed_replies += 1
                problems.append(f"try {attempt + 1}: {rejection}")
                last_leaked = False
                conversation = self._feedback(messages, reply, str(rejection))
                continue
            try:
                check_block(block, forbidden)
            except BlockRejected as rejection:
                self.stats.spoiler_replies += 1
                problems.append(f"try {attempt + 1}: {rejection}")
                last_leaked = True
                conversation = self._feedback(messages, reply, f"{rejection}; write these only as placeholders")
                continue
            try:
                block, dropped = ground_keywords(block, context, self.future_start)
            except BlockRejected as rejection:
                self.stats.ungrounded_replies += 1
                problems.append(f"try {attempt + 1}: {rejection}")
                last_leaked = False
                conversation = self._feedback(messages, reply, str(rejection))
                continue
            self.stats.ungrounded_keywords += dropped
            if self.cache_dir:
                write_json(self.cache_path(key), {"key": key, "model": self.model, "reply": reply})
            self.stats.blocks += 1
            return block
        self.stats.rejections += 1
        raise BlockRejected(f"teacher {self.model}, task {context.task.id} step {context.step}: no valid block "
                            f"after {self.max_retries + 1} tries ({' | '.join(problems)})", spoiler=last_leaked)

    def _feedback(self, messages: list[dict[str, str]], reply: Any, problem: str) -> list[dict[str, str]]:
        """The next try's messages: the first request again, with the bad reply and what was wrong."""
        if not self.retry_with_feedback or not isinstance(reply, str):
            return list(messages)
        return list(messages) + [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"Your reply was rejected ({problem}). Follow the rules and reply again "
                                        f"with exactly <imaginary>...</imaginary><keyword>...</keyword>"
                                        f"<analysis>...</analysis> and nothing else."}]

    def _post(self, messages: list[dict[str, str]]) -> Any:
        """The content of one chat completion (any JSON value; block_from_reply judges it).

        Raises _TransientFailure for what a retry may fix, TeacherError for a misconfigured endpoint
        and BlockRejected for a request the endpoint refuses (e.g. 400: prompt too long).
        """
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        self.stats.requests += 1
        try:
            response = self._session.post(self._url, json=payload, headers=self._headers, timeout=self.timeout_s)
        except requests.RequestException as error:
            raise _TransientFailure(f"{type(error).__name__}: {str(error)[:200]}") from None
        status, body = response.status_code, response.text[:200]
        if status in _TRANSIENT_STATUS or status >= 500:
            raise _TransientFailure(f"HTTP {status}: {body!r}")
        if status in _CONFIG_STATUS:
            raise TeacherError(f"{self._url}: HTTP {status} ({body!r}); check base_url, model {self.model!r} and "
                               f"the key in ${self.api_key_env or '(no api_key_env set)'}")
        if not 200 <= status < 300:
            raise BlockRejected(f"HTTP {status}: {body!r}")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _TransientFailure(f"HTTP {status} without a chat completion ({type(error).__name__}: "
                                    f"{error}; body {body!r})") from None

    # ---------------------------------------------------------------------------------------- cache
    def _read_cache(self, key: str, confidence: int, forbidden: Sequence[str],
                    context: StepContext) -> WorldModelBlock | None:
        """The cached block for `key`, or None: no cache, no entry, or an entry that does not validate."""
        if not self.cache_dir:
            return None
        path = self.cache_path(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written by something other than write_json, or not JSON
            self.stats.corrupt_cache_entries += 1
            return None
        try:
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise BlockRejected(f"{path}: not a cache entry for this key")
            block, dropped = ground_keywords(check_block(block_from_reply(entry.get("reply"), confidence), forbidden),
                                             context, self.future_start)
            self.stats.ungrounded_keywords += dropped
            return block
        except BlockRejected:  # overwritten when the teacher's new reply is accepted
            self.stats.corrupt_cache_entries += 1
            return None


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and hasattr(value, "__index__")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))
