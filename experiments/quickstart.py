"""The quickstart: the whole pipeline, two rows, a tiny model from scratch, on CPU in minutes.

  fwm pipeline --sweep experiments/quickstart.py --workdir /tmp/fwm_quickstart

Data (`fwm data`) on the learnable synthetic setting (experiments/synthetic_learnable.py: fresh-entity
knowledge world, the agent must search and read), shrunk to 400 questions; stage 0 on the world's documents;
then two rows that share the data and stage 0:
  std_sft_grpo    standard mid-training + SFT (plain format) + GRPO
  wm_fesft_fcrl   WM-AMT + FE-SFT (full format) + FC-RL (omega 0.2, R_calib + R_ground)
each evaluated greedily (and with 2 samples per task for selected@2) on 40 held-out questions. The report
(WORKDIR/report.md, figures in WORKDIR/figures/) is printed at the end. Reruns skip what has finished.

It does not learn at this budget. Every stage runs a few dozen steps of a 2-layer model, far from the
thousands of steps the learnable setting needs (experiments/synthetic_learnable_train.py: ~40 minutes for
format and the first search, reading not yet learned), so the table shows the mechanics -- every stage,
every metric, the figures -- not whether foresight helps: expect scores near 0 and formats far from 100 %.
The study that asks the paper's question is the paper's table on the same setting at the learned budget:
  fwm pipeline --sweep experiments/synthetic_study.py --workdir /tmp/fwm_study   # days on 2 CPU cores (README)

Variants: micro (seconds per stage: the test suite's end-to-end run).
"""
from fwm.configlib import load_experiment, parse_variants
from fwm.pipeline import default_pipeline_config, eval_section, stage_section
from fwm.sweep import default_sweep_config, row

eval_experiment = load_experiment("eval.py", __file__)
rl_experiment = load_experiment("rl.py", __file__)
learnable_data = load_experiment("synthetic_learnable.py", __file__)
learnable_train = load_experiment("synthetic_learnable_train.py", __file__)

VARIANTS = ("micro",)
NOTE = ("The quickstart's numbers show the mechanics of the pipeline, not learning: a 2-layer model trained for "
        "a few dozen steps per stage does not learn this task. For the paper's question run the study: "
        "fwm pipeline --sweep experiments/synthetic_study.py --workdir /tmp/fwm_study")


def base_config(micro: bool = False):
    """The pipeline config both rows start from."""
    c = default_pipeline_config()
    c.data = learnable_data.get_config("runlocal" if micro else None)
    c.data.workers = 0 if micro else 2
    if not micro:
        c.data.world.knowledge.update(dict(num_train_questions=400, num_test_questions=40))
        c.data.splits.update(dict(sft_tasks=200, rl_tasks=40))  # mid-training: the other 160 questions
        c.data.blocks.mc_k = 2
    c.data.corpora.sft_max_tokens = 256 if micro else 768  # SFT samples fit the SFT rows (history cut to fit)

    pretrain = learnable_train.get_config("pretrain")
    c.model = pretrain.model
    c.model.update(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192,
                        max_seq_len=768))
    c.stages.pretrain = stage_section(pretrain)
    c.stages.mid_train = stage_section(learnable_train.get_config("mid_plain"))  # the corpus comes from the plan
    c.stages.sft = stage_section(learnable_train.get_config("full"))
    c.stages.rl = stage_section(rl_experiment.get_config("fc_rl"))
    c.eval = eval_section(eval_experiment.get_config("sampled"))
    c.eval.sampling.k = 2

    s = c.stages
    s.pretrain.train.steps = 60
    s.mid_train.train.epochs = 0.5   # equal epochs: the WM-AMT arm's longer corpus gets more steps
    s.sft.train.epochs = 0.5
    for section in (s.pretrain, s.mid_train, s.sft):
        section.optim.warmup_steps = 5
        section.train.update(dict(log_every=5, ckpt_every=25, eval_every=1000, eval_batches=2))
    s.rl.optim.lr = 1e-4
    s.rl.train.update(dict(steps=4, ckpt_every=1, log_every=1))
    s.rl.rl.update(dict(group_size=2, rollout_batch=8, max_turns=4, max_new_tokens=96, mini_batches=2))
    c.eval.max_tasks = 40
    c.eval.env.max_turns = 4
    c.eval.sampling.max_new_tokens = 96

    if micro:
        c.model.update(dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                            max_seq_len=512))
        c.data.progress = False
        s.pretrain.train.steps = 3
        s.mid_train.train.epochs = 0.2
        s.sft.train.epochs = 0.0
        s.sft.train.steps = 3
        for section in (s.pretrain, s.mid_train, s.sft):
            section.data.seq_len = 256
            section.data.batch_size = 8
            section.train.update(dict(log_every=1, ckpt_every=100, eval_batches=1))
        s.rl.train.steps = 2
        s.rl.rl.update(dict(group_size=2, rollout_batch=4, max_turns=2, max_new_tokens=24, mini_batches=2))
        c.eval.update(dict(max_tasks=4, progress=False))
        c.eval.env.max_turns = 2
        c.eval.sampling.max_new_tokens = 24
    return c


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "experiments/quickstart.py")
    sweep = default_sweep_config()
    sweep.name = "quickstart"
    sweep.note = NOTE
    sweep.base = base_config(micro="micro" in variants)
    sweep.rows.std_sft_grpo = row("standard mid-train + SFT + GRPO", {
        "plan.mid_train": "standard", "plan.format": "plain", "plan.rl": "grpo"}, reference="46.1")
    sweep.rows.wm_fesft_fcrl = row("WM-AMT + FE-SFT + FC-RL", {
        "plan.mid_train": "wm", "plan.format": "full", "plan.rl": "fc_rl"}, reference="50.6")
    sweep.order = ("std_sft_grpo", "wm_fesft_fcrl")
    sweep.seeds = (0,)
    return sweep
