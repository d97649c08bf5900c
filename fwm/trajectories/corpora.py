"""Stage corpora from raw trajectories and their world-model blocks, in the fwm.data.records formats.

Every LM record carries the roles it trains, `"trained_roles": [...]` (the data pipeline uses it when the
training config does not set data.trained_roles); the manifest repeats it per corpus.
LM records (`{"id", "segments": [{"role", "text"}], "trained_roles"}`), one per trajectory:
- plain mid-training (`mid_train_plain`): prompt "Question: q\\n", then per step a policy segment
  `<think>..</think>`, an action segment `<action>..</action>` and, after a tool call, an observation
  segment "\\n<information>..</information>\\n" (or <output>). Trained with the default
  data.trained_roles, so observations are not targets.
- WM-AMT (`mid_train_wm`): the same text with a world_model segment (the full block, with confidence)
  before the policy segment at the steps chosen by `wm_steps` (a seeded share of the steps); a step
  whose block was rejected keeps no block. Nothing else differs from the plain corpus.
- IWM (`iwm`), one record per tool step, -log p(o_t | s_t, a_t): the state s_t (question and every earlier
  step) as a prompt segment, the step's <think> as policy, the action a_t as action, then the observation
  it got; trained_roles ["observation"], so only the next observation is a target.
- pretraining (`pretrain`, search world): each entity's document as the world wrote it, plus
  `pretrain_phrasings - 1` paraphrases of it (`pretrain_records`): its facts, outgoing and incoming, each
  in one of the FACT_PHRASINGS of fwm.envs.synthetic.knowledge's relation sentence and noun phrase, in a
  seeded order. LM records of extra files are split into NAME / NAME_eval by record id.
SFT records (`{"id", "prompt", "response", "variant"}`), one per step of the SFT trajectories, in the
plain, state and full variants: prompt from schema.render_prompt, response from schema.render_response.
Each sample is fitted to `sft_max_tokens` tokens (BOS + prompt + response + EOS, as fwm.data.features.
sft_example lays it out): the prompt's budget is what the response leaves, and render_prompt drops the
oldest steps of the history to meet it (never the question). Samples whose history was cut, and samples
that exceed sft_max_tokens even without history (sft_example would then cut the prompt from the left),
are counted in the manifest. Only trajectories with a block at every step are used, so the three
variants hold the same steps.
The `<think>` text is a fixed sentence derived from the action (`think_text`; the behaviour policies do
not reason in words), with `corpora.think=evidence` preceded by the earlier observation's sentence that
names the action's argument; it says nothing the action and the observations do not.

Trajectories whose records hold a malformed (None) or unknown action are skipped and counted. Every
corpus is split by trajectory into NAME.jsonl and NAME_eval.jsonl (`eval_fraction`, seeded).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fwm.data.features import DEFAULT_TRAINED_ROLES
from fwm.envs.jsonl import write_json, write_jsonl
from fwm.envs.synthetic.knowledge import RELATION_BY_NAME
from fwm.schema import (ANSWER, OBSERVATION_TAG_FOR_ACTION, VARIANTS, Action, StepResponse, WorldModelBlock,
                        neutralize_tags, render_action, render_observation, render_prompt,
                        render_response, render_world_model)
from fwm.trajectories.collect import derive_seed, succeeded
from fwm.trajectories.evidence import evidence_sentence

IWM_TRAINED_ROLES = ("observation",)
Segment = tuple[str, str]
Fact = tuple[str, str, str]  # (subject name, relation name, object name)
FACT_PHRASINGS = ("sentence", "phrase", "object_first", "question")
# BOS and EOS around every sample (fwm.data.features adds both by default).
SPECIAL_TOKENS_PER_SAMPLE = 2


# ------------------------------------------------------------------------------------------ selection
def wm_steps(trajectory_id: str, num_steps: int, share: float, seed: int) -> tuple[int, ...]:
    """The steps of a trajectory that get a block in the WM-AMT corpus: each with probability `share`."""
    rng = np.random.default_rng(derive_seed(seed, "wm_steps", trajectory_id))
    return tuple(int(t) for t in np.flatnonzero(rng.random(num_steps) < share))


def select_sft_trajectories(rows: Sequence[Mapping[str, Any]], policies: Sequence[str]) -> list[Mapping[str, Any]]:
    """At most one successful trajectory per task: the first by policy order (as listed), then episode."""
    rank = {policy: i for i, policy in enumerate(policies)}
    candidates = sorted((row for row in rows if row["policy"] in rank and succeeded(row["score"])),
                        key=lambda row: (row["task"]["id"], rank[row["policy"]], row["episode"]))
    chosen: dict[str, Mapping[str, Any]] = {}
    for row in candidates:
        chosen.setdefault(row["task"]["id"], row)
    order = {row["id"]: i for i, row in enumerate(rows)}
    return sorted(chosen.values(), key=lambda row: order[row["id"]])


def is_eval(trajectory_id: str, eval_fraction: float, seed: int) -> bool:
    """Whether a trajectory's records go to the held-out files (a seeded coin per trajectory)."""
    if eval_fraction <= 0:
        return False
    return np.random.default_rng(derive_seed(seed, "eval", trajectory_id)).random() < eval_fraction


