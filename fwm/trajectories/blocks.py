"""World-model blocks for recorded trajectories: Monte Carlo confidence, the rule-based writer for the
synthetic worlds, and annotation of trajectories with counted spoiler rejections.

Confidence (q_t), `monte_carlo_confidence`. The block before a_t announces a_t, so by default q_t is
conditioned on it: Q(s_t, a_t) = the success rate of continuations that start *after* a_t (the episode's
actions[:t+1] replayed in a fresh env, then the behaviour policy to the end). Where a_t ends the episode
(an answer, or the last turn) the replay is the whole continuation and is deterministic, so one is run:
q_t is then that answer's correctness, 100 or 0. The alternative `conditioning="v"` (data config
`blocks.confidence`) is V(s_t): continuations from before a_t (actions[:t] replayed), the policy choosing
a_t itself. Continuation j of step t uses the seed `derive_seed(seed, "mc", trajectory id, t, j)`;
q_t = round-half-up(100 * successes / k). Every continuation's outcome and the conditioning are stored
with the block, so the estimate can be checked against its own continuations.

`RuleBlockWriter` (a spoilers.BlockWriter) for the synthetic worlds reads the gold chain in the task's
metadata, what the agent has seen, and what this trajectory really does next:
- a link of the chain is *established* once the visible text states it: in the knowledge world the
  document sentence linking hop i's subject to its object ("X was mentored by Y."), in the arithmetic
  world a program with step i's expression whose output is step i's value. Established entities and
  values are named, the rest are placeholders ("[person B]", "[result of step 2]"); a name outside the
  chain that the agent has not seen is a typed placeholder ("[another person]");
- roadmap: the actions that really follow, from a_t to the end of the episode, mistakes and recoveries
  included, each with what it establishes, e.g. "Search Kaelo Brin to find [person B], the mentor of
  Kaelo Brin; then search "the founder of", which adds no link; then search [person B] to find
  [company C], the company that [person B] works for; then answer [company C]." Its first clause is
  a_t itself (the concrete next-step intent), so the block never says one thing while the agent does
  another. With `roadmap="evidence"` (data config `blocks.roadmap`) the roadmap first quotes the sentence
  of an earlier observation that a_t's argument was read from (fwm.trajectories.evidence), e.g.
  "Kaelo Brin was mentored by Ilsa Varn. Search Ilsa Varn to find ...": the block comes before the
  think, so without the quote the roadmap's first name would have to be retrieved from the asked
  relation's meaning in one token, the very step the evidence think (`corpora.think`) turns into copying;
- keywords: the next action's query / expression, then relation words and seen names, each kept only
  if it holds no forbidden term and occurs in what follows a_t (`grounded_keywords`,
  fwm.trajectories.future.what_follows from `future_start`);
- analysis: the gap against the gold chain: known links, missing links, and whether the last step added
  a link;
- confidence: passed in.
Every block goes through check_block inside the writer and again in `annotate_steps`, which counts a
block that is rejected (by the writer or by the second check) instead of writing it.
`annotate_chunk` (one chunk, in a worker with its own writer) also returns what the writer counted per
trajectory (`writer_counters`: a teacher's requests, cache hits, retries, ...), for the caller to sum.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fwm.envs.base import EpisodeRecord, Task, ToolEnv
from fwm.envs.synthetic.knowledge import RELATION_BY_NAME
from fwm.schema import ANSWER, Action, WorldModelBlock, check_confidence, render_world_model
from fwm.trajectories.collect import (EnvSpec, derive_seed, make_env, record_from_row, run_episode,
                                      succeeded)
from fwm.trajectories.evidence import evidence_sentence
from fwm.trajectories.future import FUTURE_STARTS, keyword_found
from fwm.trajectories.policies import Policy, entity_type
from fwm.trajectories.spoilers import (BlockRejected, BlockWriter, StepContext, check_block, contains_term,
                                       find_spoilers, spoiler_terms)

WRITERS = ("rule", "teacher")
ROADMAP_STYLES = ("action", "evidence")  # blocks.roadmap: how the rule writer's roadmap opens
CONDITIONINGS = ("q", "v")  # blocks.confidence: Q(s_t, a_t) (after a_t) or V(s_t) (before a_t)
_LETTERS = "ABCDEFGHIJ"  # chain positions; the knowledge world has at most 4 hops (5 entities)
_EXPRESSION_RE = re.compile(r"^x = (.+)$", re.MULTILINE)
_PRINT_RE = re.compile(r"^print\((-?\d+)\)$")


# ---------------------------------------------------------------------------------------- Monte Carlo
@dataclasses.dataclass(frozen=True)
class MonteCarloEstimate:
    """q_t from k continuations: confidence = round-half-up(100 * sum(successes) / k); `conditioning` "q"
    (continuations after a_t) or "v" (before a_t)."""

    confidence: int
    k: int
    successes: tuple[bool, ...]
    seeds: tuple[int, ...]
    conditioning: str = "q"


def percent(successes: int, total: int) -> int:
    """round-half-up(100 * successes / total) in exact integer arithmetic (37.5 -> 38)."""
    return (200 * successes + total) // (2 * total)


def continuation_seed(seed: int, trajectory_id: str, step: int, j: int) -> int:
    return derive_seed(seed, "mc", trajectory_id, step, j)


def monte_carlo_confidence(env: ToolEnv, policy: Policy, record: EpisodeRecord, step: int, k: int, seed: int,
                           trajectory_id: str, conditioning: str = "q") -> MonteCarloEstimate:
    """The success rate (0-100) of continuations of `policy` (module docstring).

    conditioning "q": Q(s_t, a_t), `k` continuations after actions[:step + 1]; where a_t ends the episode
    (the recorded episode's last step) one replay, whose score is a_t's own outcome. "v": V(s_t), `k`
    continuations after actions[:step].
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"unknown confidence conditioning {conditioning!r}; expected one of {CONDITIONINGS}")
    if k < 1:
        raise ValueError(f"Monte Carlo needs k >= 1 continuations, got {k}")
    if not 0 <= step < len(record.actions):
        raise ValueError(f"trajectory {trajectory_id}: step {step} outside its {len(record.actions)} steps")
    prefix = record.actions[:step + 1] if conditioning == "q" else record.actions[:step]
    if conditioning == "q" and step == len(record.actions) - 1:
        k = 1  # the replay ends the episode: nothing is left to chance
    seeds = tuple(continuation_seed(seed, trajectory_id, step, j) for j in range(k))
    successes = tuple(succeeded(run_episode(env, policy, record.task, np.random.default_rng(s), prefix).score)
                      for s in seeds)
    return MonteCarloEstimate(confidence=percent(sum(successes), k), k=k, successes=successes, seeds=seeds,
                              conditioning=conditioning)


