"""Episode collection: run behaviour policies over many tasks in parallel and write raw trajectories.

Workers die with their parent: each sets PR_SET_PDEATHSIG (Linux) in its initializer, so a parent killed
with SIGKILL leaves no worker behind (and multiprocessing's resource tracker, which waits for every holder
of its pipe, exits once they are gone). Progress is a tqdm bar on a terminal and plain log lines otherwise
(a bar's redraws would fill a log file).

Every episode draws its randomness from its own seed, `derive_seed(seed, "collect", split, policy,
task id, episode)`, so the trajectories are a function of the seed alone, whatever the number of
workers. Work is cut into contiguous chunks (one env per chunk, built in the worker from an
`EnvSpec`); results come back in input order. Workers are spawned processes (not forked: the parent
may hold threads, e.g. of jax or tokenizers, that a fork would copy in a locked state).

Tool outputs of the synthetic worlds are deterministic (BM25 over a fixed corpus, pure arithmetic),
so the envs built here memoise them per chunk: Monte Carlo continuations replay the same searches and
programs many times, and a sandbox run costs tens of milliseconds.

A trajectory row is `EpisodeRecord.to_dict()` plus "id", "split", "policy", "episode" and "seed".
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping, Sequence, TextIO, TypeVar

import numpy as np
from absl import logging
from tqdm import tqdm

from fwm.envs.base import EpisodeRecord, Task, ToolEnv
from fwm.envs.math import MathEnv
from fwm.envs.retrievers import BM25Retriever, Doc, Retriever
from fwm.envs.search import SearchEnv
from fwm.schema import Action
from fwm.trajectories.policies import Policy

TOOLS = ("search", "python")
Item = TypeVar("Item")
Result = TypeVar("Result")


def derive_seed(*parts: str | int) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def succeeded(score: float) -> bool:
    """Whether an episode counts as a success: a full score (a correct final answer)."""
    return score >= 1.0


# -------------------------------------------------------------------------------------------- environments
class MemoizedRetriever:
    """A retriever whose answers are remembered by (query, topk); failures are not remembered."""

    def __init__(self, retriever: Retriever):
        self._retriever = retriever
        self._cache: dict[tuple[str, int], list[Doc]] = {}

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        missing = [q for q in dict.fromkeys(queries) if (q, topk) not in self._cache]
        if missing:
            for query, docs in zip(missing, self._retriever.search(missing, topk)):
                self._cache[(query, topk)] = docs
        return [list(self._cache[(q, topk)]) for q in queries]


class MemoizedMathEnv(MathEnv):
    """MathEnv remembering each program's observation and each answer check (both deterministic here)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._tool_cache: dict[str, tuple[str, dict[str, bool]]] = {}
        self._score_cache: dict[tuple[str, tuple[str, ...]], tuple[float, dict[str, float]]] = {}

    def _run_tool(self, action: Action) -> tuple[str, dict[str, bool]]:
        if action.argument not in self._tool_cache:
            self._tool_cache[action.argument] = super()._run_tool(action)
        observation, flags = self._tool_cache[action.argument]
        return observation, dict(flags)

    def _score_answer(self, answer: str) -> tuple[float, dict[str, float]]:
        key = (answer, self.record.task.answers)
        if key not in self._score_cache:
            self._score_cache[key] = super()._score_answer(answer)
        score, metrics = self._score_cache[key]
        return score, dict(metrics)


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """How to build an env in a worker. tool "search": a BM25 index saved in `index_dir`; "python": the
    sandbox (timeout_s, memory_mb, isolation as in fwm.envs.sandbox.run_python)."""

    tool: str
    max_turns: int = 8
    index_dir: str = ""
    topk: int = 3
    metric: str = "exact_match"
    timeout_s: float = 5.0
    memory_mb: int = 512
    isolation: str = "auto"

    def __post_init__(self):
        if self.tool not in TOOLS:
            raise ValueError(f"EnvSpec.tool must be one of {TOOLS}, got {self.tool!r}")
        if self.tool == "search" and not self.index_dir:
            raise ValueError("EnvSpec for the search tool needs index_dir (a BM25Retriever.build directory)")


def make_env(spec: EnvSpec) -> ToolEnv:
    """A fresh env with memoised tools (see the module docstring)."""
    if spec.tool == "search":
        retriever = MemoizedRetriever(BM25Retriever.load(spec.index_dir))
        return SearchEnv(retriever, topk=spec.topk, max_turns=spec.max_turns, metric=spec.metric)
    return MemoizedMathEnv(max_turns=spec.max_turns, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb,
                           isolation=spec.isolation)


# ---------------------------------------------------------------------------------------------- episodes
def run_episode(env: ToolEnv, policy: Policy, task: Task, rng: np.random.Generator,
                prefix: Sequence[Action | None] = ()) -> EpisodeRecord:
    """Resets `env` on `task`, replays `prefix` (actions of an earlier episode), then lets `policy` act
    until the episode ends (answer or turn budget). Returns the episode's record."""
    env.reset(task)
    history: list[tuple[Action | None, str]] = []
    done = False
    for action in prefix:
        if done:
            raise ValueError(f"task {task.id}: the prefix of {len(prefix)} actions goes past the end of the episode")
        observation, done, _ = env.step(action)
        history.append((action, observation))
    while not done:
        action = policy(task, history, rng)
        observation, done, _ = env.step(action)
        history.append((action, observation))
    return env.record


def trajectory_id(split: str, policy: str, task_id: str, episode: int) -> str:
    return f"{split}/{policy}/{task_id}/{episode}"


