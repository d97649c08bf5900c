"""The paper's table (../shared/PAPER.md, "Results to compare against") as rows of overrides of one base
pipeline config, 3 seeds each, every common stage shared.

  fwm pipeline --sweep experiments/sweeps/paper_table.py --workdir /tmp/fwm_paper_table
  fwm pipeline --sweep experiments/sweeps/paper_table.py --rows wm_fesft_fcrl,std_sft_rl --seeds 0 --workdir W
  fwm pipeline --sweep experiments/sweeps/paper_table.py --rows omega_01 --workdir W   # another process/machine
  fwm report W

Base: experiments/pipeline_search.py (the synthetic search world; arg `runlocal` shrinks every stage). All rows
share the data and stage 0; the three standard mid-training rows share one mid-training checkpoint, the seven
WM-AMT rows another, and the WM-AMT + FE-SFT rows one SFT checkpoint (per seed). Rows (paper: search average /
math mean@30 / pass@30):
  std_sft_rl        standard mid-training + SFT (plain) + RL (GRPO)        46.1 / 28.0 / 52.2
  std_fesft_rl      standard mid-training + FE-SFT (full) + RL (GRPO)      47.0 / 28.0 / 51.1
  state_sft_rl      standard mid-training + State-SFT + RL (GRPO)          47.1 / 27.1 / 56.7
  iwm_rl            IWM mid-training + FE-SFT + RL (GRPO)                  48.4 / 28.6 / 57.8
  wm_fesft_omega0   WM-AMT + FE-SFT + FC-RL with omega 0                   49.1 / 28.4 / 55.5
  wm_fesft_fcrl     WM-AMT + FE-SFT + FC-RL (omega 0.2)                    50.6 / 29.5 / 60.0
  omega_01          ... omega 0.1                                          50.0
  omega_05          ... omega 0.5                                          49.2
  no_ground         ... without R_ground (R_WM = R_calib)                  50.1
  rl_no_sft         WM-AMT + FC-RL, no SFT (the paper: the policy stops calling the tool)  23.3
Choices the paper leaves open: the "RL" of the baseline rows is plain GRPO (no world-model terms); IWM is
followed by FE-SFT, so IWM vs WM-AMT is the only difference to wm_fesft_omega0; the omega 0 row keeps A_WM on
the world-model span (its 49.1 equals the omega ablation's 0); RL without SFT starts from WM-AMT in the full
format.
"""
from fwm.configlib import load_experiment
from fwm.sweep import default_sweep_config, row

STANDARD = {"plan.mid_train": "standard", "plan.rl": "grpo"}
WM_FC_RL = {"plan.mid_train": "wm", "plan.format": "full", "plan.rl": "fc_rl"}


def table_rows() -> dict:
    """The paper's rows (module docstring) as sweep rows: name -> row(label, overrides, the paper's numbers)."""
    return {
        "std_sft_rl": row("standard mid-train + SFT + RL", {**STANDARD, "plan.format": "plain"}, "46.1 / 28.0 / 52.2"),
        "std_fesft_rl": row("standard mid-train + FE-SFT + RL", {**STANDARD, "plan.format": "full"},
                            "47.0 / 28.0 / 51.1"),
        "state_sft_rl": row("State-SFT + RL", {**STANDARD, "plan.format": "state"}, "47.1 / 27.1 / 56.7"),
        "iwm_rl": row("IWM + RL", {"plan.mid_train": "iwm", "plan.format": "full", "plan.rl": "grpo"},
                      "48.4 / 28.6 / 57.8"),
        "wm_fesft_omega0": row("WM-AMT + FE-SFT + RL (omega 0)", {**WM_FC_RL, "stages.rl.rl.omega": 0.0},
                               "49.1 / 28.4 / 55.5"),
        "wm_fesft_fcrl": row("WM-AMT + FE-SFT + FC-RL", {**WM_FC_RL, "stages.rl.rl.omega": 0.2}, "50.6 / 29.5 / 60.0"),
        "omega_01": row("FC-RL omega 0.1", {**WM_FC_RL, "stages.rl.rl.omega": 0.1}, "50.0"),
        "omega_05": row("FC-RL omega 0.5", {**WM_FC_RL, "stages.rl.rl.omega": 0.5}, "49.2"),
        "no_ground": row("FC-RL without R_ground", {**WM_FC_RL, "stages.rl.rl.ground_reward": False}, "50.1"),
        "rl_no_sft": row("WM-AMT + FC-RL, no SFT", {**WM_FC_RL, "plan.sft": False}, "23.3"),
    }


def table_sweep(name: str, base):
    """The paper's table over the pipeline config `base`: every row, seeds 0, 1, 2."""
    sweep = default_sweep_config()
    sweep.name = name
    sweep.base = base
    rows = table_rows()
    for row_name, spec in rows.items():
        sweep.rows[row_name] = spec
    sweep.order = tuple(rows)
    sweep.seeds = (0, 1, 2)
    return sweep


def get_config(arg=None):
    return table_sweep("paper_table", load_experiment("../pipeline_search.py", __file__).get_config(arg))
