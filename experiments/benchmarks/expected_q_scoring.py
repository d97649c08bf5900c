"""E[q] scoring: fwm.rollout.sampler.score_continuations (one prefill per step, its KV cache branched over the
confidence values) against scoring every (step, value) pair as its own full row (one forward pass each, what
fwm.eval.expected_q did before), side by side on the same random prompts; prints the seconds, the ratio and the
largest difference between the two log-probabilities.

    python experiments/benchmarks/expected_q_scoring.py [--steps=200 --values=11 --repeats=2]

The default shape is the synthetic study's 0.9M model (768 slots) with prompts of 150-700 tokens, as its
full-format steps are; values are one token and the closing tag, as 0, 10, ..., 100 are there.
"""
import time

import jax
import numpy as np
from absl import app, flags

from fwm.mesh import make_mesh
from fwm.model import transformer
from fwm.rl.step import make_token_logprobs
from fwm.rollout import sampler

flags.DEFINE_integer("steps", 200, "prompts (steps up to <confidence>) to score")
flags.DEFINE_integer("values", 11, "continuations per prompt (a value token and the closing tag)")
flags.DEFINE_integer("repeats", 2, "timed repeats (the first compiles)")
flags.DEFINE_integer("rows_per_call", 64, "rows per call: prompts for the branches, (prompt, value) rows for full")


def full_rows(token_logprobs, params, prompts, continuations, max_seq_len, rows_per_call):
    """log p(continuation | prompt), NxV, one whole forward row per pair (rows grouped by length, padded to a
    power of two)."""
    pairs = sorted(((n, v) for n in range(len(prompts)) for v in range(len(continuations))
                    if len(prompts[n]) + len(continuations[v]) - 1 <= max_seq_len), key=lambda p: len(prompts[p[0]]))
    out = np.full((len(prompts), len(continuations)), np.nan)
    for start in range(0, len(pairs), rows_per_call):
        chunk = pairs[start:start + rows_per_call]
        rows = [list(prompts[n]) + list(continuations[v]) for n, v in chunk]
        length = min(max_seq_len, 1 << max(0, max(len(r) for r in rows) - 2).bit_length())
        tokens, targets, segments = (np.zeros((rows_per_call, length), np.int32) for _ in range(3))
        for i, row in enumerate(rows):
            tokens[i, :len(row) - 1], targets[i, :len(row) - 1], segments[i, :len(row) - 1] = row[:-1], row[1:], 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
        logp = np.asarray(token_logprobs(params, {"tokens_BxL": tokens, "targets_BxL": targets,
                                                  "segment_ids_BxL": segments, "positions_BxL": positions}))
        for i, (n, v) in enumerate(chunk):
            end = len(rows[i]) - 1
            out[n, v] = logp[i, end - len(continuations[v]):end].sum()
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    cfg = transformer.ModelConfig(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                  head_dim=32, mlp_dim=384, max_seq_len=768)
    params = transformer.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, cfg.vocab_size, int(n))) for n in rng.integers(150, 700, f.steps)]
    continuations = [[int(t), 3] for t in rng.integers(4, cfg.vocab_size, f.values)]
    mesh = make_mesh()
    token_logprobs = make_token_logprobs(cfg, mesh)
    print(f"{f.steps} prompts of 150-700 tokens x {f.values} values, model {transformer.num_params(cfg):,} "
          f"parameters, {len(jax.devices())} device(s)")
    for repeat in range(f.repeats):
        start = time.perf_counter()
        full = full_rows(token_logprobs, params, prompts, continuations, cfg.max_seq_len, f.rows_per_call)
        full_s = time.perf_counter() - start
        start = time.perf_counter()
        branched = sampler.score_continuations(cfg, params, prompts, continuations, prompts_per_call=f.rows_per_call,
                                               mesh=mesh)
        branched_s = time.perf_counter() - start
        print(f"repeat {repeat}{' (compiles)' if repeat == 0 else ''}: full rows {full_s:.1f} s, branched cache "
              f"{branched_s:.1f} s, {full_s / branched_s:.1f}x; max |difference| "
              f"{np.nanmax(np.abs(full - branched)):.1e}", flush=True)


if __name__ == "__main__":
    app.run(main)
