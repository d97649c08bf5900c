"""The sentence of an earlier observation that an action's argument was read from.

Both the oracle's evidence think (fwm.trajectories.corpora.think_text, `corpora.think=evidence`) and the
rule writer's evidence roadmap (fwm.trajectories.blocks.RuleBlockWriter, `blocks.roadmap=evidence`) quote
it, so that the name an agent writes next is copied from a restated sentence instead of retrieved in one
token from the asked relation's meaning.
"""
from __future__ import annotations

import re
from typing import Sequence

from fwm.trajectories.future import contains_term

_DOC_PREFIX_RE = re.compile(r"^\s*Doc \d+\s*\(Title:[^)]*\)\s*")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_EVIDENCE_CHARS = 300  # a longer sentence is not quoted (it would crowd out the history)


def evidence_sentence(argument: str, observations: Sequence[str]) -> str | None:
    """The sentence that an action's argument was read from: in the latest of `observations` that names
    `argument` (normalised, at word boundaries: fwm.trajectories.future.contains_term), its first sentence
    naming it, without a passage's "Doc N(Title: ...)" prefix. None when no earlier observation names it
    (e.g. a first search, whose argument comes from the question) or the sentence is longer than
    MAX_EVIDENCE_CHARS."""
    for observation in reversed(observations):
        if not contains_term(observation, argument):
            continue
        for sentence in _SENTENCE_END_RE.split(observation):
            sentence = _DOC_PREFIX_RE.sub("", sentence).strip()
            if sentence and contains_term(sentence, argument):
                return sentence if len(sentence) <= MAX_EVIDENCE_CHARS else None
        return None
    return None
