"""Environments for a batch of episodes: one env per episode over one shared tool backend, stepped together.

`EnvPool.step(envs, actions)` first answers every search query of the step in one batched retriever
call (the answers are remembered, so each env's own `step` then finds them), then steps the envs in a
thread pool (python tool calls are sandbox subprocesses, so threads overlap them). Math answers are
checked by `AnswerChecker`: `check_math_answer` in a child process with a hard timeout, because
math-verify's own timeout (signal.alarm) only works on a main thread, and a thread of this pool is
not one; an answer whose check outlives the timeout scores 0 (the child is killed and replaced) and
the record's metrics get "verify_timeout": 1.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from typing import Any, Sequence

from fwm.envs.base import ToolEnv
from fwm.envs.math import MathEnv, check_math_answer
from fwm.envs.retrievers import BM25Retriever, RetrievalError, Retriever
from fwm.envs.search import SearchEnv
from fwm.schema import Action
from fwm.trajectories.collect import EnvSpec, MemoizedRetriever, cpu_only_jax

_CHILD_START_TIMEOUT_S = 120.0  # importing math-verify (sympy) in a fresh process on a busy machine


# ---------------------------------------------------------------------------------------------- math
def _checker_main(connection: Any) -> None:
    """The child: answers (prediction, golds, timeout_s) requests with a bool until the pipe closes."""
    cpu_only_jax()
    import math_verify  # noqa: F401  (paid once here, not inside the first request's timeout)

    connection.send("ready")
    while True:
        try:
            prediction, golds, timeout_s = connection.recv()
        except EOFError:
            return
        connection.send(any(check_math_answer(prediction, gold, timeout_s) for gold in golds))


class AnswerChecker:
    """check_math_answer in a spawned child process with a hard wall-clock timeout; thread-safe.

    `__call__` returns True / False, or None when the check did not finish within timeout_s (the
    child is then killed and a fresh one started for the next request).
    """

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: Any = None
        self._connection: Any = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the parent holds jax / tokenizer threads
        parent, child = context.Pipe()
        self._process = context.Process(target=_checker_main, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self._connection = parent
        if not parent.poll(_CHILD_START_TIMEOUT_S) or parent.recv() != "ready":
            self.close()
            raise RuntimeError(f"the math answer checker process did not start within {_CHILD_START_TIMEOUT_S} s")

    def __call__(self, prediction: str, golds: Sequence[str]) -> bool | None:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            self._connection.send((prediction, tuple(golds), self.timeout_s))
            # math-verify's own alarm inside the child fires first; the margin covers several golds.
            if self._connection.poll(self.timeout_s * max(1, len(golds)) + 1.0):
                return bool(self._connection.recv())
            self.close()
            return None

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = None


class CheckedMathEnv(MathEnv):
    """MathEnv whose answers are checked by a shared AnswerChecker (safe in any thread)."""

    def __init__(self, checker: AnswerChecker, **kwargs: Any):
        super().__init__(**kwargs)
        self._checker = checker

    def _score_answer(self, answer: str) -> tuple[float, dict[str, float]]:
        verdict = self._checker(answer, self.record.task.answers)
        metrics = {"correct": float(verdict is True)}
        if verdict is None:
            metrics["verify_timeout"] = 1.0
        return float(verdict is True), metrics


# --------------------------------------------------------------------------------------------- search
class LockedRetriever:
    """A retriever whose calls are serialised (the memo and BM25 are shared by the pool's threads)."""

    def __init__(self, retriever: Retriever):
        self._retriever = retriever
        self._lock = threading.Lock()

    def search(self, queries: list[str], topk: int) -> list[list[Any]]:
        with self._lock:
            return self._retriever.search(queries, topk)


# ----------------------------------------------------------------------------------------------- pool
class EnvPool:
    """Makes envs of one kind over a shared backend and steps a batch of them (see the module doc)."""

    def __init__(self, spec: EnvSpec, retriever: Retriever | None = None, threads: int = 8):
        """spec: as for fwm.trajectories.collect.make_env. retriever: for the search tool, one to use
        instead of loading spec.index_dir (e.g. an HTTPRetriever); its answers are remembered."""
        self.spec = spec
        self._threads = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="env")
        self._retriever: Retriever | None = None
        self._checker: AnswerChecker | None = None
        if spec.tool == "search":
            self._retriever = LockedRetriever(MemoizedRetriever(retriever or BM25Retriever.load(spec.index_dir)))
        else:
            self._checker = AnswerChecker(timeout_s=spec.timeout_s)

    def new_env(self) -> ToolEnv:
        spec = self.spec
        if self._retriever is not None:
            return SearchEnv(self._retriever, topk=spec.topk, max_turns=spec.max_turns, metric=spec.metric)
        return CheckedMathEnv(self._checker, max_turns=spec.max_turns, timeout_s=spec.timeout_s,
                              memory_mb=spec.memory_mb, isolation=spec.isolation)

    def _prefetch(self, actions: Sequence[Action | None]) -> None:
        """One batched retriever call for every search of the step (remembered for the envs' own calls)."""
        queries = list(dict.fromkeys(a.argument.strip() for a in actions
                                     if a is not None and a.kind == "search" and a.argument.strip()))
        if self._retriever is not None and queries:
            try:
                self._retriever.search(queries, self.spec.topk)
            except RetrievalError:
                pass  # not remembered: each env's own call fails again and says so in its observation

    def step(self, envs: Sequence[ToolEnv], actions: Sequence[Action | None]) -> list[tuple[str, bool, dict[str, Any]]]:
        """env.step(action) for each pair, concurrently; results in order."""
        if len(envs) != len(actions):
            raise ValueError(f"EnvPool.step: {len(envs)} envs but {len(actions)} actions")
        self._prefetch(actions)
        return list(self._threads.map(lambda pair: pair[0].step(pair[1]), zip(envs, actions)))

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        if self._checker is not None:
            self._checker.close()

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
