"""The paper's table as sweeps (experiments/sweeps/paper_table.py, experiments/synthetic_study.py): every row x
seed builds a valid pipeline config, the rows differ from the paper's only where the docstring says, and
stages are shared exactly as the table needs: one data stage, stage 0 per seed, three mid-training arms, five
SFT arms and ten RL stages per seed. Config only: nothing is trained."""
import collections
import os

import pytest

from fwm import pipeline, sweep
from fwm.configlib import ConfigError, load_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = {"paper_table": os.path.join(REPO, "experiments", "sweeps", "paper_table.py"),
          "synthetic_study": os.path.join(REPO, "experiments", "synthetic_study.py"),
          "rl_arms": os.path.join(REPO, "experiments", "sweeps", "rl_arms.py")}


def _plans(name, arg):
    s = load_experiment(TABLES[name], __file__).get_config(arg)
    return s, {(row, seed): pipeline.plan(sweep.row_config(s, row, seed, "/unused"))
               for row in sweep.row_names(s) for seed in s.seeds}


@pytest.mark.parametrize("name,arg", [("paper_table", "runlocal"), ("synthetic_study", None),
                                      ("synthetic_study", "runlocal")])
def test_the_table_shares_stages_as_the_paper_needs(name, arg):
    s, plans = _plans(name, arg)
    assert len(s.rows) == 10 and list(s.seeds) == [0, 1, 2]
    fingerprints = collections.defaultdict(set)
    for specs in plans.values():
        for spec in specs:
            fingerprints[spec.name].add(spec.fingerprint)
    counts = {stage: len(fps) for stage, fps in fingerprints.items()}
    # SFT arms per seed: standard x {plain, full, state}, IWM x full, WM-AMT x full (rl_no_sft has none)
    assert counts == {"data": 1, "pretrain": 3, "mid_train": 9, "sft": 15, "rl": 30, "eval": 30}
    labels = {row: [spec.label for spec in plans[(row, 0)]] for row in s.rows}
    assert labels["std_sft_rl"] == ["data", "pretrain", "mid_train_standard", "sft_plain", "rl_grpo", "eval_plain"]
    assert labels["rl_no_sft"] == ["data", "pretrain", "mid_train_wm", "rl_fc_rl", "eval_full"]
    fc_rl = {row: plans[(row, 0)][-2].config.rl for row in ("wm_fesft_omega0", "wm_fesft_fcrl", "no_ground")}
    assert [fc_rl[r].omega for r in fc_rl] == [0.0, 0.2, 0.2]
    assert [fc_rl[r].ground_reward for r in fc_rl] == [True, True, False]
    grpo = plans[("std_fesft_rl", 0)][-2].config.rl
    assert (grpo.omega, grpo.calib_reward, grpo.ground_reward) == (0.0, False, False)


def test_the_synthetic_study_compares_sft_formats_at_equal_epochs():
    s, plans = _plans("synthetic_study", None)
    sft = {row: plans[(row, 0)][3].config for row in ("std_sft_rl", "std_fesft_rl", "state_sft_rl")}
    assert {c.data.corpus for c in sft.values()} == {"sft_plain", "sft_full", "sft_state"}
    assert {(c.train.epochs, c.data.seq_len) for c in sft.values()} == {(5.0, 768)}
    assert s.base.data.corpora.sft_max_tokens == 768  # every SFT sample fits its row whole
    assert list(s.base.data.corpora.sft_policies) == ["noisy", "oracle"]  # q varies: not the oracle's constant 100
    assert not s.base.data.corpora.pretrain_rl_documents
    mid = [plans[(row, 0)][2].config.train.epochs for row in ("std_sft_rl", "iwm_rl", "wm_fesft_fcrl")]
    assert mid == [1.0, 1.0, 1.0]
    evaluation = plans[("wm_fesft_fcrl", 0)][-1].config
    assert (evaluation.sampling.k, evaluation.sampling.max_new_tokens, evaluation.env.max_turns) == (4, 256, 6)
    assert evaluation.max_tasks == 0  # all 300 held-out questions


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_the_rl_arms_vary_rl_seeds_on_one_sft_checkpoint_shared_with_the_study(arg):
    s, plans = _plans("rl_arms", arg)
    fingerprints = collections.defaultdict(set)
    for specs in plans.values():
        for spec in specs:
            fingerprints[spec.name].add(spec.fingerprint)
    # 5 rows x 3 seeds: one data, stage 0, WM-AMT and FE-SFT stage; 4 RL arms x 3 RL seeds; 15 evals.
    assert {stage: len(fps) for stage, fps in fingerprints.items()} == \
        {"data": 1, "pretrain": 1, "mid_train": 1, "sft": 1, "rl": 12, "eval": 15}
    # ... and they are the study's seed-0 stages: the same WORKDIR reuses its FE-SFT checkpoint.
    _, study = _plans("synthetic_study", arg)
    assert [spec.fingerprint for spec in study[("wm_fesft_fcrl", 0)][:4]] == \
        [spec.fingerprint for spec in plans[("fc_rl", 2)][:4]]
    rl = {row: plans[(row, 1)][-2].config for row in ("grpo", "fc_rl", "fc_rl_literal", "no_ground")}
    assert {c.train.seed for c in rl.values()} == {1}
    assert [(c.rl.ground_match, c.rl.ground_no_future) for c in rl.values()][1:3] == \
        [("new_evidence", "group_mean"), ("found", "zero")]
    assert [c.rl.ground_reward for c in rl.values()] == [False, True, True, False]
    assert plans[("fc_rl", 1)][-1].config.sampling.k == 0  # greedy only: one answer per question, paired


def test_unseeded_stages_are_checked():
    s, _ = _plans("rl_arms", "runlocal")
    s.base.unseeded_stages = ("sft", "rlhf")
    with pytest.raises(ConfigError, match="unseeded_stages"):
        sweep.row_config(s, "fc_rl", 1, "/unused")


def test_an_rl_key_redoes_rl_and_eval_only():
    s, plans = _plans("rl_arms", "runlocal")
    s.base.stages.rl.rl.ground_match = "beyond_action"  # the supervised stages do not read the rl section
    s.base.stages.sft.rl.clip_eps_low = 0.1
    changed = pipeline.plan(sweep.row_config(s, "fc_rl", 0, "/unused"))
    before = plans[("fc_rl", 0)]
    assert [a.fingerprint == b.fingerprint for a, b in zip(before, changed)] == [True] * 4 + [False, False]
    s.base.stages.sft.optim.lr = 1e-3
    changed = pipeline.plan(sweep.row_config(s, "fc_rl", 0, "/unused"))
    assert [a.fingerprint == b.fingerprint for a, b in zip(before, changed)] == [True] * 3 + [False] * 3
