"""`fwm data`: config -> synthetic world -> collected trajectories -> world-model blocks -> stage corpora,
with statistics (printed, and in WORKDIR/stats.json).

The data config is its own schema, `default_data_config()` (experiments/synthetic_*.py start from it);
`validate_data_config` rejects unknown keys (naming the nearest valid one), wrong types and bad values,
naming the dotted key. Layout of WORKDIR:

  world/      world files (fwm.envs.synthetic writers), bm25/ (search), splits/{mid_train,sft,rl}.jsonl
  trajectories/{mid_train,sft}.jsonl   one row per episode (fwm.trajectories.collect.trajectory_row)
  blocks/blocks.jsonl                  one row per annotated step: Monte Carlo outcomes and their conditioning
                                       ("confidence_kind": q or v), whether the step errs ("erring",
                                       policies.off_gold_steps), block or rejection (with writer=teacher, the
                                       stats hold the teacher's summed counters)
  tokenizer.model                      the world's SentencePiece tokenizer, trained on the text of every corpus
                                       (stage `tokenizer`, marker tokenizer.stage.json; tokenizer.path given: none)
  corpora/    mid_train_plain, mid_train_wm, iwm, sft_{plain,state,full}, pretrain (search world documents and
              their paraphrases) (+ NAME_eval), rl_tasks, eval_tasks, manifest.json: "tokenizer" (its path
              relative to the manifest), per corpus stage, trained_roles, records and tokens (total, trained)
              in that tokenizer's tokens, SFT history cuts and samples over corpora.sft_max_tokens
  stats.json

The tokenizer is trained before the corpora are cut, on the same text rendered without token budgets
(corpora.tokenizer_texts), because cutting SFT prompts to a token budget needs the tokenizer that the
training stages will use.

Reruns skip finished stages. Each stage directory gets a `stage.json` marker, written last, holding a
fingerprint of the config keys the stage reads and of the stage before it; a stage is skipped when its
marker matches and its outputs exist, and redone otherwise (its marker is removed first, every file is
replaced atomically, and every later stage is redone because its fingerprint includes this one's;
fwm/stages.py, shared with `fwm pipeline`).
Worker count, chunk size and the progress bar are not in any fingerprint: results do not depend on them.

Splits: the world's train questions are cut in order into SFT tasks (the first splits.sft_tasks), RL
tasks (the next splits.rl_tasks) and mid-training tasks (the rest); the world's test questions are the
evaluation tasks. So SFT, RL and evaluation never see a mid-training question (DESIGN.md, synthetic study).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from fwm import calibration
from fwm import stages as stages_lib
from fwm.configlib import ConfigError, check_keys, check_override_args, check_types, require as _require
from fwm.envs.base import Task, read_tasks, write_tasks
from fwm.envs.jsonl import read_jsonl, write_json, write_jsonl
from fwm.envs.retrievers import BM25Retriever
from fwm.envs.sandbox import ISOLATION_MODES
from fwm.envs.scoring import QA_METRICS
from fwm.envs.synthetic.arithmetic import ArithmeticConfig, generate_arithmetic_tasks, write_arithmetic_tasks
from fwm.envs.synthetic.knowledge import KnowledgeWorldConfig, generate_knowledge_world, write_knowledge_world
from fwm.trajectories import blocks as blocks_lib
from fwm.trajectories import collect as collect_lib
from fwm.trajectories import corpora as corpora_lib
from fwm.trajectories.future import FUTURE_STARTS
from fwm.trajectories.policies import POLICY_NAMES, ArithmeticMoves, KnowledgeMoves, make_policy, off_gold_steps
from fwm.tokenizer import load_tokenizer, train_sentencepiece
from fwm.trajectories.teacher import TeacherStats

WORLD_KINDS = ("knowledge", "arithmetic")
STAGE_NAMES = ("world", "collect", "blocks", "tokenizer", "corpora")
_SPLITS = ("mid_train", "sft", "rl", "eval")
_CORPORA = ("pretrain", "mid_train_plain", "mid_train_wm", "iwm", "sft_plain", "sft_state", "sft_full", "rl_tasks",
            "eval_tasks")
_FORMAT_VERSION = 1  # part of every fingerprint: bump when a stage's output format changes


# ---------------------------------------------------------------------------------------------- config
def _world_defaults(config: Any) -> ml_collections.ConfigDict:
    fields = dataclasses.asdict(config)
    for key, value in fields.items():
        if value is None:  # ConfigDict fields keep their type; () stands for None ("same as the train split")
            fields[key] = ()
    return ml_collections.ConfigDict(fields)


def default_data_config() -> ml_collections.ConfigDict:
    """Every key `fwm data` reads, with defaults (a small search world)."""
    c = ml_collections.ConfigDict()
    c.workdir = ""                           # set by --workdir
    c.seed = 0                               # collection, Monte Carlo, block steps, eval split
    c.workers = 2                            # processes for collection and blocks (0: this process)
    c.chunk_size = 16                        # episodes / trajectories per unit of work
    c.progress = True                        # tqdm bars on stderr

    c.world = ml_collections.ConfigDict()
    c.world.kind = "knowledge"               # knowledge (search tool) | arithmetic (python tool)
    c.world.seed = 0
    c.world.knowledge = _world_defaults(KnowledgeWorldConfig())    # test_hop_weights () = as hop_weights
    c.world.arithmetic = _world_defaults(ArithmeticConfig())       # test_step_weights () = as step_weights

    c.splits = ml_collections.ConfigDict()
    c.splits.sft_tasks = 20                  # train questions for SFT trajectories (the first ones)
    c.splits.rl_tasks = 40                   # train questions held for RL (the next ones); rest: mid-training

    c.env = ml_collections.ConfigDict()
    c.env.max_turns = 8
    c.env.topk = 3                           # search: passages per query
    c.env.metric = "exact_match"             # search: episode score
    c.env.timeout_s = 5.0                    # python: sandbox limits
    c.env.memory_mb = 512
    c.env.isolation = "auto"                 # python: auto | namespace | audit (fwm.envs.sandbox)

    c.policies = ml_collections.ConfigDict()
    c.policies.p_error = 0.3                 # noisy: chance of a mistake when on track
    c.policies.p_recover = 0.7               # noisy: chance of redoing the right step after a mistake
    c.policies.mistake_weights = (0.5, 0.3, 0.2)  # noisy: wrong_step, vague, wrong_answer
    c.policies.p_answer = 0.25               # random: chance of answering at each step

    c.collect = ml_collections.ConfigDict()
    c.collect.policies = ("oracle", "noisy", "random")  # run on the mid_train and sft splits
    c.collect.episodes_per_task = 2

    c.blocks = ml_collections.ConfigDict()
    c.blocks.writer = "rule"                 # rule | teacher (fwm.trajectories.teacher, needs an endpoint)
    c.blocks.share = 0.5                     # share of mid-training steps that get a block (WM-AMT)
    c.blocks.mc_k = 8                        # Monte Carlo continuations per block
    c.blocks.confidence = "q"                # q: Q(s_t, a_t), continuations after a_t | v: V(s_t), before a_t
    c.blocks.future_start = "observation"    # keywords count as grounded in what follows from: observation | action
    c.blocks.roadmap = "action"              # rule writer: "action" | "evidence" (the roadmap first quotes the earlier
    #                                          observation's sentence that a_t's argument was read from)
    c.blocks.teacher = ml_collections.ConfigDict(dict(
        base_url="http://localhost:8000/v1", model="", api_key_env="", temperature=0.0, max_tokens=512,
        timeout_s=60.0, max_retries=3, backoff_s=1.0, cache_dir="", retry_with_feedback=True,
        max_observation_chars=2000))         # TeacherBlockWriter.from_config, read only with writer=teacher;
                                             # cache_dir '' means WORKDIR/teacher_cache

    c.corpora = ml_collections.ConfigDict()
    c.corpora.mid_train_policies = ("noisy",)  # whose mid_train-split trajectories feed mid-train/WM-AMT/IWM
    c.corpora.sft_policies = ("noisy",)        # whose successful sft-split trajectories feed SFT (one per task)
    c.corpora.eval_fraction = 0.05             # trajectories held out into NAME_eval.jsonl
    c.corpora.sft_max_tokens = 1024            # SFT sample budget in tokenizer tokens (BOS + prompt + response + EOS):
                                               # the SFT seq_len; the history is cut to fit, cuts are counted
    c.corpora.pretrain_phrasings = 8           # search world: each document + 7 paraphrases of its facts
    c.corpora.think = "action"                 # think_text style: "action" (the action alone) | "evidence" (quote
    #                                            the earlier observation's sentence naming the argument first)
    c.corpora.pretrain_eval_documents = True   # False: `pretrain` leaves out the documents of the eval questions'
                                               # hops (a fresh-entity world, where they are those questions' own)
    c.corpora.pretrain_rl_documents = True     # False: nor those of the RL questions' hops, so that RL, like the
                                               # evaluation, must read what its searches return (not recall it)

    c.tokenizer = ml_collections.ConfigDict()  # the world's tokenizer, stage `tokenizer` (WORKDIR/tokenizer.model)
    c.tokenizer.path = ""                      # '' trains one on all corpora; else use this tokenizer (e.g. a
                                               # checkpoint's tokenizer.json) for token budgets and counts
    c.tokenizer.vocab_size = 1024              # SentencePiece BPE, tags as user-defined symbols, byte fallback
    c.tokenizer.model_type = "bpe"
    c.tokenizer.character_coverage = 1.0
    c.tokenizer.max_texts = 20000              # texts sampled (seeded) from the corpora to train it on
    return c


def _check_policy_list(key: str, value: Sequence[str], allowed: Sequence[str], allow_empty: bool = False) -> None:
    _require((allow_empty or len(value) > 0) and set(value) <= set(allowed) and len(set(value)) == len(value), key,
             f"{'a' if allow_empty else 'a non-empty'} list of distinct names from {tuple(allowed)}", tuple(value))


def world_config(config: ml_collections.ConfigDict) -> KnowledgeWorldConfig | ArithmeticConfig:
    """The world's dataclass config (ConfigError naming the section on a bad value)."""
    kind = config.world.kind
    fields = config.world[kind].to_dict()
    for key, value in fields.items():
        if isinstance(value, list):
            fields[key] = tuple(value)
        if key.startswith("test_") and value == ():
            fields[key] = None
    try:
        return KnowledgeWorldConfig(**fields) if kind == "knowledge" else ArithmeticConfig(**fields)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config section 'world.{kind}': {error}") from None