# ------------------------------------------------------------------------------------------ rule writer
def _sentences(parts: Sequence[str]) -> str:
    text = "; then ".join(parts) + "."
    return text[:1].upper() + text[1:]


def knowledge_established(task: Task, observations: Sequence[str]) -> int:
    """How many links of the gold chain the observations state, in order (m: entities 0..m are known)."""
    text = "\n".join(observations)
    established = 0
    for hop in task.metadata["hops"]:
        if RELATION_BY_NAME[hop["relation"]].sentence.format(s=hop["subject"], o=hop["object"]) not in text:
            break
        established += 1
    return established


def arithmetic_established(task: Task, past: Sequence[tuple[Action | None, str]]) -> int:
    """How many steps have been computed, in order: a python action holding step i's expression whose
    output is step i's value (each expression starts from the previous value, so order is implied)."""
    established = 0
    for step in task.metadata["steps"]:
        if not any(action is not None and action.kind == "python" and step["expression"] in action.argument
                   and observation.strip() == str(step["after"]) for action, observation in past):
            break
        established += 1
    return established


def knowledge_placeholder(entity_id: str, position: int) -> str:
    """How a block names chain entity `position` (0: the question's subject) before it is seen: '[person B]'."""
    return f"[{entity_type(entity_id)} {_LETTERS[position]}]"


