"""Evaluation of a checkpoint on the held-out tasks of a `fwm data` workdir (`fwm eval`).

  fwm eval --config experiments/eval.py --config.checkpoint=TRAIN_DIR --config.data_dir=DATA_DIR --workdir OUT
  fwm eval --config experiments/eval.py:runlocal,sampled ...   # 8 tasks, short responses; + 4 samples per task

One greedy episode per task by default. Variants (comma-separated arg): runlocal (a smoke test: 8 tasks,
64 new tokens, 4 turns), sampled (also 4 sampled episodes per task at temperature 1: mean@4 / pass@4),
plain | state (the prompt variant of a model trained on that SFT variant; default full).
"""
from fwm.configlib import parse_variants
from fwm.eval.config import default_eval_config

VARIANTS = ("runlocal", "sampled", "plain", "state")


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/eval.py")
    config = default_eval_config()
    config.prompt.variant = "plain" if "plain" in variants else "state" if "state" in variants else "full"
    if "sampled" in variants:
        config.sampling.k = 4
        config.sampling.temperature = 1.0
    if "runlocal" in variants:
        config.max_tasks = 8
        config.env.max_turns = 4
        config.sampling.max_new_tokens = 64
    return config
