"""Data for the synthetic math study: multi-step arithmetic with the python tool, noisy-policy
trajectories, blocks, corpora.

  fwm data --config experiments/synthetic_math.py --workdir /tmp/synthetic_math
  fwm data --config experiments/synthetic_math.py:runlocal --workdir /tmp/sm_small   # seconds, for tests

Same shape as experiments/synthetic_search.py. The sandbox runs in "audit" isolation here: the
programs come from the rule-based behaviour policies (`x = a op b`), not from a model, and audit mode
costs about a third of a namespace start per run. There is no pretraining corpus (the world has no
documents). Variants (comma-separated arg): runlocal.
"""
from fwm.configlib import parse_variants
from fwm.trajectories.pipeline import default_data_config

VARIANTS = ("runlocal",)


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/synthetic_math.py")
    config = default_data_config()
    config.world.kind = "arithmetic"
    config.world.arithmetic.update(dict(
        num_train_tasks=1000, num_test_tasks=200, step_weights=(0.2, 0.3, 0.3, 0.2),
        test_step_weights=(0.1, 0.2, 0.3, 0.4), max_digits=3))
    config.splits.sft_tasks = 100
    config.splits.rl_tasks = 300
    config.env.max_turns = 8
    config.env.isolation = "audit"
    config.collect.episodes_per_task = 2
    config.blocks.share = 0.5
    config.blocks.mc_k = 8
    if "runlocal" in variants:
        config.world.arithmetic.update(dict(num_train_tasks=30, num_test_tasks=10))
        config.splits.sft_tasks = 6
        config.splits.rl_tasks = 4
        config.collect.episodes_per_task = 1
        config.blocks.mc_k = 4
        config.corpora.eval_fraction = 0.1
        config.tokenizer.vocab_size = 512
    return config