def arithmetic_placeholder(step: int) -> str:
    """How a block names the value of arithmetic step `step` (1-based) before it is computed."""
    return f"[result of step {step}]"


def _relation_words(relation: str) -> str:
    """'mentored_by' -> 'mentored by' (the words the world's documents use for the relation)."""
    return relation.replace("_", " ")


def _action_term(action: Action | None) -> str | None:
    """What of the next action can be a keyword: the query, the answer, or a program's expression."""
    if action is None:
        return None
    if action.kind == "python":
        found = _EXPRESSION_RE.search(action.argument)
        return found.group(1).strip() if found else action.argument.strip()
    return action.argument.strip()


def grounded_keywords(candidates: Sequence[str | None], context: StepContext, forbidden: Sequence[str],
                      limit: int, future_start: str = "observation") -> list[str]:
    """Up to `limit` distinct candidates that are well-formed keywords, hold no forbidden term and occur
    in what follows a_t (fwm.trajectories.future: what_follows from `future_start`, keyword_found). With
    the default start a keyword that only repeats a_t's own query or answer is not grounded."""
    future = context.future_text(future_start)
    keywords: list[str] = []
    for candidate in candidates:
        if candidate is None:
            continue
        keyword = " ".join(candidate.split())
        if (not keyword or ";" in keyword or "<" in keyword or len(keyword) > 80
                or any(keyword.lower() == k.lower() for k in keywords)):
            continue
        probe = WorldModelBlock(roadmap="", keywords=[keyword], analysis="", confidence=None)
        if find_spoilers(probe, forbidden) or not keyword_found(keyword, future):
            continue
        keywords.append(keyword)
        if len(keywords) == limit:
            break
    return keywords


def _ends_without_answer(context: StepContext) -> bool:
    last = context.actions[-1]
    return last is None or last.kind != ANSWER