def renderable(row: Mapping[str, Any]) -> bool:
    """Whether every action of a trajectory row is a well-formed tool call or answer."""
    return all(action is not None and (action["kind"] == ANSWER or action["kind"] in OBSERVATION_TAG_FOR_ACTION)
               for action in row["actions"])


# ---------------------------------------------------------------------------------------------- text
THINK_STYLES = ("action", "evidence")


def think_text(action: Action, observations: Sequence[str] = (), style: str = "action") -> str:
    """The policy's stated reasoning for an action; the behaviour policies do not reason in words, so it
    says nothing the action and the earlier observations do not.

    style "action": derived from the action alone ("I will search for X." / "My answer is X.").
    style "evidence": the action's `evidence_sentence` from the earlier `observations`, quoted first, then
      the action's sentence ("Dugegi exports mostly to Saroara. I will search for Saroara."); the action's
      sentence alone when no earlier observation names the argument. Quoting turns reading into copying: to
      write the sentence the model restates the relation the question asks for, and the name that follows
      it in the observation is then copied (an induction pattern a small model learns), instead of being
      retrieved in one token from the relation's meaning.
    """
    if style not in THINK_STYLES:
        raise ValueError(f"think style must be one of {THINK_STYLES}, got {style!r}")
    if action.kind == "search":
        said = f"I will search for {action.argument}."
    elif action.kind == "python":
        said = "I will compute this step with python."
    else:
        said = f"My answer is {action.argument}."
    if style == "evidence" and action.kind != "python":
        evidence = evidence_sentence(action.argument, observations)
        if evidence is not None:
            return f"{evidence} {said}"
    return said


def question_text(question: str) -> str:
    return f"Question: {neutralize_tags(question)}\n"


def step_segments(action: Action, observation: str, block: WorldModelBlock | None = None,
                  earlier: Sequence[str] = (), think: str = "action") -> list[Segment]:
    """One step as LM segments: [world_model], policy, action, [observation]; `earlier` are the step's earlier
    observations and `think` the think_text style."""
    segments: list[Segment] = []
    if block is not None:
        segments.append(("world_model", render_world_model(block, with_confidence=True)))
    segments.append(("policy", f"<think>{neutralize_tags(think_text(action, earlier, think))}</think>"))
    segments.append(("action", render_action(action)))
    if action.kind != ANSWER:
        segments.append(("observation", "\n" + render_observation(action.kind, observation) + "\n"))
    return segments


def _actions(row: Mapping[str, Any]) -> list[Action]:
    """The actions of a renderable trajectory row."""
    return [Action(kind=action["kind"], argument=action["argument"]) for action in row["actions"]]


