"""The paper's math setting at its scale: Qwen2.5-3B through WM-AMT, FE-SFT and FC-RL with the sandboxed
python tool; the same model, machines, meshes, batches and memory per device as
experiments/paper_qwen3b_search.py (read its docstring for the arithmetic), except:

- data: trajectories of math problems solved with the code interpreter (DATA below); RL task records
  {"id", "question", "answers"} from a math training set (fwm.envs.readers.read_math / read_gsm8k);
- rl: tool python (rl.timeout_s per call, rl.memory_mb, sandbox isolation), omega 0.1 (the paper's math
  value), answers checked by the math scorer; no retriever;
- evaluation: AIME 2024-2026 (EVAL_SETS), mean@30 and pass@30:
    fwm eval --config experiments/eval.py --config.checkpoint=$RUNS/fc_rl --config.tasks_format=math \\
        --config.tasks_file=DATA/aime/aime2024.jsonl --config.sampling.k=30 --config.sampling.max_new_tokens=1024 \\
        --workdir OUT/aime2024

  fwm train --config experiments/paper_qwen3b_math.py:mid_train,v4_32 --workdir $RUNS/mid_wm
  fwm train --config experiments/paper_qwen3b_math.py:sft,v4_32 --workdir $RUNS/sft_full
  fwm train --config experiments/paper_qwen3b_math.py:rl,gpu8 --workdir $RUNS/fc_rl
Variants: as experiments/paper_qwen3b_search.py (one stage of mid_train, sft, rl; one machine of v4_32,
v5e_64, v5e_8, gpu8).
"""
import importlib.util
import os

_SEARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_qwen3b_search.py")
DATA = "gs://YOUR_BUCKET/fwm/data/math"
RUNS = "gs://YOUR_BUCKET/fwm/runs/math"
EVAL_SETS = ("aime2024", "aime2025", "aime2026")


def _search_module():
    # One definition of model, machines and batches: experiment files are loaded by path, not as a package.
    spec = importlib.util.spec_from_file_location("paper_qwen3b_search", _SEARCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    search = _search_module()
    c = search.get_config(arg, where="experiments/paper_qwen3b_math.py")
    with c.ignore_type():
        for key in ("train_files", "eval_files"):
            c.data[key] = tuple(path.replace(search.DATA, DATA) for path in c.data[key])
        c.init.source = c.init.source.replace(search.RUNS, RUNS)
    if c.stage == "rl":
        # The paper's math setting: omega 0.1, the code interpreter as the tool; answers are scored, not retrieved.
        c.rl.update(dict(tool="python", retriever_url="", index_dir="", omega=0.1, outcome_metric="score",
                         timeout_s=10.0, memory_mb=1024, max_new_tokens=1024,
                         prompt_budget_tokens=search.SEQ_LEN - 1024))
    return c
