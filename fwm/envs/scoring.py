"""Answer scoring for question answering: SQuAD normalisation, exact match, token F1, substring match.

All three take the prediction and the gold answers (a string or a sequence of strings) and return the
best score over the gold answers as a float in [0, 1], as in SQuAD and Search-R1.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _golds(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in _golds(answers)))


def substring_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs inside the normalised prediction (Search-R1's subEM)."""
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(gold) in predicted for gold in _golds(answers)
                     if normalize_answer(gold)))


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 between the normalised prediction and each gold answer, maximised over the answers."""
    predicted_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in _golds(answers):
        gold_tokens = normalize_answer(gold).split()
        if not predicted_tokens or not gold_tokens:
            best = max(best, float(predicted_tokens == gold_tokens))
            continue
        common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision = overlap / len(predicted_tokens)
        recall = overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


QA_METRICS = {"exact_match": exact_match, "f1": f1, "substring_match": substring_match}