def lm_record(record_id: str, segments: Iterable[Segment], trained_roles: Sequence[str]) -> dict[str, Any]:
    """An LM record that says which of its roles are targets."""
    return {"id": record_id, "segments": [{"role": role, "text": text} for role, text in segments],
            "trained_roles": list(trained_roles)}


def trajectory_lm_record(row: Mapping[str, Any], blocks: Mapping[int, WorldModelBlock],
                         think: str = "action") -> dict[str, Any]:
    """The whole trajectory as one LM record; `blocks` (step -> block) are inserted before their steps."""
    segments = [("prompt", question_text(row["task"]["question"]))]
    for step, (action, observation) in enumerate(zip(_actions(row), row["observations"])):
        segments += step_segments(action, observation, blocks.get(step), row["observations"][:step], think)
    return lm_record(row["id"], segments, DEFAULT_TRAINED_ROLES)


def iwm_lm_records(row: Mapping[str, Any], think: str = "action") -> list[dict[str, Any]]:
    """One record per tool step: state s_t (prompt) -> think (policy) -> a_t (action) -> o_t (observation)."""
    records = []
    state = question_text(row["task"]["question"])
    for step, (action, observation) in enumerate(zip(_actions(row), row["observations"])):
        segments = step_segments(action, observation, None, row["observations"][:step], think)
        if segments[-1][0] == "observation":
            records.append(lm_record(f"{row['id']}/{step}", [("prompt", state), *segments], IWM_TRAINED_ROLES))
        state += "".join(text for _, text in segments)
    return records


@dataclasses.dataclass(frozen=True)
class SFTSample:
    """One SFT record and how it fits the token budget: `tokens` as sft_example lays it out (BOS + prompt +
    response + EOS), `history_cut` whether render_prompt dropped earlier steps, `over_budget` whether it
    exceeds the budget even so (the question or response is then what the trainer cuts)."""

    record: dict[str, Any]
    tokens: int
    history_cut: bool
    over_budget: bool


def sft_step_records(row: Mapping[str, Any], blocks: Mapping[int, WorldModelBlock], variant: str,
                     count_tokens: Callable[[str], int], max_tokens: int, think: str = "action") -> list[SFTSample]:
    """One SFT sample per step of a trajectory in `variant` (state and full need a block at every step), each
    fitted to `max_tokens` (module docstring): the prompt may use what BOS, the response and EOS leave."""
    samples = []
    history: list[tuple[str, str]] = []
    question = row["task"]["question"]
    for step, (action, observation) in enumerate(zip(_actions(row), row["observations"])):
        response = render_response(StepResponse(think=neutralize_tags(think_text(action, row["observations"][:step], think)),
                                                action=action,
                                                world_model=blocks.get(step)), variant)
        prompt_budget = max_tokens - SPECIAL_TOKENS_PER_SAMPLE - count_tokens(response)
        prompt = render_prompt(question, history, count_tokens, prompt_budget, variant=variant)
        tokens = SPECIAL_TOKENS_PER_SAMPLE + count_tokens(prompt) + count_tokens(response)
        cut = bool(history) and prompt != render_prompt(question, history, count_tokens, 1 << 62, variant=variant)
        samples.append(SFTSample({"id": f"{row['id']}/{step}/{variant}", "prompt": prompt, "response": response,
                                  "variant": variant}, tokens, cut, tokens > max_tokens))
        if action.kind != ANSWER:
            history.append((render_action(action), render_observation(action.kind, observation)))
    return samples


# ------------------------------------------------------------------------------------------- pretraining
def fact_phrasings(subject: str, relation: str, obj: str) -> tuple[str, ...]:
    """One fact in each of FACT_PHRASINGS, from the world's own relation sentence and noun phrase, e.g.
    "A was mentored by B." / "The mentor of A is B." / "B is the mentor of A." / "Who is the mentor of A? B."."""
    spec = RELATION_BY_NAME[relation]
    phrase = spec.phrase.format(s=subject)
    wh = "Who" if spec.object_type == "person" else "What"
    return (spec.sentence.format(s=subject, o=obj), f"{phrase[:1].upper()}{phrase[1:]} is {obj}.",
            f"{obj} is {phrase}.", f"{wh} is {phrase}? {obj}.")


