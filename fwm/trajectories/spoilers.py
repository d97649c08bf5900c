"""What a world-model block may not say, and the contract every block writer meets.

A block z_t is written from the *real future* of a trajectory, but it may name future entities and
answers only as placeholders (PAPER.md, WM-AMT block rules). At step t the agent has seen the
question and the steps before t (the "visible" text); a term is a spoiler if it is a candidate
(a gold answer, an entity or value the gold chain passes through, or a caller-supplied name such as
every entity of a synthetic world) that the future text or the gold chain holds and the visible text
does not. Matching is on SQuAD-normalised text at word boundaries, so "Paris" matches "paris," but
"12" does not match "120".
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Protocol, Sequence

from fwm.envs.base import EpisodeRecord, Task
from fwm.envs.scoring import normalize_answer
from fwm.schema import Action, WorldModelBlock


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Step `step` (0-based) of a recorded episode: the block being written precedes actions[step].

    actions[i] is None where response i was malformed; observations[i] is the raw observation that
    followed actions[i] ("" after the final answer). `score` is the episode's final score.
    """

    task: Task
    step: int
    actions: tuple[Action | None, ...]
    observations: tuple[str, ...]
    score: float

    def __post_init__(self):
        if len(self.actions) != len(self.observations):
            raise ValueError(f"task {self.task.id}: {len(self.actions)} actions but {len(self.observations)} "
                             f"observations")
        if not 0 <= self.step < len(self.actions):
            raise ValueError(f"task {self.task.id}: step {self.step} outside the episode's "
                             f"{len(self.actions)} steps")

    @classmethod
    def from_record(cls, record: EpisodeRecord, step: int) -> "StepContext":
        return cls(task=record.task, step=step, actions=tuple(record.actions),
                   observations=tuple(record.observations), score=record.score)

    @property
    def past(self) -> list[tuple[Action | None, str]]:
        """(action, observation) of the steps before this one, oldest first."""
        return list(zip(self.actions[:self.step], self.observations[:self.step]))

    @property
    def future(self) -> list[tuple[Action | None, str]]:
        """(action, observation) of this step and every later one."""
        return list(zip(self.actions[self.step:], self.observations[self.step:]))

    def visible_text(self) -> str:
        """What the agent has seen before acting: the question and the earlier actions and observations."""
        return "\n".join([self.task.question] + [_step_text(a, o) for a, o in self.past])

    def future_text(self) -> str:
        """What actually follows: this step's action and observation and all later ones."""
        return "\n".join(_step_text(a, o) for a, o in self.future)


def _step_text(action: Action | None, observation: str) -> str:
    return ("" if action is None else f"{action.kind}: {action.argument}") + "\n" + observation


def gold_chain_terms(task: Task) -> list[str]:
    """Entities or values the task's gold chain passes through (synthetic worlds' metadata), answers last."""
    terms: list[str] = []
    for hop in task.metadata.get("hops", ()) or ():
        if isinstance(hop, dict) and isinstance(hop.get("object"), str):
            terms.append(hop["object"])
    for step in task.metadata.get("steps", ()) or ():
        if isinstance(step, dict) and isinstance(step.get("after"), int):
            terms.append(str(step["after"]))
    return terms + list(task.answers)


def _occurs(normalized_text: str, term: str) -> bool:
    needle = normalize_answer(term)
    # The substring test is implied by the match and ~100x cheaper than compiling the pattern (a
    # world passes tens of thousands of names per block): only names that occur pay for the regex.
    return bool(needle) and needle in normalized_text and re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", normalized_text) is not None


def contains_term(text: str, term: str) -> bool:
    """Whether normalised `term` occurs in normalised `text` at word boundaries (empty terms never do)."""
    return _occurs(normalize_answer(text), term)


def spoiler_terms(context: StepContext, entity_names: Iterable[str] = ()) -> list[str]:
    """The terms a block at this step must not contain, deduplicated in a stable order.

    Candidates: the gold chain and answers (always, whether or not this trajectory reaches them) and
    those `entity_names` that occur in the future text. A candidate the visible text already holds is
    allowed (the agent has seen it).
    """
    # Normalised once: a world has ~100 entity names to test against the same two texts.
    visible, future = normalize_answer(context.visible_text()), normalize_answer(context.future_text())
    candidates = gold_chain_terms(context.task) + [n for n in entity_names if _occurs(future, n)]
    forbidden: dict[str, None] = {}
    for term in candidates:
        if normalize_answer(term) and not _occurs(visible, term):
            forbidden.setdefault(term, None)
    return list(forbidden)


def block_text(block: WorldModelBlock) -> dict[str, str]:
    """The checkable fields of a block by name (confidence is a number and cannot spoil)."""
    return {"roadmap": block.roadmap, "keywords": "; ".join(block.keywords), "analysis": block.analysis}


def find_spoilers(block: WorldModelBlock, forbidden: Sequence[str]) -> list[str]:
    """'field: term' for every forbidden term found in the block; empty when the block is clean."""
    normalized = {field: normalize_answer(text) for field, text in block_text(block).items()}
    return [f"{field}: {term}" for field, text in normalized.items() for term in forbidden if _occurs(text, term)]


class BlockRejected(Exception):
    """A block writer could not produce a valid, spoiler-free block for a step; the message says why.
    `spoiler`: the (final) reason was a leaked forbidden term, which statistics count apart."""

    def __init__(self, message: str, spoiler: bool = False):
        super().__init__(message)
        self.spoiler = spoiler


def check_block(block: WorldModelBlock, forbidden: Sequence[str]) -> WorldModelBlock:
    """The block itself if it holds no forbidden term; else BlockRejected(spoiler=True) listing what leaked."""
    leaks = find_spoilers(block, forbidden)
    if leaks:
        raise BlockRejected("spoiler: " + ", ".join(leaks), spoiler=True)
    return block


class BlockWriter(Protocol):
    """The contract of every block writer (rule-based, teacher LLM): a full block for `context` with
    the given confidence (0-100, from Monte Carlo continuations), holding none of `forbidden`
    (spoiler_terms of the step), or BlockRejected. Writers run every block through check_block."""

    def __call__(self, context: StepContext, confidence: int, forbidden: Sequence[str]) -> WorldModelBlock:
        ...
