"""Readers of real task files: Search-R1 (JSONL and Parquet, raw and processed rows), GSM8K, MATH, gsm_symbolic."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fwm.envs.base import read_tasks, write_tasks
from fwm.envs.jsonl import DataFormatError
from fwm.envs.readers import gsm_symbolic_tasks, last_boxed, read_gsm8k, read_math, read_search_r1


def _jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


RAW = {"id": "train_0", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare", "William Shakespeare"],
       "data_source": "nq"}
PROCESSED = {"data_source": "hotpotqa",
             "prompt": [{"role": "user", "content": "Answer the given question. ... Question: where is Big Ben?\n"}],
             "ability": "fact-reasoning", "reward_model": {"style": "rule", "ground_truth": {"target": ["London"]}},
             "extra_info": {"split": "test", "index": 7}}


def test_search_r1_jsonl_both_row_forms(tmp_path):
    tasks = read_search_r1(_jsonl(tmp_path / "qa.jsonl", [RAW, PROCESSED]))
    assert [t.question for t in tasks] == ["who wrote hamlet?", "where is Big Ben?"]
    assert tasks[0].answers == ("Shakespeare", "William Shakespeare") and tasks[0].id == "train_0"
    assert tasks[1].answers == ("London",) and tasks[1].data_source == "hotpotqa" and tasks[1].id == "qa-1"
    assert tasks[1].metadata == {"split": "test", "index": 7}


def test_search_r1_parquet(tmp_path):
    path = tmp_path / "test.parquet"
    both = dict(PROCESSED, **RAW)  # Search-R1's processed files keep the raw columns too
    schema = pa.Table.from_pylist([both]).schema
    pq.write_table(pa.Table.from_pylist([both, PROCESSED], schema=schema), path)  # row 1: raw columns null
    tasks = read_search_r1(path)
    assert [t.answers for t in tasks] == [("Shakespeare", "William Shakespeare"), ("London",)]
    assert [t.question for t in tasks] == ["who wrote hamlet?", "where is Big Ben?"]
    assert tasks[1].metadata == {"split": "test", "index": 7}
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([RAW, dict(RAW, golden_answers=[])]), bad)
    with pytest.raises(DataFormatError, match=r"bad.parquet, row 1: field 'golden_answers'"):
        read_search_r1(bad)


@pytest.mark.parametrize("row, message", [
    ({"question": "q?", "data_source": "nq"}, r"line 2: field 'golden_answers' is missing"),
    ({"question": "", "golden_answers": ["a"]}, r"line 2: field 'question' must be a non-empty string"),
    ({"prompt": [{"role": "user", "content": "no marker"}], "golden_answers": ["a"]}, r"line 2: field 'question'"),
    ({"question": "q?", "golden_answers": "a", "x": 1, "reward_model": 3}, None),
    ('{"question": "q?", ', r"line 2: not valid JSON"),
])
def test_search_r1_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = _jsonl(tmp_path / "rows.jsonl", [RAW, row])
    if message is None:
        assert read_search_r1(path)[1].answers == ("a",)
    else:
        with pytest.raises(DataFormatError, match=r"rows.jsonl, " + message):
            read_search_r1(path)


def test_gsm8k(tmp_path):
    path = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = 1203\n#### 1,203"}])
    [task] = read_gsm8k(path)
    assert task.answers == ("1203",) and task.metadata["solution"].endswith("#### 1,203")
    _jsonl(path, [{"question": "q", "answer": "no marker here"}])
    with pytest.raises(DataFormatError, match=r"gsm8k.jsonl, line 1: field 'answer' must end with '#### "):
        read_gsm8k(path)
    _jsonl(path, [{"question": "q", "answer": "x\n#### 4"}, {"answer": "#### 5"}])
    with pytest.raises(DataFormatError, match=r"line 2: field 'question'"):
        read_gsm8k(path)


def test_math_boxed_with_nested_braces(tmp_path):
    assert last_boxed("so \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}} done") == "\\frac{\\sqrt{3}}{2}"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}" and last_boxed("none") is None and last_boxed("\\boxed{{1}") is None
    path = _jsonl(tmp_path / "math.jsonl", [
        {"problem": "Compute sin(60).", "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "level": "Level 2"},
        {"problem": "p", "solution": "no box", "answer": "7"}])
    tasks = read_math(path)
    assert tasks[0].answers == ("\\frac{\\sqrt{3}}{2}",) and tasks[0].metadata["level"] == "Level 2"
    assert tasks[1].answers == ("7",)
    _jsonl(path, [{"problem": "p", "solution": "unbalanced \\boxed{1"}])
    with pytest.raises(DataFormatError, match=r"math.jsonl, line 1: field 'solution' has no complete"):
        read_math(path)


def test_gsm_symbolic_is_seeded_and_round_trips(tmp_path):
    tasks = gsm_symbolic_tasks(5, seed=11)
    assert tasks == gsm_symbolic_tasks(5, seed=11) and tasks != gsm_symbolic_tasks(5, seed=12)
    assert all(t.answers[0].lstrip("-").replace(".", "", 1).isdigit() for t in tasks)
    assert len({t.id for t in tasks}) == 5 and tasks[0].data_source == "gsm_symbolic"
    write_tasks(tmp_path / "tasks.jsonl", tasks)
    assert read_tasks(tmp_path / "tasks.jsonl") == tasks
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "question": "q", "answers": "not a list"}\n')
    with pytest.raises(DataFormatError, match=r"broken.jsonl, line 1: field 'answers' must be a list"):
        read_tasks(tmp_path / "broken.jsonl")
