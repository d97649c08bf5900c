"""FC-RL (stage 3) from an SFT checkpoint on a `fwm data` world, and the paper's RL baselines and ablations.

  fwm train --config experiments/rl.py[:VARIANTS] --workdir /tmp/rl \
      --config.init.source=orbax:SFT_WORKDIR/checkpoints --config.tokenizer.path=SFT_WORKDIR/tokenizer.model \
      --config.data.train_files=DATA/corpora/rl_tasks.jsonl --config.rl.index_dir=DATA/world/bm25

Variants (comma-separated arg; the model's shapes come from the checkpoint):
  fc_rl      (default) omega 0.2, R_WM = R_calib + R_ground: WM-AMT + FE-SFT + FC-RL
  grpo       omega 0, no world-model terms: plain GRPO, every response token gets A_E (the "RL" rows)
  no_ground  R_WM = R_calib only (ablation "without R_ground")
  omega0.1 / omega0.5   the omega ablation (0.1 is also the paper's math setting)
  state      a State-SFT checkpoint: roadmap and keywords, no confidence (R_ground only, omega 0)
  plain      a plain-SFT checkpoint: no world-model span (plain GRPO)
  dapo       token-mean loss, clip-higher 0.28, no KL (DAPO's choices)
  math       the python tool and omega 0.1 (pass no rl.index_dir)
  learnable  the fresh-entity world of experiments/synthetic_learnable.py ($FWM_LEARNABLE_DATA, default
             /tmp/fwm_learnable: its rl_tasks and BM25 index, 1 passage per search, 6 turns) at a small
             model's learning rate (1e-4 against 1e-6 for billions of parameters), groups of 8 over 8 tasks
  runlocal   4 optimiser updates of a small rollout (smoke tests)
"""
import os

from fwm.config import default_config
from fwm.configlib import parse_variants

VARIANTS = ("fc_rl", "grpo", "no_ground", "omega0.1", "omega0.5", "state", "plain", "dapo", "math", "learnable",
            "runlocal")
LEARNABLE_DATA_ENV, LEARNABLE_DEFAULT_DATA = "FWM_LEARNABLE_DATA", "/tmp/fwm_learnable"


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/rl.py", default="fc_rl")
    config = default_config()
    config.stage = "rl"
    config.init.source = ""  # required: --config.init.source=orbax:SFT_WORKDIR/checkpoints (or hf:PATH)
    config.optim.update(dict(lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1.0))
    config.train.update(dict(steps=200, ckpt_every=10, keep_ckpts=3))
    # Search-R1's setting: groups of 5, k3 KL 0.001, clip 0.2, 4 turns.
    config.rl.update(dict(group_size=5, rollout_batch=40, max_turns=4, max_new_tokens=256, mini_batches=2,
                          temperature=1.0, omega=0.2, kl_beta=0.001))
    if "grpo" in variants or "plain" in variants:
        config.rl.update(dict(omega=0.0, calib_reward=False, ground_reward=False))
    if "plain" in variants:
        config.rl.variant = "plain"
    if "state" in variants:
        config.rl.update(dict(variant="state", omega=0.0, calib_reward=False))
    if "no_ground" in variants:
        config.rl.ground_reward = False
    if "omega0.1" in variants or "math" in variants:
        config.rl.omega = 0.1
    if "omega0.5" in variants:
        config.rl.omega = 0.5
    if "dapo" in variants:
        config.rl.update(dict(loss_aggregation="token_mean", clip_eps_high=0.28, kl_beta=0.0))
    if "math" in variants:
        config.rl.tool = "python"
    if "learnable" in variants:
        data = os.environ.get(LEARNABLE_DATA_ENV, LEARNABLE_DEFAULT_DATA)
        config.data.train_files = (os.path.join(data, "corpora", "rl_tasks.jsonl"),)
        config.optim.lr = 1e-4
        # A mini-batch of full-format steps is up to 128 rows x 768 tokens: 18.1 GiB of temporaries in one
        # rl_step (attention scores of every layer kept for the backward pass); 4 micro-batches cut that ~4x.
        config.optim.micro_batches = 4
        config.train.update(dict(steps=30, ckpt_every=5))
        # Packed rows and the sampler's own log-probs as pi_old (it matches the training forward to ~4e-7
        # nats/token in float32, measured as sampler_logprob_gap): ~half the update time of one sample per
        # row with a log-prob pass per mini-batch.
        config.rl.update(dict(index_dir=os.path.join(data, "world", "bm25"), topk=1, max_turns=6, group_size=8,
                              rollout_batch=64, mini_batches=4, pack=True, old_logprobs="sampler"))
    if "runlocal" in variants:
        config.train.update(dict(steps=4, ckpt_every=1))
        config.rl.update(dict(group_size=2, rollout_batch=4, max_turns=2, max_new_tokens=32, mini_batches=2))
    return config
