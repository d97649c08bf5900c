"""Training stages of the synthetic search study on a `fwm data` workdir (experiments/synthetic_search.py).

Each stage reads its corpus (train and held-out files, trained roles) and the world's tokenizer from
DATA/corpora/manifest.json (data.manifest + data.corpus); the next stage starts from the previous
stage's checkpoint and reuses its tokenizer (recorded in the checkpoint), so no tokenizer is named:

  fwm data  --config experiments/synthetic_search.py --workdir $DATA
  fwm train --config experiments/synthetic_search_train.py:pretrain --config.data.manifest=$DATA --workdir $RUN/stage0
  fwm train --config experiments/synthetic_search_train.py:mid_train_plain --config.data.manifest=$DATA \
      --config.init.source=orbax:$RUN/stage0/checkpoints --workdir $RUN/mid_plain
  fwm train --config experiments/synthetic_search_train.py:mid_train_wm --config.data.manifest=$DATA \
      --config.init.source=orbax:$RUN/stage0/checkpoints --workdir $RUN/mid_wm
  fwm train --config experiments/synthetic_search_train.py:sft_full --config.data.manifest=$DATA \
      --config.init.source=orbax:$RUN/mid_wm/checkpoints --workdir $RUN/mid_wm_sft_full   # and from mid_plain

Variants (comma-separated arg): one stage -- pretrain (stage 0 on the world's documents), mid_train_plain /
mid_train_wm (the two WM-AMT arms: the same trajectories without / with world-model blocks), iwm (next-
observation prediction: the corpus records train their observation only), sft_plain / sft_state /
sft_full (the three response formats on the same steps) -- and runlocal (a seconds-long smoke test).

Steps come from train.epochs (fwm/config.py), so the two mid-training arms see their corpus the same
number of times although the WM-AMT corpus is longer (more steps). Mid-training masks observations in
both arms (data.trained_roles unset: the manifest's roles, all but "observation"); the paper trains on
the whole trajectory: add --config.data.trained_roles='("document","prompt","world_model","policy","action","observation")'.
The model is a 4-layer, ~1M-parameter decoder, sized to run every stage on a CPU in minutes.
"""
from fwm.config import default_config
from fwm.configlib import parse_variants

# variant -> (stage, corpus of the manifest, epochs)
STAGES = {
    "pretrain": ("pretrain", "pretrain", 10.0),  # a small document corpus: many passes to learn the facts
    "mid_train_plain": ("mid_train", "mid_train_plain", 1.0),
    "mid_train_wm": ("mid_train", "mid_train_wm", 1.0),
    "iwm": ("mid_train", "iwm", 1.0),
    "sft_plain": ("sft", "sft_plain", 3.0),
    "sft_state": ("sft", "sft_state", 3.0),
    "sft_full": ("sft", "sft_full", 3.0),
}
VARIANTS = tuple(STAGES) + ("runlocal",)


def get_config(arg=None, where="experiments/synthetic_search_train.py"):
    variants = parse_variants(arg, VARIANTS, where, default="pretrain")
    chosen = [v for v in variants if v in STAGES]
    if len(chosen) != 1:
        from fwm.configlib import ConfigError

        raise ConfigError(f"{where}: name exactly one stage of {tuple(STAGES)} (plus optional runlocal), got {arg!r}")
    config = default_config()
    config.stage, config.data.corpus, config.train.epochs = STAGES[chosen[0]]
    # data.manifest: the `fwm data` workdir, given on the command line (--config.data.manifest=DIR).
    # `fwm data` fits SFT samples to corpora.sft_max_tokens = 1024 tokens of the world's tokenizer; a longer
    # sample would lose its oldest prompt tokens here (the share is logged as truncated_share).
    config.data.seq_len = 1024 if config.stage == "sft" else 256
    config.data.batch_size = 16
    config.data.pack = config.stage == "sft"  # first-fit packing of whole samples: ~1/3 fewer padded tokens
    config.model.update(dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=344,
                             max_seq_len=1024))
    config.tokenizer.train.vocab_size = 1024  # only used when the manifest names no tokenizer (stage 0 trains one)
    config.optim.lr = 3e-3 if config.stage == "pretrain" else 1e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.01
    config.train.log_every = 10
    config.train.ckpt_every = 500
    config.train.eval_every = 200
    config.train.keep_ckpts = 2
    if "runlocal" in variants:
        config.data.seq_len = 1024 if config.stage == "sft" else 128
        config.data.batch_size = 8
        config.model.update(dict(hidden_size=64, num_layers=2, head_dim=16, mlp_dim=172, max_seq_len=1024))
        config.tokenizer.train.vocab_size = 512
        config.optim.warmup_steps = 2
        config.train.epochs = min(config.train.epochs, 1.0)
        config.train.log_every = 1
        config.train.eval_every = 1000
    return config
