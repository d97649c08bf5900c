"""Readers of real task files into `Task`s: Search-R1 QA, GSM8K, MATH, and reasoning-gym's gsm_symbolic.

Every reader raises `DataFormatError` naming the file, the line (JSONL, 1-based) or row (Parquet,
0-based) and the field when a row does not have the expected form.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from fwm.envs.base import Task
from fwm.envs.jsonl import DataFormatError, read_jsonl


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) for each record of a .jsonl/.json-lines or .parquet file."""
    path = os.fspath(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row_index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path}, row {row_index}", row
                row_index += 1
    else:
        for line, row in read_jsonl(path):
            yield f"{path}, line {line}", row


def _string(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.80}")
    return value


def _row_id(row: dict[str, Any], stem: str, index: int) -> str:
    value = row.get("id")
    return str(value) if value is not None and str(value) else f"{stem}-{index}"


def _answer_list(value: Any, where: str, field: str) -> tuple[str, ...]:
    answers = (value,) if isinstance(value, str) else value
    if (not isinstance(answers, (list, tuple)) or not answers
            or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers)):
        raise DataFormatError(f"{where}: field {field!r} must be a non-empty list of strings, got {value!r:.80}")
    return tuple(str(a) for a in answers)


def _search_r1_question(row: dict[str, Any], where: str) -> str:
    if row.get("question") is not None:  # Parquet files mixing both forms hold None for absent fields
        return _string(row, "question", where).strip()
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        contents = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if contents and isinstance(contents[-1], str) and "Question:" in contents[-1]:
            question = contents[-1].rsplit("Question:", 1)[1].strip()
            if question:
                return question
    raise DataFormatError(f"{where}: field 'question' is missing and 'prompt' holds no user message with a "
                          f"'Question:' line")


def read_search_r1(path: str | os.PathLike) -> list[Task]:
    """Search-R1 QA rows: `question`, `golden_answers`, `data_source` (raw form), or the processed form
    with the question in `prompt[-1].content` after "Question:" and the answers in
    `reward_model.ground_truth.target`."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    tasks = []
    for index, (where, row) in enumerate(iter_rows(path)):
        question = _search_r1_question(row, where)
        if row.get("golden_answers") is not None:
            answers = _answer_list(row["golden_answers"], where, "golden_answers")
        else:
            target = ((row.get("reward_model") or {}).get("ground_truth") or {})
            if not isinstance(target, dict) or "target" not in target:
                raise DataFormatError(f"{where}: field 'golden_answers' is missing and so is "
                                      f"'reward_model.ground_truth.target'")
            answers = _answer_list(target["target"], where, "reward_model.ground_truth.target")
        data_source = row.get("data_source")
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        metadata = {key: extra[key] for key in ("split", "index") if key in extra}
        tasks.append(Task(id=_row_id(row, stem, index), question=question, answers=answers, metadata=metadata,
                          data_source=str(data_source) if data_source else stem))
    return tasks


def read_gsm8k(path: str | os.PathLike, data_source: str = "gsm8k") -> list[Task]:
    """GSM8K-style rows: `question`, and `answer` whose last `#### n` gives the final answer."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    tasks = []
    for index, (where, row) in enumerate(iter_rows(path)):
        question = _string(row, "question", where)
        solution = _string(row, "answer", where)
        if "####" not in solution:
            raise DataFormatError(f"{where}: field 'answer' must end with '#### <final answer>', got "
                                  f"...{solution[-60:]!r}")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not final:
            raise DataFormatError(f"{where}: field 'answer' has nothing after '####'")
        tasks.append(Task(id=_row_id(row, stem, index), question=question.strip(), answers=(final,),
                          metadata={"solution": solution}, data_source=data_source))
    return tasks


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces respected; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced braces


def read_math(path: str | os.PathLike, data_source: str = "math") -> list[Task]:
    """MATH-style rows: `problem`, and `solution` whose last \\boxed{} is the answer (an `answer` field is
    used when the solution has none)."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    tasks = []
    for index, (where, row) in enumerate(iter_rows(path)):
        problem = _string(row, "problem", where)
        solution = _string(row, "solution", where)
        answer = last_boxed(solution)
        if answer is None and isinstance(row.get("answer"), str) and row["answer"].strip():
            answer = row["answer"]
        if answer is None or not answer.strip():
            raise DataFormatError(f"{where}: field 'solution' has no complete \\boxed{{...}} answer (and no "
                                  f"'answer' field)")
        metadata = {key: row[key] for key in ("level", "type", "subject") if key in row}
        tasks.append(Task(id=_row_id(row, stem, index), question=problem.strip(), answers=(answer.strip(),),
                          metadata={**metadata, "solution": solution}, data_source=data_source))
    return tasks


def gsm_symbolic_tasks(num_tasks: int, seed: int, difficulty: float = 1.0) -> list[Task]:
    """`num_tasks` GSM8K-derived problems from reasoning-gym's gsm_symbolic generator (offline, seeded)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=num_tasks, seed=seed, difficulty=difficulty)
    tasks = []
    for index, entry in enumerate(dataset):
        meta = entry.get("metadata", {})
        tasks.append(Task(id=f"gsm_symbolic-{seed}-{index}", question=entry["question"],
                          answers=(str(entry["answer"]),),
                          metadata={"solution": meta.get("answer_cot", ""), "variables": meta.get("variables", {})},
                          data_source="gsm_symbolic"))
    return tasks
