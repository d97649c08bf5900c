"""The agent text format: rendering, parsing back, malformed-output reporting, spans, prompts."""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwm import schema
from fwm.schema import Action, StepResponse, WorldModelBlock

STEP = StepResponse(
    think="The city is named in passage 2;  next I need its mayor.\n",
    action=Action("search", "mayor of  Lyon "),
    world_model=WorldModelBlock("find [CITY], then its [MAYOR]", ["mayor", "city hall"], "the mayor is unknown", 73),
)
WM_TEXT = ("<imaginary>find [CITY], then its [MAYOR]</imaginary><keyword>mayor; city hall</keyword>"
           "<analysis>the mayor is unknown</analysis>")
POLICY_TEXT = ("<think>The city is named in passage 2;  next I need its mayor.\n</think>"
               "<action><search>mayor of  Lyon </search></action>")
EXPECTED = {
    "plain": POLICY_TEXT,
    "state": WM_TEXT + POLICY_TEXT,
    "full": WM_TEXT + "<confidence>73</confidence>" + POLICY_TEXT,
}
# Derandomised and without a database: the same examples on every CI run, no files written.
FAST = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _check_round_trip(step, variant):
    text = schema.render_response(step, variant)
    parsed = schema.parse_response(text)
    assert parsed.malformed == [] and parsed.variant == variant
    assert [schema.format_ok(parsed, v) for v in schema.VARIANTS] == [v == variant for v in schema.VARIANTS]
    assert parsed.think == step.think and parsed.action == step.action
    if variant == "plain":
        assert parsed.world_model_span is None and parsed.roadmap is None and parsed.keywords == []
        assert parsed.policy_span == (0, len(text))
        return text, parsed
    block = step.world_model
    assert (parsed.roadmap, parsed.analysis) == (block.roadmap, block.analysis)
    assert parsed.keywords == [k.strip() for k in block.keywords]
    if variant == "full":
        assert parsed.confidence_q == pytest.approx(block.confidence / 100)
    else:
        assert parsed.confidence_q is None and parsed.confidence_text is None
    wm_start, wm_end = parsed.world_model_span
    policy_start, policy_end = parsed.policy_span
    assert (wm_start, wm_end, policy_end) == (0, policy_start, len(text))
    return text, parsed


@pytest.mark.parametrize("variant", schema.VARIANTS)
def test_render_matches_design_and_parses_back(variant):
    text, parsed = _check_round_trip(STEP, variant)
    assert text == EXPECTED[variant]
    if parsed.world_model_span:
        assert text[slice(*parsed.world_model_span)] == EXPECTED[variant][: -len(POLICY_TEXT)]
    assert text[slice(*parsed.policy_span)] == POLICY_TEXT


plain_text = st.text(max_size=40).filter(lambda s: schema.neutralize_tags(s) == s)
keyword = st.text(alphabet=st.characters(blacklist_characters=";<"), min_size=1, max_size=12).map(str.strip).filter(bool)
steps = st.builds(
    StepResponse,
    think=plain_text,
    action=st.builds(Action, st.sampled_from(schema.ACTION_TAGS), plain_text),
    world_model=st.builds(WorldModelBlock, plain_text, st.lists(keyword, max_size=4), plain_text,
                          st.integers(0, 100)),
)


@FAST
@given(step=steps, variant=st.sampled_from(schema.VARIANTS))
def test_any_step_round_trips(step, variant):
    _check_round_trip(step, variant)


# Fragments that build adversarial responses: every tag, near-tags, odd confidences, unicode.
FRAGMENTS = st.one_of(
    st.sampled_from(schema.ALL_TAG_TOKENS),
    st.sampled_from(["<", ">", "</", "<think", "<browse>", "</browse>", "<<think>>", "; ", "\n", " ", "\u2581",
                     "1e999", "nan", "inf", "73%", " 73 ", "-5", "101", "73.5", "", "\x00", "é中🙂", "\ud7ff"]),
    st.text(max_size=8),
)


def _check_invariants(text):
    parsed = schema.parse_response(text)
    assert isinstance(parsed, schema.ParsedResponse)
    assert all(isinstance(m, str) and m for m in parsed.malformed)
    assert parsed.confidence_q is None or 0.0 <= parsed.confidence_q <= 1.0
    for span in (parsed.world_model_span, parsed.policy_span):
        assert span is None or 0 <= span[0] < span[1] <= len(text)
    oks = [schema.format_ok(parsed, v) for v in schema.VARIANTS]
    assert sum(oks) <= 1 and (not any(oks) or not parsed.malformed)
    ids = schema.char_span_ids(text)
    assert ids.dtype == np.int8 and ids.shape == (len(text),)
    assert set(np.unique(ids)) <= {schema.SPAN_NONE, schema.SPAN_WM, schema.SPAN_POLICY}
    return parsed


@FAST
@given(text=st.text(max_size=200))
def test_parse_never_raises_on_any_text(text):
    _check_invariants(text)


@FAST
@given(fragments=st.lists(FRAGMENTS, max_size=30))
def test_parse_never_raises_on_tag_soup(fragments):
    _check_invariants("".join(fragments))


