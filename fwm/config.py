"""Defaults for every config section and `validate`, which fails on unknown keys and bad values.

A run's config is an `ml_collections.ConfigDict` built by an experiment file
(`experiments/NAME.py` with `get_config(arg=None)`) that starts from `default_config()` and
overrides a few keys, then by `--config.a.b=v` flags. `default_config()` is the schema: every
valid key exists in it, so an unknown key anywhere (a typo in an experiment file or an override)
is an error that names the full dotted path and the nearest valid name.

`stage` names the runner of the run; `STAGES` maps each stage to its entry point as a
"module:function" string (resolved lazily by the CLI, so this module imports nothing heavy). Later
stages (e.g. 'rl') add one entry here and their own section of defaults.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

import ml_collections

from fwm import configlib
from fwm.configlib import ConfigError, require as _require
from fwm.data.records import ON_BAD_RECORD, ROLES
from fwm.model.transformer import ModelConfig
from fwm.schema import VARIANTS
from fwm.trajectories.future import FUTURE_STARTS, GROUND_MATCHES

# stage name -> "module:function" taking (config) and running the stage in config.train.workdir.
STAGES: dict[str, str] = {
    "pretrain": "fwm.train.loop:run",   # stage 0: base model from scratch on plain documents
    "mid_train": "fwm.train.loop:run",  # WM-AMT or plain mid-training: packed LM batches
    "sft": "fwm.train.loop:run",        # FE-SFT / plain SFT: prompt masked, span ids
    "rl": "fwm.rl.loop:run",            # FC-RL (or plain GRPO): rollouts, rewards, rl_step
}
SCHEDULES = ("cosine", "linear", "constant")
_INIT_SOURCE = re.compile(r"^(scratch|orbax:.+|hf:.+)$")


def default_config() -> ml_collections.ConfigDict:
    """Every section with its defaults (a small CPU-sized run unless an experiment says otherwise)."""
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"

    # Where the parameters come from. 'scratch' (fresh, shapes from `model`), 'orbax:PATH' (a params
    # checkpoint or a training checkpoint of an earlier stage: params only, fresh optimiser) or
    # 'hf:PATH' (a Hugging Face directory). Called `source` because `from` cannot be written as a
    # --config.init.from override (it is a Python keyword).
    c.init = ml_collections.ConfigDict()
    c.init.source = "scratch"

    # ModelConfig fields. With init.source 'scratch' they define the model (vocab_size 0: the
    # tokenizer's size). With a checkpoint its own shapes win; the numerics below still apply.
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
    c.model.vocab_size = 0
    # Numerics: training keeps float32 master weights and optimiser moments (param_dtype float32, the only
    # value a training stage accepts: AdamW on bfloat16 parameters rounds small updates away); the matmuls
    # run in compute_dtype (bfloat16 on TPU/GPU; float32 default for CPU-exact tests). remat_policy (none |
    # full | dots) is set per stage, in each stage's config; it applies to loaded checkpoints too.

    # tokenizer.path: a SentencePiece .model or an HF tokenizer.json / directory. '' means, in order:
    # the tokenizer recorded by init.source's checkpoint (or an hf: directory's own), the manifest's
    # (data.manifest), the workdir's own copy, else one trained into WORKDIR/tokenizer.model from
    # data.train_files (settings in `train`). Every run copies its tokenizer into the workdir and
    # records it (path and sha256) in each checkpoint's meta, so the next stage finds it.
    # A tokenizer that differs from the one the parameters were trained with (the source checkpoint's,
    # or this workdir's checkpoint on resume) stops the run unless allow_change=True.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""
    c.tokenizer.allow_change = False
    c.tokenizer.train = ml_collections.ConfigDict()
    c.tokenizer.train.vocab_size = 512
    c.tokenizer.train.max_texts = 20000        # texts read from data.train_files to train it
    c.tokenizer.train.character_coverage = 1.0
    c.tokenizer.train.seed = 0

    c.data = ml_collections.ConfigDict()
    # data.manifest: a `fwm data` corpora manifest (its manifest.json, the corpora directory or the data
    # workdir); data.corpus: a corpus name in it. At start-up they fill train_files, eval_files,
    # trained_roles and tokenizer.path from the manifest; keys set explicitly win.
    c.data.manifest = ""
    c.data.corpus = ""
    c.data.train_files = ()                    # JSONL / Parquet / ArrayRecord files (globs allowed)
    c.data.eval_files = ()                     # held-out split; empty: no eval
    c.data.seq_len = 128
    c.data.batch_size = 8                      # global rows per step (split over processes); a multiple of
                                               # mesh data x fsdp (the axes batch rows shard over)
    # LM stages: the roles that are targets. () (unset): each record's own "trained_roles" (an IWM
    # record trains its observation only), else DEFAULT_TRAINED_ROLES, i.e. everything but
    # "observation": tool output is never a target. The paper's WM-AMT is "plain NLL on the whole
    # trajectory"; this project masks observations in BOTH mid-training arms by default (the arms
    # still differ only by the block). To train observations too, set
    # data.trained_roles=("document","prompt","world_model","policy","action","observation").
    c.data.trained_roles = ()
    c.data.pack = False                        # SFT: first-fit pack samples into rows
    c.data.add_bos = True
    c.data.add_eos = True
    c.data.on_bad_record = "raise"             # or 'skip' (counted in the logs)
    c.data.worker_count = 0                    # Grain worker processes (0: in the main process)
    c.data.read_threads = 2
    c.data.shuffle = True
    c.data.seed = 0

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False           # norms and biases are never decayed
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"                # after warmup: cosine | linear | constant
    c.optim.min_lr_ratio = 0.1                 # final lr / peak lr for cosine and linear
    c.optim.clip_norm = 1.0                    # global-norm clipping; 0 disables it
    c.optim.micro_batches = 1                  # gradient accumulation steps per optimiser step

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    # epochs > 0 replaces `steps`: steps = ceil(epochs x rows of one epoch / data.batch_size), rows
    # counted at start-up by tokenizing the training files once (LM: packed rows of seq_len; SFT: one
    # row per sample, packed: tokens / seq_len). Arms compared at equal epochs; on a large corpus
    # prefer `steps` (the count reads every file).
    c.train.epochs = 0.0
    c.train.log_every = 10
    c.train.ckpt_every = 200
    c.train.keep_ckpts = 3
    c.train.eval_every = 200                   # and always at the last step
    c.train.eval_batches = 0                   # cap on batches per eval; 0: every eval record, once
    c.train.seed = 0
    c.train.workdir = ""                       # set by --workdir
    c.train.async_checkpoint = True
    c.train.peak_flops_per_device = 0.0        # MFU denominator; 0: the table in fwm/train/metrics.py
    # Multi-process run (several hosts): jax.distributed.initialize() at start-up. Env FWM_DISTRIBUTED=1 does
    # the same (launch/tpu_vm.sh sets it); FWM_COORDINATOR / FWM_NUM_PROCESSES / FWM_PROCESS_ID, where set,
    # name the coordinator host:port, the process count and this process's index (else jax detects them).
    c.train.distributed = False
    # Cross-entropy in chunks of this many sequence positions (0: whole rows at once): the float32 logits
    # of one chunk exist at a time (recomputed in the backward pass), instead of batch x seq_len x vocab.
    # Worth it at large vocabularies (Qwen2.5: 151,936); a divisor of data.seq_len is fastest.
    c.train.loss_chunk_size = 0

    # FC-RL (fwm/rl/). Rollouts: rollout_batch episodes = rollout_batch / group_size tasks x group_size.
    # In RL, train.steps counts optimiser updates (one per mini-batch) and optim.* is the optimiser.
    c.rl = ml_collections.ConfigDict()
    c.rl.variant = "full"                      # response variant the policy writes (schema.VARIANTS)
    c.rl.group_size = 5                        # G episodes per task (Search-R1: 5)
    c.rl.rollout_batch = 40                    # global episodes per rollout (a multiple of group_size x processes)
    c.rl.max_turns = 4                         # steps per episode before the turn budget ends it (score 0)
    c.rl.max_new_tokens = 256                  # sampled tokens per step response
    c.rl.temperature = 1.0
    c.rl.mini_batches = 1                      # optimiser updates per pass over a rollout (step samples split evenly)
    c.rl.epochs = 1                            # passes over each rollout's mini-batches (PPO epochs)
    c.rl.outcome_metric = "score"              # score (the env's) | exact_match | f1 | substring_match
    c.rl.correct_threshold = 1.0               # I = 1 (R_calib) iff the outcome reward >= this
    c.rl.format_penalty = 0.0                  # R_E = outcome - format_penalty * (1 - format adherence)
    c.rl.future_start = "observation"          # where tau_{>t} starts for R_ground (trajectories.future)
    c.rl.ground_match = "new_evidence"         # R_ground's R_match: found | beyond_action | new_evidence (future.py)
    c.rl.ground_no_future = "group_mean"       # the final answer's R_ground: group_mean | zero (fwm.rl.rewards)
    c.rl.calib_reward = True                   # R_calib in the world-model span reward
    c.rl.ground_reward = True                  # R_ground in the world-model span reward
    c.rl.omega = 0.2                           # policy span: A_E + omega * A_S (paper: 0.2 search, 0.1 math)
    c.rl.advantage = "grpo"                    # grpo | dr_grpo | rloo (fwm.rl.advantages.ESTIMATORS)
    c.rl.wm_advantage = ""                     # A_WM's estimator ('' = rl.advantage; fwm.rl.advantages docstring)
    c.rl.advantage_eps = 1e-6                  # grpo: (r - mean) / (std + eps)
    c.rl.kl_beta = 0.001                       # k3 KL to the reference (Search-R1: 0.001; 0: no KL, no ref)
    c.rl.clip_eps_low = 0.2                    # ratio clipped to [1 - low, 1 + high]
    c.rl.clip_eps_high = 0.2                   # DAPO's clip-higher: 0.28
    c.rl.loss_aggregation = "token_mean"       # token_mean | sequence_mean_token_mean (fwm.rl.losses)
    c.rl.pack = False                          # several step samples per row (fwm.rl.batch; token_mean only)
    c.rl.old_logprobs = "recompute"            # pi_old of the ratio: recompute (a training forward per mini-batch
    #                                            before the first update) | sampler (the rollout's own log-probs:
    #                                            one forward pass less per mini-batch; exact only where the sampler's
    #                                            numerics match training's, see sampler_logprob_gap of a recompute run)
    # The environment (tasks come from data.train_files: RL task records, e.g. fwm data's rl_tasks.jsonl).
    c.rl.tool = "search"                       # search | python
    c.rl.index_dir = ""                        # search: a BM25 index directory (fwm data: WORKDIR/world/bm25)
    c.rl.retriever_url = ""                    # search: a Search-R1 server (POST /retrieve) instead of index_dir
    c.rl.topk = 3                              # search: passages per query
    c.rl.env_metric = "exact_match"            # search: the env's score (exact_match | f1 | substring_match)
    c.rl.timeout_s = 5.0                       # python tool and math answer checks
    c.rl.memory_mb = 512
    c.rl.isolation = "auto"
    c.rl.env_threads = 8                       # tool calls in flight
    c.rl.prompt_budget_tokens = 0              # render_prompt's history budget; 0: all the room the model has
    c.rl.strict_actions = False                # act only on responses whose whole format is right
    return c


def check_override_args(argv: Iterable[str], flag_name: str = "config") -> None:
    """Checks `--config.a.b=v` override paths against default_config() (see configlib)."""
    configlib.check_override_args(argv, default_config(), flag_name)


def check_values(config: ml_collections.ConfigDict) -> None:
    """Choices, ranges and the cross-key constraints a run needs."""
    c = config
    _require(c.stage in STAGES, "stage", f"one of {sorted(STAGES)}", c.stage)
    _require(bool(_INIT_SOURCE.match(c.init.source)), "init.source", "'scratch', 'orbax:PATH' or 'hf:PATH'",
             c.init.source)
    model_fields = c.model.to_dict()
    if model_fields["vocab_size"] == 0:
        model_fields["vocab_size"] = 1  # taken from the tokenizer at start-up
    try:
        model_config_from(model_fields)
    except ValueError as err:
        raise ConfigError(f"config section 'model': {err}") from err
    _require(c.model.param_dtype == "float32", "model.param_dtype",
             "float32 for training (master weights and AdamW moments stay float32; bfloat16 parameters round small "
             "updates away); for bfloat16 speed set model.compute_dtype='bfloat16' instead", c.model.param_dtype)
    _require(c.train.loss_chunk_size >= 0, "train.loss_chunk_size", "an int >= 0 (0: no chunking)",
             c.train.loss_chunk_size)
    for name in ("seq_len", "batch_size"):
        _require(c.data[name] > 0, f"data.{name}", "a positive int", c.data[name])
    _require(c.data.seq_len <= c.model.max_seq_len, "data.seq_len", f"<= model.max_seq_len={c.model.max_seq_len}",
             c.data.seq_len)
    _require(c.data.on_bad_record in ON_BAD_RECORD, "data.on_bad_record", f"one of {ON_BAD_RECORD}",
             c.data.on_bad_record)
    bad_roles = sorted(set(c.data.trained_roles) - set(ROLES))
    _require(not bad_roles, "data.trained_roles", f"roles from {ROLES}", tuple(c.data.trained_roles))
    _require(c.data.worker_count >= 0, "data.worker_count", "an int >= 0", c.data.worker_count)
    _require(c.data.read_threads >= 0, "data.read_threads", "an int >= 0", c.data.read_threads)
    for axis in ("data", "fsdp", "tensor"):
        _require(c.mesh[axis] == -1 or c.mesh[axis] > 0, f"mesh.{axis}", "a positive int or -1", c.mesh[axis])
    _require(list(c.mesh.values()).count(-1) <= 1, "mesh", "at most one axis of -1", c.mesh.to_dict())
    _require(c.optim.lr >= 0, "optim.lr", "a learning rate >= 0", c.optim.lr)
    for name in ("b1", "b2"):
        _require(0 <= c.optim[name] < 1, f"optim.{name}", "a value in [0, 1)", c.optim[name])
    _require(c.optim.eps > 0, "optim.eps", "a value > 0", c.optim.eps)
    _require(c.optim.weight_decay >= 0, "optim.weight_decay", "a value >= 0", c.optim.weight_decay)
    _require(c.optim.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", c.optim.warmup_steps)
    _require(c.optim.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}", c.optim.schedule)
    _require(0 <= c.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "a value in [0, 1]", c.optim.min_lr_ratio)
    _require(c.optim.clip_norm >= 0, "optim.clip_norm", "a value >= 0 (0 disables clipping)", c.optim.clip_norm)
    _require(c.optim.micro_batches >= 1, "optim.micro_batches", "an int >= 1", c.optim.micro_batches)
    _require(c.data.batch_size % c.optim.micro_batches == 0, "optim.micro_batches",
             f"a divisor of data.batch_size={c.data.batch_size}", c.optim.micro_batches)
    for name in ("steps", "log_every", "ckpt_every", "keep_ckpts", "eval_every"):
        _require(c.train[name] >= 1, f"train.{name}", "an int >= 1", c.train[name])
    _require(c.train.eval_batches >= 0, "train.eval_batches", "an int >= 0 (0: the whole eval split)",
             c.train.eval_batches)
    _require(c.train.epochs >= 0, "train.epochs", "a number >= 0 (0: use train.steps)", c.train.epochs)
    if c.data.corpus and not c.data.manifest:
        raise ConfigError(f"config key 'data.manifest' is empty, but data.corpus={c.data.corpus!r} names a corpus of "
                          f"one: pass --config.data.manifest=DIR, the workdir of `fwm data` (or its manifest.json)")
    _require(not c.data.manifest or bool(c.data.corpus), "data.corpus", "a corpus name of data.manifest", "")
    _require(c.train.peak_flops_per_device >= 0, "train.peak_flops_per_device", "a value >= 0 (0: table)",
             c.train.peak_flops_per_device)
    _require(c.tokenizer.train.vocab_size > 0, "tokenizer.train.vocab_size", "a positive int",
             c.tokenizer.train.vocab_size)
    check_rl_values(c.rl)


def check_rl_values(rl: ml_collections.ConfigDict) -> None:
    """The `rl` section: choices, ranges, and which rewards a response variant can earn."""
    # Imported here, not at the top: the choices live with the RL code (one definition), and the
    # supervised modules, which import this one, must not import the RL ones.
    from fwm.envs.sandbox import ISOLATION_MODES
    from fwm.envs.scoring import QA_METRICS
    from fwm.rl.advantages import ESTIMATORS
    from fwm.rl.losses import AGGREGATIONS
    from fwm.rl.rewards import NO_FUTURE_RULES, OUTCOME_METRICS

    _require(rl.variant in VARIANTS, "rl.variant", f"one of {VARIANTS}", rl.variant)
    _require(rl.group_size >= 2, "rl.group_size", "an int >= 2 (a group of one has no baseline)", rl.group_size)
    _require(rl.rollout_batch >= rl.group_size and rl.rollout_batch % rl.group_size == 0, "rl.rollout_batch",
             f"a positive multiple of rl.group_size={rl.group_size}", rl.rollout_batch)
    for name in ("max_turns", "max_new_tokens", "mini_batches", "epochs"):
        _require(rl[name] >= 1, f"rl.{name}", "an int >= 1", rl[name])
    _require(rl.temperature > 0, "rl.temperature", "a value > 0", rl.temperature)
    if rl.pack:
        _require(rl.loss_aggregation == "token_mean", "rl.loss_aggregation", "'token_mean' with rl.pack=True (a "
                 "packed row holds several sequences; sequence_mean_token_mean would average them as one)",
                 rl.loss_aggregation)
    _require(rl.old_logprobs in ("recompute", "sampler"), "rl.old_logprobs", "'recompute' or 'sampler'",
             rl.old_logprobs)
    _require(rl.outcome_metric in OUTCOME_METRICS, "rl.outcome_metric", f"one of {OUTCOME_METRICS}",
             rl.outcome_metric)
    _require(0 < rl.correct_threshold <= 1, "rl.correct_threshold", "a value in (0, 1]", rl.correct_threshold)
    _require(rl.format_penalty >= 0, "rl.format_penalty", "a value >= 0", rl.format_penalty)
    _require(rl.future_start in FUTURE_STARTS, "rl.future_start", f"one of {FUTURE_STARTS}", rl.future_start)
    _require(rl.ground_match in GROUND_MATCHES, "rl.ground_match", f"one of {GROUND_MATCHES}", rl.ground_match)
    _require(rl.ground_match != "new_evidence" or rl.future_start == "observation", "rl.future_start",
             "'observation' with rl.ground_match='new_evidence' (no action is evidence)", rl.future_start)
    _require(rl.ground_no_future in NO_FUTURE_RULES, "rl.ground_no_future", f"one of {NO_FUTURE_RULES}",
             rl.ground_no_future)
    _require(rl.omega >= 0, "rl.omega", "a value >= 0", rl.omega)
    _require(rl.advantage in ESTIMATORS, "rl.advantage", f"one of {tuple(ESTIMATORS)}", rl.advantage)
    _require(rl.wm_advantage in ("",) + tuple(ESTIMATORS), "rl.wm_advantage",
             f"'' (= rl.advantage) or one of {tuple(ESTIMATORS)}", rl.wm_advantage)
    _require(rl.advantage_eps > 0, "rl.advantage_eps", "a value > 0", rl.advantage_eps)
    _require(rl.kl_beta >= 0, "rl.kl_beta", "a value >= 0 (0: no KL)", rl.kl_beta)
    _require(0 <= rl.clip_eps_low < 1, "rl.clip_eps_low", "a value in [0, 1)", rl.clip_eps_low)
    _require(rl.clip_eps_high >= 0, "rl.clip_eps_high", "a value >= 0", rl.clip_eps_high)
    _require(rl.loss_aggregation in AGGREGATIONS, "rl.loss_aggregation", f"one of {AGGREGATIONS}",
             rl.loss_aggregation)
    # What the variant's responses hold: plain has no keywords or confidence, state no confidence.
    if rl.variant != "full":
        for name in ("calib_reward", "omega"):
            _require(not rl[name], f"rl.{name}", f"off (0/False): the {rl.variant!r} variant states no confidence",
                     rl[name])
    if rl.variant == "plain":
        _require(not rl.ground_reward, "rl.ground_reward", "False: the 'plain' variant writes no keywords",
                 rl.ground_reward)
    _require(rl.tool in ("search", "python"), "rl.tool", "search or python", rl.tool)
    _require(rl.env_metric in QA_METRICS, "rl.env_metric", f"one of {sorted(QA_METRICS)}", rl.env_metric)
    _require(rl.topk >= 1, "rl.topk", "an int >= 1", rl.topk)
    _require(rl.timeout_s > 0, "rl.timeout_s", "a value > 0", rl.timeout_s)
    _require(rl.memory_mb > 0, "rl.memory_mb", "an int > 0", rl.memory_mb)
    _require(rl.isolation in ISOLATION_MODES, "rl.isolation", f"one of {ISOLATION_MODES}", rl.isolation)
    _require(rl.env_threads >= 1, "rl.env_threads", "an int >= 1", rl.env_threads)
    _require(rl.prompt_budget_tokens >= 0, "rl.prompt_budget_tokens", "an int >= 0 (0: all the room)",
             rl.prompt_budget_tokens)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Unknown keys, then types, then values; raises ConfigError naming the dotted key. Returns config."""
    schema = default_config()
    configlib.check_keys(config, schema)
    # model.rope_scaling defaults to None and otherwise holds the HF rope_scaling items.
    configlib.check_types(config, schema, nullable={"model.rope_scaling": (tuple, list)})
    check_values(config)
    return config


def model_config_from(fields: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the `model` section's fields (lists become tuples)."""
    fields = dict(fields)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(fields["rope_scaling"])
    return ModelConfig.from_dict(fields)
