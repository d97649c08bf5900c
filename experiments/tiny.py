"""Tiny offline run: a 2-layer model on the invented-world corpus of experiments/data/tiny/.

40 steps take well under a minute on 2 CPU cores; the tokenizer (SentencePiece, up to 512
pieces) is trained into the workdir on first use.

  fwm train --config experiments/tiny.py --workdir /tmp/tiny             # stage 0: pretrain
  fwm train --config experiments/tiny.py:sft --workdir /tmp/tiny_sft     # SFT on agent-format samples
  fwm train --config experiments/tiny.py:pretrain,runlocal ...           # 8 steps, for smoke tests
Variants (comma-separated arg): pretrain | mid_train | sft, and runlocal (shrink to a smoke test).
"""
import os

from fwm.config import default_config
from fwm.configlib import parse_variants

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny")
VARIANTS = ("pretrain", "mid_train", "sft", "runlocal")


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/tiny.py", default="pretrain")
    config = default_config()
    config.stage = "sft" if "sft" in variants else "mid_train" if "mid_train" in variants else "pretrain"
    kind = "sft" if config.stage == "sft" else "lm"
    config.data.train_files = (os.path.join(DATA, f"{kind}_train.jsonl"),)
    config.data.eval_files = (os.path.join(DATA, f"{kind}_eval.jsonl"),)
    config.data.seq_len = 64 if kind == "lm" else 160  # SFT samples are 138-152 tokens: none truncated
    config.data.batch_size = 8

    config.tokenizer.train.vocab_size = 512
    config.model.update(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=172,
                             max_seq_len=256))

    config.optim.lr = 3e-3
    config.optim.warmup_steps = 5
    config.optim.weight_decay = 0.01

    config.train.steps = 40
    config.train.log_every = 5
    config.train.ckpt_every = 20
    config.train.eval_every = 20
    config.train.keep_ckpts = 2
    if "runlocal" in variants:
        config.train.steps = 8
        config.train.ckpt_every = config.train.eval_every = 4
        config.train.log_every = 1
    return config
