"""Teacher-forced action exact match on SFT samples: a cheap proxy of whether an SFT'd model reads.

  python experiments/action_match.py --checkpoint WORKDIR/checkpoints --tokenizer WORKDIR/tokenizer.model \
      --samples DATA/corpora/sft_plain_eval.jsonl --tasks DATA/world/splits/sft.jsonl [--seq_len 512]

For each one-step SFT sample (prompt + gold response, tokenized as fwm.data.features.sft_example does
for training), one forward pass. Two scores per step (the gold history is in the prompt, so each step
is judged on its own):
  response  the argmax at every response token (block, <think>, <action>) is the gold token: the
            step greedy decoding would write, as long as it writes the gold text (the closest
            teacher-forced stand-in for a greedy step; the <think> already names the query or answer)
  action    the argmax at every token of `<action>...</action>` is right given the gold text before
            it (easier: the gold <think> has already named the entity, so this is mostly a copy) Steps are grouped by what they ask of the model, from the sample id
(`sft/POLICY/TASK/EPISODE/STEP/VARIANT`) and the task's hop count:
  search_subject  step 1: search the question's subject (copy from the question)
  search_linked   a later search: the entity the last document links by the asked relation (read it)
  answer          the answer step (read the last document)
Prints (and with --out writes as JSON) both exact-match shares of each group, overall and by hops.
Only oracle samples are exact in this sense (a noisy trajectory's steps may be detours), so the
groups assume the sample's steps follow the gold chain: step k < hops searches hop k's subject.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fwm.data import features
from fwm.envs.base import read_tasks
from fwm.envs.jsonl import read_jsonl
from fwm.model import checkpoint, transformer
from fwm.tokenizer import load_tokenizer


def step_kind(step: int, num_hops: int) -> str:
    """What step `step` (0-based) of a gold-chain episode asks of the model."""
    if step >= num_hops:
        return "answer"
    return "search_subject" if step == 0 else "search_linked"


def target_masks(example: dict[str, np.ndarray], response: str, tokenizer: Any) -> dict[str, np.ndarray]:
    """Bool masks over the example's target positions (input-aligned, as sft_example's `targets`):
    'response' the response's tokens (not the EOS), 'action' those of its `<action>...</action>`."""
    start = response.index("<action>")
    end = response.index("</action>") + len("</action>")
    ids, offsets = tokenizer.encode_with_offsets(response)
    in_action = np.asarray([start <= a and b <= end for a, b in offsets], bool)
    trained = np.flatnonzero(example["loss_weights"] > 0)[:len(ids)]  # response tokens, in order (EOS dropped)
    masks = {"response": np.zeros(len(example["targets"]), bool), "action": np.zeros(len(example["targets"]), bool)}
    masks["response"][trained] = True
    masks["action"][trained] = in_action[:len(trained)]
    return masks


def evaluate(params: Any, cfg: transformer.ModelConfig, tokenizer: Any, records: Sequence[dict[str, Any]],
             hops_by_task: dict[str, int], seq_len: int, batch_size: int = 16) -> dict[str, Any]:
    """Exact-match counts per step kind and hop count (see the module docstring)."""
    logits_fn = jax.jit(lambda p, t, s: jnp.argmax(transformer.forward(cfg, p, t, segment_ids_BxL=s), -1))
    rows = []
    for record in records:
        example = features.sft_example(record, tokenizer, seq_len=seq_len)
        _, _, task_id, _, step, _ = record["id"].split("/")
        rows.append((example, target_masks(example, record["response"], tokenizer),
                     step_kind(int(step), hops_by_task[task_id]), hops_by_task[task_id]))
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for i, (example, _, _, _) in enumerate(chunk):
            n = len(example["tokens"])
            tokens[i, :n], segments[i, :n] = example["tokens"], 1
        predicted = np.asarray(logits_fn(params, tokens, segments))
        for i, (example, masks, kind, hops) in enumerate(chunk):
            n = len(example["targets"])
            for score, mask in masks.items():
                right = bool(np.all(predicted[i, :n][mask] == example["targets"][mask]))
                for key in ("all", kind, f"{kind}/{hops}hop"):
                    counts[(key, score)][0] += right
                    counts[(key, score)][1] += 1
    result: dict[str, Any] = {}
    for (key, score), (c, n) in sorted(counts.items()):
        result.setdefault(key, {"n": n})[score] = round(c / n, 4)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training workdir's checkpoints/ (newest step) or a step")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--samples", required=True, nargs="+", help="SFT JSONL files")
    parser.add_argument("--tasks", required=True, nargs="+", help="task JSONL files holding the samples' tasks")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--limit", type=int, default=0, help="first N samples only (0: all)")
    parser.add_argument("--out", default="", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    hops_by_task = {task.id: len(task.metadata["hops"]) for path in args.tasks for task in read_tasks(path)}
    records = [row for path in args.samples for _, row in read_jsonl(path)]
    records = records[:args.limit] if args.limit else records
    cfg, params = checkpoint.load_params(args.checkpoint)
    result = evaluate(params, cfg, load_tokenizer(args.tokenizer), records, hops_by_task, args.seq_len)
    print(f"{'step kind':28s} {'response':>9s} {'action':>9s}")
    for key, value in result.items():
        print(f"{key:28s} {100 * value['response']:8.1f}% {100 * value['action']:8.1f}%  (n={value['n']})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "samples": args.samples, **result}, f,
                      indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
