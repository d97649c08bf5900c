"""Behaviour policies for the synthetic worlds: oracle, noisy (wrong or vague steps, sometimes recovering)
and random.

A policy is a pure function `policy(task, history, rng) -> Action` of the task, the episode so far
(`history`: (action, observation) pairs, oldest first) and a numpy Generator; it keeps no state of
its own, so it can be continued from any mid-episode state (Monte Carlo confidence needs that). What
a policy may do in a world is a `Moves` object:

- `KnowledgeMoves` (search tool): the correct step of hop k searches hop k's subject name; after the
  last hop the correct step answers the gold answer. Mistakes: "wrong_step" searches another entity
  of the subject's type, "vague" searches the relation without its subject ("the mentor of"),
  "wrong_answer" answers another entity of the answer's type.
- `ArithmeticMoves` (python tool): the correct step k runs step k's expression (`x = 4821 * 37` then
  `print(x)`), then answers the final number. Mistakes: "wrong_step" runs step k with a perturbed
  operand or another operator, "vague" reruns the previous step (or prints the current value) and so
  adds nothing, "wrong_answer" answers the value so far (premature) or a near miss of the final one.

Progress k is read from the history: the number of correct steps taken in order (an action advances
k only if it is exactly the correct step at k). The noisy policy errs with probability p_error when
its last step advanced (or at the start); after a step that did not advance it recovers -- redoes
the correct step -- with probability p_recover and errs again otherwise. A wrong answer ends the
episode, so a noisy episode either recovers, answers wrongly, or runs out of turns.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from fwm.envs.base import Task
from fwm.envs.synthetic.knowledge import RELATION_BY_NAME, KnowledgeWorld
from fwm.schema import Action

History = Sequence[tuple[Action | None, str]]
MISTAKE_KINDS = ("wrong_step", "vague", "wrong_answer")
POLICY_NAMES = ("oracle", "noisy", "random")
_NUMBER_RE = re.compile(r"\d+")


class Moves(Protocol):
    """What a policy can do in one world (see the module docstring)."""

    def num_steps(self, task: Task) -> int:
        """Tool steps of the gold chain (the answer comes after them)."""

    def correct(self, task: Task, k: int) -> Action:
        """The correct action after k correct steps (k == num_steps: the gold answer)."""

    def mistake(self, kind: str, task: Task, k: int, history: History, rng: np.random.Generator) -> Action:
        """A wrong action of `kind` (one of MISTAKE_KINDS) after k correct steps."""

    def random_action(self, task: Task, history: History, rng: np.random.Generator, p_answer: float) -> Action:
        """An action chosen without regard to the task's chain; answers with probability p_answer."""


def progress(moves: Moves, task: Task, history: History) -> tuple[int, bool]:
    """(correct steps taken in order, whether the last action was one of them); (0, True) at the start."""
    k, last_advanced = 0, True
    for action, _ in history:
        last_advanced = k <= moves.num_steps(task) and action == moves.correct(task, k)
        k += last_advanced
    return k, last_advanced


def off_gold_steps(moves: Moves, task: Task, actions: Sequence[Action | None]) -> list[bool]:
    """Which steps of an episode err: step t errs iff a_t is not the gold next action after the correct
    steps taken before it in order (`progress` of actions[:t]); a malformed (None) action errs.

    The policies record no mistakes of their own, and this definition also covers the random policy and
    recorded episodes of any origin. A recovery (redoing the step a mistake skipped) does not err; a
    detour that happens to be harmless (a vague search after which the chain goes on) does.
    """
    history = [(action, "") for action in actions]
    return [not progress(moves, task, history[:t + 1])[1] for t in range(len(actions))]


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------- knowledge
def vague_query(relation: str) -> str:
    """The relation's noun phrase without its subject: 'the mentor of {s}' -> 'the mentor of'."""
    return " ".join(RELATION_BY_NAME[relation].phrase.replace("{s}", " ").split())


def entity_type(entity_id: str) -> str:
    """'person-3' -> 'person' (ids of the knowledge world are '{type}-{index}')."""
    return entity_id.rsplit("-", 1)[0]


