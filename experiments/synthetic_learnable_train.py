"""Training on the fresh-entity search world (experiments/synthetic_learnable.py): stage 0, then SFT.

Data: the `fwm data` workdir of synthetic_learnable.py, read from $FWM_LEARNABLE_DATA (default
/tmp/fwm_learnable). The measured recipe (README "Measured"; 0.92M parameters, 2 shared CPU cores):

  export FWM_LEARNABLE_DATA=/tmp/fwm_learnable
  fwm data --config experiments/synthetic_learnable.py --workdir $FWM_LEARNABLE_DATA                 # ~12 min
  fwm train --config experiments/synthetic_learnable_train.py:pretrain --workdir /tmp/fl_pre          # ~18 min
  fwm train --config experiments/synthetic_learnable_train.py --workdir /tmp/fl_sft \
      --config.init.source=orbax:/tmp/fl_pre/checkpoints --config.tokenizer.path=/tmp/fl_pre/tokenizer.model  # ~35 min
  fwm eval --config experiments/eval.py:plain --config.checkpoint=/tmp/fl_sft/checkpoints \
      --config.data_dir=$FWM_LEARNABLE_DATA --config.sampling.max_new_tokens=96 --workdir /tmp/fl_sft_eval      # ~3 min
  # FE-SFT (the full format, for FC-RL) continues from the plain SFT checkpoint:
  fwm train --config experiments/synthetic_learnable_train.py:full --workdir /tmp/fl_full \
      --config.init.source=orbax:/tmp/fl_sft/checkpoints --config.tokenizer.path=/tmp/fl_pre/tokenizer.model
  python experiments/action_match.py --checkpoint /tmp/fl_sft/checkpoints --tokenizer /tmp/fl_pre/tokenizer.model \
      --samples $FWM_LEARNABLE_DATA/corpora/sft_plain_eval.jsonl --tasks $FWM_LEARNABLE_DATA/world/splits/sft.jsonl

What made reading learnable: the oracle's think quotes the sentence it reads (`corpora.think=evidence`,
fwm.trajectories.corpora.think_text), so the answer or next search is copied after the model restates the
asked relation, and seq_len 512 keeps every plain sample whole. Held-out success went from 0.7 % (think
from the action alone, seq 384) to 60.7 % with the same model, data and stage 0.

Stage 0 (`:pretrain`) is LM training on the world's documents without the evaluation questions'
(corpora/pretrain.jsonl): each document repeats its fresh subject name ~5 times, which is where the
model learns to copy (in-context NLL of a name's later mentions fell from 2.6 to 0.28 nats/token
between steps 300 and 600, while SFT from scratch learned copying slowly). `:mid_plain` / `:mid_wm`
train on the mid-training trajectories without / with blocks (mid-training questions only). SFT from
scratch is the default variant without init.source.

Variants (comma-separated arg): plain (default) | state | full (which sft_* corpus), pretrain (stage 0),
mid_plain | mid_wm (mid-training), big (6 layers of 192, 2.8M parameters, instead of 4 of 128, 0.9M),
runlocal (a smoke test of a few steps). The tokenizer (SentencePiece, 1024 pieces) is trained into the
workdir from the training files on first use; chain stages with tokenizer.path. seq_len 512 (plain) /
768 (state, full) holds every sample untruncated (plain samples are 319 tokens at the median and up to 457
with the evidence think: at 384, 20 % lost the head of their prompt); samples are packed first-fit.
"""
import os

from fwm.config import default_config
from fwm.configlib import parse_variants

VARIANTS = ("plain", "state", "full", "pretrain", "mid_plain", "mid_wm", "big", "runlocal")
DATA_ENV = "FWM_LEARNABLE_DATA"
DEFAULT_DATA = "/tmp/fwm_learnable"


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/synthetic_learnable_train.py", default="plain")
    formats = variants & {"plain", "state", "full"}
    if len(formats) > 1:
        raise ValueError(f"experiments/synthetic_learnable_train.py: at most one of plain/state/full, got {formats}")
    corpora = os.path.join(os.environ.get(DATA_ENV, DEFAULT_DATA), "corpora")
    config = default_config()
    config.data.batch_size = 8
    if "pretrain" in variants:
        config.stage = "pretrain"
        config.data.train_files = (os.path.join(corpora, "pretrain.jsonl"),)
        config.data.eval_files = ()
        config.data.seq_len = 256
        config.data.batch_size = 16
    elif variants & {"mid_plain", "mid_wm"}:
        name = "mid_train_wm" if "mid_wm" in variants else "mid_train_plain"
        config.stage = "mid_train"
        config.data.train_files = (os.path.join(corpora, f"{name}.jsonl"),)
        config.data.eval_files = (os.path.join(corpora, f"{name}_eval.jsonl"),)
        config.data.seq_len = 512
    else:
        name = "sft_" + (formats.pop() if formats else "plain")
        config.stage = "sft"
        config.data.train_files = (os.path.join(corpora, f"{name}.jsonl"),)
        config.data.eval_files = (os.path.join(corpora, f"{name}_eval.jsonl"),)
        config.data.seq_len = 512 if name == "sft_plain" else 768
        config.data.pack = True  # first-fit packing: ~2 plain samples per row

    # 1024 pieces: a name word is ~3 pieces (with 512, nearly all go to bytes, tags and the
    # instruction's words, and a name word is ~5 pieces, close to letters).
    config.tokenizer.train.vocab_size = 1024
    config.model.update(dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                             mlp_dim=384, max_seq_len=768))
    if "big" in variants:
        config.model.update(dict(hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=32,
                                 mlp_dim=512))

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.01
    config.optim.min_lr_ratio = 0.05

    config.train.steps = 600 if config.stage == "pretrain" else 2500
    if variants & {"state", "full"}:  # measured as a continuation of the plain SFT checkpoint (docstring)
        config.train.steps = 800
        config.optim.update(dict(lr=1e-3, warmup_steps=50))
    config.train.log_every = 25
    config.train.ckpt_every = 250
    config.train.keep_ckpts = 20
    config.train.eval_every = 250
    config.train.eval_batches = 8
    if "runlocal" in variants:
        config.train.steps = 6
        config.train.ckpt_every = config.train.eval_every = 3
        config.train.log_every = 1
        config.train.eval_batches = 1
    return config
