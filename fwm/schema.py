"""The agent text format: tags, step-prompt rendering, response parsing into spans (see DESIGN.md).

One agent step is one sample. The prompt holds an instruction, the question and the history of
earlier steps; the response, in the "full" variant, is exactly

    <imaginary>roadmap</imaginary><keyword>k1; k2</keyword><analysis>gap</analysis>
    <confidence>73</confidence><think>reasoning</think><action><search>query</search></action>

written without separators (the line break above is only for reading). The first four elements are
the world-model span, the last two the policy span. Variants: "plain" (policy span only), "state"
(world-model span without <confidence>), "full". Actions: <search>, <python>, <answer>; the
environment answers a search with <information>...</information> and python with <output>...</output>.

`parse_response` reads any string (model output is input too): it never raises, extracts what it
can, and names every problem in `malformed`. `format_ok` is the one definition of format adherence.
`char_span_ids` / `token_span_ids` label characters / tokens as world-model span, policy span or
neither, for per-span losses and advantages.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------- tags
IMAGINARY, KEYWORD, ANALYSIS, CONFIDENCE = "imaginary", "keyword", "analysis", "confidence"
THINK, ACTION = "think", "action"
SEARCH, PYTHON, ANSWER = "search", "python", "answer"
INFORMATION, OUTPUT = "information", "output"

WORLD_MODEL_TAGS = (IMAGINARY, KEYWORD, ANALYSIS, CONFIDENCE)
POLICY_TAGS = (THINK, ACTION)
ACTION_TAGS = (SEARCH, PYTHON, ANSWER)
OBSERVATION_TAGS = (INFORMATION, OUTPUT)
ALL_TAGS = WORLD_MODEL_TAGS + POLICY_TAGS + ACTION_TAGS + OBSERVATION_TAGS
# Every open and close tag; the tokenizers make each one a single token.
ALL_TAG_TOKENS = [token for tag in ALL_TAGS for token in (f"<{tag}>", f"</{tag}>")]
# The observation tag that wraps the environment's answer to each tool (answer ends the episode).
OBSERVATION_TAG_FOR_ACTION = {SEARCH: INFORMATION, PYTHON: OUTPUT}
KEYWORD_SEPARATOR = "; "

# Top-level order of the response elements (a variant uses a subsequence of it).
_ORDER = WORLD_MODEL_TAGS + POLICY_TAGS
_TAG_RE = re.compile(r"<(/?)(" + "|".join(ALL_TAGS) + r")>")
_CONFIDENCE_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]+)?")

# ------------------------------------------------------------------------------------- spans, variants
SPAN_NONE = 0
SPAN_WM = 1  # world-model span: <imaginary> ... </confidence> (or </analysis> in the state variant)
SPAN_POLICY = 2  # policy span: <think> ... </action>
SPAN_WORLD_MODEL = SPAN_WM  # long name, used by fwm.train.losses

PLAIN, STATE, FULL = "plain", "state", "full"
VARIANTS = (PLAIN, STATE, FULL)


@dataclasses.dataclass(frozen=True)
class Action:
    """One agent action: kind is 'search', 'python' or 'answer'; argument is the query, code or answer text."""

    kind: str
    argument: str


@dataclasses.dataclass
class WorldModelBlock:
    """The foresight z_t: roadmap (<imaginary>), keywords, gap analysis, confidence 0-100 (None: state variant)."""

    roadmap: str
    keywords: list[str]
    analysis: str
    confidence: int | None


@dataclasses.dataclass
class StepResponse:
    """One step's response: optional world-model block, then the reasoning and the action."""

    think: str
    action: Action
    world_model: WorldModelBlock | None = None


@dataclasses.dataclass
class ParsedResponse:
    """What parse_response found. Text fields are verbatim element contents, None when absent.

    Best effort: fields are filled even when the text is malformed (the first element of each name
    wins), so check `malformed` / `format_ok` before trusting them. Spans are [start, end) character
    ranges from the first opening tag to the last closing tag of the span. `variant` is the variant
    the element set matches (None if it matches none); `elements` lists top-level element names in
    text order.
    """

    world_model_span: tuple[int, int] | None
    policy_span: tuple[int, int] | None
    roadmap: str | None
    keywords: list[str]
    analysis: str | None
    confidence_q: float | None
    think: str | None
    action: Action | None
    malformed: list[str]
    confidence_text: str | None = None
    variant: str | None = None
    elements: tuple[str, ...] = ()


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown response variant {variant!r}; expected one of {list(VARIANTS)}")