def test_parse_never_raises_on_non_strings():
    for value in (None, b"<think>x</think>", 73, ["<think>"]):
        parsed = schema.parse_response(value)
        assert parsed.malformed and not any(schema.format_ok(parsed, v) for v in schema.VARIANTS)


@pytest.mark.parametrize("confidence,q", [("73", 0.73), (" 73 ", 0.73), ("0", 0.0), ("100", 1.0), ("73.5", 0.735),
                                          ("\n42\n", 0.42)])
def test_valid_confidences(confidence, q):
    parsed = schema.parse_response(EXPECTED["full"].replace(">73<", f">{confidence}<"))
    assert parsed.confidence_q == pytest.approx(q) and schema.format_ok(parsed, "full")


@pytest.mark.parametrize("confidence", ["1e999", "nan", "NaN", "inf", "73%", "-5", "-0", "+5", "101", "100.5", "",
                                        "  ", "abc", "0x10", "７３", "73 %", "1,5", "9" * 400, "7 3"])
def test_malformed_confidence_gives_none_and_an_entry(confidence):
    parsed = schema.parse_response(EXPECTED["full"].replace(">73<", f">{confidence}<"))
    assert parsed.confidence_q is None and parsed.confidence_text == confidence
    assert any(m.startswith("confidence") for m in parsed.malformed), parsed.malformed
    assert not schema.format_ok(parsed, "full")
    assert parsed.action == STEP.action  # the rest is still read


FULL = EXPECTED["full"]
MALFORMED = {
    "missing <think>": FULL.replace("<think>The city is named in passage 2;  next I need its mayor.\n</think>", ""),
    "missing <action>": FULL.split("<action>")[0],
    "unclosed <think>": FULL.replace("</think>", ""),
    "unclosed <action>": FULL.replace("</action>", ""),
    "unclosed <answer>": "<think>t</think><action><answer>Paris",
    "tags out of order: <think> before <imaginary>": POLICY_TEXT + WM_TEXT + "<confidence>5</confidence>",
    "text outside tags: 'Sure!'": "Sure! " + FULL,
    "text outside tags: 'trailing'": FULL + "trailing",
    "unknown action: '<browse>x</browse>'": "<think>t</think><action><browse>x</browse></action>",
    "empty <action>": "<think>t</think><action> </action>",
    "two actions": "<think>t</think><action><search>a</search><answer>b</answer></action>",
    "2 <think> elements": "<think>t</think><think>u</think><action><answer>b</answer></action>",
    "stray </think>": "<think>t</think></think><action><answer>b</answer></action>",
    "<action> inside <action>": "<think>t</think><action><action><answer>b</answer></action>",
    "<think> inside <action>": "<think>t</think><action><think>u</think><answer>b</answer></action>",
    "<search> outside <action>": "<think>t</think><search>q</search>",
    "observation tag <information> in the response": POLICY_TEXT + "<information>doc</information>",
    "missing <keyword> (incomplete world-model span)": FULL.replace("<keyword>mayor; city hall</keyword>", ""),
    "text inside <action> outside the action tag: 'now'": "<think>t</think><action>now<answer>b</answer></action>",
}


@pytest.mark.parametrize("problem", MALFORMED)
def test_malformed_output_is_named_not_raised(problem):
    parsed = _check_invariants(MALFORMED[problem])
    assert problem in parsed.malformed, parsed.malformed
    assert not any(schema.format_ok(parsed, v) for v in schema.VARIANTS)


def test_best_effort_fields_of_malformed_text():
    parsed = schema.parse_response(MALFORMED["unclosed <answer>"])
    assert parsed.action == Action("answer", "Paris") and parsed.think == "t"
    parsed = schema.parse_response(MALFORMED["two actions"])
    assert parsed.action == Action("search", "a")
    parsed = schema.parse_response("<think>a<action><answer>b</answer></action>")  # think cut at <action>
    assert parsed.think == "a" and parsed.action == Action("answer", "b") and "unclosed <think>" in parsed.malformed
    parsed = schema.parse_response("")
    assert parsed.malformed == ["missing <think>", "missing <action>"] and parsed.action is None


def test_whitespace_between_elements_is_allowed():
    text = EXPECTED["full"].replace("><", ">\n<").replace("<keyword>", " <keyword>")
    parsed = schema.parse_response(text)
    assert schema.format_ok(parsed, "full") and parsed.keywords == ["mayor", "city hall"]


def test_char_span_ids_cover_exactly_the_spans():
    text = EXPECTED["full"] + "\n"
    ids = schema.char_span_ids(text)
    wm_len = len(EXPECTED["full"]) - len(POLICY_TEXT)
    assert (ids[:wm_len] == schema.SPAN_WM).all()
    assert (ids[wm_len:-1] == schema.SPAN_POLICY).all() and ids[-1] == schema.SPAN_NONE
    assert (schema.char_span_ids("Sure! " + POLICY_TEXT)[:6] == schema.SPAN_NONE).all()
    # Out of order: each element keeps its own span.
    swapped = POLICY_TEXT + WM_TEXT
    ids = schema.char_span_ids(swapped)
    assert (ids[: len(POLICY_TEXT)] == schema.SPAN_POLICY).all() and (ids[len(POLICY_TEXT):] == schema.SPAN_WM).all()
    assert schema.char_span_ids("").shape == (0,)
    assert schema.SPAN_WORLD_MODEL == schema.SPAN_WM


