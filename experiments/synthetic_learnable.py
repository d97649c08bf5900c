"""Data for a synthetic search setting a small model can learn: the fresh-entity knowledge world.

  fwm data --config experiments/synthetic_learnable.py --workdir /tmp/fwm_learnable      # ~2-3 min, 2 cores
  fwm data --config experiments/synthetic_learnable.py:runlocal --workdir /tmp/fl_small  # seconds, for tests

Why (issue 10, point 4): in the shared 101-entity world a tiny model memorised question -> answer (or
searched names seen in training) instead of reading its searches, and held-out success sat at the
most common answer's share. Here every question has entities invented for it alone
(`world.knowledge.fresh_entities`): no answer recurs (the constant answer is worth ~0 %) and held-out
questions share no entity or name word with training, so the only way to answer is to copy the
question's subject into a search, read the relation the question asks for in the returned document
(which states `facts_per_document` = 4 relations, two of them with objects of the asked type), copy
that object into the next search or the answer. Names are 2-3 syllables from 70, so copying a name is
copying a few regular pieces. 1-2 hop questions, one passage per search (observations stay short and
state each fact in one plain sentence), no filler. The stage-0 corpus (corpora/pretrain.jsonl) leaves out
the evaluation questions' documents, so no stage reads them before evaluation.

Splits: 2,800 SFT questions (oracle trajectories: ~7k one-step samples, 5 % of trajectories held out
as sft_*_eval), 200 RL, 1,000 mid-training questions (noisy policy, 2 episodes each); 300 held-out
evaluation questions. Variants (comma-separated arg): runlocal (a few seconds), noisy_sft (SFT on
successful noisy trajectories, as synthetic_search.py, falling back to the oracle's), topk3 (three
passages per search: the document, the one that names it, and noise), hops4 (1-4 hops).
"""
from fwm.configlib import parse_variants
from fwm.trajectories.pipeline import default_data_config

VARIANTS = ("runlocal", "noisy_sft", "topk3", "hops4")


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/synthetic_learnable.py")
    config = default_data_config()
    config.world.kind = "knowledge"
    config.world.knowledge.update(dict(
        fresh_entities=True, facts_per_document=4, incoming_mentions=0, filler_sentences=0,
        num_train_questions=4000, num_test_questions=300,
        hop_weights=(0.5, 0.5), test_hop_weights=(0.5, 0.5)))
    config.splits.sft_tasks = 2800
    config.splits.rl_tasks = 200    # mid-training: the other 1,000 questions
    config.env.max_turns = 6
    config.env.topk = 1
    config.collect.policies = ("oracle", "noisy")
    config.collect.episodes_per_task = 2
    config.corpora.mid_train_policies = ("noisy",)
    config.corpora.sft_policies = ("oracle",)
    config.blocks.share = 0.25  # blocks are the slow stage (~9 of the ~12 CPU minutes): what was measured
    config.blocks.mc_k = 2
    config.corpora.pretrain_phrasings = 1  # stage 0 = the documents alone (each repeats its subject ~5 times,
    #                                        which teaches copying a fresh name); what was measured
    config.corpora.pretrain_eval_documents = False  # stage 0 never reads an evaluation question's document
    config.corpora.think = "evidence"  # the think quotes the sentence the next search / answer is read from
    config.blocks.roadmap = "evidence"  # and so does the block before it (FE-SFT: the roadmap names that object first)
    if "noisy_sft" in variants:
        config.corpora.sft_policies = ("noisy", "oracle")
    if "topk3" in variants:
        config.env.topk = 3
        config.world.knowledge.incoming_mentions = 1
    if "hops4" in variants:
        config.world.knowledge.update(dict(hop_weights=(0.25, 0.25, 0.25, 0.25),
                                           test_hop_weights=(0.25, 0.25, 0.25, 0.25)))
        config.env.max_turns = 8
    if "runlocal" in variants:
        config.world.knowledge.update(dict(num_train_questions=60, num_test_questions=20))
        config.splits.sft_tasks = 20
        config.splits.rl_tasks = 10
        config.collect.episodes_per_task = 1
        config.blocks.mc_k = 2
        config.corpora.eval_fraction = 0.1
    return config
