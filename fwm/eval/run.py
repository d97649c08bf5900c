"""`fwm eval`: a checkpoint's greedy (and k-sample) episodes on held-out tasks, with metrics, JSON and markdown.

  checkpoint (+ its tokenizer) --ModelPolicy--> fwm.rollout.episodes.run_episodes on the tasks of a
  `fwm data` workdir (corpora/eval_tasks.jsonl; env rebuilt from its world/: the BM25 index for the
  knowledge world, the sandboxed python tool for arithmetic) --> fwm.eval.metrics --> WORKDIR/
Real benchmarks: tasks_file in a fwm.envs.readers format (tasks_format search_r1 | gsm8k | math) and, for
search, env.retriever_url (a Search-R1 `POST /retrieve` server).

Writes into config.workdir: eval.json (every number, the config and what was evaluated), eval.md (the
tables, fwm.eval.report), tb/ (the numbers as TensorBoard scalars at the checkpoint's training step),
episodes_greedy.jsonl / episodes_sampled.jsonl (every step: prompt and response ids, span ids, log-probs,
q_t, keywords, action, observation; for calibration and RL analyses).
Beside the scores: calibration of q, keyword grounding, foresight precision/recall, planning horizon
(fwm.eval.foresight), recovery rate (fwm.eval.metrics), selected@k and a risk-coverage curve.

Prompts are built as the SFT corpora build them (schema.render_prompt, BOS first) and must leave
sampling.max_new_tokens of the model's max_seq_len free: a longer prompt loses its oldest history
first (render_prompt's budget), then tokens from its left (counted as truncated_prompts).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from fwm.configlib import ConfigError
from fwm.envs import readers
from fwm.envs.base import Task, read_tasks
from fwm.envs.jsonl import write_json, write_jsonl
from fwm.envs.retrievers import HTTPRetriever, Retriever
from fwm.envs.scoring import QA_METRICS, exact_match, f1
from fwm.eval import expected_q, foresight, metrics, report
from fwm.eval.config import validate_eval_config
from fwm.files import DataFormatError, atomic_open, read_json
from fwm.mesh import make_mesh
from fwm.model import checkpoint as checkpoint_lib
from fwm.rollout.envs import EnvPool
from fwm.rollout.episodes import Episode, ModelPolicy, PromptOptions, episode_slots, run_episodes
from fwm.rollout.sampler import score_continuations
from fwm.tokenizer import load_tokenizer
from fwm.trajectories.collect import EnvSpec

CHECKPOINTS_SUBDIR = "checkpoints"  # a training workdir's step checkpoints (fwm/train/checkpoints.py)
DEFAULT_TOKENIZER = "tokenizer.model"  # where `fwm train` trains one (fwm/train/inputs.py)


def resolve_checkpoint(path: str) -> str:
    """A training workdir means its checkpoints/ root; anything else is passed to load_params as is."""
    nested = os.path.join(path, CHECKPOINTS_SUBDIR)
    return nested if os.path.isdir(nested) else path


def training_workdir(path: str) -> str:
    """The directory above `path` (or `path` itself) that holds checkpoints/; else `path`."""
    here = os.path.abspath(path)
    while True:
        if os.path.isdir(os.path.join(here, CHECKPOINTS_SUBDIR)):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return os.path.abspath(path)
        here = parent


def resolve_tokenizer(configured: str, checkpoint_path: str, meta: Mapping[str, Any]) -> str:
    """configured, else the meta's tokenizer (as saved, or by name in the training workdir), else
    TRAINING_WORKDIR/tokenizer.model. FileNotFoundError naming what was tried."""
    if configured:
        return configured
    workdir = training_workdir(checkpoint_path)
    saved = str(meta.get("tokenizer") or "")
    tried = [t for t in (saved, os.path.join(workdir, os.path.basename(saved)) if saved else "",
                         os.path.join(workdir, DEFAULT_TOKENIZER)) if t]
    for candidate in tried:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"no tokenizer for {checkpoint_path}: tried {tried}; set --config.tokenizer=PATH")


DEFAULT_MAX_TURNS, DEFAULT_TOPK = 8, 3


def turns_and_topk(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """env.max_turns and env.topk, each 0 replaced by the data workdir's own (the "env" of DATA_DIR/stats.json,
    which `fwm data` writes: what its trajectories were collected with), else DEFAULT_MAX_TURNS / DEFAULT_TOPK."""
    recorded: dict[str, Any] = {}
    stats_path = os.path.join(config.data_dir, "stats.json") if config.data_dir else ""
    if stats_path and os.path.exists(stats_path):
        try:
            recorded = read_json(stats_path).get("env") or {}
        except DataFormatError as e:
            raise ConfigError(f"config key 'data_dir': {e}") from e
    return (int(config.env.max_turns or recorded.get("max_turns") or DEFAULT_MAX_TURNS),
            int(config.env.topk or recorded.get("topk") or DEFAULT_TOPK))


def env_spec(config: ml_collections.ConfigDict) -> tuple[EnvSpec, Retriever | None]:
    """The env and, for search over a server, its retriever. With env.retriever_url: search over that
    Search-R1 server; else the data workdir's world (search over world/bm25 if it exists, else the python
    tool); without a data workdir, the tool the task format implies (search_r1: search, else python).
    Turns and passages per search: turns_and_topk."""
    e = config.env
    max_turns, topk = turns_and_topk(config)
    python = EnvSpec("python", max_turns=max_turns, timeout_s=e.timeout_s, memory_mb=e.memory_mb,
                     isolation=e.isolation)
    if e.retriever_url:  # index_dir only names the retriever here: EnvPool uses the one given
        return (EnvSpec("search", max_turns=max_turns, index_dir=e.retriever_url, topk=topk, metric=e.metric),
                HTTPRetriever(e.retriever_url, timeout_s=e.timeout_s))
    if config.data_dir:
        index_dir = os.path.join(config.data_dir, "world", "bm25")
        if os.path.isdir(index_dir):
            return EnvSpec("search", max_turns=max_turns, index_dir=index_dir, topk=topk, metric=e.metric), None
        if not os.path.isdir(os.path.join(config.data_dir, "world")):
            raise ConfigError(f"config key 'data_dir': {config.data_dir!r} has no world/ directory; expected a "
                              f"`fwm data` workdir")
        return python, None
    if config.tasks_format == "search_r1":
        raise ConfigError("config key 'env.retriever_url': search tasks without a data_dir need a retriever "
                          "server (a Search-R1 POST /retrieve URL)")
    return python, None


_READERS = {"fwm": read_tasks, "search_r1": readers.read_search_r1, "gsm8k": readers.read_gsm8k,
            "math": readers.read_math}


def load_tasks(config: ml_collections.ConfigDict) -> tuple[str, list[Task]]:
    """(path, the first max_tasks tasks) of tasks_file in tasks_format (default DATA_DIR/corpora/eval_tasks.jsonl)."""
    path = config.tasks_file or os.path.join(config.data_dir, "corpora", "eval_tasks.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'tasks_file': no task file at {path}")
    tasks = _READERS[config.tasks_format](path)
    return path, tasks[:config.max_tasks] if config.max_tasks else tasks


def constant_answers(tasks: Sequence[Task], score_metric: str, key: Callable[[Task], str]) -> dict[str, dict[str, Any]]:
    """Best constant answers per group of tasks (`key`), over all tasks, and their mean over groups ('average')."""
    score_fn = QA_METRICS.get(score_metric, exact_match)
    functions = {"score": score_fn, "exact_match": exact_match, "f1": f1}
    groups: dict[str, list[Task]] = {}
    for task in tasks:
        groups.setdefault(key(task), []).append(task)
    out = {name: metrics.constant_baselines(group, functions) for name, group in sorted(groups.items())}
    per_group = list(out.values())
    out[metrics.ALL] = metrics.constant_baselines(tasks, functions)
    out[metrics.AVERAGE] = {name: {"answer": None, "value": sum(g[name]["value"] for g in per_group) / len(per_group)}
                            for name in functions} if per_group else {}
    return out


def _results_of(episodes: Sequence[Episode], k: int | None) -> dict[str, Any]:
    if k is None:
        summary = metrics.summarize
    else:
        summary = lambda group: {**metrics.summarize(group), **metrics.mean_and_pass_at_k(group, k),  # noqa: E731
                                 f"selected@{k}": foresight.selected_at_k(group)}
    out = {"by_source": metrics.by_data_source(episodes, summary), "gold_chain": metrics.gold_chain_following(episodes),
           "calibration": foresight.q_calibration(episodes), "keyword_grounding": foresight.keyword_grounding(episodes),
           "foresight": foresight.foresight(episodes), "planning_horizon": foresight.planning_horizon(episodes),
           "recovery": metrics.recovery(episodes), "risk_coverage": foresight.risk_coverage(episodes)}
    if any(metrics.num_hops(e.slot.task) is not None for e in episodes):
        out["by_hops"] = metrics.by_hops(episodes, summary)
    if k is not None:
        out["k"] = k
    return out


def _score_expected_q(config: ml_collections.ConfigDict, cfg: Any, params: Any, mesh: Any, tokenizer: Any,
                      prefixes: Sequence[Sequence[int]]) -> tuple[list[float | None], list[float | None]]:
    """(E[q], grid mass) per prefix up to <confidence> (fwm.eval.expected_q); None where it does not fit."""
    values = [int(v) for v in config.foresight.expected_q_values]
    started = time.monotonic()
    value_logp_NxV = score_continuations(cfg, params, prefixes, expected_q.value_token_ids(tokenizer, values),
                                         prompts_per_call=int(config.foresight.expected_q_rows), mesh=mesh)
    logging.info("E[q]: %d steps x %d values scored in %.1f s", len(prefixes), len(values), time.monotonic() - started)
    scored = ~np.isnan(value_logp_NxV).any(axis=1)
    expected_N, mass_N = expected_q.expected_from_logprobs(np.where(scored[:, None], value_logp_NxV, 0.0), values)
    return ([float(q) if ok else None for q, ok in zip(expected_N, scored)],
            [float(m) if ok else None for m, ok in zip(mass_N, scored)])


def _expected_q(config: ml_collections.ConfigDict, cfg: Any, params: Any, mesh: Any, tokenizer: Any,
                episodes: Sequence[Episode]) -> dict[str, Any]:
    """Calibration of E[q_t] (fwm.eval.expected_q) over every greedy step with a <confidence> tag and over each
    episode's last such step, with the grid's mean probability mass."""
    open_id = tokenizer.tag_ids[expected_q.OPEN_TAG]
    located = [(i, expected_q.confidence_prefix(step.prompt_ids, step.response_ids, open_id))
               for i, e in enumerate(episodes) for step in e.steps]
    located = [(i, prefix) for i, prefix in located if prefix is not None]
    qs, masses = _score_expected_q(config, cfg, params, mesh, tokenizer, [prefix for _, prefix in located])
    steps = [(i, q, m) for (i, _), q, m in zip(located, qs, masses) if q is not None]
    last: dict[int, float] = {}
    for i, q, _ in steps:  # in step order: the last one written wins
        last[i] = q
    total_steps = sum(len(e.steps) for e in episodes)
    return {"values": [int(v) for v in config.foresight.expected_q_values],
            "mean_mass": float(np.mean([m for *_, m in steps])) if steps else None,
            "steps": foresight.calibration([q for _, q, _ in steps], [episodes[i].success for i, *_ in steps],
                                           total_steps - len(steps)),
            "last_step": foresight.calibration(list(last.values()), [episodes[i].success for i in last],
                                               len(episodes) - len(last))}


def _expected_q_sampled(config: ml_collections.ConfigDict, cfg: Any, params: Any, mesh: Any, tokenizer: Any,
                        episodes: Sequence[Episode], k: int) -> dict[str, Any]:
    """q at test time from the model's belief: E[q] of each sampled episode's last step (the step whose written
    q selected@k reads), its calibration, and selected@k by it (best-of-k by E[q] instead of the written q,
    which a model that writes 100 everywhere makes a uniform pick)."""
    open_id = tokenizer.tag_ids[expected_q.OPEN_TAG]
    last = [(i, expected_q.confidence_prefix(e.steps[-1].prompt_ids, e.steps[-1].response_ids, open_id))
            for i, e in enumerate(episodes) if e.steps]
    last = [(i, prefix) for i, prefix in last if prefix is not None]
    qs, masses = _score_expected_q(config, cfg, params, mesh, tokenizer, [prefix for _, prefix in last])
    by_episode = {id(episodes[i]): q for (i, _), q in zip(last, qs) if q is not None}
    known = [(q, episodes[i].success) for (i, _), q in zip(last, qs) if q is not None]
    return {"values": [int(v) for v in config.foresight.expected_q_values],
            "mean_mass": float(np.mean([m for m in masses if m is not None])) if known else None,
            "last_step": foresight.calibration([q for q, _ in known], [y for _, y in known],
                                               len(episodes) - len(known)),
            f"selected@{k}": foresight.selected_at_k(episodes, lambda e: by_episode.get(id(e)))}


def tensorboard_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """Every number of the greedy and sampled results as TensorBoard tags 'eval/MODE/a/b' (nested dict keys
    joined by '/', '@' spelled '_at_'); lists (reliability bins, rates by offset, risk-coverage) and None
    values are left to eval.json."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}/{str(key).replace('@', '_at_').replace(' ', '_')}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for mode in ("greedy", "sampled"):
        if mode in results:
            walk(f"eval/{mode}", results[mode])
    return out


