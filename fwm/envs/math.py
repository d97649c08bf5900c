"""The math environment: `<python>` runs code in the sandbox, `<answer>` is checked with math-verify.

Observations of `<python>` are what the program printed: stdout, then stderr (tracebacks), then notes
for a timeout, a kill or truncated output; "(no output)" when it printed nothing. A run that does not
exit cleanly is counted as a tool error.
"""
from __future__ import annotations

import math
import re
import threading

from fwm.envs.base import ToolEnv
from fwm.envs.sandbox import SandboxResult, run_python
from fwm.schema import Action

MAX_ANSWER_CHARS = 1000  # longer answers are scored 0 without parsing (parsing time grows with length)
_BOXED_RE = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def check_math_answer(prediction: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether `prediction` equals `gold` mathematically (math-verify), else by a plain numeric compare.

    The gold is read as LaTeX (wrapped in \\boxed{} unless it already has \\boxed or $); the prediction is
    tried as written and boxed. math-verify's own timeout (signal.alarm, `timeout_s` rounded up) is used
    on the main thread; other threads cannot use signals, so there only the length cap bounds the work.
    Errors inside math-verify count as "not equal", never propagate.
    """
    if len(prediction) > MAX_ANSWER_CHARS or not prediction.strip():
        return False
    try:
        if _math_verify_equal(prediction, gold, timeout_s):
            return True
    except Exception:  # math-verify / sympy failures on model text are a wrong answer, not a crash
        pass
    return _numeric_equal(prediction, gold)


def _math_verify_equal(prediction: str, gold: str, timeout_s: float) -> bool:
    from math_verify import parse, verify

    seconds = max(1, math.ceil(timeout_s)) if threading.current_thread() is threading.main_thread() else None
    gold_text = gold if ("\\boxed" in gold or "$" in gold) else f"\\boxed{{{gold}}}"
    gold_parsed = parse(gold_text, parsing_timeout=seconds)
    if not gold_parsed:
        return False
    candidates = [prediction]
    if "\\boxed" not in prediction and "$" not in prediction:
        candidates.append(f"\\boxed{{{prediction}}}")
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=seconds)
        if parsed and verify(gold_parsed, parsed, timeout_seconds=seconds):
            return True
    return False


def _as_number(text: str) -> float | None:
    text = text.strip().rstrip(".").replace("$", "").replace(",", "").replace(" ", "")
    boxed = _BOXED_RE.match(text)
    if boxed:
        text = boxed.group(1)
    return float(text) if _NUMBER_RE.match(text) else None


def _numeric_equal(prediction: str, gold: str) -> bool:
    predicted, expected = _as_number(prediction), _as_number(gold)
    if predicted is None or expected is None:
        return False
    return math.isclose(predicted, expected, rel_tol=1e-9, abs_tol=1e-12)


def format_sandbox_result(result: SandboxResult) -> str:
    """The observation text for one python run."""
    parts = [result.stdout]
    if result.stderr:
        parts.append(result.stderr)
    text = "".join(part if part.endswith("\n") or not part else part + "\n" for part in parts)
    if result.timed_out:
        text += f"[timed out after {result.wall_s:.1f} s]\n"
    elif result.status == "killed":
        text += f"[killed by signal {-result.exit_code}]\n"
    if result.truncated:
        text += f"[output truncated: {result.output_bytes} bytes in total]\n"
    return text if text else "(no output)"


class MathEnv(ToolEnv):
    """Math problems with a sandboxed python tool; score 1.0 if the answer matches a gold answer."""

    tool_kinds = ("python",)

    def __init__(self, max_turns: int = 4, timeout_s: float = 5.0, memory_mb: int = 512,
                 max_output_bytes: int = 4096, isolation: str = "auto", verify_timeout_s: float = 5.0):
        super().__init__(max_turns)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_output_bytes = max_output_bytes
        self.isolation = isolation
        self.verify_timeout_s = verify_timeout_s

    def _run_tool(self, action: Action) -> tuple[str, dict[str, bool]]:
        result = run_python(action.argument, self.timeout_s, self.memory_mb,
                            max_output_bytes=self.max_output_bytes, isolation=self.isolation)
        return format_sandbox_result(result), {"tool_error": not result.ok}

    def _score_answer(self, answer: str) -> tuple[float, dict[str, float]]:
        correct = any(check_math_answer(answer, gold, self.verify_timeout_s) for gold in self.record.task.answers)
        return float(correct), {"correct": float(correct)}
