"""Synthetic multi-step arithmetic tasks for the python tool, with the gold step chain in the metadata.

A task starts from a number and applies numbered steps (add, subtract, multiply, exact divide,
remainder, square); values stay non-negative integers, so the answer is one integer. Each step in
`metadata["steps"]` carries its operation, operand, the value before and after, and a Python
expression (`"4821 * 37"`) an oracle can run. `generate_arithmetic_tasks(config, seed)` is a pure
function of its arguments. Difficulty knobs: `step_weights` / `test_step_weights` (how many steps) and
`max_digits` (magnitude of the start value and the operands).
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, Sequence

from fwm.envs.base import Task, write_tasks
from fwm.envs.jsonl import write_json

OPERATIONS = ("add", "subtract", "multiply", "divide", "remainder", "square")
_WORDING = {"add": "add {x}", "subtract": "subtract {x}", "multiply": "multiply by {x}",
            "divide": "divide by {x}", "remainder": "take the remainder after dividing by {x}",
            "square": "square the number"}
_SQUARE_LIMIT = 10_000  # squaring larger values makes numbers nobody would copy by hand


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    num_train_tasks: int = 200
    num_test_tasks: int = 50
    step_weights: tuple[float, ...] = (0.2, 0.3, 0.3, 0.2)  # P(1 step), P(2 steps), ...
    test_step_weights: tuple[float, ...] | None = None  # None: same as step_weights
    max_digits: int = 3
    operations: tuple[str, ...] = OPERATIONS

    def __post_init__(self):
        for name in ("step_weights", "test_step_weights"):
            weights = getattr(self, name)
            if weights is not None and (not weights or any(w < 0 for w in weights) or sum(weights) <= 0):
                raise ValueError(f"ArithmeticConfig.{name} must hold non-negative weights (for 1, 2, ... steps) "
                                 f"with a positive sum, got {weights}")
        if self.max_digits < 1:
            raise ValueError(f"ArithmeticConfig.max_digits must be >= 1, got {self.max_digits}")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"ArithmeticConfig.operations must be a non-empty subset of {OPERATIONS}, "
                             f"got {self.operations}")


def generate_arithmetic_tasks(config: ArithmeticConfig, seed: int) -> tuple[tuple[Task, ...], tuple[Task, ...]]:
    """(train tasks, test tasks), distinct questions; a pure function of (config, seed)."""
    rng = random.Random(f"arithmetic-{seed}")
    seen: set[str] = set()
    train = _make_tasks(config, config.num_train_tasks, config.step_weights, "train", seen, rng)
    test = _make_tasks(config, config.num_test_tasks, config.test_step_weights or config.step_weights, "test",
                       seen, rng)
    return train, test


def write_arithmetic_tasks(config: ArithmeticConfig, seed: int, train: Sequence[Task], test: Sequence[Task],
                           directory: str | os.PathLike) -> dict[str, str]:
    """Writes train.jsonl, test.jsonl and meta.json (config, seed, counts); returns the paths by name."""
    directory = os.fspath(directory)
    paths = {"train": os.path.join(directory, "train.jsonl"), "test": os.path.join(directory, "test.jsonl"),
             "meta": os.path.join(directory, "meta.json")}
    write_tasks(paths["train"], train)
    write_tasks(paths["test"], test)
    write_json(paths["meta"], {"world": "arithmetic", "seed": seed, "config": dataclasses.asdict(config),
                               "num_train_tasks": len(train), "num_test_tasks": len(test)})
    return paths


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(2, max(2, 10 ** digits - 1))


def _step(value: int, operation: str, rng: random.Random, digits: int) -> dict[str, Any] | None:
    """One step from `value`, or None when `operation` does not fit it (the caller draws another)."""
    if operation == "add":
        x = _operand(rng, digits)
        after, expression = value + x, "{v} + {x}"
    elif operation == "subtract":
        if value < 2:
            return None
        x = rng.randint(1, min(value, 10 ** digits - 1))
        after, expression = value - x, "{v} - {x}"
    elif operation == "multiply":
        x = _operand(rng, max(1, digits - 1))
        after, expression = value * x, "{v} * {x}"
    elif operation == "divide":
        limit = min(value, 10 ** min(digits, 4) - 1)  # bounds the divisor search
        divisors = [d for d in range(2, limit + 1) if value % d == 0]
        if not divisors:
            return None
        x = rng.choice(divisors)
        after, expression = value // x, "{v} // {x}"
    elif operation == "remainder":
        x = _operand(rng, digits)
        if x >= value:
            return None
        after, expression = value % x, "{v} % {x}"
    else:  # square
        if value >= _SQUARE_LIMIT:
            return None
        x, after, expression = 2, value * value, "{v} ** 2"
    return {"op": operation, "operand": x, "before": value, "after": after,
            "expression": expression.format(v=value, x=x), "text": _WORDING[operation].format(x=x)}


def _make_tasks(config: ArithmeticConfig, count: int, step_weights: Sequence[float], split: str, seen: set[str],
                rng: random.Random) -> tuple[Task, ...]:
    step_counts = list(range(1, len(step_weights) + 1))
    tasks: list[Task] = []
    attempts = 0
    while len(tasks) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"could not make {count} distinct {split} arithmetic tasks; raise max_digits or "
                             f"ask for fewer tasks")
        num_steps = rng.choices(step_counts, weights=step_weights)[0]
        start = rng.randint(2, 10 ** config.max_digits - 1)
        value, steps = start, []
        for _ in range(20 * num_steps):  # an operation that fits no value (e.g. only "divide") ends the try
            if len(steps) == num_steps:
                break
            step = _step(value, rng.choice(config.operations), rng, config.max_digits)
            if step is not None:
                steps.append(step)
                value = step["after"]
        if len(steps) < num_steps:
            continue
        lines = [f"Start with {start}."] + [f"Step {i}: {s['text']}." for i, s in enumerate(steps, start=1)]
        question = " ".join(lines) + " What is the final number?"
        if question in seen:
            continue
        seen.add(question)
        tasks.append(Task(id=f"arithmetic-{split}-{len(tasks):05d}", question=question, answers=(str(value),),
                          metadata={"world": "arithmetic", "split": split, "num_steps": num_steps, "start": start,
                                    "steps": steps},
                          data_source="synthetic_arithmetic"))
    return tuple(tasks)