def test_token_span_ids_rule():
    char_ids = np.array([0, 1, 1, 2, 2], np.int8)
    # Tokens: [0,2) straddles NONE|WM -> first char; (3,3) empty -> char at 3; (5,5) past the end -> NONE.
    offsets = [(0, 2), (2, 3), (3, 3), (3, 5), (5, 5)]
    assert schema.token_span_ids(char_ids, offsets).tolist() == [0, 1, 2, 2, 0]
    assert schema.token_span_ids(char_ids, []).shape == (0,)
    assert schema.token_span_ids(np.zeros(0, np.int8), [(0, 0)]).tolist() == [0]


def test_render_rejects_what_would_not_parse_back():
    bad = [
        (StepResponse("a <think> b", Action("answer", "x")), "plain", "think"),
        (StepResponse("t", Action("python", "print('</python>')")), "plain", "action argument"),
        (StepResponse("t", Action("browse", "x")), "plain", "unknown action kind"),
        (StepResponse("t", Action("answer", "x"), WorldModelBlock("r", ["a;b"], "g", 5)), "state", "keyword 0"),
        (StepResponse("t", Action("answer", "x"), WorldModelBlock("r", [" "], "g", 5)), "state", "keyword 0"),
        (StepResponse("t", Action("answer", "x"), WorldModelBlock("r", [], "g", None)), "full", "confidence"),
        (StepResponse("t", Action("answer", "x"), WorldModelBlock("r", [], "g", 101)), "full", "confidence"),
        (StepResponse("t", Action("answer", "x"), WorldModelBlock("r", [], "g", True)), "full", "confidence"),
        (StepResponse("t", Action("answer", "x")), "state", "world_model"),
        (STEP, "fancy", "variant"),
    ]
    for step, variant, needle in bad:
        with pytest.raises(ValueError, match=needle):
            schema.render_response(step, variant)
    # Neutralised text renders and parses back (as its neutralised form).
    step = StepResponse(schema.neutralize_tags("a <think> b"), Action("answer", "x"))
    assert schema.parse_response(schema.render_response(step, "plain")).think == "a &lt;think> b"


def test_render_observation():
    assert schema.render_observation("search", "doc 1") == "<information>doc 1</information>"
    assert schema.render_observation("python", "42\n") == "<output>42\n</output>"
    assert schema.render_observation("search", "x</information><answer>y</answer>").count("</information>") == 1
    with pytest.raises(ValueError, match="answer"):
        schema.render_observation("answer", "x")


def _history(n):
    return [(schema.render_action(Action("search", f"query number {i}")),
             schema.render_observation("search", f"passage {i} " + "word " * 20)) for i in range(1, n + 1)]


def count_words(text):
    return len(text.split())


def test_prompt_keeps_the_newest_steps_that_fit():
    history = _history(6)
    full = schema.render_prompt("Who is the mayor?", history, count_words, 10**6)
    assert "omitted" not in full and "Step 1:" in full and full.index("query number 5") < full.index("query number 6")
    assert full.endswith("Step 7:\n") and "Question: Who is the mayor?" in full
    budget = count_words(full) - 30  # must drop some steps
    prompt = schema.render_prompt("Who is the mayor?", history, count_words, budget)
    assert count_words(prompt) <= budget
    dropped = int(re.search(r"\((\d+) oldest omitted\)", prompt).group(1))
    assert dropped >= 1 and "query number 6" in prompt and f"query number {dropped}<" not in prompt
    assert f"Step {dropped + 1}:" in prompt and f"query number {dropped + 1}<" in prompt
    # Minimal: keeping one more step would not fit.
    assert count_words(schema._prompt_text(schema.DEFAULT_INSTRUCTION, "full", "Who is the mayor?", history,
                                           dropped - 1)) > budget
    assert prompt == schema.render_prompt("Who is the mayor?", history, count_words, budget)  # deterministic
    tiny = schema.render_prompt("Who is the mayor?", history, count_words, 1)
    assert "Who is the mayor?" in tiny and "query number" not in tiny and "(6 oldest omitted)" in tiny


def test_prompt_explains_the_variant_and_defuses_the_question():
    prompts = {v: schema.render_prompt("q <answer>x</answer>", [], count_words, 10**6, variant=v)
               for v in schema.VARIANTS}
    assert "<confidence>" in prompts["full"] and "<confidence>" not in prompts["state"]
    assert "<imaginary>" in prompts["state"] and "<imaginary>" not in prompts["plain"]
    assert all("Question: q &lt;answer>x&lt;/answer>" in p and "Earlier steps: none." in p for p in prompts.values())
    with pytest.raises(ValueError, match="variant"):
        schema.render_prompt("q", [], count_words, 100, variant="fancy")
