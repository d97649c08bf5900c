"""Per-stage record validation: raw `SourceRecord`s become checked, normalised dicts or a precise error.

Record formats (written by the corpus builders, read here):
- LM (pretraining / mid-training): `{"id": str, "segments": [{"role": str, "text": str}, ...]}` or
  `{"id": str, "text": str}` (one segment with role "document"). Roles are `ROLES`. Optional
  `"trained_roles": [role, ...]`: which roles of this record are targets when the run does not set
  data.trained_roles (e.g. an IWM record trains its observation only). Normalised to
  `{"id", "segments": [(role, text), ...], "trained_roles": tuple of roles | None}`.
- SFT: `{"id": str, "prompt": str, "response": str, "variant": "plain" | "state" | "full"}`.
- RL task: `{"id": str, "question": str, "answers": [str, ...], "data_source": str (optional),
  "metadata": dict (optional)}`; normalised with `data_source` "" and `metadata` {} when absent.
Keys beyond these are ignored. A bad record raises `BadRecordError` naming the file, the line/row,
the field and what was expected; `RecordValidator(stage, on_bad_record="skip")` drops it instead,
counts it and logs the count and the first few reasons (absl logging).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from absl import logging

from fwm.data.sources import SourceRecord
from fwm.schema import VARIANTS

ROLES = ("document", "prompt", "world_model", "policy", "action", "observation")
STAGES = ("lm", "sft", "rl")
ON_BAD_RECORD = ("raise", "skip")


class BadRecordError(ValueError):
    """A record that does not match its stage's format; says where it is and what was expected."""

    def __init__(self, path: str, location: str, field: str, expected: str, got: Any):
        self.path, self.location, self.field, self.expected = path, location, field, expected
        got_text = repr(got)
        if len(got_text) > 80:
            got_text = got_text[:77] + "..."
        super().__init__(f"{path}, {location}: field {field!r}: expected {expected}, got {got_text}")


class _FieldError(Exception):
    """Raised inside the validators; becomes a BadRecordError once the location is known."""

    def __init__(self, field: str, expected: str, got: Any):
        super().__init__(field, expected, got)
        self.field, self.expected, self.got = field, expected, got


def _require(record: dict, field: str, kind: type, expected: str, optional: bool = False) -> Any:
    if field not in record:
        if optional:
            return None
        raise _FieldError(field, expected, "<missing>")
    value = record[field]
    if not isinstance(value, kind):
        raise _FieldError(field, expected, value)
    return value


def _require_id(record: dict) -> str:
    record_id = _require(record, "id", (str, int), "a string id")
    return str(record_id)  # Parquet exports often carry integer ids; an id only has to be unique.


def validate_lm(record: dict) -> dict:
    """An LM corpus record normalised to {"id", "segments": [(role, text), ...], "trained_roles": tuple | None}."""
    record_id = _require_id(record)
    if "segments" in record and "text" in record:
        raise _FieldError("text", "either 'text' or 'segments', not both", record["text"])
    if "segments" not in record:
        text = _require(record, "text", str, "a string (or a 'segments' list instead)")
        segments = [("document", text)]
    else:
        raw_segments = _require(record, "segments", list, "a list of {'role': str, 'text': str}")
        segments = []
        for i, segment in enumerate(raw_segments):
            if not isinstance(segment, dict):
                raise _FieldError(f"segments[{i}]", "an object {'role': str, 'text': str}", segment)
            role = segment.get("role", "<missing>")
            if role not in ROLES:
                raise _FieldError(f"segments[{i}].role", f"one of {list(ROLES)}", role)
            text = segment.get("text", "<missing>")
            if not isinstance(text, str):
                raise _FieldError(f"segments[{i}].text", "a string", text)
            segments.append((role, text))
    if not any(text for _, text in segments):
        raise _FieldError("segments" if "segments" in record else "text", "some non-empty text", "")
    trained_roles = _require(record, "trained_roles", list, f"a list of roles from {list(ROLES)}", optional=True)
    if trained_roles is not None:
        for i, role in enumerate(trained_roles):
            if role not in ROLES:
                raise _FieldError(f"trained_roles[{i}]", f"one of {list(ROLES)}", role)
        trained_roles = tuple(trained_roles)
    return {"id": record_id, "segments": segments, "trained_roles": trained_roles}