# ------------------------------------------------------------------------------------------ rendering
def neutralize_tags(text: str) -> str:
    """Text with every format tag defused ('<think>' -> '&lt;think>') so outside text cannot inject tags."""
    return _TAG_RE.sub(lambda m: "&lt;" + m.group(0)[1:], text)


def _clean(field: str, text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{field} must be a str, got {type(text).__name__}")
    found = _TAG_RE.search(text)
    if found:
        raise ValueError(f"{field} contains the format tag {found.group(0)!r} at character {found.start()}, "
                         f"which would break parsing; pass it through schema.neutralize_tags first")
    return text


def render_action(action: Action) -> str:
    """'<action><search>query</search></action>' (also the action text of a history step)."""
    if action.kind not in ACTION_TAGS:
        raise ValueError(f"unknown action kind {action.kind!r}; expected one of {list(ACTION_TAGS)}")
    argument = _clean(f"action argument ({action.kind})", action.argument)
    return f"<{ACTION}><{action.kind}>{argument}</{action.kind}></{ACTION}>"


def check_confidence(confidence: object) -> int:
    """A written confidence as an int in [0, 100] (ints and numpy ints; not bools, floats or text); ValueError
    otherwise. The one check for confidences that code produces (block writers, rendering); model output
    is read by parse_confidence, which never raises."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, np.integer)) or not 0 <= confidence <= 100:
        raise ValueError(f"confidence must be an int in [0, 100], got {confidence!r}")
    return int(confidence)


def render_world_model(block: WorldModelBlock, with_confidence: bool) -> str:
    """The world-model span; with_confidence=False leaves out <confidence> (state variant)."""
    keywords = []
    for i, keyword in enumerate(block.keywords):
        keyword = _clean(f"keyword {i}", keyword).strip()
        if not keyword or ";" in keyword:
            raise ValueError(f"keyword {i} ({block.keywords[i]!r}) must be non-empty and contain no ';' "
                             f"(the separator)")
        keywords.append(keyword)
    text = (f"<{IMAGINARY}>{_clean('roadmap', block.roadmap)}</{IMAGINARY}>"
            f"<{KEYWORD}>{KEYWORD_SEPARATOR.join(keywords)}</{KEYWORD}>"
            f"<{ANALYSIS}>{_clean('analysis', block.analysis)}</{ANALYSIS}>")
    if with_confidence:
        text += f"<{CONFIDENCE}>{check_confidence(block.confidence)}</{CONFIDENCE}>"
    return text


def render_response(step: StepResponse, variant: str) -> str:
    """The response text of one step in a variant (plain ignores the block, state its confidence)."""
    _check_variant(variant)
    policy = f"<{THINK}>{_clean('think', step.think)}</{THINK}>{render_action(step.action)}"
    if variant == PLAIN:
        return policy
    if step.world_model is None:
        raise ValueError(f"the {variant!r} variant needs step.world_model (a WorldModelBlock), got None")
    return render_world_model(step.world_model, with_confidence=variant == FULL) + policy


def render_observation(kind: str, text: str) -> str:
    """The environment's answer to an action: search -> <information>, python -> <output> (tags in text defused)."""
    if kind not in OBSERVATION_TAG_FOR_ACTION:
        raise ValueError(f"no observation for action kind {kind!r}; expected one of {list(OBSERVATION_TAG_FOR_ACTION)}")
    tag = OBSERVATION_TAG_FOR_ACTION[kind]
    return f"<{tag}>{neutralize_tags(text)}</{tag}>"


DEFAULT_INSTRUCTION = (
    "You are an agent that answers a question in steps. Each step you take exactly one action: "
    "<search>query</search> returns <information>passages</information>, <python>code</python> returns "
    "<output>what it printed</output>, and <answer>final answer</answer> ends the episode."
)
_FORMAT_DESCRIPTIONS = {
    PLAIN: "Write each step as <think>your reasoning</think><action>one action</action>.",
    STATE: ("Write each step as <imaginary>a short roadmap of the steps ahead, naming future entities only as "
            "placeholders</imaginary><keyword>terms you expect to meet next, separated by '; '</keyword>"
            "<analysis>what is still missing</analysis><think>your reasoning</think><action>one action</action>."),
    FULL: ("Write each step as <imaginary>a short roadmap of the steps ahead, naming future entities only as "
           "placeholders</imaginary><keyword>terms you expect to meet next, separated by '; '</keyword>"
           "<analysis>what is still missing</analysis><confidence>your chance of answering correctly, an "
           "integer from 0 to 100</confidence><think>your reasoning</think><action>one action</action>."),
}


def _prompt_text(instruction: str, variant: str, question: str, history: Sequence[tuple[str, str]],
                 omitted: int) -> str:
    parts = [instruction, _FORMAT_DESCRIPTIONS[variant], f"Question: {neutralize_tags(question)}"]
    if not history:
        parts.append("Earlier steps: none.")
    else:
        header = f"Earlier steps ({omitted} oldest omitted):" if omitted else "Earlier steps:"
        steps = [f"Step {omitted + i + 1}:\n{action}\n{observation}"
                 for i, (action, observation) in enumerate(history[omitted:])]
        parts.append("\n".join([header] + steps))
    parts.append(f"Step {len(history) + 1}:\n")
    return "\n\n".join(parts)


def render_prompt(question: str, history: list[tuple[str, str]], count_tokens: Callable[[str], int],
                  budget_tokens: int, instruction: str = DEFAULT_INSTRUCTION, variant: str = FULL) -> str:
    """The step prompt: instruction + format of `variant`, question, earlier steps, newest last.

    history: (action text, observation text) per earlier step, already rendered (render_action,
    render_observation). The oldest steps are dropped until `count_tokens(prompt) <= budget_tokens`
    (the prompt says how many); step numbers keep counting from the first step. If even no history
    fits, the prompt without history is returned (the question is never cut). Assumes dropping a
    step never lengthens the prompt (binary search over the number dropped); deterministic.
    """
    _check_variant(variant)
    history = list(history)

    def fits(omitted: int) -> bool:
        return count_tokens(_prompt_text(instruction, variant, question, history, omitted)) <= budget_tokens

    low, high = 0, len(history)  # invariant: fits(high) or high == len(history)
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return _prompt_text(instruction, variant, question, history, low)


# -------------------------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class _Element:
    name: str
    start: int  # opening tag start
    content_start: int
    content_end: int
    end: int  # closing tag end (or where an unclosed element was cut)
    in_action: bool  # a child of an <action> element


def _scan(text: str, problems: list[str]) -> tuple[list[_Element], list[tuple[int, int]]]:
    """Elements in text order and the ranges of stray closing tags.

    The grammar is flat: only <action> has children. An element still open when another opening tag
    (or the end of text) arrives is cut there and reported unclosed.
    """
    elements: list[_Element] = []
    stray: list[tuple[int, int]] = []
    leaf: _Element | None = None
    action: _Element | None = None

    def cut_leaf(at: int) -> None:
        nonlocal leaf
        problems.append(f"unclosed <{leaf.name}>")
        leaf.content_end = leaf.end = at
        elements.append(leaf)
        leaf = None

    for match in _TAG_RE.finditer(text):
        is_close, name, start, end = match.group(1) == "/", match.group(2), match.start(), match.end()
        if not is_close:
            if leaf is not None:
                cut_leaf(start)
            if name != ACTION:
                leaf = _Element(name, start, end, end, end, in_action=action is not None)
            elif action is not None:
                problems.append("<action> inside <action>")
                stray.append((start, end))
            else:
                action = _Element(name, start, end, end, end, in_action=False)
        elif leaf is not None and leaf.name == name:
            leaf.content_end, leaf.end = start, end
            elements.append(leaf)
            leaf = None
        elif name == ACTION and action is not None:
            if leaf is not None:
                cut_leaf(start)
            action.content_end, action.end = start, end
            elements.append(action)
            action = None
        else:
            problems.append(f"stray </{name}>")
            stray.append((start, end))
    if leaf is not None:
        cut_leaf(len(text))
    if action is not None:
        problems.append(f"unclosed <{ACTION}>")
        action.content_end = action.end = len(text)
        elements.append(action)
    elements.sort(key=lambda e: e.start)
    return elements, stray


def _uncovered_text(text: str, start: int, end: int, covered: Sequence[tuple[int, int]]) -> list[str]:
    """Non-whitespace chunks of text[start:end] outside the `covered` ranges."""
    chunks, position = [], start
    for lo, hi in sorted(covered) + [(end, end)]:
        if lo > position and text[position:lo].strip():
            chunks.append(text[position:lo].strip())
        position = max(position, hi)
    return chunks


def _snippet(chunks: list[str]) -> str:
    first = chunks[0] if len(chunks[0]) <= 30 else chunks[0][:27] + "..."
    return f"{first!r}" + (f" and {len(chunks) - 1} more" if len(chunks) > 1 else "")


def parse_confidence(text: str) -> float | None:
    """'73' (or ' 73 ', '73.5') -> 0.73; None unless a plain decimal number in [0, 100]."""
    stripped = text.strip()
    if not _CONFIDENCE_RE.fullmatch(stripped):
        return None
    value = float(stripped)
    return value / 100.0 if math.isfinite(value) and 0.0 <= value <= 100.0 else None


def _parse(text: str) -> tuple[ParsedResponse, list[_Element]]:
    problems: list[str] = []
    elements, stray = _scan(text, problems)
    top = [e for e in elements if not e.in_action]
    content = lambda e: text[e.content_start:e.content_end]  # noqa: E731
    first = {}
    for e in top:
        first.setdefault(e.name, e)
    names = [e.name for e in top]

    outside = _uncovered_text(text, 0, len(text), [(e.start, e.end) for e in top] + stray)
    if outside:
        problems.append(f"text outside tags: {_snippet(outside)}")
    for name in sorted(set(names), key=ALL_TAGS.index):
        if name in _ORDER and names.count(name) > 1:
            problems.append("two actions" if name == ACTION else f"{names.count(name)} <{name}> elements")
        if name in ACTION_TAGS:
            problems.append(f"<{name}> outside <{ACTION}>")
        if name in OBSERVATION_TAGS:
            problems.append(f"observation tag <{name}> in the response")
    ordered = [n for n in dict.fromkeys(names) if n in _ORDER]
    for i, name in enumerate(ordered):  # the first element with one that belongs after it in front
        misplaced = [earlier for earlier in ordered[:i] if _ORDER.index(earlier) > _ORDER.index(name)]
        if misplaced:
            problems.append(f"tags out of order: <{misplaced[0]}> before <{name}>")
            break

    action = None
    if ACTION in first:
        outer = first[ACTION]
        children = [e for e in elements if e.in_action and outer.start < e.start < outer.end]
        kinds = [e for e in children if e.name in ACTION_TAGS]
        for child in children:
            if child.name not in ACTION_TAGS:
                problems.append(f"<{child.name}> inside <{ACTION}>")
        loose = _uncovered_text(text, outer.content_start, outer.content_end, [(e.start, e.end) for e in children])
        if not kinds:
            problems.append(f"unknown action: {_snippet(loose)}" if loose else f"empty <{ACTION}>")
        else:
            if len(kinds) > 1:
                problems.append("two actions")
            if loose:
                problems.append(f"text inside <{ACTION}> outside the action tag: {_snippet(loose)}")
            action = Action(kinds[0].name, content(kinds[0]))
    else:
        stray_kinds = [e for e in top if e.name in ACTION_TAGS]
        if stray_kinds:
            action = Action(stray_kinds[0].name, content(stray_kinds[0]))

    for name in POLICY_TAGS:
        if name not in first:
            problems.append(f"missing <{name}>")
    has_world_model = any(name in first for name in WORLD_MODEL_TAGS)
    if has_world_model:
        for name in (IMAGINARY, KEYWORD, ANALYSIS):
            if name not in first:
                problems.append(f"missing <{name}> (incomplete world-model span)")

    confidence_text = content(first[CONFIDENCE]) if CONFIDENCE in first else None
    confidence_q = None
    if confidence_text is not None:
        confidence_q = parse_confidence(confidence_text)
        if confidence_q is None:
            shown = confidence_text if len(confidence_text) <= 20 else confidence_text[:17] + "..."
            problems.append(f"confidence {shown!r} is not a number from 0 to 100")

    present = set(first)
    variant = None
    if {THINK, ACTION} <= present:
        world_model_present = present & set(WORLD_MODEL_TAGS)
        if not world_model_present:
            variant = PLAIN
        elif world_model_present == {IMAGINARY, KEYWORD, ANALYSIS}:
            variant = STATE
        elif world_model_present == set(WORLD_MODEL_TAGS):
            variant = FULL

    def hull(span_names: Sequence[str]) -> tuple[int, int] | None:
        members = [e for e in top if e.name in span_names]
        return (min(e.start for e in members), max(e.end for e in members)) if members else None

    keywords_text = content(first[KEYWORD]) if KEYWORD in first else ""
    parsed = ParsedResponse(
        world_model_span=hull(WORLD_MODEL_TAGS),
        policy_span=hull(POLICY_TAGS + ACTION_TAGS),
        roadmap=content(first[IMAGINARY]) if IMAGINARY in first else None,
        keywords=[k.strip() for k in keywords_text.split(";") if k.strip()],
        analysis=content(first[ANALYSIS]) if ANALYSIS in first else None,
        confidence_q=confidence_q,
        think=content(first[THINK]) if THINK in first else None,
        action=action,
        malformed=list(dict.fromkeys(problems)),  # one entry per distinct problem
        confidence_text=confidence_text,
        variant=variant,
        elements=tuple(names),
    )
    return parsed, top


def parse_response(text: str) -> ParsedResponse:
    """Parses one response; never raises (a non-str is reported as malformed, not an exception)."""
    if not isinstance(text, str):
        return ParsedResponse(None, None, None, [], None, None, None, None,
                              [f"response is a {type(text).__name__}, not a str"])
    return _parse(text)[0]


def format_ok(parsed: ParsedResponse, variant: str) -> bool:
    """THE format-adherence test: nothing malformed and exactly the elements of `variant`, in order."""
    _check_variant(variant)
    return not parsed.malformed and parsed.variant == variant and parsed.action is not None


# ---------------------------------------------------------------------------------------------- spans
def char_span_ids(text: str) -> np.ndarray:
    """int8 [len(text)]: SPAN_WM over the world-model span, SPAN_POLICY over the policy span, else SPAN_NONE.

    Each span covers its first opening tag to its last closing tag, gaps included. Malformed text is
    labelled best effort: where the two spans' ranges overlap (elements out of order), each element's
    own characters take its span and the shared gaps take the policy span.
    """
    parsed, top = _parse(text)
    ids = np.zeros(len(text), np.int8)
    for span, span_id in ((parsed.world_model_span, SPAN_WM), (parsed.policy_span, SPAN_POLICY)):
        if span is not None:
            ids[span[0]:span[1]] = span_id
    for element in top:
        if element.name in WORLD_MODEL_TAGS:
            ids[element.start:element.end] = SPAN_WM
        elif element.name in POLICY_TAGS + ACTION_TAGS:
            ids[element.start:element.end] = SPAN_POLICY
    return ids


def token_span_ids(char_ids: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """int8 [len(offsets)]: each token takes the span id of its first character.

    A token straddling a span boundary (impossible when every tag is one token, since spans begin
    and end on tags) is labelled by where it starts. A token with an empty range (e.g. a leading
    byte piece of a multi-byte character) takes the id of the character at its position; past the
    end of the text, SPAN_NONE.
    """
    char_ids = np.asarray(char_ids, np.int8)
    if len(offsets) == 0:
        return np.zeros(0, np.int8)
    starts = np.asarray(offsets, np.int64).reshape(-1, 2)[:, 0]
    padded = np.concatenate([char_ids, np.zeros(1, np.int8)])  # index len(text) -> SPAN_NONE
    return padded[np.clip(starts, 0, len(char_ids))].astype(np.int8)
