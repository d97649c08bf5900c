"""The RL arms on one shared FE-SFT checkpoint: what RL does to WM-AMT + FE-SFT on the fresh-entity world, over
RL seeds only (`unseeded_stages`: data, stage 0, mid-training and SFT are seed 0's, shared by every row and seed).

  fwm pipeline --sweep experiments/sweeps/rl_arms.py --workdir /tmp/fwm_study                  # every arm x seed
  fwm pipeline --sweep experiments/sweeps/rl_arms.py --rows fe_sft,fc_rl --seeds 0 --workdir /tmp/fwm_study
  fwm compare W/stages/eval_full-A W/stages/eval_full-B          # paired, on the same 300 held-out questions

Base: experiments/synthetic_study.py's (the same WORKDIR shares its data, stage 0, WM-AMT and FE-SFT stages with
the study's wm_fesft_* rows of seed 0), evaluated greedy only (the paired comparison needs one answer per
question; sampling is the study's). Rows:
  fe_sft          no RL: the checkpoint every other row starts from
  grpo            plain GRPO (no world-model terms: every token takes A_E)
  fc_rl           FC-RL, omega 0.2, with fwm.config's R_ground (R_match 'new_evidence', the final answer's
                  R_ground its step group's mean: README, "What FC-RL learned from R_ground")
  fc_rl_literal   FC-RL with the literal R_ground (R_match 'found' over tau_{>t}, 0 after the final answer)
  no_ground       FC-RL without R_ground (R_WM = R_calib)
"""
from fwm.configlib import load_experiment, parse_variants
from fwm.sweep import default_sweep_config, row

study = load_experiment("../synthetic_study.py", __file__)

VARIANTS = ("runlocal",)
WM_FULL = {"plan.mid_train": "wm", "plan.format": "full"}
FC_RL = {**WM_FULL, "plan.rl": "fc_rl", "stages.rl.rl.omega": 0.2}


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/sweeps/rl_arms.py")
    s = default_sweep_config()
    s.name = "rl_arms"
    s.note = ("RL arms on one WM-AMT + FE-SFT checkpoint of the fresh-entity world (experiments/sweeps/rl_arms.py), "
              "greedy eval on the 300 held-out questions; seeds vary RL only.")
    s.base = study.base_config(runlocal="runlocal" in variants)
    s.base.unseeded_stages = ("pretrain", "mid_train", "sft")
    s.base.eval.sampling.k = 0
    s.rows.fe_sft = row("WM-AMT + FE-SFT (no RL)", {**WM_FULL, "plan.rl": "none"}, "")
    s.rows.grpo = row("WM-AMT + FE-SFT + GRPO", {**WM_FULL, "plan.rl": "grpo"}, "")
    s.rows.fc_rl = row("WM-AMT + FE-SFT + FC-RL", FC_RL, "50.6")
    s.rows.fc_rl_literal = row("FC-RL, literal R_ground", {**FC_RL, "stages.rl.rl.ground_match": "found",
                                                           "stages.rl.rl.ground_no_future": "zero"}, "")
    s.rows.no_ground = row("FC-RL without R_ground", {**FC_RL, "stages.rl.rl.ground_reward": False}, "50.1")
    s.order = ("fe_sft", "grpo", "fc_rl", "fc_rl_literal", "no_ground")
    s.seeds = (0, 1, 2)
    return s
