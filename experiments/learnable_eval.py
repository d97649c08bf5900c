"""Greedy episodes of a trained checkpoint on a split of an `fwm data` search workdir: success overall and
by hops, the constant answer beside it, and where the episodes go wrong.

  python experiments/learnable_eval.py --checkpoint /tmp/fl_sft_plain/checkpoints \
      --tokenizer /tmp/fl_sft_plain/tokenizer.model --data /tmp/fwm_learnable --split eval --variant plain

Episodes run with the batched runner of fwm.rollout.episodes (greedy, one step per call for all
episodes, the BM25 index of DATA/world/bm25; `--topk` and `--max_turns` must match the data config:
1 and 6 for experiments/synthetic_learnable.py). Reported:
  success            exact-match success of the greedy episode (the env's score)
  constant_answer    the share of the split's tasks whose gold answer is the most common gold answer of
                     the SFT split (what a model that always gives that answer would score)
  top_answer_share   the share of the model's answers that are its own most common answer
  first_search_subject / second_search_linked   the first search is the question's subject / the second
                     search (2-hop tasks) is hop 2's subject, the entity read from the first document
  repeated_searches  the share of searches that repeat an earlier search of the same episode
This is a stop-gap until `fwm eval` lands; it reads the same runner.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from fwm.envs.base import read_tasks
from fwm.envs.scoring import normalize_answer
from fwm.model import checkpoint
from fwm.rollout.envs import EnvPool
from fwm.rollout.episodes import Episode, ModelPolicy, PromptOptions, episode_slots, run_episodes
from fwm.tokenizer import load_tokenizer
from fwm.trajectories.collect import EnvSpec


def summarize(episodes: Sequence[Episode], constant: str) -> dict[str, Any]:
    """The module docstring's numbers for finished episodes."""
    def share(values: Sequence[bool]) -> float | None:
        return round(float(np.mean(values)), 4) if len(values) else None

    answers = [step.action.argument for e in episodes for step in e.steps
               if step.action is not None and step.action.kind == "answer"]
    top = collections.Counter(normalize_answer(a) for a in answers).most_common(1)
    searches = [[step.action.argument for step in e.steps if step.action is not None and step.action.kind == "search"]
                for e in episodes]
    hops = [e.slot.task.metadata["hops"] for e in episodes]
    out: dict[str, Any] = {
        "episodes": len(episodes), "success": share([e.success for e in episodes]),
        "constant_answer": share([normalize_answer(constant) in {normalize_answer(a) for a in e.slot.task.answers}
                                  for e in episodes]),
        "constant_answer_text": constant,
        "answered": share([bool(e.steps) and e.steps[-1].action is not None and e.steps[-1].action.kind == "answer"
                           for e in episodes]),
        "top_answer_share": round(top[0][1] / len(answers), 4) if answers else None,
        "format_adherence": share([e.format_adherence for e in episodes]),
        "mean_turns": round(float(np.mean([len(e.steps) for e in episodes])), 3) if episodes else None,
        "first_search_subject": share([bool(s) and s[0] == h[0]["subject"] for s, h in zip(searches, hops)]),
        "second_search_linked": share([len(s) > 1 and s[1] == h[1]["subject"]
                                       for s, h in zip(searches, hops) if len(h) > 1]),
        "repeated_searches": share([query in s[:i] for s in searches for i, query in enumerate(s)]),
        "by_hops": {},
    }
    for n in sorted({len(h) for h in hops}):
        group = [e for e, h in zip(episodes, hops) if len(h) == n]
        out["by_hops"][str(n)] = {"episodes": len(group), "success": share([e.success for e in group])}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="the fwm data workdir (world/splits, world/bm25)")
    parser.add_argument("--split", default="eval", help="eval | sft | rl | mid_train (world/splits/SPLIT.jsonl)")
    parser.add_argument("--variant", default="plain", choices=("plain", "state", "full"))
    parser.add_argument("--limit", type=int, default=0, help="first N tasks only (0: all)")
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--max_turns", type=int, default=6)
    parser.add_argument("--max_new_tokens", type=int, default=0, help="0: 64 plain, 320 state/full")
    parser.add_argument("--batch", type=int, default=64, help="prompts per sampler call")
    parser.add_argument("--out", default="", help="also write the summary (and episodes) as JSON here")
    args = parser.parse_args(argv)

    tasks = read_tasks(os.path.join(args.data, "world", "splits", f"{args.split}.jsonl"))
    tasks = tasks[:args.limit] if args.limit else tasks
    sft_answers = collections.Counter(t.answers[0] for t in read_tasks(os.path.join(args.data, "world", "splits",
                                                                                    "sft.jsonl")))
    constant = sft_answers.most_common(1)[0][0]
    tokenizer = load_tokenizer(args.tokenizer)
    cfg, params = checkpoint.load_params(args.checkpoint)
    max_new = args.max_new_tokens or (64 if args.variant == "plain" else 320)
    stops = (tokenizer.tag_ids["</action>"], tokenizer.eos_id)
    policy = ModelPolicy(cfg, params, max_new_tokens=max_new, stop_ids=stops, max_batch=args.batch)
    options = PromptOptions(variant=args.variant, budget_tokens=cfg.max_seq_len - max_new,
                            max_prompt_tokens=cfg.max_seq_len - max_new)
    spec = EnvSpec("search", max_turns=args.max_turns, index_dir=os.path.join(args.data, "world", "bm25"),
                   topk=args.topk)
    with EnvPool(spec) as pool:
        episodes = run_episodes(episode_slots(tasks, 1, seed=0, tag="learnable_eval"), policy, pool, tokenizer,
                                options)
    summary = {"checkpoint": os.path.abspath(args.checkpoint), "split": args.split, "variant": args.variant,
               **summarize(episodes, constant)}
    print(json.dumps(summary, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({**summary, "examples": [e.to_dict() for e in episodes[:20]]}, f, indent=1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
