"""Data for the synthetic search study: a knowledge world, noisy-policy trajectories, blocks, corpora.

  fwm data --config experiments/synthetic_search.py --workdir /tmp/synthetic_search
  fwm data --config experiments/synthetic_search.py:runlocal --workdir /tmp/ss_small   # seconds, for tests

The shape follows DESIGN.md ("synthetic study"): mid-training sees many trajectories of the noisy
policy (two per question, successes and failures, mistakes and recoveries), SFT about ten times fewer
steps of good (successful) trajectories on other questions, and RL / evaluation questions are held
out of both; evaluation questions lean to multi-hop. Variants (comma-separated arg): runlocal.
"""
from fwm.configlib import parse_variants
from fwm.trajectories.pipeline import default_data_config

VARIANTS = ("runlocal",)


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/synthetic_search.py")
    config = default_data_config()
    config.world.kind = "knowledge"
    config.world.knowledge.update(dict(
        num_people=60, num_cities=16, num_countries=5, num_companies=12, num_universities=8,
        num_train_questions=1800, num_test_questions=300,
        hop_weights=(0.25, 0.25, 0.25, 0.25), test_hop_weights=(0.1, 0.2, 0.3, 0.4)))
    config.splits.sft_tasks = 150   # -> ~120 successful noisy trajectories, ~400 steps
    config.splits.rl_tasks = 400    # mid-training: the other 1250 questions x 2 episodes
    config.env.max_turns = 8
    config.collect.episodes_per_task = 2
    config.blocks.share = 0.5
    config.blocks.mc_k = 8
    if "runlocal" in variants:
        config.world.knowledge.update(dict(
            num_people=12, num_cities=5, num_countries=2, num_companies=4, num_universities=3,
            num_train_questions=80, num_test_questions=20))
        config.splits.sft_tasks = 10
        config.splits.rl_tasks = 10
        config.collect.episodes_per_task = 1
        config.blocks.mc_k = 4
        config.corpora.eval_fraction = 0.1
        config.corpora.pretrain_phrasings = 4
        config.tokenizer.vocab_size = 512
    return config