@dataclasses.dataclass(frozen=True)
class KnowledgeMoves:
    """Moves in a knowledge world; `names_by_type` lists every entity name by type (wrong picks come from it),
    `relations` the relation names the world states, sorted (vague random searches come from it)."""

    names_by_type: Mapping[str, tuple[str, ...]]
    relations: tuple[str, ...]

    @classmethod
    def from_world(cls, world: KnowledgeWorld) -> "KnowledgeMoves":
        names: dict[str, list[str]] = {}
        for entity in world.entities:
            names.setdefault(entity.type, []).append(entity.name)
        relations = tuple(sorted({relation for entity in world.entities for relation, _ in entity.relations}))
        return cls({kind: tuple(values) for kind, values in names.items()}, relations)

    def _other_name(self, kind: str, avoid: Sequence[str], rng: np.random.Generator) -> str:
        """A name of type `kind` not in `avoid` (any other type's name if `kind` has none left)."""
        options = [n for n in self.names_by_type.get(kind, ()) if n not in avoid]
        if not options:
            options = [n for names in self.names_by_type.values() for n in names if n not in avoid]
        return _choice(rng, options)

    def num_steps(self, task: Task) -> int:
        return len(task.metadata["hops"])

    def correct(self, task: Task, k: int) -> Action:
        hops = task.metadata["hops"]
        return Action("search", hops[k]["subject"]) if k < len(hops) else Action("answer", task.answers[0])

    def mistake(self, kind: str, task: Task, k: int, history: History, rng: np.random.Generator) -> Action:
        hops = task.metadata["hops"]
        hop = hops[min(k, len(hops) - 1)]  # after the last hop, a detour around the last one
        if kind == "wrong_step":
            target = hop["subject"] if k < len(hops) else hop["object"]
            target_id = hop["subject_id"] if k < len(hops) else hop["object_id"]
            return Action("search", self._other_name(entity_type(target_id), (target,), rng))
        if kind == "vague":
            return Action("search", vague_query(hop["relation"]))
        if kind == "wrong_answer":
            return Action("answer", self._other_name(task.metadata["answer_type"], task.answers, rng))
        raise ValueError(f"unknown mistake kind {kind!r}; expected one of {MISTAKE_KINDS}")

    def random_action(self, task: Task, history: History, rng: np.random.Generator, p_answer: float) -> Action:
        all_names = [n for names in self.names_by_type.values() for n in names]
        if rng.random() < p_answer:
            return Action("answer", _choice(rng, all_names))
        if rng.random() < 0.5:
            return Action("search", _choice(rng, all_names))
        return Action("search", vague_query(_choice(rng, self.relations)))


# -------------------------------------------------------------------------------------------- arithmetic
_OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
    "**": operator.pow}


def python_code(expression: str) -> str:
    """The program a policy runs for one expression (the expression stays a contiguous substring)."""
    return f"x = {expression}\nprint(x)"


def _value(expression: str) -> int | None:
    """Value of 'a op b' (the forms the arithmetic world and the moves below write); None if undefined."""
    left, op, right = expression.split(" ")
    a, b = int(left), int(right)
    if op in ("//", "%") and b == 0:
        return None
    return _OPERATORS[op](a, b)


@dataclasses.dataclass(frozen=True)
class ArithmeticMoves:
    """Moves in the arithmetic world (tasks carry metadata['steps'] with expressions and values)."""

    def num_steps(self, task: Task) -> int:
        return len(task.metadata["steps"])

    def correct(self, task: Task, k: int) -> Action:
        steps = task.metadata["steps"]
        if k < len(steps):
            return Action("python", python_code(steps[k]["expression"]))
        return Action("answer", task.answers[0])

    @staticmethod
    def wrong_expressions(step: Mapping) -> list[str]:
        """A small fixed set of wrong versions of a step's expression (a small set, so that the many
        Monte Carlo continuations mostly repeat programs the memoised tool has already run)."""
        before, op, operand = step["expression"].split(" ")
        b = int(operand)
        if op == "**":  # squaring: a wrong power or a doubling (larger powers make absurd numbers)
            candidates = [f"{before} ** 3", f"{before} * 2", f"{before} + 2"]
        else:
            candidates = [f"{before} {op} {b + d}" for d in (1, -1, 10) if b + d > 0]
            candidates += [f"{before} {other} {operand}" for other in ("+", "-", "*") if other != op]
        wrong = [c for c in dict.fromkeys(candidates) if _value(c) is not None and _value(c) != step["after"]]
        # Adding or subtracting the operand instead always changes the value, so `wrong` is not empty in practice.
        return wrong or [f"{before} + {b + 1}"]

    def mistake(self, kind: str, task: Task, k: int, history: History, rng: np.random.Generator) -> Action:
        steps = task.metadata["steps"]
        final = int(task.answers[0])
        if kind == "wrong_step":
            return Action("python", python_code(_choice(rng, self.wrong_expressions(steps[min(k, len(steps) - 1)]))))
        if kind == "vague":  # no progress: rerun the previous step (unless that is also this step) or print
            rerun = Action("python", python_code(steps[min(k, len(steps)) - 1]["expression"])) if k else None
            if rerun is None or rerun == self.correct(task, k):
                return Action("python", f"print({steps[min(k, len(steps) - 1)]['before']})")
            return rerun
        if kind == "wrong_answer":
            if k < len(steps) and steps[k]["before"] != final:
                return Action("answer", str(steps[k]["before"]))  # stops early with the value so far
            return Action("answer", _choice(rng, [str(v) for v in (final + 1, final - 1, final * 10)
                                                  if v != final]))
        raise ValueError(f"unknown mistake kind {kind!r}; expected one of {MISTAKE_KINDS}")

    def random_action(self, task: Task, history: History, rng: np.random.Generator, p_answer: float) -> Action:
        seen = " ".join([task.question] + [observation for _, observation in history])
        numbers = list(dict.fromkeys(_NUMBER_RE.findall(seen))) or ["0"]
        if rng.random() < p_answer:
            return Action("answer", _choice(rng, numbers))
        a, b = _choice(rng, numbers), _choice(rng, numbers)
        op = _choice(rng, ("+", "-", "*", "//", "%"))
        if op in ("//", "%") and int(b) == 0:
            op = "+"
        return Action("python", python_code(f"{a} {op} {b}"))