def trajectory_row(record: EpisodeRecord, *, split: str, policy: str, episode: int, seed: int) -> dict[str, Any]:
    """The JSONL row of one collected episode."""
    return {"id": trajectory_id(split, policy, record.task.id, episode), "split": split, "policy": policy,
            "episode": episode, "seed": seed, **record.to_dict()}


def record_from_row(row: Mapping[str, Any], where: str = "trajectory") -> EpisodeRecord:
    """The EpisodeRecord of a trajectory row (extra keys ignored); errors name `where`."""
    return EpisodeRecord.from_dict(row, where)


@dataclasses.dataclass(frozen=True)
class CollectJob:
    """What every collection chunk shares: the env to build, the policies by name and the base seed."""

    env: EnvSpec
    policies: Mapping[str, Policy]
    seed: int


@dataclasses.dataclass(frozen=True)
class EpisodeItem:
    split: str
    policy: str
    task: Task
    episode: int


def collect_chunk(job: CollectJob, items: Sequence[EpisodeItem]) -> list[dict[str, Any]]:
    """Runs one chunk of episodes (in a worker); returns their rows in order."""
    env = make_env(job.env)
    rows = []
    for item in items:
        seed = derive_seed(job.seed, "collect", item.split, item.policy, item.task.id, item.episode)
        record = run_episode(env, job.policies[item.policy], item.task, np.random.default_rng(seed))
        rows.append(trajectory_row(record, split=item.split, policy=item.policy, episode=item.episode, seed=seed))
    return rows


def episode_items(split: str, tasks: Sequence[Task], policies: Sequence[str], episodes_per_task: int
                  ) -> list[EpisodeItem]:
    """Task-major order (a task's episodes share a chunk, and so its memoised tool outputs)."""
    return [EpisodeItem(split, policy, task, episode) for task in tasks for policy in policies
            for episode in range(episodes_per_task)]


def collect(job: CollectJob, items: Sequence[EpisodeItem], workers: int = 0, chunk_size: int = 16,
            progress: bool = True) -> list[dict[str, Any]]:
    """Trajectory rows for `items`, in order; deterministic for job.seed whatever `workers` is."""
    return map_chunks(collect_chunk, job, items, workers=workers, chunk_size=chunk_size, desc="collect",
                      unit="episode", progress=progress)


# --------------------------------------------------------------------------------------------- parallel
def map_chunks(function: Callable[[Any, Sequence[Item]], list[Result]], job: Any, items: Sequence[Item], *,
               workers: int, chunk_size: int, desc: str, unit: str = "item", progress: bool = True) -> list[Result]:
    """`function(job, chunk)` over contiguous chunks of `items`, concatenated in input order.

    workers 0 runs in this process; otherwise a pool of that many spawned processes (`function` and
    `job` must pickle), which die with this process (`worker_init`). Progress counts finished items
    (`Progress`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = [list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size)]
    results: list[list[Result] | None] = [None] * len(chunks)
    with Progress(len(items), desc, unit, enabled=progress) as bar:
        if workers <= 0 or len(chunks) <= 1:
            for i, chunk in enumerate(chunks):
                results[i] = function(job, chunk)
                bar.update(len(chunk))
        else:
            context = multiprocessing.get_context("spawn")
            # Workers are started by submit() in this thread, whose exit (with the process) is what
            # PR_SET_PDEATHSIG watches; the pool does not outlive this call.
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context,
                                                        initializer=worker_init, initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(function, job, chunk): i for i, chunk in enumerate(chunks)}
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.update(len(chunks[i]))
    out: list[Result] = []
    for chunk, chunk_results in zip(chunks, results):
        if chunk_results is None or len(chunk_results) != len(chunk):
            raise RuntimeError(f"{desc}: a chunk of {len(chunk)} items returned "
                               f"{None if chunk_results is None else len(chunk_results)} results")
        out.extend(chunk_results)
    return out


class Progress:
    """Counts finished items: a tqdm bar when `stream` is a terminal, else a plain log line at most every
    `every_s` seconds and one at the end; nothing when disabled."""

    def __init__(self, total: int, desc: str, unit: str, *, enabled: bool = True, stream: TextIO | None = None,
                 every_s: float = 10.0):
        stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled = enabled
        self.done = 0
        self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=stream) \
            if enabled and stream.isatty() else None
        self._start = self._last = time.monotonic()

    def __enter__(self) -> "Progress":
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._log()

    def _log(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        units = self.unit[:-1] + "ies" if self.unit.endswith("y") else self.unit + "s"
        logging.info("%s: %d/%d %s (%.0f%%) in %.1f s", self.desc, self.done, self.total, units,
                     100.0 * self.done / max(self.total, 1), elapsed)

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and exc_info[0] is None:
            self._log()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(parent_pid: int) -> None:
    """A pool worker's initializer: die with the parent, keep jax on the CPU.

    PR_SET_PDEATHSIG(SIGKILL) makes the kernel kill this process when its parent exits, however the parent
    dies (SIGKILL included, where no cleanup of the parent runs). The parent may already be gone by the time
    this runs (the worker was still importing): then the worker has been re-parented and exits at once.
    Elsewhere than Linux there is no such call, and workers end when their next read of the call queue fails.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)
    cpu_only_jax()


def cpu_only_jax() -> None:
    """Keeps jax on the CPU in this process. Data work needs no accelerator, and any jax op a library runs
    in a worker would otherwise claim the GPU/TPU (or preallocate GPU memory); retrievers.py already keeps
    bm25s off jax, this guards the rest."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # already imported: the environment variable was read at import time
        sys.modules["jax"].config.update("jax_platforms", "cpu")