@dataclasses.dataclass(frozen=True)
class RuleBlockWriter:
    """The rule-based BlockWriter for the synthetic worlds (module docstring).

    future_start: where "what follows" starts for keyword grounding (fwm.trajectories.future.FUTURE_STARTS).
    entity_types: name -> type of the world's entities, so that an unseen name outside the gold chain
    reads as "[another person]"; a name it lacks reads as "[another name]".
    """

    max_keywords: int = 4
    future_start: str = "observation"
    entity_types: Mapping[str, str] = dataclasses.field(default_factory=dict)
    roadmap: str = "action"  # ROADMAP_STYLES: "evidence" quotes a_t's evidence sentence first (module docstring)

    def __post_init__(self):
        if self.future_start not in FUTURE_STARTS:
            raise ValueError(f"RuleBlockWriter.future_start must be one of {FUTURE_STARTS}, got {self.future_start!r}")
        if self.roadmap not in ROADMAP_STYLES:
            raise ValueError(f"RuleBlockWriter.roadmap must be one of {ROADMAP_STYLES}, got {self.roadmap!r}")

    def __call__(self, context: StepContext, confidence: int, forbidden: Sequence[str]) -> WorldModelBlock:
        confidence = check_confidence(confidence)
        world = context.task.metadata.get("world")
        if world == "knowledge":
            roadmap, candidates, analysis = self._knowledge(context, forbidden)
        elif world == "arithmetic":
            roadmap, candidates, analysis = self._arithmetic(context, forbidden)
        else:
            raise BlockRejected(f"task {context.task.id}: the rule writer knows the synthetic worlds 'knowledge' "
                                f"and 'arithmetic', not metadata world {world!r}")
        if self.roadmap == "evidence":
            roadmap = self._quote_evidence(context, roadmap)
        keywords = grounded_keywords(candidates, context, forbidden, self.max_keywords, self.future_start)
        block = WorldModelBlock(roadmap=roadmap, keywords=keywords, analysis=analysis, confidence=confidence)
        return check_block(block, forbidden)

    @staticmethod
    def _quote_evidence(context: StepContext, roadmap: str) -> str:
        """The roadmap after the sentence of an earlier observation that a_t's argument was read from
        (unchanged for a malformed step, a program, or an argument no earlier observation names)."""
        action = context.actions[context.step]
        if action is None or action.kind == "python":
            return roadmap
        evidence = evidence_sentence(action.argument, [observation for _, observation in context.past])
        return roadmap if evidence is None else f"{evidence} {roadmap}"

    def _knowledge(self, context: StepContext, forbidden: Sequence[str]) -> tuple[str, list[str | None], str]:
        task, past, step = context.task, context.past, context.step
        hops = task.metadata["hops"]
        names = [hops[0]["subject"]] + [hop["object"] for hop in hops]
        ids = [hops[0]["subject_id"]] + [hop["object_id"] for hop in hops]
        known = knowledge_established(task, [observation for _, observation in past])
        visible = context.visible_text()

        def shown(j: int) -> str:
            return names[j] if j <= known else knowledge_placeholder(ids[j], j)

        def phrase(j: int) -> str:  # the noun phrase for entity j + 1, given entity j as shown
            return RELATION_BY_NAME[hops[j]["relation"]].phrase.format(s=shown(j))

        def name_as_seen(name: str) -> str:  # a searched or answered name as the agent can write it at step t
            if name in names:  # a chain entity reads as the analysis calls it, even if seen elsewhere
                return shown(names.index(name))
            if contains_term(visible, name):
                return name
            if name in self.entity_types:
                return f"[another {self.entity_types[name]}]"
            return "[another name]"

        plan = []
        for i in range(step, len(context.actions)):
            action = context.actions[i]
            if action is None:
                plan.append("write a malformed step")
            elif action.kind == ANSWER:
                plan.append(f"answer {name_as_seen(action.argument)}")
            else:
                is_name = action.argument in names or action.argument in self.entity_types or action.argument in forbidden
                target = name_as_seen(action.argument) if is_name else f'"{action.argument}"'  # relation words
                before = knowledge_established(task, context.observations[:i])
                after = knowledge_established(task, context.observations[:i + 1])
                found = ", and ".join(f"{shown(j + 1)}, {phrase(j)}" for j in range(before, after))
                plan.append(f"{action.kind} {target} to find {found}" if found
                            else f"{action.kind} {target}, which adds no link")
        if _ends_without_answer(context):
            plan.append("run out of turns without an answer")
        roadmap = _sentences(plan)
        facts = [RELATION_BY_NAME[hops[j]["relation"]].sentence.format(s=names[j], o=names[j + 1])
                 for j in range(known)]
        missing = [f"{shown(j + 1)}, {phrase(j)}" for j in range(known, len(hops))]
        analysis = "Known: " + (" ".join(facts) if facts else f"only the question about {names[0]}.")
        to_go = len(hops) - known
        analysis += (f" Missing: {'; '.join(missing)} ({to_go} hop{'s' if to_go > 1 else ''} to go)." if missing
                     else f" Missing: nothing; the answer is {names[-1]}.")
        if past and knowledge_established(task, [observation for _, observation in past[:-1]]) == known:
            analysis += " The last step added no new link."
        candidates = [_action_term(context.actions[step])]
        candidates += [_relation_words(hops[j]["relation"]) for j in range(known, len(hops))]
        candidates += [names[j] for j in range(known, -1, -1)]  # seen chain entities, latest first
        return roadmap, candidates, analysis

    @staticmethod
    def _arithmetic(context: StepContext, forbidden: Sequence[str]) -> tuple[str, list[str | None], str]:
        task, past, step = context.task, context.past, context.step
        steps = task.metadata["steps"]
        values = [task.metadata["start"]] + [s["after"] for s in steps]
        known = arithmetic_established(task, past)
        visible = context.visible_text()

        def shown(j: int) -> str:  # value j: the start (0) or the result of step j
            return str(values[j]) if j <= known else arithmetic_placeholder(j)

        def number_as_seen(text: str) -> str:  # a number in an action as the agent can write it at step t
            for j, value in reversed(list(enumerate(values))):  # a repeated value reads as its latest step
                if text == str(value) and (j <= known or not contains_term(visible, text)):
                    return shown(j)
            # Other numbers are the agent's own constants and guesses: named unless the spoiler check forbids them.
            return "[another number]" if text in forbidden else text

        def describe(action: Action) -> str:
            if action.kind == ANSWER:
                return f"answer {number_as_seen(action.argument.strip())}"
            code = action.argument.strip()
            printed = _PRINT_RE.match(code)
            if printed:
                return f"print {number_as_seen(printed.group(1))}"
            found = _EXPRESSION_RE.search(code)
            parts = found.group(1).strip().split(" ") if found else []
            if len(parts) != 3:
                return "run another program"
            expression = " ".join([number_as_seen(parts[0]), parts[1], number_as_seen(parts[2])])
            gold = [j for j, s in enumerate(steps) if s["expression"] == found.group(1).strip()]
            return f"compute {expression}" + (f" for step {gold[0] + 1}" if gold else "")

        plan = []
        for i in range(step, len(context.actions)):
            action = context.actions[i]
            if action is None:
                plan.append("write a malformed step")
                continue
            clause = describe(action)
            if action.kind != ANSWER:
                before = arithmetic_established(task, list(zip(context.actions[:i], context.observations[:i])))
                after = arithmetic_established(task, list(zip(context.actions[:i + 1], context.observations[:i + 1])))
                clause += (f" to get {', '.join(shown(j) for j in range(before + 1, after + 1))}" if after > before
                           else ", which adds no new result")
            plan.append(clause)
        if _ends_without_answer(context):
            plan.append("run out of turns without an answer")
        roadmap = _sentences(plan)
        facts = [f"the start value is {values[0]}"] + [f"step {j} gives {values[j]}" for j in range(1, known + 1)]
        analysis = "Known: " + "; ".join(facts) + "."
        if known == len(steps):
            analysis += f" Missing: nothing; the final number is {values[-1]}."
        elif known == len(steps) - 1:
            analysis += f" Missing: step {len(steps)} and the final number."
        else:
            analysis += f" Missing: steps {known + 1} to {len(steps)} and the final number."
        if past and arithmetic_established(task, past[:-1]) == known:
            analysis += " The last step added no new result."
        candidates = [_action_term(context.actions[step])]
        candidates += [str(steps[j]["operand"]) for j in range(known, len(steps))]
        return roadmap, candidates, analysis