def validate_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Unknown keys, types, then values; ConfigError naming the dotted key. Returns config."""
    schema = default_data_config()
    check_keys(config, schema)
    check_types(config, schema)
    c = config
    _require(c.workers >= 0, "workers", "an int >= 0 (0: in this process)", c.workers)
    _require(c.chunk_size >= 1, "chunk_size", "an int >= 1", c.chunk_size)
    _require(c.world.kind in WORLD_KINDS, "world.kind", f"one of {WORLD_KINDS}", c.world.kind)
    world = world_config(c)
    num_train = world.num_train_questions if c.world.kind == "knowledge" else world.num_train_tasks
    for key in ("sft_tasks", "rl_tasks"):
        _require(c.splits[key] >= 0, f"splits.{key}", "an int >= 0", c.splits[key])
    _require(c.splits.sft_tasks + c.splits.rl_tasks < num_train, "splits",
             f"sft_tasks + rl_tasks below the world's {num_train} train questions (the rest are for mid-training)",
             c.splits.to_dict())
    _require(c.env.max_turns >= 1, "env.max_turns", "an int >= 1", c.env.max_turns)
    _require(c.env.topk >= 1, "env.topk", "an int >= 1", c.env.topk)
    _require(c.env.metric in QA_METRICS, "env.metric", f"one of {sorted(QA_METRICS)}", c.env.metric)
    _require(c.env.timeout_s > 0, "env.timeout_s", "a number > 0", c.env.timeout_s)
    _require(c.env.memory_mb > 0, "env.memory_mb", "an int > 0", c.env.memory_mb)
    _require(c.env.isolation in ISOLATION_MODES, "env.isolation", f"one of {ISOLATION_MODES}", c.env.isolation)
    for key in ("p_error", "p_recover", "p_answer"):
        _require(0 <= c.policies[key] <= 1, f"policies.{key}", "a probability in [0, 1]", c.policies[key])
    weights = tuple(c.policies.mistake_weights)
    _require(len(weights) == 3 and all(isinstance(w, (int, float)) and w >= 0 for w in weights) and sum(weights) > 0,
             "policies.mistake_weights", "3 non-negative weights (wrong_step, vague, wrong_answer), positive sum",
             weights)
    _check_policy_list("collect.policies", c.collect.policies, POLICY_NAMES)
    _require(c.collect.episodes_per_task >= 1, "collect.episodes_per_task", "an int >= 1",
             c.collect.episodes_per_task)
    _require(c.blocks.writer in blocks_lib.WRITERS, "blocks.writer", f"one of {blocks_lib.WRITERS}", c.blocks.writer)
    _require(0 <= c.blocks.share <= 1, "blocks.share", "a share in [0, 1]", c.blocks.share)
    _require(c.blocks.mc_k >= 1, "blocks.mc_k", "an int >= 1", c.blocks.mc_k)
    _require(c.blocks.confidence in blocks_lib.CONDITIONINGS, "blocks.confidence",
             f"one of {blocks_lib.CONDITIONINGS} (Q(s_t, a_t) or V(s_t))", c.blocks.confidence)
    _require(c.blocks.future_start in FUTURE_STARTS, "blocks.future_start", f"one of {FUTURE_STARTS}",
             c.blocks.future_start)
    _require(c.blocks.roadmap in blocks_lib.ROADMAP_STYLES, "blocks.roadmap", f"one of {blocks_lib.ROADMAP_STYLES}",
             c.blocks.roadmap)
    if c.blocks.writer == "teacher":
        _require(c.blocks.roadmap == "action", "blocks.roadmap", "'action' with blocks.writer=teacher (the teacher "
                 "words its own roadmap)", c.blocks.roadmap)
        _require(bool(c.blocks.teacher.model.strip()), "blocks.teacher.model", "the teacher's model name",
                 c.blocks.teacher.model)
    _check_policy_list("corpora.mid_train_policies", c.corpora.mid_train_policies, c.collect.policies)
    _check_policy_list("corpora.sft_policies", c.corpora.sft_policies, c.collect.policies, allow_empty=True)
    _require(0 <= c.corpora.eval_fraction < 1, "corpora.eval_fraction", "a fraction in [0, 1)",
             c.corpora.eval_fraction)
    _require(c.corpora.sft_max_tokens >= 64, "corpora.sft_max_tokens", "an int >= 64 (tokens per SFT sample)",
             c.corpora.sft_max_tokens)
    _require(c.corpora.think in corpora_lib.THINK_STYLES, "corpora.think", f"one of {corpora_lib.THINK_STYLES}",
             c.corpora.think)
    _require(c.corpora.pretrain_phrasings >= 1, "corpora.pretrain_phrasings", "an int >= 1 (1: the documents alone)",
             c.corpora.pretrain_phrasings)
    _require(not c.tokenizer.path or os.path.exists(c.tokenizer.path), "tokenizer.path",
             "'' (train WORKDIR/tokenizer.model) or an existing tokenizer file / directory", c.tokenizer.path)
    _require(c.tokenizer.vocab_size >= 512, "tokenizer.vocab_size", "an int >= 512 (256 byte pieces, tags, text)",
             c.tokenizer.vocab_size)
    _require(c.tokenizer.model_type in ("bpe", "unigram"), "tokenizer.model_type", "'bpe' or 'unigram'",
             c.tokenizer.model_type)
    _require(0 < c.tokenizer.character_coverage <= 1, "tokenizer.character_coverage", "a fraction in (0, 1]",
             c.tokenizer.character_coverage)
    _require(c.tokenizer.max_texts >= 1, "tokenizer.max_texts", "an int >= 1", c.tokenizer.max_texts)
    return config


def check_data_override_args(argv: Iterable[str], flag_name: str = "config") -> None:
    """Checks `--config.a.b=v` override paths against default_data_config() (see fwm.configlib)."""
    check_override_args(argv, default_data_config(), flag_name)


# ------------------------------------------------------------------------------------------- stages
def _fingerprint(*parts: Any) -> str:
    return stages_lib.fingerprint(_FORMAT_VERSION, *parts)


_Stage = stages_lib.Stage  # a stage's directory, marker and fingerprint (fwm/stages.py, shared with fwm pipeline)


@dataclasses.dataclass(frozen=True)
class _World:
    """The generated world in memory (a pure function of world config and seed, so cheap to rebuild)."""

    kind: str
    splits: Mapping[str, tuple[Task, ...]]  # mid_train, sft, rl, eval
    entity_names: tuple[str, ...]
    entity_types: Mapping[str, str]  # name -> type (knowledge world; empty for arithmetic)
    documents: tuple[Mapping[str, str], ...]  # {"id", "text"} for a pretraining corpus (knowledge only)
    facts: tuple[corpora_lib.Fact, ...]  # (subject, relation, object) names, for the document paraphrases
    moves: Any
    write: Callable[[str], None]


def _make_world(config: ml_collections.ConfigDict) -> _World:
    kind, seed = config.world.kind, config.world.seed
    if kind == "knowledge":
        world = generate_knowledge_world(world_config(config), seed)
        train, test = world.train_tasks, world.test_tasks
        names = tuple(entity.name for entity in world.entities)
        types = {entity.name: entity.type for entity in world.entities}
        documents = tuple({"id": doc.id, "text": doc.contents} for doc in world.documents)
        facts = tuple((entity.name, relation, world.entity(object_id).name) for entity in world.entities
                      for relation, object_id in entity.relations)
        moves: Any = KnowledgeMoves.from_world(world)

        def write(directory: str) -> None:
            write_knowledge_world(world, directory)
            BM25Retriever.build(world.corpus(), os.path.join(directory, "bm25"))
    else:
        arithmetic = world_config(config)
        train, test = generate_arithmetic_tasks(arithmetic, seed)
        names, types, documents, facts, moves = (), {}, (), (), ArithmeticMoves()

        def write(directory: str) -> None:
            write_arithmetic_tasks(arithmetic, seed, train, test, directory)
    sft_end = config.splits.sft_tasks
    rl_end = sft_end + config.splits.rl_tasks
    splits = {"sft": tuple(train[:sft_end]), "rl": tuple(train[sft_end:rl_end]), "mid_train": tuple(train[rl_end:]),
              "eval": tuple(test)}
    return _World(kind, splits, names, types, documents, facts, moves, write)


def _env_spec(config: ml_collections.ConfigDict, world_dir: str) -> collect_lib.EnvSpec:
    e = config.env
    if config.world.kind == "knowledge":
        return collect_lib.EnvSpec("search", max_turns=e.max_turns, index_dir=os.path.join(world_dir, "bm25"),
                                   topk=e.topk, metric=e.metric)
    return collect_lib.EnvSpec("python", max_turns=e.max_turns, timeout_s=e.timeout_s, memory_mb=e.memory_mb,
                               isolation=e.isolation)


def _policies(config: ml_collections.ConfigDict, moves: Any) -> dict[str, Any]:
    p = config.policies
    return {name: make_policy(name, moves, p_error=p.p_error, p_recover=p.p_recover,
                              mistake_weights=tuple(p.mistake_weights), p_answer=p.p_answer)
            for name in config.collect.policies}


def _rows(path: str) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path)]


def _collect_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_policy: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_policy.setdefault(row["policy"], []).append(row)
    return {policy: {"trajectories": len(group), "steps": sum(len(r["actions"]) for r in group),
                     "success_rate": round(float(np.mean([collect_lib.succeeded(r["score"]) for r in group])), 4),
                     "mean_turns": round(float(np.mean([r["num_turns"] for r in group])), 3),
                     "turn_budget_endings": sum(r["reason"] == "turn_budget" for r in group)}
            for policy, group in by_policy.items()}


def confidence_quality(confidences: Sequence[int], successes: Sequence[bool], erring: Sequence[bool]) -> dict[str, Any]:
    """How well block confidences (0-100) predict the recorded episodes' outcomes, and whether they tell the
    steps that err (policies.off_gold_steps) from the rest: mean q on each, AUROC and Brier of q / 100
    against success (fwm.calibration)."""
    q_N = np.asarray(confidences, np.float64) / 100.0
    y_N = np.asarray(successes, np.float64)
    erring_N = np.asarray(erring, bool)
    area = calibration.auroc(q_N, y_N)

    def mean(values: np.ndarray) -> float | None:
        return round(float(values.mean() * 100), 2) if values.size else None

    return {"steps": int(q_N.size), "erring_steps": int(erring_N.sum()), "mean_q_erring": mean(q_N[erring_N]),
            "mean_q_other": mean(q_N[~erring_N]), "mean_q": mean(q_N), "success_rate": round(float(y_N.mean()), 4),
            "auroc": None if area is None else round(area, 4), "brier": round(calibration.brier_score(q_N, y_N), 4)}


def _block_stats(rows: Sequence[Mapping[str, Any]], outcomes: Mapping[str, float], mc_k: int,
                 conditioning: str) -> dict[str, Any]:
    written = [row for row in rows if row["block"] is not None]
    stats: dict[str, Any] = {
        "annotated_steps": len(rows), "blocks_written": len(written), "rejections": len(rows) - len(written),
        "spoiler_rejections": sum(bool(row["spoiler_rejection"]) for row in rows), "mc_k": mc_k,
        "confidence_kind": conditioning, "continuations": sum(row["mc_k"] for row in rows),
        "mean_keywords": round(float(np.mean([len(r["block"]["keywords"]) for r in written])), 3) if written else 0.0,
        "rejection_examples": [row["rejection"] for row in rows if row["rejection"]][:3],
    }
    # q against the recorded episode's own outcome. Mid-training steps only: the SFT trajectories are chosen
    # for success, so their steps would make any q look discriminative.
    mid = [row for row in rows if row["trajectory_id"].startswith("mid_train/")]
    if mid:
        stats["q_vs_outcome"] = confidence_quality(
            [row["confidence"] for row in mid], [collect_lib.succeeded(outcomes[row["trajectory_id"]]) for row in mid],
            [row["erring"] for row in mid])
    return stats


def _block_map(blocks_dir: str) -> dict[tuple[str, int], Any]:
    """(trajectory id, step) -> accepted block, from blocks.jsonl."""
    return {(row["trajectory_id"], row["step"]): blocks_lib.block_from_dict(row["block"])
            for _, row in read_jsonl(os.path.join(blocks_dir, "blocks.jsonl")) if row["block"] is not None}


def _file_digest(path: str) -> str:
    """sha256 of a given tokenizer file ('' for none or a directory, which is fingerprinted by path only)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or skips) every stage into config.workdir; returns the statistics (also in stats.json)."""
    validate_data_config(config)
    if not config.workdir:
        raise ConfigError("config key 'workdir': expected the output directory (fwm data --workdir DIR), got ''")
    workdir = os.path.abspath(config.workdir)
    c = config
    world = _make_world(c)
    world_dir = os.path.join(workdir, "world")
    stages: dict[str, str] = {}
    results: dict[str, Any] = {}

    # -- world
    world_fp = _fingerprint("world", c.world.kind, c.world.seed, c.world[c.world.kind].to_dict(), c.splits.to_dict())

    def run_world() -> tuple[dict[str, Any], list[str]]:
        world.write(world_dir)
        split_paths = []
        for split, tasks in world.splits.items():
            split_paths.append(os.path.join("splits", f"{split}.jsonl"))
            write_tasks(os.path.join(world_dir, split_paths[-1]), tasks)
        outputs = split_paths + ["meta.json"] + ([os.path.join("bm25", "fwm_index.json")] if world.documents else [])
        return ({"kind": world.kind, "entities": len(world.entity_names), "documents": len(world.documents),
                 "tasks": {split: len(tasks) for split, tasks in world.splits.items()}}, outputs)

    results["world"], skipped = _Stage("world", world_dir, world_fp).execute(run_world)
    stages["world"] = "skipped" if skipped else "ran"

    # -- collect
    spec = _env_spec(c, world_dir)
    policies = _policies(c, world.moves)
    trajectories_dir = os.path.join(workdir, "trajectories")
    collect_fp = _fingerprint("collect", world_fp, c.env.to_dict(), c.policies.to_dict(), c.collect.to_dict(), c.seed)

    def run_collect() -> tuple[dict[str, Any], list[str]]:
        job = collect_lib.CollectJob(spec, policies, c.seed)
        stats: dict[str, Any] = {}
        for split in ("mid_train", "sft"):
            items = collect_lib.episode_items(split, world.splits[split], c.collect.policies,
                                              c.collect.episodes_per_task)
            rows = collect_lib.map_chunks(collect_lib.collect_chunk, job, items, workers=c.workers,
                                          chunk_size=c.chunk_size, desc=f"collect {split}", unit="episode",
                                          progress=c.progress)
            write_jsonl(os.path.join(trajectories_dir, f"{split}.jsonl"), rows)
            stats[split] = _collect_stats(rows)
        return stats, ["mid_train.jsonl", "sft.jsonl"]

    results["collect"], skipped = _Stage("collect", trajectories_dir, collect_fp).execute(run_collect)
    stages["collect"] = "skipped" if skipped else "ran"

    # -- blocks
    blocks_dir = os.path.join(workdir, "blocks")
    teacher = c.blocks.teacher.to_dict() if c.blocks.writer == "teacher" else {}
    blocks_fp = _fingerprint("blocks", collect_fp, c.blocks.writer, c.blocks.share, c.blocks.mc_k, teacher,
                             c.blocks.confidence, c.blocks.future_start, c.blocks.roadmap, c.corpora.mid_train_policies,
                             c.corpora.sft_policies)
    if teacher and not teacher["cache_dir"]:  # paid replies survive a crashed or repeated run
        teacher["cache_dir"] = os.path.join(workdir, "teacher_cache")
    mid_rows = [r for r in _rows(os.path.join(trajectories_dir, "mid_train.jsonl"))
                if r["policy"] in c.corpora.mid_train_policies]
    sft_rows = corpora_lib.select_sft_trajectories(_rows(os.path.join(trajectories_dir, "sft.jsonl")),
                                                   c.corpora.sft_policies)

    def run_blocks() -> tuple[dict[str, Any], list[str]]:
        items = [blocks_lib.BlockItem(row, corpora_lib.wm_steps(row["id"], len(row["actions"]), c.blocks.share, c.seed))
                 for row in mid_rows]
        items += [blocks_lib.BlockItem(row, tuple(range(len(row["actions"])))) for row in sft_rows]
        items = [item for item in items if item.steps]
        job = blocks_lib.BlockJob(spec, policies, c.blocks.writer, teacher, c.seed, c.blocks.mc_k, world.entity_names,
                                  conditioning=c.blocks.confidence, future_start=c.blocks.future_start,
                                  entity_types=world.entity_types, roadmap=c.blocks.roadmap)
        per_item = collect_lib.map_chunks(blocks_lib.annotate_chunk, job, items, workers=c.workers,
                                          chunk_size=max(1, c.chunk_size // 4), desc="blocks", unit="trajectory",
                                          progress=c.progress)
        rows = []
        for item, annotated in zip(items, per_item):
            record = collect_lib.record_from_row(item.trajectory, f"trajectory {item.trajectory['id']}")
            erring = off_gold_steps(world.moves, record.task, record.actions)
            rows += [{**row, "erring": erring[row["step"]]} for row in annotated.rows]
        write_jsonl(os.path.join(blocks_dir, "blocks.jsonl"), rows)
        outcomes = {item.trajectory["id"]: item.trajectory["score"] for item in items}
        stats = _block_stats(rows, outcomes, c.blocks.mc_k, c.blocks.confidence)
        if c.blocks.writer == "teacher":  # every chunk had its own writer (in its own process): sum them
            stats["teacher"] = blocks_lib.sum_counters([TeacherStats().as_dict()]
                                                       + [annotated.writer_counters for annotated in per_item])
        return stats, ["blocks.jsonl"]

    results["blocks"], skipped = _Stage("blocks", blocks_dir, blocks_fp).execute(run_blocks)
    stages["blocks"] = "skipped" if skipped else "ran"

    # -- tokenizer: trained on the text of every corpus before the corpora are cut to token budgets
    # in the fingerprint only when off, so that the default leaves existing data's fingerprints as they were
    rl_documents_part = () if c.corpora.pretrain_rl_documents else (("pretrain_rl_documents", False),)
    held_out_splits = [split for split, keep in (("eval", c.corpora.pretrain_eval_documents),
                                                 ("rl", c.corpora.pretrain_rl_documents)) if not keep]
    held_out_documents = {hop["subject_id"] for split in held_out_splits for task in world.splits[split]
                          for hop in task.metadata.get("hops", ())} if world.documents else set()
    pretrain = corpora_lib.pretrain_records([doc for doc in world.documents if doc["id"] not in held_out_documents],
                                            world.facts, c.corpora.pretrain_phrasings, c.seed) \
        if world.documents else []
    tokenizer_path = os.path.abspath(c.tokenizer.path) if c.tokenizer.path else os.path.join(workdir, "tokenizer.model")
    tokenizer_fp = _fingerprint("tokenizer", blocks_fp, c.tokenizer.to_dict(), c.corpora.pretrain_phrasings,
                                c.corpora.pretrain_eval_documents, c.corpora.think, c.seed,
                                _file_digest(c.tokenizer.path), *rl_documents_part)

    def run_tokenizer() -> tuple[dict[str, Any], list[str]]:
        if c.tokenizer.path:  # given: nothing to train
            tokenizer = load_tokenizer(tokenizer_path)
            return {"path": tokenizer_path, "trained": False, "vocab_size": tokenizer.vocab_size}, []
        block_map = _block_map(blocks_dir)
        texts = corpora_lib.tokenizer_texts(mid_rows, sft_rows, block_map, pretrain, c.corpora.think)
        if len(texts) > c.tokenizer.max_texts:
            keep = np.random.default_rng(collect_lib.derive_seed(c.seed, "tokenizer")).permutation(len(texts))
            texts = [texts[i] for i in sorted(keep[:c.tokenizer.max_texts])]
        tokenizer = train_sentencepiece(texts, tokenizer_path, c.tokenizer.vocab_size, model_type=c.tokenizer.model_type,
                                        character_coverage=c.tokenizer.character_coverage, seed=c.seed)
        return ({"path": tokenizer_path, "trained": True, "vocab_size": tokenizer.vocab_size, "texts": len(texts),
                 "characters": sum(len(text) for text in texts)}, [os.path.basename(tokenizer_path)])

    results["tokenizer"], skipped = _Stage("tokenizer", workdir, tokenizer_fp, "tokenizer.stage.json").execute(
        run_tokenizer)
    stages["tokenizer"] = "skipped" if skipped else "ran"

    # -- corpora
    corpora_dir = os.path.join(workdir, "corpora")
    corpora_fp = _fingerprint("corpora", tokenizer_fp, c.corpora.to_dict(), c.seed)

    def run_corpora() -> tuple[dict[str, Any], list[str]]:
        block_map = _block_map(blocks_dir)
        extra: dict[str, tuple[str, Sequence[Mapping[str, Any]]]] = {
            "rl_tasks": ("rl", [task.to_dict() for task in read_tasks(os.path.join(world_dir, "splits", "rl.jsonl"))]),
            "eval_tasks": ("rl", [task.to_dict() for task in read_tasks(os.path.join(world_dir, "splits", "eval.jsonl"))]),
        }
        if pretrain:
            extra["pretrain"] = ("lm", pretrain)
        options = corpora_lib.CorpusOptions(seed=c.seed, eval_fraction=c.corpora.eval_fraction,
                                            sft_max_tokens=c.corpora.sft_max_tokens, tokenizer_path=tokenizer_path,
                                            think=c.corpora.think)
        summary = corpora_lib.build_corpora(corpora_dir, mid_rows, sft_rows, block_map, options, extra)
        outputs = ["manifest.json"] + [entry["path"] for entry in summary["corpora"].values()]
        outputs += [entry["eval_path"] for entry in summary["corpora"].values() if "eval_path" in entry]
        return summary, outputs

    results["corpora"], skipped = _Stage("corpora", corpora_dir, corpora_fp).execute(run_corpora)
    stages["corpora"] = "skipped" if skipped else "ran"

    # env: the settings the trajectories were collected with, so `fwm eval` on this workdir acts in the same env
    stats = {"workdir": workdir, "stages": stages, "env": c.env.to_dict(), **results}
    write_json(os.path.join(workdir, "stats.json"), stats)
    return stats


# ---------------------------------------------------------------------------------------------- report
def _ordered(mapping: Mapping[str, Any], order: Sequence[str]) -> list[tuple[str, Any]]:
    """Items in `order` first, then the rest by name (stage markers store keys sorted)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(mapping.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def format_stats(stats: Mapping[str, Any]) -> str:
    """The statistics as the text `fwm data` prints."""
    world, collected, blocks, corpora = stats["world"], stats["collect"], stats["blocks"], stats["corpora"]
    lines = [f"fwm data: {stats['workdir']}",
             "stages: " + ", ".join(f"{name} {state}" for name, state in stats["stages"].items()),
             f"world: {world['kind']}, {world['entities']} entities, {world['documents']} documents; tasks "
             + ", ".join(f"{split} {n}" for split, n in _ordered(world["tasks"], _SPLITS))]
    for split in ("mid_train", "sft"):
        for policy, s in _ordered(collected[split], POLICY_NAMES):
            lines.append(f"trajectories {split:9s} {policy:6s}: {s['trajectories']:6d} trajectories "
                         f"{s['steps']:7d} steps  success {100 * s['success_rate']:5.1f}%  "
                         f"mean turns {s['mean_turns']:.2f}  out of turns {s['turn_budget_endings']}")
    lines.append(f"blocks: {blocks['blocks_written']} written of {blocks['annotated_steps']} annotated steps, "
                 f"{blocks['rejections']} rejected ({blocks['spoiler_rejections']} for spoilers); Monte Carlo "
                 f"K={blocks['mc_k']} ({blocks['continuations']} continuations), confidence "
                 f"{'Q(s_t, a_t): after a_t' if blocks['confidence_kind'] == 'q' else 'V(s_t): before a_t'}")
    if "q_vs_outcome" in blocks:
        q = blocks["q_vs_outcome"]

        def shown(value: float | None, form: str) -> str:
            return "n/a" if value is None else format(value, form)

        lines.append(f"  q on {q['steps']} mid-training steps: mean {shown(q['mean_q'], '.1f')} vs success "
                     f"{100 * q['success_rate']:.1f}%; erring steps ({q['erring_steps']}) {shown(q['mean_q_erring'], '.1f')}"
                     f" vs other steps {shown(q['mean_q_other'], '.1f')}; AUROC {shown(q['auroc'], '.3f')}, "
                     f"Brier {q['brier']:.3f}")
    if "teacher" in blocks:
        t = blocks["teacher"]
        lines.append(f"  teacher: {t['blocks']} blocks, {t['cache_hits']} from the cache ({t['corrupt_cache_entries']} "
                     f"corrupt entries); {t['requests']} requests, {t['retries']} retries, {t['http_failures']} "
                     f"HTTP failures; {t['malformed_replies']} malformed and {t['spoiler_replies']} leaking "
                     f"replies; {t['rejections']} steps rejected; {t['ungrounded_keywords']} ungrounded keywords "
                     f"dropped, {t['ungrounded_replies']} replies without a grounded keyword")
    lines.append(f"corpora: steps mid-training {corpora['mid_train_steps']} ({corpora['mid_train_trajectories']} "
                 f"trajectories, {corpora['wm_blocks_inserted']} blocks in WM-AMT), SFT {corpora['sft_steps']} "
                 f"({corpora['sft_trajectories']} trajectories); skipped {corpora['skipped_trajectories']}")
    tokenizer = stats["tokenizer"]
    lines.append(f"tokenizer: {tokenizer['path']} ({'trained on ' + str(tokenizer['texts']) + ' texts, ' if tokenizer['trained'] else 'given, '}"
                 f"{tokenizer['vocab_size']} pieces); tokens counted as {corpora['token_count']}")
    for name, entry in _ordered(corpora["corpora"], _CORPORA):
        roles = f" trained_roles={','.join(entry['trained_roles'])}" if "trained_roles" in entry else ""
        sft = (f"; history cut in {entry['history_cut']} ({100 * entry['history_cut'] / max(entry['records'], 1):.1f}%), "
               f"{entry['over_max_tokens']} over {corpora['sft_max_tokens']} tokens" if entry["stage"] == "sft" else "")
        lines.append(f"  {name:16s} {entry['stage']:3s} {entry['records']:7d} records (+{entry['eval_records']} eval) "
                     f"{entry['tokens']:9d} tokens, {entry['trained_tokens']:9d} trained, "
                     f"{entry['bytes'] / 1e6:7.2f} MB{roles}{sft}")
    seconds = {name: stats[name].get("seconds") for name in STAGE_NAMES}
    lines.append("seconds (when run): " + ", ".join(f"{name} {s}" for name, s in seconds.items()))
    return "\n".join(lines)
