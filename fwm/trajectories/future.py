"""The one definition of "what follows" step t (tau_{>t}) and of a keyword being found in it.

Grounding -- the rule writer's keyword filter when blocks are written, R_ground in FC-RL -- asks
whether a keyword of the block z_t occurs in what actually happens after the step. PAPER.md leaves
where tau_{>t} starts open. Our choice (default `start="observation"`): the text from the
observation of a_t onward, i.e. observation_t, a_{t+1}, observation_{t+1}, ..., so that the text
of a_t itself does not count. `start="action"` includes a_t itself (the looser reading: tau_{>=t}
of the agent's own actions).
That alone does not stop a keyword that repeats the step's own search query from being found: a
search's results echo its query (the top passage of a search for an entity is titled by it). R_ground
can close that (`GROUND_MATCHES`, `keyword_grounded`). Nor does it stop two more shortcuts that FC-RL
found (README, "What FC-RL learned from R_ground"): a keyword the agent grounds itself by writing it into a
later query, and a keyword grounded by a repeated search whose passage the agent had already read. The
R_match 'new_evidence' closes both: it searches only `new_evidence`, the observations after a_t that
were not already in the episode before z_t was written (the agent's own later actions are not evidence).

Matching (our R_match): SQuAD-normalised keyword found in SQuAD-normalised text at word boundaries
(`contains_term`, which the spoiler check uses too), so "Paris" matches "paris," but "12" not "120".
This module depends on nothing else of fwm.trajectories, so spoilers.py can build on it.
"""
from __future__ import annotations

import re
from typing import Sequence

from fwm.envs.scoring import normalize_answer
from fwm.schema import Action

FUTURE_STARTS = ("observation", "action")
# R_match variants of R_ground (rl.ground_match): "found" = keyword_found in what_follows; "beyond_action" =
# found, and not contained in the step's own action argument (a repeated query predicts nothing);
# "new_evidence" = beyond_action, searched in new_evidence instead of what_follows.
GROUND_MATCHES = ("found", "beyond_action", "new_evidence")


def occurs(normalized_text: str, term: str) -> bool:
    """Whether normalised `term` occurs in already-normalised text at word boundaries (empty terms never do)."""
    needle = normalize_answer(term)
    # The substring test is implied by the match and ~100x cheaper than compiling the pattern (a world
    # passes tens of thousands of names per block): only names that occur pay for the regex.
    return (bool(needle) and needle in normalized_text
            and re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", normalized_text) is not None)


def contains_term(text: str, term: str) -> bool:
    """Whether normalised `term` occurs in normalised `text` at word boundaries (empty terms never do)."""
    return occurs(normalize_answer(text), term)


def action_text(action: Action | None) -> str:
    """How an action reads inside tau_{>t}: 'search: query' ('' for a malformed response)."""
    return "" if action is None else f"{action.kind}: {action.argument}"


def what_follows(actions: Sequence[Action | None], observations: Sequence[str], step: int,
                 start: str = "observation") -> str:
    """tau_{>t}: the text of what follows the block written before actions[step].

    start="observation": observations[step], then every later action and observation (default);
    start="action": actions[step] too. actions[i] is None where response i was malformed;
    observations[i] is what followed actions[i] ("" after the final answer).
    """
    if start not in FUTURE_STARTS:
        raise ValueError(f"unknown start of 'what follows' {start!r}; expected one of {FUTURE_STARTS}")
    if len(actions) != len(observations):
        raise ValueError(f"{len(actions)} actions but {len(observations)} observations")
    if not 0 <= step < len(actions):
        raise ValueError(f"step {step} outside the episode's {len(actions)} steps")
    parts = [action_text(actions[step])] if start == "action" else []
    parts.append(observations[step])
    for action, observation in zip(actions[step + 1:], observations[step + 1:]):
        parts += [action_text(action), observation]
    return "\n".join(parts)


def new_evidence(observations: Sequence[str], step: int) -> str:
    """The world's evidence after the block of step `step`: observations[step:], each kept only if its text
    (whitespace-stripped) is not one the episode already returned before the block was written
    (observations[:step], which the agent had read). Actions are not evidence: a keyword the agent writes
    into a later query of its own is foresight of nothing. An empty observation (after an answer) adds nothing.
    """
    if not 0 <= step < len(observations):
        raise ValueError(f"step {step} outside the episode's {len(observations)} steps")
    seen = {text.strip() for text in observations[:step]}
    return "\n".join(text for text in observations[step:] if text.strip() and text.strip() not in seen)


def ground_text(actions: Sequence[Action | None], observations: Sequence[str], step: int, start: str = "observation",
                match: str = "found") -> str:
    """The text R_ground's R_match `match` searches for the keywords of step `step`'s block: `new_evidence`
    for 'new_evidence' (where tau_{>t} starts does not apply: no action is evidence), else `what_follows`."""
    if match not in GROUND_MATCHES:
        raise ValueError(f"unknown R_match {match!r}; expected one of {GROUND_MATCHES}")
    if match == "new_evidence":
        if len(actions) != len(observations):
            raise ValueError(f"{len(actions)} actions but {len(observations)} observations")
        return new_evidence(observations, step)
    return what_follows(actions, observations, step, start)


def keyword_found(keyword: str, future_text: str) -> bool:
    """R_match for one keyword: whether it occurs in `future_text` after normalisation (module docstring)."""
    return contains_term(future_text, keyword)


def keyword_grounded(keyword: str, future_text: str, own_action: Action | None, match: str = "found") -> bool:
    """R_match of R_ground for one keyword of the block before `own_action` (a_t).

    'found': `keyword_found(keyword, future_text)`. 'beyond_action' and 'new_evidence': found, and not
    occurring in a_t's own argument (normalised, word boundaries): a keyword that only repeats the step's
    search query is found in that search's results whatever the block foresaw, so it earns nothing; a
    keyword that names what the query does not (a relation, a later entity) still counts. `future_text` is
    `ground_text(..., match)`: for 'new_evidence' only the new observations.
    """
    if match not in GROUND_MATCHES:
        raise ValueError(f"unknown R_match {match!r}; expected one of {GROUND_MATCHES}")
    if not keyword_found(keyword, future_text):
        return False
    return match == "found" or own_action is None or not contains_term(own_action.argument, keyword)