def make_block_writer(name: str, teacher_config: Mapping[str, Any] | None = None, *, future_start: str = "observation",
                      entity_types: Mapping[str, str] | None = None, roadmap: str = "action") -> BlockWriter:
    """'rule' -> RuleBlockWriter; 'teacher' -> TeacherBlockWriter.from_config(teacher_config) (imported only then:
    it needs an endpoint). Both ground their keywords in what follows from `future_start`; `roadmap` (the rule
    writer's ROADMAP_STYLES) must stay "action" for the teacher, which words its roadmap itself."""
    if name == "teacher" and roadmap != "action":
        raise ValueError(f"roadmap style {roadmap!r} is the rule writer's; the teacher writes its own roadmap")
    if name == "rule":
        return RuleBlockWriter(future_start=future_start, entity_types=dict(entity_types or {}), roadmap=roadmap)
    if name == "teacher":
        from fwm.trajectories.teacher import TeacherBlockWriter

        return TeacherBlockWriter.from_config({**dict(teacher_config or {}), "future_start": future_start})
    raise ValueError(f"unknown block writer {name!r}; expected one of {WRITERS}")


# ------------------------------------------------------------------------------------------- annotation
def block_to_dict(block: WorldModelBlock) -> dict[str, Any]:
    return {"roadmap": block.roadmap, "keywords": list(block.keywords), "analysis": block.analysis,
            "confidence": block.confidence}


def block_from_dict(row: Mapping[str, Any]) -> WorldModelBlock:
    return WorldModelBlock(roadmap=row["roadmap"], keywords=list(row["keywords"]), analysis=row["analysis"],
                           confidence=row["confidence"])