def pretrain_records(documents: Sequence[Mapping[str, str]], facts: Sequence[Fact], phrasings: int,
                     seed: int) -> list[dict[str, Any]]:
    """The stage-0 corpus: per document ({"id", "text"}, titled by its entity's name on the first line) the
    document itself, then `phrasings - 1` paraphrases: every fact naming the entity (as subject or object),
    the i-th of them in FACT_PHRASINGS[(v + i) % 4] for paraphrase v, in a seeded order."""
    if phrasings < 1:
        raise ValueError(f"pretrain phrasings must be >= 1 (1: the documents alone), got {phrasings}")
    about: dict[str, list[Fact]] = {}
    for fact in facts:
        about.setdefault(fact[0], []).append(fact)
        if fact[2] != fact[0]:
            about.setdefault(fact[2], []).append(fact)
    records = []
    for document in documents:
        name = document["text"].split("\n", 1)[0]
        records.append({"id": document["id"], "text": document["text"], "trained_roles": list(DEFAULT_TRAINED_ROLES)})
        mine = about.get(name, [])
        for v in range(1, phrasings if mine else 1):
            rng = np.random.default_rng(derive_seed(seed, "pretrain", document["id"], v))
            sentences = [fact_phrasings(*fact)[(v + i) % len(FACT_PHRASINGS)] for i, fact in enumerate(mine)]
            order = rng.permutation(len(sentences))
            records.append({"id": f"{document['id']}/p{v}", "text": f"{name}\n" + " ".join(sentences[i] for i in order),
                            "trained_roles": list(DEFAULT_TRAINED_ROLES)})
    return records


# ------------------------------------------------------------------------------------------- tokenizer
def blocks_of(row: Mapping[str, Any], blocks: Mapping[tuple[str, int], WorldModelBlock]) -> dict[int, WorldModelBlock]:
    """step -> accepted block of one trajectory."""
    return {step: blocks[(row["id"], step)] for step in range(len(row["actions"])) if (row["id"], step) in blocks}


def lm_text(record: Mapping[str, Any]) -> str:
    """The text an LM record trains on, segments joined."""
    return "".join(segment["text"] for segment in record["segments"]) if "segments" in record else record["text"]


def tokenizer_texts(mid_train_rows: Sequence[Mapping[str, Any]], sft_rows: Sequence[Mapping[str, Any]],
                    blocks: Mapping[tuple[str, int], WorldModelBlock],
                    lm_records: Sequence[Mapping[str, Any]] = (), think: str = "action") -> list[str]:
    """The text of every corpus, for training the world's tokenizer before the corpora are cut to token
    budgets: the WM-AMT trajectories (which hold the plain and IWM text too), every SFT variant's prompt
    with the whole history and its response, and `lm_records` (the pretraining documents)."""
    texts = [lm_text(record) for record in lm_records]
    for row in mid_train_rows:
        if renderable(row):
            texts.append(lm_text(trajectory_lm_record(row, blocks_of(row, blocks), think)))
    for row in sft_rows:
        if renderable(row) and len(blocks_of(row, blocks)) == len(row["actions"]):
            for variant in VARIANTS:  # an unlimited budget keeps the whole history
                texts += [sample.record["prompt"] + sample.record["response"]
                          for sample in sft_step_records(row, blocks_of(row, blocks), variant, len, 1 << 62, think)]
    return texts


