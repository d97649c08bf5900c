"""Tasks, the environment protocol and the episode record shared by every environment.

An environment runs one episode at a time: `reset(task)` returns the question; `step(action)` takes a
`fwm.schema.Action` (or None when the model's response could not be parsed) and returns
`(observation, done, info)`. Observations are the raw content the tool produced (passages, program
output, or an error notice); wrapping them in the agent format (`<information>`, `<output>`) is
`fwm.schema.render_observation(info["observation_kind"], observation)`'s job. An `<answer>` ends the
episode with observation "" and a score; so does the turn budget, with score 0.

info keys after every step: "turn" (1-based), "observation_kind" (the kind to render the observation
with; errors use the env's own tool kind), "malformed", "invalid_action", "failed_search",
"tool_error" (bools for this step) and the running counts "num_malformed", "num_invalid_actions",
"num_failed_searches", "num_tool_errors"; when done also "reason" ("answer" | "turn_budget") and
"score", plus whatever metrics the env adds (e.g. "exact_match").
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Iterable, Mapping, Protocol, Sequence

from fwm.envs.jsonl import DataFormatError, read_jsonl, write_jsonl
from fwm.schema import Action

MALFORMED_OBSERVATION = (
    "Your previous response was malformed: no valid action was found. Respond with one action: "
    "<search>query</search>, <python>code</python> or <answer>final answer</answer>.")


@dataclasses.dataclass(frozen=True)
class Task:
    """One question with its gold answers; `metadata` is JSON-like (e.g. the gold hops) and read-only by
    convention (a dict so that tasks pickle and serialise; tasks hash by id, question and answers)."""

    id: str
    question: str
    answers: tuple[str, ...]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    data_source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "answers", tuple(self.answers))
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Task.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"Task {self.id}: question must be a non-empty string, got {self.question!r}")
        if not self.answers or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"Task {self.id}: answers must be a non-empty sequence of strings, got {self.answers!r}")

    def __hash__(self) -> int:
        return hash((self.id, self.question, self.answers))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "answers": list(self.answers),
                "data_source": self.data_source, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "task") -> "Task":
        """Inverse of to_dict; `where` (e.g. "tasks.jsonl, line 3") prefixes error messages."""
        for key, kind in (("id", str), ("question", str), ("answers", list)):
            if not isinstance(row.get(key), kind):
                raise DataFormatError(f"{where}: field {key!r} must be a {kind.__name__}, got {row.get(key)!r}")
        metadata = row.get("metadata", {})
        if not isinstance(metadata, dict):
            raise DataFormatError(f"{where}: field 'metadata' must be an object, got {type(metadata).__name__}")
        try:
            return cls(id=row["id"], question=row["question"], answers=tuple(row["answers"]),
                       metadata=metadata, data_source=str(row.get("data_source", "")))
        except ValueError as error:
            raise DataFormatError(f"{where}: {error}") from None


def write_tasks(path: str | os.PathLike, tasks: Iterable[Task]) -> int:
    """Writes tasks as JSONL (Task.to_dict per line), atomically; returns the count."""
    return write_jsonl(path, (task.to_dict() for task in tasks))


def read_tasks(path: str | os.PathLike) -> list[Task]:
    """Reads a file written by write_tasks; errors name the file and line."""
    return [Task.from_dict(row, f"{os.fspath(path)}, line {line}") for line, row in read_jsonl(path)]


@dataclasses.dataclass
class EpisodeRecord:
    """Everything one episode did. actions[i] is None where response i was malformed; observations[i]
    is the raw observation returned for it ("" for the final answer)."""

    task: Task
    actions: list[Action | None] = dataclasses.field(default_factory=list)
    observations: list[str] = dataclasses.field(default_factory=list)
    final_answer: str | None = None
    score: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    num_turns: int = 0
    num_malformed: int = 0
    num_invalid_actions: int = 0
    num_failed_searches: int = 0
    num_tool_errors: int = 0
    done: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task.to_dict(),
                "actions": [None if a is None else {"kind": a.kind, "argument": a.argument} for a in self.actions],
                "observations": list(self.observations), "final_answer": self.final_answer,
                "score": self.score, "metrics": dict(self.metrics), "num_turns": self.num_turns,
                "num_malformed": self.num_malformed, "num_invalid_actions": self.num_invalid_actions,
                "num_failed_searches": self.num_failed_searches, "num_tool_errors": self.num_tool_errors,
                "done": self.done, "reason": self.reason}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "episode") -> "EpisodeRecord":
        """Inverse of to_dict; `where` prefixes error messages."""
        try:
            actions = [None if a is None else Action(kind=a["kind"], argument=a["argument"]) for a in row["actions"]]
            fields = {f.name: row[f.name] for f in dataclasses.fields(cls) if f.name not in ("task", "actions")}
        except (KeyError, TypeError) as error:
            raise DataFormatError(f"{where}: not an episode record (missing or bad field {error})") from None
        return cls(task=Task.from_dict(row["task"], where), actions=actions, **fields)


class Env(Protocol):
    """What the episode runner needs from an environment."""

    max_turns: int

    def reset(self, task: Task) -> str:
        """Starts an episode on `task`; returns the question text."""

    def step(self, action: Action | None) -> tuple[str, bool, dict[str, Any]]:
        """Applies one action (None: malformed response); returns (observation, done, info)."""

    @property
    def record(self) -> EpisodeRecord:
        """The current (or just finished) episode."""


class ToolEnv(abc.ABC):
    """Shared episode logic: turn budget, malformed and invalid actions, counting and the record.

    Subclasses set `tool_kinds` (the action kinds they execute; the first is the kind error notices are
    rendered with) and implement `_run_tool(action) -> (observation, flags)` and
    `_score_answer(answer) -> (score, metrics)`.
    """

    tool_kinds: Sequence[str] = ()

    def __init__(self, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self._record: EpisodeRecord | None = None

    @property
    def record(self) -> EpisodeRecord:
        if self._record is None:
            raise RuntimeError(f"{type(self).__name__}: no episode yet; call reset(task) first")
        return self._record

    def reset(self, task: Task) -> str:
        self._record = EpisodeRecord(task=task)
        return task.question

    def step(self, action: Action | None) -> tuple[str, bool, dict[str, Any]]:
        record = self.record
        if record.done:
            raise RuntimeError(f"{type(self).__name__}: episode on task {record.task.id} is over "
                               f"({record.reason}); call reset(task) before stepping again")
        record.num_turns += 1
        flags = {"malformed": False, "invalid_action": False, "failed_search": False, "tool_error": False}
        kind = self.tool_kinds[0]
        done = False
        if action is None:
            flags["malformed"] = True
            observation = MALFORMED_OBSERVATION
        elif action.kind == "answer":
            observation, done = "", True
            record.final_answer = action.argument
            record.score, record.metrics = self._score_answer(action.argument)
            record.reason = "answer"
        elif action.kind in self.tool_kinds:
            kind = action.kind
            observation, tool_flags = self._run_tool(action)
            flags.update(tool_flags)
        else:
            flags["invalid_action"] = True
            observation = (f"The action <{action.kind}> is not available here. Available actions: "
                           + ", ".join(f"<{k}>" for k in (*self.tool_kinds, "answer")) + ".")
        record.actions.append(action)
        record.observations.append(observation)
        record.num_malformed += flags["malformed"]
        record.num_invalid_actions += flags["invalid_action"]
        record.num_failed_searches += flags["failed_search"]
        record.num_tool_errors += flags["tool_error"]
        if not done and record.num_turns >= self.max_turns:
            done, record.reason, record.score = True, "turn_budget", 0.0
        record.done = done
        info: dict[str, Any] = {"turn": record.num_turns, "observation_kind": kind, **flags,
                                "num_malformed": record.num_malformed,
                                "num_invalid_actions": record.num_invalid_actions,
                                "num_failed_searches": record.num_failed_searches,
                                "num_tool_errors": record.num_tool_errors}
        if done:
            info.update(reason=record.reason, score=record.score, **record.metrics)
        return observation, done, info

    @abc.abstractmethod
    def _run_tool(self, action: Action) -> tuple[str, dict[str, bool]]:
        """Executes a tool action; returns (observation, flags such as {"failed_search": True})."""

    @abc.abstractmethod
    def _score_answer(self, answer: str) -> tuple[float, dict[str, float]]:
        """Scores a final answer against the current task; returns (score, named metrics)."""