def annotate_steps(env: ToolEnv, policy: Policy, writer: BlockWriter, record: EpisodeRecord, trajectory_id: str,
                   steps: Sequence[int], *, k: int, seed: int, entity_names: Sequence[str] = (),
                   conditioning: str = "q") -> list[dict[str, Any]]:
    """One row per step: the Monte Carlo estimate (`conditioning`: see monte_carlo_confidence) and either the
    block or why it was rejected.

    A block counts as rejected when the writer raises BlockRejected, when check_block finds a forbidden
    term in what the writer returned (a writer's own check is not trusted), when it does not render,
    or when its confidence is not the Monte Carlo one.
    """
    rows = []
    for step in steps:
        context = StepContext.from_record(record, step)
        forbidden = spoiler_terms(context, entity_names)
        estimate = monte_carlo_confidence(env, policy, record, step, k, seed, trajectory_id, conditioning)
        block, rejection, spoiler = None, None, False
        try:
            block = check_block(writer(context, estimate.confidence, forbidden), forbidden)
            render_world_model(block, with_confidence=True)
            if block.confidence != estimate.confidence:
                raise BlockRejected(f"the writer changed the confidence from {estimate.confidence} to "
                                    f"{block.confidence}")
        except (BlockRejected, ValueError, TypeError) as error:
            block = None
            rejection = f"{type(error).__name__}: {error}"
            spoiler = isinstance(error, BlockRejected) and error.spoiler
        rows.append({"trajectory_id": trajectory_id, "step": step, "confidence": estimate.confidence,
                     "confidence_kind": estimate.conditioning, "mc_k": estimate.k,
                     "mc_successes": [int(s) for s in estimate.successes],
                     "block": None if block is None else block_to_dict(block), "rejection": rejection,
                     "spoiler_rejection": spoiler})
    return rows


@dataclasses.dataclass(frozen=True)
class BlockJob:
    """What every annotation chunk shares (built into envs, policies and a writer inside the worker)."""

    env: EnvSpec
    policies: Mapping[str, Policy]
    writer: str
    teacher_config: Mapping[str, Any]
    seed: int
    mc_k: int
    entity_names: tuple[str, ...] = ()
    conditioning: str = "q"  # blocks.confidence
    future_start: str = "observation"  # blocks.future_start
    entity_types: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> type (rule writer)
    roadmap: str = "action"  # blocks.roadmap (rule writer)


@dataclasses.dataclass(frozen=True)
class BlockItem:
    trajectory: Mapping[str, Any]  # a trajectory row (collect.trajectory_row)
    steps: tuple[int, ...]


def writer_counters(writer: BlockWriter) -> dict[str, int]:
    """What a writer has counted so far (TeacherBlockWriter.stats); {} for a writer that keeps no counters
    (the rule writer)."""
    stats = getattr(writer, "stats", None)
    return {} if stats is None else dict(stats.as_dict())


def sum_counters(counters: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Key-wise sums (zeros kept, first-seen key order): totals over chunks, each with its own writer."""
    total: dict[str, int] = {}
    for one in counters:
        for name, value in one.items():
            total[name] = total.get(name, 0) + value
    return total


@dataclasses.dataclass(frozen=True)
class AnnotatedItem:
    """One item's step rows and what the chunk's writer counted while writing them (the item's share of
    the writer's counters, so summing over items and chunks gives the stage's totals)."""

    rows: list[dict[str, Any]]
    writer_counters: dict[str, int]


def annotate_chunk(job: BlockJob, items: Sequence[BlockItem]) -> list[AnnotatedItem]:
    """Annotates one chunk of trajectories (in a worker, which builds its own env and writer)."""
    env = make_env(job.env)
    writer = make_block_writer(job.writer, job.teacher_config, future_start=job.future_start,
                               entity_types=job.entity_types, roadmap=job.roadmap)
    out = []
    for item in items:
        row = item.trajectory
        record = record_from_row(row, f"trajectory {row.get('id')}")
        before = writer_counters(writer)
        rows = annotate_steps(env, job.policies[row["policy"]], writer, record, row["id"], item.steps,
                              k=job.mc_k, seed=job.seed, entity_names=job.entity_names,
                              conditioning=job.conditioning)
        after = writer_counters(writer)
        out.append(AnnotatedItem(rows, {name: value - before.get(name, 0) for name, value in after.items()}))
    return out

