"""The search environment: `<search>` queries a retriever, `<answer>` is scored against the gold answers.

Observations are the raw `Doc i(Title: t) text` lines (Search-R1 convention); a failed search (server
down, timeout, bad response) becomes an observation that says so and is counted in info and in the
episode record ("failed_search"), never an exception. An empty query is a tool error.
"""
from __future__ import annotations

from typing import Sequence

from fwm.envs.base import ToolEnv
from fwm.envs.retrievers import Doc, RetrievalError, Retriever, format_docs
from fwm.envs.scoring import QA_METRICS
from fwm.schema import Action

NO_RESULTS_OBSERVATION = "No documents matched the query."
EMPTY_QUERY_OBSERVATION = "The search query was empty. Put the query between <search> and </search>."


def failed_search_observation(reason: str) -> str:
    """What the agent sees when the retriever could not answer."""
    return f"Search failed: {reason}. You may try again or answer."


def search_outcomes(retriever: Retriever, queries: Sequence[str], topk: int) -> list[tuple[str, bool]]:
    """(observation, failed) for each query, in one batched retriever call; used by SearchEnv and by
    batched episode runners. Empty queries are answered without calling the retriever."""
    outcomes: list[tuple[str, bool] | None] = [None] * len(queries)
    asked = [i for i, query in enumerate(queries) if query.strip()]
    for i, query in enumerate(queries):
        if not query.strip():
            outcomes[i] = (EMPTY_QUERY_OBSERVATION, False)
    if asked:
        try:
            results: list[list[Doc]] = retriever.search([queries[i].strip() for i in asked], topk)
        except RetrievalError as error:
            reason = str(error)
            for i in asked:
                outcomes[i] = (failed_search_observation(reason), True)
        else:
            for i, docs in zip(asked, results):
                outcomes[i] = (format_docs(docs) if docs else NO_RESULTS_OBSERVATION, False)
    return outcomes  # type: ignore[return-value]


class SearchEnv(ToolEnv):
    """Question answering with a search tool; score = `metric` (exact_match, f1 or substring_match)
    of the answer, with all three metrics in info and the record."""

    tool_kinds = ("search",)

    def __init__(self, retriever: Retriever, topk: int = 3, max_turns: int = 4, metric: str = "exact_match"):
        super().__init__(max_turns)
        if metric not in QA_METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(QA_METRICS)}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.retriever = retriever
        self.topk = topk
        self.metric = metric

    def _run_tool(self, action: Action) -> tuple[str, dict[str, bool]]:
        [(observation, failed)] = search_outcomes(self.retriever, [action.argument], self.topk)
        return observation, {"failed_search": failed, "tool_error": observation == EMPTY_QUERY_OBSERVATION}

    def _score_answer(self, answer: str) -> tuple[float, dict[str, float]]:
        golds = self.record.task.answers
        metrics = {name: fn(answer, golds) for name, fn in QA_METRICS.items()}
        return metrics[self.metric], metrics