def write_tensorboard(logdir: str, scalars: Mapping[str, float], step: int) -> None:
    """The scalars as TensorBoard events in logdir (tensorboardX: no TensorFlow needed), at `step`."""
    from tensorboardX import SummaryWriter  # lazy: only `fwm eval` pays for it

    writer = SummaryWriter(logdir)
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Evaluates config.checkpoint into config.workdir; returns the results (also in eval.json)."""
    validate_eval_config(config)
    if not config.workdir:
        raise ConfigError("config key 'workdir': expected the output directory (fwm eval --workdir DIR), got ''")
    os.makedirs(config.workdir, exist_ok=True)
    mesh = make_mesh(config.mesh.to_dict())
    checkpoint_path = resolve_checkpoint(config.checkpoint)
    meta = checkpoint_lib.load_meta(checkpoint_path)
    cfg, params = checkpoint_lib.load_params(checkpoint_path, mesh)
    tokenizer_path = resolve_tokenizer(config.tokenizer, config.checkpoint, meta)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
    s = config.sampling
    room = cfg.max_seq_len - s.max_new_tokens
    if room < 2:
        raise ConfigError(f"config key 'sampling.max_new_tokens': {s.max_new_tokens} leaves no room for a prompt in "
                          f"the model's max_seq_len={cfg.max_seq_len}")
    options = PromptOptions(variant=config.prompt.variant, budget_tokens=config.prompt.budget_tokens or room - 1,
                            max_prompt_tokens=room, strict_actions=config.prompt.strict_actions)
    tasks_file, tasks = load_tasks(config)
    spec, retriever = env_spec(config)
    logging.info("evaluating %s (%s) on %d tasks of %s with the %s tool", checkpoint_path, cfg, len(tasks), tasks_file,
                 spec.tool)
    score_metric = config.env.metric if spec.tool == "search" else "correct (math-verify)"
    results: dict[str, Any] = {
        "checkpoint": os.path.abspath(checkpoint_path), "tokenizer": tokenizer_path, "tasks_file": tasks_file,
        "num_tasks": len(tasks), "model": cfg.to_dict(), "config": json.loads(config.to_json()),
        "env": {"tool": spec.tool, "max_turns": spec.max_turns, "topk": spec.topk}, "score_metric": score_metric,
        "prompt": {"variant": options.variant, "budget_tokens": options.budget_tokens,
                   "max_prompt_tokens": options.max_prompt_tokens},
        "sampling": s.to_dict(), "constant_answer": constant_answers(tasks, config.env.metric, metrics.source_label),
    }
    if any(metrics.num_hops(task) is not None for task in tasks):
        results["constant_answer_by_hops"] = constant_answers(tasks, config.env.metric, metrics.hops_label)
    common = dict(max_new_tokens=s.max_new_tokens, stop_ids=(tokenizer.eos_id,), mesh=mesh, max_batch=s.max_batch)
    with EnvPool(spec, retriever=retriever, threads=config.env.threads) as pool:
        if s.greedy:
            policy = ModelPolicy(cfg, params, temperature=0.0, **common)
            episodes = run_episodes(episode_slots(tasks, 1, config.seed, "eval/greedy"), policy, pool, tokenizer,
                                    options, progress=config.progress, desc="eval greedy")
            write_jsonl(os.path.join(config.workdir, "episodes_greedy.jsonl"), (e.to_dict() for e in episodes))
            results["greedy"] = _results_of(episodes, None)
            if config.foresight.expected_q:
                results["greedy"]["expected_q"] = _expected_q(config, cfg, params, mesh, tokenizer, episodes)
        if s.k:
            policy = ModelPolicy(cfg, params, temperature=s.temperature, top_k=s.top_k or None,
                                 top_p=s.top_p if s.top_p < 1 else None, **common)
            episodes = run_episodes(episode_slots(tasks, s.k, config.seed, "eval/sampled"), policy, pool, tokenizer,
                                    options, progress=config.progress, desc=f"eval {s.k} samples")
            write_jsonl(os.path.join(config.workdir, "episodes_sampled.jsonl"), (e.to_dict() for e in episodes))
            results["sampled"] = _results_of(episodes, s.k)
            if config.foresight.expected_q:
                results["sampled"]["expected_q"] = _expected_q_sampled(config, cfg, params, mesh, tokenizer, episodes,
                                                                       s.k)
    write_json(os.path.join(config.workdir, "eval.json"), results)
    write_tensorboard(os.path.join(config.workdir, "tb"), tensorboard_scalars(results), int(meta.get("step", 0)))
    page = report.markdown(results)
    with atomic_open(os.path.join(config.workdir, "eval.md"), "w") as f:
        f.write(page)
    return results