# ------------------------------------------------------------------------------------------- counting
def make_token_counter(tokenizer_path: str) -> tuple[Callable[[str], int], str]:
    """(count function, its name): a tokenizer's tokens (fwm.tokenizer.load_tokenizer), or whitespace-separated
    words for '' (a rough unit for building corpora without a tokenizer, as unit tests do)."""
    if not tokenizer_path:
        return (lambda text: len(text.split())), "whitespace words"
    from fwm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)

    # The same segments recur across corpora (plain, WM-AMT, IWM, SFT) and render_prompt probes the same
    # prompts more than once: counting each text once halves the stage's time.
    @functools.lru_cache(maxsize=1 << 17)
    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    return count, f"tokens of {tokenizer_path}"


@dataclasses.dataclass
class CorpusStats:
    """records / tokens / trained tokens of the training file (each record + BOS and EOS; segments counted one
    by one, so within a token or two of the tokenizer on the joined text), eval records; SFT: samples whose
    history was cut and samples over sft_max_tokens."""

    records: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    eval_records: int = 0
    history_cut: int = 0
    over_max_tokens: int = 0


def _count_lm(record: Mapping[str, Any], count: Callable[[str], int]) -> tuple[int, int]:
    """(tokens, trained tokens) of an LM record, by its own trained_roles (EOS trained, BOS not)."""
    segments = record.get("segments") or [{"role": "document", "text": record["text"]}]
    trained_roles = record.get("trained_roles", DEFAULT_TRAINED_ROLES)
    sizes = [(segment["role"], count(segment["text"])) for segment in segments]
    return (SPECIAL_TOKENS_PER_SAMPLE + sum(n for _, n in sizes),
            1 + sum(n for role, n in sizes if role in trained_roles))


# ---------------------------------------------------------------------------------------------- build
@dataclasses.dataclass(frozen=True)
class CorpusOptions:
    """How the corpora are cut: the seed (eval split), eval_fraction, the SFT sample budget in tokens
    (sft_max_tokens: BOS + prompt + response + EOS, the SFT training seq_len) and the tokenizer that counts
    them (a path; '' counts whitespace words); think: the think_text style of every policy segment."""

    seed: int = 0
    eval_fraction: float = 0.05
    sft_max_tokens: int = 1024
    tokenizer_path: str = ""
    think: str = "action"


