"""Stage corpora from raw trajectories and their world-model blocks, in the fwm.data.records formats.

LM records (`{"id", "segments": [{"role", "text"}]}`), one per trajectory:
- plain mid-training (`mid_train_plain`): prompt "Question: q\\n", then per step a policy segment
  `<think>..</think>`, an action segment `<action>..</action>` and, after a tool call, an observation
  segment "\\n<information>..</information>\\n" (or <output>). Trained with the default
  data.trained_roles, so observations are not targets.
- WM-AMT (`mid_train_wm`): the same text with a world_model segment (the full block, with confidence)
  before the policy segment at the steps chosen by `wm_steps` (a seeded share of the steps); a step
  whose block was rejected keeps no block. Nothing else differs from the plain corpus.
- IWM (`iwm`), one record per tool step: everything up to and including the step's <think> as
  prompt, the action, then the observation it got. Train it with data.trained_roles=("observation",)
  so that only the next observation is a target (the manifest says so for each corpus).
SFT records (`{"id", "prompt", "response", "variant"}`), one per step of the SFT trajectories, in the
plain, state and full variants: prompt from schema.render_prompt (history truncated to a budget),
response from schema.render_response. Only trajectories with a block at every step are used, so the
three variants hold the same steps.
The `<think>` text is a fixed sentence derived from the action alone (the behaviour policies do not
reason in words); it says nothing the action does not.

Trajectories whose records hold a malformed (None) or unknown action are skipped and counted. Every
corpus is split by trajectory into NAME.jsonl and NAME_eval.jsonl (`eval_fraction`, seeded).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fwm.data.features import DEFAULT_TRAINED_ROLES
from fwm.envs.jsonl import write_json, write_jsonl
from fwm.schema import (ANSWER, OBSERVATION_TAG_FOR_ACTION, VARIANTS, Action, StepResponse, WorldModelBlock,
                        neutralize_tags, render_action, render_observation, render_prompt,
                        render_response, render_world_model)
from fwm.trajectories.collect import derive_seed, succeeded

IWM_TRAINED_ROLES = ("observation",)
Segment = tuple[str, str]


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
def think_text(action: Action) -> str:
    """The policy's stated reasoning for an action (derived from the action alone)."""
    if action.kind == "search":
        return f"I will search for {action.argument}."
    if action.kind == "python":
        return "I will compute this step with python."
    return f"My answer is {action.argument}."


def question_text(question: str) -> str:
    return f"Question: {neutralize_tags(question)}\n"


def step_segments(action: Action, observation: str, block: WorldModelBlock | None = None) -> list[Segment]:
    """One step as LM segments: [world_model], policy, action, [observation]."""
    segments: list[Segment] = []
    if block is not None:
        segments.append(("world_model", render_world_model(block, with_confidence=True)))
    segments.append(("policy", f"<think>{neutralize_tags(think_text(action))}</think>"))
    segments.append(("action", render_action(action)))
    if action.kind != ANSWER:
        segments.append(("observation", "\n" + render_observation(action.kind, observation) + "\n"))
    return segments


def _actions(row: Mapping[str, Any]) -> list[Action]:
    """The actions of a renderable trajectory row."""
    return [Action(kind=action["kind"], argument=action["argument"]) for action in row["actions"]]


def _lm_record(record_id: str, segments: Iterable[Segment]) -> dict[str, Any]:
    return {"id": record_id, "segments": [{"role": role, "text": text} for role, text in segments]}


def trajectory_lm_record(row: Mapping[str, Any], blocks: Mapping[int, WorldModelBlock]) -> dict[str, Any]:
    """The whole trajectory as one LM record; `blocks` (step -> block) are inserted before their steps."""
    segments = [("prompt", question_text(row["task"]["question"]))]
    for step, (action, observation) in enumerate(zip(_actions(row), row["observations"])):
        segments += step_segments(action, observation, blocks.get(step))
    return _lm_record(row["id"], segments)