def validate_sft(record: dict) -> dict:
    """An SFT record: one agent step with its prompt, response and response variant."""
    record_id = _require_id(record)
    prompt = _require(record, "prompt", str, "a string")
    response = _require(record, "response", str, "a non-empty string")
    if not response:
        raise _FieldError("response", "a non-empty string", response)
    variant = record.get("variant", "<missing>")
    if variant not in VARIANTS:
        raise _FieldError("variant", f"one of {list(VARIANTS)}", variant)
    return {"id": record_id, "prompt": prompt, "response": response, "variant": variant}


def validate_rl(record: dict) -> dict:
    """An RL task record: question, accepted answers, optional data source and metadata."""
    record_id = _require_id(record)
    question = _require(record, "question", str, "a non-empty string")
    if not question.strip():
        raise _FieldError("question", "a non-empty string", question)
    answers = record.get("answers", "<missing>")
    if isinstance(answers, tuple):
        answers = list(answers)
    if not isinstance(answers, list) or not answers:
        raise _FieldError("answers", "a non-empty list of strings", answers)
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise _FieldError(f"answers[{i}]", "a string", answer)
    data_source = _require(record, "data_source", str, "a string", optional=True)
    metadata = _require(record, "metadata", dict, "an object", optional=True)
    return {
        "id": record_id,
        "question": question,
        "answers": list(answers),
        "data_source": data_source or "",
        "metadata": metadata or {},
    }


VALIDATORS: dict[str, Callable[[dict], dict]] = {"lm": validate_lm, "sft": validate_sft, "rl": validate_rl}


def parse_record(raw: SourceRecord, stage: str) -> dict:
    """The validated record for `stage`, or BadRecordError naming file, line/row and field."""
    payload = raw.payload
    try:
        if isinstance(payload, (bytes, bytearray, str)):
            try:
                payload = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _FieldError("<record>", "one JSON object", f"invalid JSON ({e})") from None
        if not isinstance(payload, dict):
            raise _FieldError("<record>", "one JSON object", payload)
        return VALIDATORS[stage](payload)
    except _FieldError as e:
        raise BadRecordError(raw.path, raw.location, e.field, e.expected, e.got) from None


class RecordValidator:
    """Callable `SourceRecord -> validated dict | None` for one stage.

    With on_bad_record="raise" a bad record raises BadRecordError; with "skip" it returns None (the
    pipeline filters it out), increments `num_bad` and logs the first `max_logged_reasons` reasons,
    then the running count at every power of two. Counts are per process (and per Grain worker).
    """

    def __init__(self, stage: str, on_bad_record: str = "raise", max_logged_reasons: int = 5):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {list(ON_BAD_RECORD)}")
        self.stage, self.on_bad_record, self.max_logged_reasons = stage, on_bad_record, max_logged_reasons
        self.num_bad = 0
        self.reasons: list[str] = []  # the first max_logged_reasons messages

    def __call__(self, raw: SourceRecord) -> dict | None:
        try:
            return parse_record(raw, self.stage)
        except BadRecordError as e:
            if self.on_bad_record == "raise":
                raise
            self.num_bad += 1
            if len(self.reasons) < self.max_logged_reasons:
                self.reasons.append(str(e))
                logging.warning("skipping bad %s record (%d so far): %s", self.stage, self.num_bad, e)
            elif self.num_bad & (self.num_bad - 1) == 0:
                logging.warning("skipped %d bad %s records so far", self.num_bad, self.stage)
            return None
