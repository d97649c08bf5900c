"""The batched step-wise episode runner: B tasks x G samples, one agent step per policy call for all of them.

Each step, for every episode still running:
  1. the prompt is rendered from the history (`schema.render_prompt`, the SFT corpora's instruction,
     variant and token budget; fwm/trajectories/corpora.py sft_step_records) and tokenized the way SFT
     samples are (BOS, then the prompt's ids; fwm/data/features.py sft_example); a prompt still longer
     than `max_prompt_tokens` loses tokens from its left after BOS, as sft_example cuts it;
  2. one batched policy call samples the responses (`Policy`: requests -> sampler.Sample per request);
  3. each response is decoded, its span ids taken from the decoding offsets of the sampled ids (never
     from re-encoding the text), and parsed (`schema.parse_response`, which never raises);
  4. the actions run in the environments (`EnvPool.step`: batched searches, a thread pool, math answers
     checked in a child process); a response without an action is a malformed step the env answers with
     a notice and counts;
  5. the observation joins the history; the episode ends at an answer or the env's turn budget.

Per step the runner records prompt and response ids, span ids, both log-probabilities of the sampled
tokens (see fwm/rollout/sampler.py), q_t (the parsed confidence in [0, 1], None if missing), keywords,
the action (None if none was found) and the observation; per episode the env's EpisodeRecord (score,
metrics, reason, counts) and format adherence. `Episode.trajectory_row` is the row format of
fwm.trajectories.collect, so a model policy can collect trajectories with the same runner.

Policies: `ModelPolicy` samples with fwm.rollout.sampler.generate; `ScriptedPolicy` wraps a behaviour
policy of fwm/trajectories/policies.py, renders its action as a plain-variant response
(<think>..</think><action>..</action>, the SFT corpora's think text) and tokenizes it (+ EOS).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from fwm import schema
from fwm.envs.base import EpisodeRecord, Task
from fwm.mesh import process_reduce
from fwm.model.transformer import ModelConfig
from fwm.rollout.envs import EnvPool
from fwm.rollout.sampler import Sample, generate
from fwm.schema import Action
from fwm.trajectories.collect import derive_seed, succeeded, trajectory_row
from fwm.trajectories.corpora import think_text
from fwm.trajectories.policies import Policy as BehaviourPolicy

History = tuple[tuple[Action | None, str], ...]


# ------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class EpisodeSlot:
    """One episode to run: the task, its sample index g in [0, G) and the seed of its numpy Generator."""

    task: Task
    sample: int
    seed: int


def episode_slots(tasks: Sequence[Task], samples_per_task: int, seed: int, tag: str = "episodes") -> list[EpisodeSlot]:
    """Task-major slots (task 0's G samples first), each with its own derived seed."""
    if samples_per_task < 1:
        raise ValueError(f"samples_per_task must be >= 1, got {samples_per_task}")
    return [EpisodeSlot(task, g, derive_seed(seed, tag, task.id, g)) for task in tasks for g in range(samples_per_task)]


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """How step prompts are built. budget_tokens: render_prompt's budget (tokens of the tokenizer, BOS
    not counted; the oldest history steps are dropped to fit). max_prompt_tokens: hard cap including
    BOS (the room the sampler has; 0: none). strict_actions: take the action only from a response whose
    format is fully right (schema.format_ok for `variant`); else from any response the parser found one in."""

    variant: str = schema.FULL
    instruction: str = schema.DEFAULT_INSTRUCTION
    budget_tokens: int = 1024
    max_prompt_tokens: int = 0
    strict_actions: bool = False

    def __post_init__(self):
        if self.variant not in schema.VARIANTS:
            raise ValueError(f"PromptOptions.variant must be one of {schema.VARIANTS}, got {self.variant!r}")
        if self.budget_tokens < 1 or self.max_prompt_tokens < 0:
            raise ValueError(f"PromptOptions: budget_tokens must be >= 1 and max_prompt_tokens >= 0, got "
                             f"{self.budget_tokens} and {self.max_prompt_tokens}")


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """What a policy sees for one episode's step: the prompt's ids (BOS first) and, for scripted
    policies, the task, the raw history ((action, observation) pairs) and the episode's Generator."""

    prompt_ids: list[int]
    task: Task
    history: History
    rng: np.random.Generator


Policy = Callable[[Sequence[StepRequest]], list[Sample]]


# ----------------------------------------------------------------------------------------- policies
@dataclasses.dataclass
class ModelPolicy:
    """Samples responses with the model (fwm.rollout.sampler.generate), at most max_batch prompts a call
    (0: all). With temperature > 0 each request's jax key is drawn from its episode's Generator, so an
    episode repeats exactly for the same slot, whatever batch (or process) it is sampled in.

    Several processes: a collective call (see generate); every process makes as many sampler calls as
    the one with most, with no prompts where it has run out."""

    cfg: ModelConfig
    params: Any
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    mesh: Any = None
    max_batch: int = 0

    def __call__(self, requests: Sequence[StepRequest]) -> list[Sample]:
        size = self.max_batch or max(len(requests), 1)
        calls = int(process_reduce(-(-len(requests) // size)))
        out: list[Sample] = []
        for start in range(0, calls * size, size):
            chunk = requests[start:start + size]
            rng = None
            if self.temperature > 0 and chunk:
                rng = jax.vmap(jax.random.key)(np.asarray([r.rng.integers(2 ** 31) for r in chunk], np.int32))
            out += generate(self.cfg, self.params, [r.prompt_ids for r in chunk], self.max_new_tokens,
                            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            stop_ids=self.stop_ids, rng=rng, mesh=self.mesh)
        return out


@dataclasses.dataclass(frozen=True)
class ScriptedPolicy:
    """A behaviour policy's action as a plain-variant response, tokenized, EOS last (no log-probs)."""

    behaviour: BehaviourPolicy
    tokenizer: Any
    think: str = "action"  # think_text style, as the corpora's `corpora.think`

    def __call__(self, requests: Sequence[StepRequest]) -> list[Sample]:
        out = []
        for request in requests:
            action = self.behaviour(request.task, request.history, request.rng)
            think = think_text(action, [observation for _, observation in request.history], self.think)
            text = schema.render_response(schema.StepResponse(think=schema.neutralize_tags(think), action=action),
                                          schema.PLAIN)
            out.append(Sample(tokens=list(self.tokenizer.encode(text)) + [self.tokenizer.eos_id], logprobs=None,
                              sampling_logprobs=None, stopped=True))
        return out


# ------------------------------------------------------------------------------------------ records
@dataclasses.dataclass
class StepRecord:
    """One agent step. span_ids: per response token (schema.SPAN_*). q: parsed confidence in [0, 1] or
    None. action: what was sent to the env (None: no action found). observation: the env's raw answer,
    rendered into later prompts with observation_kind."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    span_ids: list[int]
    logprobs: list[float] | None
    sampling_logprobs: list[float] | None
    stopped: bool
    q: float | None
    keywords: list[str]
    action: Action | None
    observation: str
    observation_kind: str
    format_ok: bool
    malformed: list[str]
    prompt_truncated: bool

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["action"] = None if self.action is None else {"kind": self.action.kind, "argument": self.action.argument}
        return out


@dataclasses.dataclass
class Episode:
    """One finished episode: its slot, steps, and the env's record (score, metrics, reason, counts)."""

    slot: EpisodeSlot
    steps: list[StepRecord]
    record: EpisodeRecord

    @property
    def success(self) -> bool:
        return succeeded(self.record.score)

    @property
    def format_adherence(self) -> float:
        """Share of steps whose response has exactly the variant's format (schema.format_ok)."""
        return float(np.mean([step.format_ok for step in self.steps])) if self.steps else 0.0

    def trajectory_row(self, split: str, policy: str) -> dict[str, Any]:
        """The fwm.trajectories.collect row of this episode (episode index = sample index)."""
        return trajectory_row(self.record, split=split, policy=policy, episode=self.slot.sample, seed=self.slot.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.slot.task.id, "sample": self.slot.sample, "seed": self.slot.seed,
                "data_source": self.slot.task.data_source, "success": self.success,
                "format_adherence": self.format_adherence, "record": self.record.to_dict(),
                "steps": [step.to_dict() for step in self.steps]}


# ------------------------------------------------------------------------------------------- pieces
def token_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, [start, end) per token) from decoding: the pieces' own texts when they concatenate to the
    whole decode, else cumulative prefix decodes made non-decreasing (a byte piece inside a multi-byte
    character gets an empty range at it). Special ids (BOS / EOS / pad) get empty ranges."""
    text = tokenizer.decode(ids)
    pieces = [tokenizer.decode([i]) for i in ids]
    if "".join(pieces) == text:
        ends = np.cumsum([len(p) for p in pieces]).tolist()
    else:
        ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
        ends = [min(e, len(text)) for e in np.minimum.accumulate(np.asarray(ends[::-1], np.int64))[::-1].tolist()]
    starts = [0] + ends[:-1]
    return text, [(s, max(s, e)) for s, e in zip(starts, ends)]


def response_span_ids(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(text, span id per token): schema.token_span_ids over the decode offsets; a trailing special
    token (EOS) takes the span of the token before it, as in SFT samples (features.sft_example)."""
    text, offsets = token_offsets(tokenizer, ids)
    spans = schema.token_span_ids(schema.char_span_ids(text), offsets).tolist()
    special = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id}
    for i in range(1, len(ids)):
        if ids[i] in special and offsets[i][0] == offsets[i][1]:
            spans[i] = spans[i - 1]
    return text, [int(s) for s in spans]


def prompt_ids(tokenizer: Any, question: str, history: Sequence[tuple[str, str]],
               options: PromptOptions) -> tuple[list[int], bool]:
    """(BOS + the step prompt's ids, whether the hard cap cut it)."""
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    text = schema.render_prompt(question, list(history), count, options.budget_tokens, options.instruction,
                                options.variant)
    ids = [tokenizer.bos_id] + list(tokenizer.encode(text))
    cap = options.max_prompt_tokens
    if cap and len(ids) > cap:
        return [tokenizer.bos_id] + ids[len(ids) - (cap - 1):], True
    return ids, False


def history_action_text(action: Action | None, response_text: str) -> str:
    """The action as later prompts show it: rendered (tags in the argument defused), or for a step without
    an action the response itself with its tags defused, so the model sees what it wrote."""
    if action is None:
        return schema.neutralize_tags(response_text.strip()) or "(empty response)"
    return schema.render_action(Action(action.kind, schema.neutralize_tags(action.argument)))


# ------------------------------------------------------------------------------------------- runner
def run_episodes(slots: Sequence[EpisodeSlot], policy: Policy, pool: EnvPool, tokenizer: Any,
                 options: PromptOptions = PromptOptions(), progress: bool = False, desc: str = "episodes"
                 ) -> list[Episode]:
    """Runs every slot's episode to its end (answer or turn budget); results in slot order."""
    envs = [pool.new_env() for _ in slots]
    for env, slot in zip(envs, slots):
        env.reset(slot.task)
    rngs = [np.random.default_rng(slot.seed) for slot in slots]
    histories: list[list[tuple[Action | None, str]]] = [[] for _ in slots]
    rendered: list[list[tuple[str, str]]] = [[] for _ in slots]
    steps: list[list[StepRecord]] = [[] for _ in slots]
    live = list(range(len(slots)))
    # Several processes: the policy's sampler calls are collective, so every process steps while any has
    # a live episode (one with none sends no prompts). One process: `live` alone, no exchange.
    with tqdm(total=len(slots), desc=desc, unit="episode", disable=not progress, dynamic_ncols=True) as bar:
        while process_reduce(len(live)) > 0:
            prompts = [prompt_ids(tokenizer, slots[i].task.question, rendered[i], options) for i in live]
            requests = [StepRequest(ids, slots[i].task, tuple(histories[i]), rngs[i]) for i, (ids, _) in zip(live, prompts)]
            samples = policy(requests)
            if len(samples) != len(requests):
                raise RuntimeError(f"the policy returned {len(samples)} responses for {len(requests)} prompts")
            decoded = [response_span_ids(tokenizer, sample.tokens) for sample in samples]
            parsed = [schema.parse_response(text) for text, _ in decoded]
            ok = [schema.format_ok(p, options.variant) for p in parsed]
            actions = [p.action if (fine or not options.strict_actions) else None for p, fine in zip(parsed, ok)]
            results = pool.step([envs[i] for i in live], actions) if live else []
            still = []
            for j, i in enumerate(live):
                observation, done, info = results[j]
                text, spans = decoded[j]
                sample = samples[j]
                steps[i].append(StepRecord(
                    prompt_ids=prompts[j][0], response_ids=list(sample.tokens), response_text=text, span_ids=spans,
                    logprobs=sample.logprobs, sampling_logprobs=sample.sampling_logprobs, stopped=sample.stopped,
                    q=parsed[j].confidence_q, keywords=list(parsed[j].keywords), action=actions[j],
                    observation=observation, observation_kind=info["observation_kind"], format_ok=ok[j],
                    malformed=list(parsed[j].malformed), prompt_truncated=prompts[j][1]))
                histories[i].append((actions[j], observation))
                if done:
                    bar.update(1)
                    continue
                rendered[i].append((history_action_text(actions[j], text),
                                    schema.render_observation(info["observation_kind"], observation)))
                still.append(i)
            live = still
    return [Episode(slot, slot_steps, env.record) for slot, slot_steps, env in zip(slots, steps, envs)]