def iwm_lm_records(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per tool step: (question, earlier steps, this step's think) -> action -> observation."""
    records = []
    prefix = question_text(row["task"]["question"])
    for step, (action, observation) in enumerate(zip(_actions(row), row["observations"])):
        policy, rendered_action, *rest = step_segments(action, observation)
        if rest:
            records.append(_lm_record(f"{row['id']}/{step}", [("prompt", prefix + policy[1]), rendered_action,
                                                              rest[0]]))
        prefix += "".join(text for _, text in (policy, rendered_action, *rest))
    return records


def sft_step_records(row: Mapping[str, Any], blocks: Mapping[int, WorldModelBlock], variant: str,
                     count_tokens: Callable[[str], int], prompt_budget: int) -> list[dict[str, Any]]:
    """One SFT record per step of a trajectory in `variant` (state and full need a block at every step)."""
    records = []
    history: list[tuple[str, str]] = []
    for step, (action, observation) in enumerate(zip(_actions(row), row["observations"])):
        prompt = render_prompt(row["task"]["question"], history, count_tokens, prompt_budget, variant=variant)
        response = render_response(StepResponse(think=think_text(action), action=action,
                                                world_model=blocks.get(step)), variant)
        records.append({"id": f"{row['id']}/{step}/{variant}", "prompt": prompt, "response": response,
                        "variant": variant})
        if action.kind != ANSWER:
            history.append((render_action(action), render_observation(action.kind, observation)))
    return records


# ------------------------------------------------------------------------------------------- counting
def make_token_counter(tokenizer_path: str) -> tuple[Callable[[str], int], str]:
    """(count function, its name): whitespace-separated words, or a tokenizer's tokens (fwm.tokenizer)."""
    if not tokenizer_path:
        return (lambda text: len(text.split())), "whitespace words"
    from fwm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    return (lambda text: len(tokenizer.encode(text))), f"tokens of {tokenizer_path}"


@dataclasses.dataclass
class CorpusStats:
    records: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    eval_records: int = 0


def _count_lm(record: Mapping[str, Any], trained_roles: Sequence[str], count: Callable[[str], int]) -> tuple[int, int]:
    sizes = [(segment["role"], count(segment["text"])) for segment in record["segments"]]
    return sum(n for _, n in sizes), sum(n for role, n in sizes if role in trained_roles)


# ---------------------------------------------------------------------------------------------- build
@dataclasses.dataclass(frozen=True)
class CorpusOptions:
    """How the corpora are cut: the seed (eval split), eval_fraction, the SFT prompt budget (in the
    counter's units) and the token counter (a tokenizer path, '' for whitespace words)."""

    seed: int = 0
    eval_fraction: float = 0.05
    prompt_budget: int = 1024
    tokenizer_path: str = ""


def build_corpora(directory: str, mid_train_rows: Sequence[Mapping[str, Any]], sft_rows: Sequence[Mapping[str, Any]],
                  blocks: Mapping[tuple[str, int], WorldModelBlock], options: CorpusOptions,
                  extra_files: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]] | None = None) -> dict[str, Any]:
    """Writes every corpus into `directory` (atomically, file by file) and manifest.json; returns stats.

    mid_train_rows feed mid_train_plain, mid_train_wm and iwm; sft_rows feed sft_{plain,state,full};
    blocks maps (trajectory id, step) to the accepted block. extra_files: name -> (stage, records) for
    files written as they are (world documents for pretraining, RL and eval tasks).
    """
    count, counter_name = make_token_counter(options.tokenizer_path)
    skipped = {"mid_train": sum(not renderable(row) for row in mid_train_rows),
               "sft_malformed": sum(not renderable(row) for row in sft_rows)}
    mid_train_rows = [row for row in mid_train_rows if renderable(row)]
    sft_ready = [row for row in sft_rows if renderable(row)
                 and all((row["id"], step) in blocks for step in range(len(row["actions"])))]
    skipped["sft_missing_block"] = sum(renderable(row) for row in sft_rows) - len(sft_ready)

    def blocks_of(row: Mapping[str, Any]) -> dict[int, WorldModelBlock]:
        return {step: blocks[(row["id"], step)] for step in range(len(row["actions"])) if (row["id"], step) in blocks}

    corpora: dict[str, tuple[str, dict[str, Any], Callable[[Mapping[str, Any]], list[dict[str, Any]]],
                             Sequence[Mapping[str, Any]]]] = {
        "mid_train_plain": ("lm", {"trained_roles": list(DEFAULT_TRAINED_ROLES)},
                            lambda row: [trajectory_lm_record(row, {})], mid_train_rows),
        "mid_train_wm": ("lm", {"trained_roles": list(DEFAULT_TRAINED_ROLES)},
                         lambda row: [trajectory_lm_record(row, blocks_of(row))], mid_train_rows),
        "iwm": ("lm", {"trained_roles": list(IWM_TRAINED_ROLES)}, iwm_lm_records, mid_train_rows),
    }
    for variant in VARIANTS:
        corpora[f"sft_{variant}"] = (
            "sft", {"variant": variant},
            lambda row, variant=variant: sft_step_records(row, blocks_of(row), variant, count, options.prompt_budget),
            sft_ready)

    manifest: dict[str, Any] = {}
    for name, (stage, extra, make_records, rows) in corpora.items():
        stats = CorpusStats()
        train: list[dict[str, Any]] = []
        held_out: list[dict[str, Any]] = []
        for row in rows:
            records = make_records(row)
            (held_out if is_eval(row["id"], options.eval_fraction, options.seed) else train).extend(records)
        for record in train:
            tokens, trained = (_count_lm(record, extra["trained_roles"], count) if stage == "lm" else
                               (count(record["prompt"]) + count(record["response"]), count(record["response"])))
            stats.records += 1
            stats.tokens += tokens
            stats.trained_tokens += trained
        stats.eval_records = len(held_out)
        manifest[name] = _write(directory, name, stage, train, held_out, extra, stats)
    for name, (stage, records) in (extra_files or {}).items():
        records = list(records)
        stats = CorpusStats(records=len(records))
        if stage == "lm":
            for record in records:
                segments = record.get("segments") or [{"role": "document", "text": record["text"]}]
                tokens, trained = _count_lm({"segments": segments}, DEFAULT_TRAINED_ROLES, count)
                stats.tokens += tokens
                stats.trained_tokens += trained
        extra = {"trained_roles": list(DEFAULT_TRAINED_ROLES)} if stage == "lm" else {}
        manifest[name] = _write(directory, name, stage, records, [], extra, stats)
    summary = {"token_count": counter_name, "corpora": manifest, "skipped_trajectories": skipped,
               "mid_train_trajectories": len(mid_train_rows), "sft_trajectories": len(sft_ready),
               "mid_train_steps": sum(len(row["actions"]) for row in mid_train_rows),
               "sft_steps": sum(len(row["actions"]) for row in sft_ready),
               "wm_blocks_inserted": sum(len(blocks_of(row)) for row in mid_train_rows)}
    write_json(os.path.join(directory, "manifest.json"), summary)
    return summary


def _write(directory: str, name: str, stage: str, train: Sequence[dict[str, Any]], held_out: Sequence[dict[str, Any]],
           extra: Mapping[str, Any], stats: CorpusStats) -> dict[str, Any]:
    path = os.path.join(directory, f"{name}.jsonl")
    write_jsonl(path, train)
    entry: dict[str, Any] = {"path": os.path.basename(path), "stage": stage, **extra,
                             **dataclasses.asdict(stats), "bytes": os.path.getsize(path)}
    eval_path = os.path.join(directory, f"{name}_eval.jsonl")
    if held_out:
        write_jsonl(eval_path, held_out)
        entry["eval_path"] = os.path.basename(eval_path)
    elif os.path.exists(eval_path):  # left over from a run with other settings
        os.remove(eval_path)
    return entry

