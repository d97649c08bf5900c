"""The pipeline on the synthetic search world (experiments/synthetic_search.py), every stage at the study's
budget: the base of the paper table (experiments/sweeps/paper_table.py).

  fwm pipeline --config experiments/pipeline_search.py --workdir /tmp/fwm_search            # one row: the full arm
  fwm pipeline --config experiments/pipeline_search.py --config.plan.mid_train=standard \
      --config.plan.format=plain --config.plan.rl=grpo --config.name=baseline --workdir /tmp/fwm_search

Stages (fwm/pipeline.py): `fwm data` with experiments/synthetic_search.py; stage 0, mid-training and SFT
as experiments/synthetic_search_train.py sets them (stage 0 10 epochs, mid-training 1 epoch per arm, SFT 3
epochs; a 4-layer ~1M-parameter model); RL as experiments/rl.py (Search-R1's groups of 5, 200 updates);
evaluation as experiments/eval.py:sampled (greedy + 4 samples per task: selected@4). Default plan: stage 0 +
WM-AMT + FE-SFT + FC-RL. Variant runlocal: every stage's smoke-test size (minutes on a CPU).
"""
from fwm.configlib import load_experiment, parse_variants
from fwm.pipeline import default_pipeline_config, eval_section, stage_section

VARIANTS = ("runlocal",)


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/pipeline_search.py")
    small = ",runlocal" if "runlocal" in variants else ""
    data = load_experiment("synthetic_search.py", __file__)
    train = load_experiment("synthetic_search_train.py", __file__)
    rl = load_experiment("rl.py", __file__)
    evaluation = load_experiment("eval.py", __file__)
    c = default_pipeline_config()
    c.name = "wm_fesft_fcrl"
    c.data = data.get_config(small.lstrip(",") or None)
    pretrain = train.get_config("pretrain" + small)
    c.model = pretrain.model
    c.stages.pretrain = stage_section(pretrain)
    c.stages.mid_train = stage_section(train.get_config("mid_train_wm" + small))  # the corpus comes from the plan
    c.stages.sft = stage_section(train.get_config("sft_full" + small))
    c.stages.rl = stage_section(rl.get_config("fc_rl" + small))
    c.eval = eval_section(evaluation.get_config("sampled" + small))
    c.plan.update(dict(pretrain=True, mid_train="wm", sft=True, format="full", rl="fc_rl", eval=True))
    return c