# ---------------------------------------------------------------------------------------------- policies
@dataclasses.dataclass(frozen=True)
class OraclePolicy:
    """Follows the gold chain: each correct step in order, then the gold answer."""

    moves: Moves
    name: str = "oracle"

    def __call__(self, task: Task, history: History, rng: np.random.Generator) -> Action:
        k, _ = progress(self.moves, task, history)
        return self.moves.correct(task, min(k, self.moves.num_steps(task)))


@dataclasses.dataclass(frozen=True)
class NoisyPolicy:
    """The oracle with mistakes: p_error when on track, 1 - p_recover right after a step that did not
    advance; the kind of mistake is drawn with `mistake_weights` (for MISTAKE_KINDS, in order)."""

    moves: Moves
    p_error: float = 0.3
    p_recover: float = 0.7
    mistake_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    name: str = "noisy"

    def __post_init__(self):
        for field in ("p_error", "p_recover"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"NoisyPolicy.{field} must be in [0, 1], got {getattr(self, field)}")
        weights = self.mistake_weights
        if len(weights) != len(MISTAKE_KINDS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"NoisyPolicy.mistake_weights must be {len(MISTAKE_KINDS)} non-negative weights for "
                             f"{MISTAKE_KINDS} with a positive sum, got {weights}")

    def __call__(self, task: Task, history: History, rng: np.random.Generator) -> Action:
        k, last_advanced = progress(self.moves, task, history)
        k = min(k, self.moves.num_steps(task))
        p_mistake = self.p_error if last_advanced else 1.0 - self.p_recover
        if rng.random() < p_mistake:
            weights = np.asarray(self.mistake_weights, np.float64)
            kind = MISTAKE_KINDS[int(rng.choice(len(MISTAKE_KINDS), p=weights / weights.sum()))]
            return self.moves.mistake(kind, task, k, history, rng)
        return self.moves.correct(task, k)


@dataclasses.dataclass(frozen=True)
class RandomPolicy:
    """Ignores the chain: random searches / programs, answering with probability p_answer each step."""

    moves: Moves
    p_answer: float = 0.25
    name: str = "random"

    def __post_init__(self):
        if not 0.0 <= self.p_answer <= 1.0:
            raise ValueError(f"RandomPolicy.p_answer must be in [0, 1], got {self.p_answer}")

    def __call__(self, task: Task, history: History, rng: np.random.Generator) -> Action:
        return self.moves.random_action(task, history, rng, self.p_answer)


Policy = Callable[[Task, History, np.random.Generator], Action]


def make_policy(name: str, moves: Moves, *, p_error: float = 0.3, p_recover: float = 0.7,
                mistake_weights: Sequence[float] = (0.5, 0.3, 0.2), p_answer: float = 0.25) -> Policy:
    """The policy called `name` (one of POLICY_NAMES) over `moves`."""
    if name == "oracle":
        return OraclePolicy(moves)
    if name == "noisy":
        return NoisyPolicy(moves, p_error=p_error, p_recover=p_recover, mistake_weights=tuple(mistake_weights))
    if name == "random":
        return RandomPolicy(moves, p_answer=p_answer)
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICY_NAMES}")
