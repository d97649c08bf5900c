"""`fwm data` end to end: the runlocal search config as a user runs it (subprocess), statistics and files,
skipping finished stages on a rerun, determinism across worker counts, config errors, the math config."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fwm.config import ConfigError
from fwm.trajectories import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "experiments", "synthetic_search.py")
MATH = os.path.join(ROOT, "experiments", "synthetic_math.py")
CORPORA = ("pretrain", "mid_train_plain", "mid_train_wm", "iwm", "sft_plain", "sft_state", "sft_full", "rl_tasks",
           "eval_tasks")


def _fwm(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "fwm.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def _experiment(path, arg):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _files(workdir):
    """Relative path -> bytes of every data file (markers and stats hold timings, so they are left out)."""
    out = {}
    for directory, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith("stage.json") and name != "stats.json" and "bm25" not in directory:
                out[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fwm_data") / "search")
    done = _fwm("data", "--config", f"{SEARCH}:runlocal", "--workdir", workdir, "--config.workers=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_fwm_data_prints_and_writes_its_statistics(search_run):
    workdir, done = search_run
    stats = json.load(open(os.path.join(workdir, "stats.json")))
    assert stats["stages"] == {"world": "ran", "collect": "ran", "blocks": "ran", "tokenizer": "ran", "corpora": "ran"}
    for line in ("trajectories mid_train noisy", "trajectories sft       oracle", "Monte Carlo K=4",
                 "confidence Q(s_t, a_t)", "erring steps", "AUROC", "history cut in",
                 f"tokens counted as tokens of {workdir}/tokenizer.model", "0 rejected (0 for spoilers)", "mid_train_wm"):
        assert line in done.stdout, done.stdout
    assert "collect mid_train" in done.stderr  # the tqdm bar
    rates = {policy: s["success_rate"] for policy, s in stats["collect"]["mid_train"].items()}
    assert rates["oracle"] == 1.0 and 0.3 < rates["noisy"] < 1.0 and rates["random"] < 0.2
    assert stats["blocks"]["mc_k"] == 4 and stats["blocks"]["blocks_written"] == stats["blocks"]["annotated_steps"] > 0
    assert stats["blocks"]["spoiler_rejections"] == 0
    q = stats["blocks"]["q_vs_outcome"]  # q after a_t tells erring steps from the rest
    assert q["erring_steps"] > 0 and q["mean_q_erring"] < q["mean_q_other"] and q["auroc"] > 0.6
    blocks = [json.loads(line) for line in open(os.path.join(workdir, "blocks", "blocks.jsonl"))]
    assert {b["confidence_kind"] for b in blocks} == {"q"} and all(isinstance(b["erring"], bool) for b in blocks)
    summary = stats["corpora"]
    assert set(summary["corpora"]) == set(CORPORA)
    for name, entry in summary["corpora"].items():  # the statistics describe the files
        with open(os.path.join(workdir, "corpora", entry["path"])) as f:
            assert sum(1 for _ in f) == entry["records"] > 0, name
    assert summary["sft_steps"] < summary["mid_train_steps"]
    manifest = json.load(open(os.path.join(workdir, "corpora", "manifest.json")))  # training stages find the tokenizer
    assert manifest["tokenizer"] == "../tokenizer.model" and os.path.isfile(os.path.join(workdir, "tokenizer.model"))
    assert manifest["corpora"]["pretrain"]["eval_records"] > 0
    with open(os.path.join(workdir, "trajectories", "mid_train.jsonl")) as f:
        assert sum(1 for _ in f) == sum(s["trajectories"] for s in stats["collect"]["mid_train"].values())


def test_rerun_skips_finished_stages_and_redoes_changed_ones(search_run):
    workdir, first = search_run
    before = {path: os.stat(os.path.join(workdir, path)).st_mtime_ns for path in _files(workdir)}
    again = _fwm("data", "--config", f"{SEARCH}:runlocal", "--workdir", workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages: world skipped, collect skipped, blocks skipped, tokenizer skipped, corpora skipped" in again.stdout
    assert again.stdout.splitlines()[2:] == first.stdout.splitlines()[2:]  # same statistics
    assert {path: os.stat(os.path.join(workdir, path)).st_mtime_ns for path in _files(workdir)} == before
    changed = _fwm("data", "--config", f"{SEARCH}:runlocal", "--workdir", workdir, "--config.corpora.eval_fraction=0.3")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "stages: world skipped, collect skipped, blocks skipped, tokenizer skipped, corpora ran" in changed.stdout
    stats = json.load(open(os.path.join(workdir, "stats.json")))
    assert stats["corpora"]["corpora"]["mid_train_plain"]["eval_records"] > 0


def test_results_do_not_depend_on_the_worker_count(search_run, tmp_path):
    workdir, _ = search_run
    config = _experiment(SEARCH, "runlocal")
    config.workdir, config.workers, config.progress = str(tmp_path / "serial"), 0, False
    pipeline.run(config)
    parallel, serial = _files(workdir), _files(config.workdir)
    shared = [path for path in serial if not path.startswith("corpora")]  # the rerun above changed the corpora
    assert shared and all(serial[path] == parallel[path] for path in shared)


def test_config_errors_name_the_key(tmp_path):
    done = _fwm("data", "--config", f"{SEARCH}:runlocal", "--workdir", str(tmp_path), "--config.blocks.mc_kk=3")
    assert done.returncode != 0 and "blocks.mc_kk" in done.stderr and "'mc_k'" in done.stderr
    done = _fwm("data", "--config", f"{SEARCH}:runlocal", "--workdir", str(tmp_path), "--config.blocks.share=2.0")
    assert done.returncode != 0 and "'blocks.share'" in done.stderr
    assert not os.listdir(tmp_path)  # nothing written before validation
    cases = {"splits": ("splits.rl_tasks", 10_000), "world.knowledge": ("world.knowledge.num_people", 1),
             "corpora.mid_train_policies": ("corpora.mid_train_policies", ("greedy",)),
             "env.isolation": ("env.isolation", "none"), "policies.mistake_weights": ("policies.mistake_weights", (1,))}
    for expected, (key, value) in cases.items():
        config = _experiment(SEARCH, "runlocal")
        section, name = key.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        node[name] = value
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            pipeline.validate_data_config(config)
    with pytest.raises(ValueError, match="unknown variant"):
        _experiment(MATH, "tiny")


def test_math_config_builds_its_corpora(tmp_path):
    config = _experiment(MATH, "runlocal")
    config.workdir, config.workers, config.progress = str(tmp_path), 2, False
    stats = pipeline.run(config)
    assert stats["world"]["kind"] == "arithmetic" and stats["collect"]["mid_train"]["oracle"]["success_rate"] == 1.0
    assert stats["blocks"]["blocks_written"] > 0 and stats["blocks"]["spoiler_rejections"] == 0
    assert "pretrain" not in stats["corpora"]["corpora"]  # the arithmetic world has no documents
    text = pipeline.format_stats(stats)
    assert "world: arithmetic" in text and "sft_full" in text
