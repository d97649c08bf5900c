"""The `fwm eval` config: its own schema, `default_eval_config()`, validated with errors naming the dotted key.

experiments/eval.py starts from it; `--config.a.b=v` overrides are checked against it before flag parsing.
"""
from __future__ import annotations

from typing import Iterable

import ml_collections

from fwm.configlib import check_keys, check_override_args, check_types, require
from fwm.envs.sandbox import ISOLATION_MODES
from fwm.envs.scoring import QA_METRICS
from fwm.schema import VARIANTS


TASK_FORMATS = ("fwm", "search_r1", "gsm8k", "math")


def default_eval_config() -> ml_collections.ConfigDict:
    """Every key `fwm eval` reads, with defaults."""
    c = ml_collections.ConfigDict()
    c.workdir = ""              # set by --workdir: eval.json, eval.md, episodes_*.jsonl go here
    c.checkpoint = ""           # a training workdir, its checkpoints/ dir, a step dir or a params checkpoint
    c.tokenizer = ""            # '' : the tokenizer named in the checkpoint's meta (else CHECKPOINT/tokenizer.model)
    c.data_dir = ""             # a `fwm data` workdir: world/ (retriever or arithmetic) and corpora/
    c.tasks_file = ""           # '' : DATA_DIR/corpora/eval_tasks.jsonl (questions no training stage saw)
    c.tasks_format = "fwm"      # fwm (Task JSONL) | search_r1 | gsm8k | math (fwm.envs.readers; JSONL or Parquet)
    c.max_tasks = 0             # the first N tasks (0: all)
    c.seed = 0                  # episode seeds (sampling)
    c.progress = True           # tqdm bars on stderr
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.env = ml_collections.ConfigDict()
    c.env.max_turns = 0         # 0: the data workdir's own (DATA_DIR/stats.json "env", what its trajectories
    c.env.topk = 0              #    were collected with), else 8 turns / 3 passages per search query
    c.env.metric = "exact_match"  # search: the episode score (success = score 1)
    c.env.timeout_s = 5.0       # python tool and math answer checks
    c.env.memory_mb = 512
    c.env.isolation = "auto"
    c.env.threads = 8           # tool calls in flight
    c.env.retriever_url = ""    # a Search-R1 `POST /retrieve` server: search with it instead of DATA_DIR's BM25

    c.prompt = ml_collections.ConfigDict()
    c.prompt.variant = "full"   # the SFT variant the model was trained on: plain | state | full
    c.prompt.budget_tokens = 0  # render_prompt's history budget in tokens; 0: all the room the model has
    c.prompt.strict_actions = False  # act only on responses whose whole format is right

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 256   # per response; prompt room = model.max_seq_len - this
    # Prompts per sampler call (0: every running episode at once). Bounded by default: a call's prefill holds
    # rows x heads x prompt^2 scores, and 800 episodes of 512-token prompts in one call took 35 GB on CPU.
    c.sampling.max_batch = 256
    c.sampling.greedy = True          # one greedy episode per task
    c.sampling.k = 0                  # k sampled episodes per task for mean@k / pass@k (0: none)
    c.sampling.temperature = 1.0      # for the k samples
    c.sampling.top_k = 0              # 0: off
    c.sampling.top_p = 1.0            # 1: off
    c.foresight = ml_collections.ConfigDict()
    # E[q] from the model's probabilities of the <confidence> values (fwm.eval.expected_q): calibration of the
    # belief, not of the greedy mode, at every greedy step; and at the last step of every sampled episode, with
    # selected@k by it. Costs about one prefill per scored step.
    c.foresight.expected_q = False
    c.foresight.expected_q_values = tuple(range(0, 101, 10))
    c.foresight.expected_q_rows = 64  # steps prefilled per call (each then branches over the values)
    return c


def validate_eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Unknown keys, types, values; ConfigError naming the dotted key. Returns config."""
    check_keys(config, default_eval_config())
    check_types(config, default_eval_config())
    c = config
    require(bool(c.checkpoint), "checkpoint", "a checkpoint or training workdir (--config.checkpoint=DIR)", c.checkpoint)
    require(bool(c.data_dir or c.tasks_file), "data_dir", "a `fwm data` workdir (--config.data_dir=DIR)", c.data_dir)
    require(c.tasks_format in TASK_FORMATS, "tasks_format", f"one of {TASK_FORMATS}", c.tasks_format)
    require(bool(c.tasks_file) or c.tasks_format == "fwm", "tasks_file", f"a {c.tasks_format} file", c.tasks_file)
    require(c.max_tasks >= 0, "max_tasks", "an int >= 0 (0: all)", c.max_tasks)
    for axis in ("data", "fsdp", "tensor"):
        require(c.mesh[axis] == -1 or c.mesh[axis] > 0, f"mesh.{axis}", "a positive int or -1", c.mesh[axis])
    require(c.env.max_turns >= 0, "env.max_turns", "an int >= 0 (0: the data workdir's)", c.env.max_turns)
    require(c.env.topk >= 0, "env.topk", "an int >= 0 (0: the data workdir's)", c.env.topk)
    require(c.env.metric in QA_METRICS, "env.metric", f"one of {sorted(QA_METRICS)}", c.env.metric)
    require(c.env.timeout_s > 0, "env.timeout_s", "a number > 0", c.env.timeout_s)
    require(c.env.memory_mb > 0, "env.memory_mb", "an int > 0", c.env.memory_mb)
    require(c.env.isolation in ISOLATION_MODES, "env.isolation", f"one of {ISOLATION_MODES}", c.env.isolation)
    require(c.env.threads >= 1, "env.threads", "an int >= 1", c.env.threads)
    require(c.prompt.variant in VARIANTS, "prompt.variant", f"one of {VARIANTS}", c.prompt.variant)
    require(c.prompt.budget_tokens >= 0, "prompt.budget_tokens", "an int >= 0 (0: all the room)", c.prompt.budget_tokens)
    require(c.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "an int >= 1", c.sampling.max_new_tokens)
    require(c.sampling.max_batch >= 0, "sampling.max_batch", "an int >= 0", c.sampling.max_batch)
    require(c.sampling.k >= 0, "sampling.k", "an int >= 0", c.sampling.k)
    require(c.sampling.greedy or c.sampling.k > 0, "sampling", "greedy=True or k > 0 (something to run)",
            c.sampling.to_dict())
    require(c.sampling.temperature > 0, "sampling.temperature", "a number > 0 (greedy is sampling.greedy)",
            c.sampling.temperature)
    require(c.sampling.top_k >= 0, "sampling.top_k", "an int >= 0 (0: off)", c.sampling.top_k)
    require(0 < c.sampling.top_p <= 1, "sampling.top_p", "a number in (0, 1]", c.sampling.top_p)
    values = tuple(c.foresight.expected_q_values)
    require(bool(values) and len(set(values)) == len(values) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100 for v in values),
        "foresight.expected_q_values", "distinct ints in [0, 100]", values)
    require(c.foresight.expected_q_rows >= 1, "foresight.expected_q_rows", "an int >= 1", c.foresight.expected_q_rows)
    return config


def check_eval_override_args(argv: Iterable[str], flag_name: str = "config") -> None:
    """Checks `--config.a.b=v` override paths against default_eval_config() (see fwm.configlib)."""
    check_override_args(argv, default_eval_config(), flag_name)
