"""The synthetic study: the paper's table (experiments/sweeps/paper_table.py, all ten rows, seeds 0, 1, 2) on
the synthetic search setting a small model learns, the fresh-entity world (experiments/synthetic_learnable.py).

  fwm pipeline --sweep experiments/synthetic_study.py --workdir /tmp/fwm_study                  # everything
  fwm pipeline --sweep experiments/synthetic_study.py --rows std_sft_rl,wm_fesft_fcrl --seeds 0 --workdir W
  fwm pipeline --sweep experiments/synthetic_study.py --rows iwm_rl --workdir W    # another process / machine
  fwm report W

Why this world and not experiments/pipeline_search.py's: in the shared 101-entity world a tiny model
memorises question -> answer instead of reading its searches (the constant answer is as good as the model);
here every question has entities of its own, the constant answer is worth ~0 %, and a 0.9M-parameter model
reaches 60.7 % held out after stage 0 and plain SFT (README "Measured"). Every stage runs at the budget of
that measured recipe (experiments/synthetic_learnable_train.py):

  data       synthetic_learnable.py:noisy_sft (2,800 SFT, 200 RL, 1,000 mid-training, 300 held-out questions):
             SFT on the noisy policy's successful trajectories, so q varies (the oracle's is always 100);
             every SFT sample fitted to the 768-token SFT rows; stage 0's corpus leaves out the documents of
             the RL questions too (RL that recalled them would train recall, not reading)   shared by all
  stage 0    600 steps of 16 x 256 tokens on the world's documents (no held-out question's)   per seed
  mid-train  1 epoch of its corpus per arm (standard / WM-AMT / IWM: equal epochs, the WM-AMT corpus is
             longer so it gets more steps)                                             per arm and seed
  SFT        SFT_EPOCHS epochs of its corpus per format (plain / full / state), 768-token packed rows, lr 2e-3:
             the measured plain recipe was ~5.7 epochs (2,500 steps of 512-token rows); equal epochs, so every
             format sees each question as often                                        per arm, format, seed
  RL         experiments/rl.py:learnable (30 updates, groups of 8 over 8 tasks, lr 1e-4, 6 turns)   per row
  eval       the 300 held-out questions, greedy + 4 samples (selected@4), 256 new tokens, 6 turns, and
             E[q] of every greedy step (its ECE / AUROC: the greedy text q is 100 almost everywhere)   per row

Format: the paper's FE-SFT alone reaches 99.9 % format adherence, and its comparison is capability at equal
format; the report marks every row whose greedy format adherence is below 95 % (fwm.report.MIN_FORMAT): its gap
may be format rather than capability. Runtime on 2 CPU cores, from the stage times measured in the README:
see "Synthetic study" there. Variant `runlocal`: every stage at smoke-test size on the small learnable world
(seconds per stage; for checking the plan, not for numbers).
"""
from fwm.configlib import load_experiment, parse_variants
from fwm.pipeline import default_pipeline_config, eval_section, stage_section

paper_table = load_experiment("sweeps/paper_table.py", __file__)
eval_experiment = load_experiment("eval.py", __file__)
rl_experiment = load_experiment("rl.py", __file__)
learnable_data = load_experiment("synthetic_learnable.py", __file__)
learnable_train = load_experiment("synthetic_learnable_train.py", __file__)

VARIANTS = ("runlocal",)
SFT_EPOCHS = 5.0
SFT_SEQ_LEN = 768      # every format's samples whole (full-format samples reach ~700 tokens with history cut)
NOTE = ("The paper's table on the fresh-entity search world (experiments/synthetic_study.py): a 0.9M-parameter "
        "model from scratch, every stage at the budget of the measured learnable recipe.")


def base_config(runlocal: bool = False):
    """The pipeline config every row overrides (module docstring)."""
    small = ",runlocal" if runlocal else ""
    c = default_pipeline_config()
    c.name = "wm_fesft_fcrl"
    # noisy_sft: SFT on the noisy policy's successful trajectories (the oracle's where none succeeded), whose
    # Monte Carlo q varies with the step (the oracle's continuations always succeed: q = 100 at every step, so
    # calibration, A_S and R_calib would say nothing)
    c.data = learnable_data.get_config("noisy_sft,runlocal" if runlocal else "noisy_sft")
    c.data.corpora.sft_max_tokens = SFT_SEQ_LEN
    c.data.corpora.pretrain_rl_documents = False  # RL must read its tasks' documents, as held-out questions must
    pretrain = learnable_train.get_config("pretrain" + small)
    c.model = pretrain.model
    c.stages.pretrain = stage_section(pretrain)
    mid_train = learnable_train.get_config("mid_plain" + small)  # the corpus comes from the plan
    mid_train.train.epochs = 1.0
    c.stages.mid_train = stage_section(mid_train)
    sft = learnable_train.get_config("full" + small)  # seq_len 768 and packing; the corpus comes from the plan
    sft.optim.update(dict(lr=2e-3, warmup_steps=100))  # from mid-training, not a continuation of plain SFT
    sft.train.epochs = SFT_EPOCHS
    c.stages.sft = stage_section(sft)
    c.stages.rl = stage_section(rl_experiment.get_config("fc_rl,learnable" + small))
    c.eval = eval_section(eval_experiment.get_config("sampled" + small))
    c.eval.env.max_turns = c.stages.rl.rl.max_turns
    c.eval.sampling.max_new_tokens = c.stages.rl.rl.max_new_tokens  # 256: a full-format step is ~150-250 tokens
    # the greedy text q is 100 at nearly every step of this world's checkpoints (README, "Calibration"), so its
    # ECE / AUROC say little; E[q] from the <confidence> value probabilities is the calibration the table reads
    c.eval.foresight.expected_q = True
    if runlocal:
        c.data.progress = False
        c.data.corpora.sft_max_tokens = 256
        c.model.max_seq_len = 512
        for section in (c.stages.pretrain, c.stages.mid_train, c.stages.sft):
            section.data.seq_len = 256
        c.stages.mid_train.train.epochs = 0.2
        c.stages.sft.train.epochs = 0.2
        c.eval.update(dict(max_tasks=4, progress=False))
        c.eval.sampling.update(dict(k=2, max_new_tokens=24))
        c.eval.env.max_turns = 2
    c.plan.update(dict(pretrain=True, mid_train="wm", sft=True, format="full", rl="fc_rl", eval=True))
    return c


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/synthetic_study.py")
    sweep = paper_table.table_sweep("synthetic_study", base_config(runlocal="runlocal" in variants))
    sweep.note = NOTE
    return sweep
