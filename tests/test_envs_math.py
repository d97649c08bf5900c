"""Answer checking with math-verify and the math environment with its sandboxed python tool."""
import threading
import time

import pytest

from fwm.envs.base import MALFORMED_OBSERVATION, Task
from fwm.envs.math import MathEnv, check_math_answer, format_sandbox_result
from fwm.envs.sandbox import SandboxResult
from fwm.schema import Action


@pytest.mark.parametrize("prediction, gold, expected", [
    ("42", "42", True),
    ("\\boxed{42}", "42", True),
    ("42", "\\boxed{42}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("1,000", "1000", True),
    ("$1000$", "1000", True),
    ("41", "42", False),
    ("\\frac{1}{3}", "0.5", False),
    ("", "42", False),
])
def test_check_math_answer(prediction, gold, expected):
    assert check_math_answer(prediction, gold) is expected


@pytest.mark.parametrize("garbage", ["\\boxed{", "}}}{{{", "1/0", "\\frac{1}{0}", "\x00\x01", "x" * 5000, "\\sqrt[",
                                     "[[[["])
def test_garbage_answers_score_zero_without_raising(garbage):
    assert check_math_answer(garbage, "42") is False


def test_verification_has_a_timeout_on_the_main_thread():
    start = time.monotonic()
    assert check_math_answer("9^{9^{9^{9}}}", "1", timeout_s=1) is False
    assert time.monotonic() - start < 3


def test_check_math_answer_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append((check_math_answer("\\frac{6}{4}", "1.5"),
                                                              check_math_answer("7", "8"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]


def test_format_sandbox_result():
    base = dict(exit_code=0, status="ok", timed_out=False, truncated=False, output_bytes=3, wall_s=0.1,
                isolation="audit")
    assert format_sandbox_result(SandboxResult(stdout="", stderr="", **base)) == "(no output)"
    assert format_sandbox_result(SandboxResult(stdout="1", stderr="", **base)) == "1\n"
    timed = dict(base, exit_code=None, status="timeout", timed_out=True, truncated=True, output_bytes=99, wall_s=2.0)
    assert format_sandbox_result(SandboxResult(stdout="abc\n", stderr="", **timed)) == (
        "abc\n[timed out after 2.0 s]\n[output truncated: 99 bytes in total]\n")


def test_math_env_episode():
    task = Task(id="t1", question="What is 6 * 7 + 2**10?", answers=("1066",))
    env = MathEnv(max_turns=4, timeout_s=5.0)
    env.reset(task)
    observation, done, info = env.step(Action("python", "print(6 * 7 + 2**10)"))
    assert observation == "1066\n" and not done and not info["tool_error"] and info["observation_kind"] == "python"
    observation, done, info = env.step(Action("python", "print(undefined_name)"))
    assert "NameError" in observation and info["tool_error"] and info["num_tool_errors"] == 1
    observation, done, info = env.step(None)
    assert observation == MALFORMED_OBSERVATION and info["num_malformed"] == 1
    observation, done, info = env.step(Action("answer", "\\boxed{1066}"))
    assert done and info["reason"] == "answer" and info["score"] == 1.0 and observation == ""
    assert env.record.final_answer == "\\boxed{1066}" and env.record.num_turns == 4

    env.reset(task)
    _, _, info = env.step(Action("search", "six times seven"))
    assert info["invalid_action"]
    _, done, info = env.step(Action("answer", "1065"))
    assert done and info["score"] == 0.0


def test_math_env_turn_budget_and_timeouts():
    env = MathEnv(max_turns=1, timeout_s=0.5)
    env.reset(Task(id="t2", question="Loop?", answers=("0",)))
    observation, done, info = env.step(Action("python", "while True:\n    pass"))
    assert "[timed out after" in observation and info["tool_error"]
    assert done and info["reason"] == "turn_budget" and info["score"] == 0.0