def build_corpora(directory: str, mid_train_rows: Sequence[Mapping[str, Any]], sft_rows: Sequence[Mapping[str, Any]],
                  blocks: Mapping[tuple[str, int], WorldModelBlock], options: CorpusOptions,
                  extra_files: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]] | None = None) -> dict[str, Any]:
    """Writes every corpus into `directory` (atomically, file by file) and manifest.json; returns stats.

    mid_train_rows feed mid_train_plain, mid_train_wm and iwm; sft_rows feed sft_{plain,state,full};
    blocks maps (trajectory id, step) to the accepted block. extra_files: name -> (stage, records) for
    files of ready records (pretraining documents, RL and eval tasks); their LM records are split into
    NAME / NAME_eval by record id, the others are written whole. The manifest names the tokenizer
    relative to itself ("tokenizer"), and gives each corpus its records and token counts.
    """
    if options.sft_max_tokens < 1:
        raise ValueError(f"sft_max_tokens must be >= 1, got {options.sft_max_tokens}")
    count, counter_name = make_token_counter(options.tokenizer_path)
    skipped = {"mid_train": sum(not renderable(row) for row in mid_train_rows),
               "sft_malformed": sum(not renderable(row) for row in sft_rows)}
    mid_train_rows = [row for row in mid_train_rows if renderable(row)]
    sft_ready = [row for row in sft_rows if renderable(row)
                 and all((row["id"], step) in blocks for step in range(len(row["actions"])))]
    skipped["sft_missing_block"] = sum(renderable(row) for row in sft_rows) - len(sft_ready)

    corpora: dict[str, tuple[str, dict[str, Any], Callable[[Mapping[str, Any]], list[Any]],
                             Sequence[Mapping[str, Any]]]] = {
        "mid_train_plain": ("lm", {"trained_roles": list(DEFAULT_TRAINED_ROLES)},
                            lambda row: [trajectory_lm_record(row, {}, options.think)], mid_train_rows),
        "mid_train_wm": ("lm", {"trained_roles": list(DEFAULT_TRAINED_ROLES)},
                         lambda row: [trajectory_lm_record(row, blocks_of(row, blocks), options.think)], mid_train_rows),
        "iwm": ("lm", {"trained_roles": list(IWM_TRAINED_ROLES)},
                lambda row: iwm_lm_records(row, options.think), mid_train_rows),
    }
    for variant in VARIANTS:
        corpora[f"sft_{variant}"] = (
            "sft", {"variant": variant},
            lambda row, variant=variant: sft_step_records(row, blocks_of(row, blocks), variant, count,
                                                          options.sft_max_tokens, options.think),
            sft_ready)
    for name, (stage, records) in (extra_files or {}).items():
        extra = {"trained_roles": list(DEFAULT_TRAINED_ROLES)} if stage == "lm" else {}
        corpora[name] = (stage, extra, lambda record: [record], list(records))

    manifest: dict[str, Any] = {}
    for name, (stage, extra, make_records, rows) in corpora.items():
        stats = CorpusStats()
        train: list[dict[str, Any]] = []
        held_out: list[dict[str, Any]] = []
        for row in rows:
            made = make_records(row)
            goes_to_eval = stage in ("lm", "sft") and is_eval(row["id"], options.eval_fraction, options.seed)
            for item in made:
                record = item.record if isinstance(item, SFTSample) else item
                if goes_to_eval:
                    held_out.append(record)
                    continue
                train.append(record)
                stats.records += 1
                if isinstance(item, SFTSample):
                    stats.tokens += item.tokens
                    stats.trained_tokens += count(record["response"]) + 1  # + EOS
                    stats.history_cut += item.history_cut
                    stats.over_max_tokens += item.over_budget
                elif stage == "lm":
                    tokens, trained = _count_lm(record, count)
                    stats.tokens += tokens
                    stats.trained_tokens += trained
        stats.eval_records = len(held_out)
        manifest[name] = _write(directory, name, stage, train, held_out, extra, stats)
    summary = {"token_count": counter_name, "corpora": manifest, "skipped_trajectories": skipped,
               "sft_max_tokens": options.sft_max_tokens,
               "mid_train_trajectories": len(mid_train_rows), "sft_trajectories": len(sft_ready),
               "mid_train_steps": sum(len(row["actions"]) for row in mid_train_rows),
               "sft_steps": sum(len(row["actions"]) for row in sft_ready),
               "wm_blocks_inserted": sum(len(blocks_of(row, blocks)) for row in mid_train_rows)}
    if options.tokenizer_path:
        summary["tokenizer"] = os.path.relpath(os.path.abspath(options.tokenizer_path), os.path.abspath(directory))
    write_json(os.path.join(directory, "manifest.json"), summary)
    return summary


def _write(directory: str, name: str, stage: str, train: Sequence[dict[str, Any]], held_out: Sequence[dict[str, Any]],
           extra: Mapping[str, Any], stats: CorpusStats) -> dict[str, Any]:
    path = os.path.join(directory, f"{name}.jsonl")
    write_jsonl(path, train)
    counts = dataclasses.asdict(stats)
    if stage != "sft":  # history cuts and token budgets are SFT's
        del counts["history_cut"], counts["over_max_tokens"]
    entry: dict[str, Any] = {"path": os.path.basename(path), "stage": stage, **extra, **counts,
                             "bytes": os.path.getsize(path)}
    eval_path = os.path.join(directory, f"{name}_eval.jsonl")
    if held_out:
        write_jsonl(eval_path, held_out)
        entry["eval_path"] = os.path.basename(eval_path)
    elif os.path.exists(eval_path):  # left over from a run with other settings
        os.remove(eval_path)
    return entry
