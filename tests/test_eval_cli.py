"""`fwm eval` end to end as a user runs it: a `fwm data` workdir, a (random, untrained) checkpoint with its
tokenizer, greedy and sampled episodes -> eval.json, eval.md, episodes_*.jsonl. A random model writes
malformed responses: they are scored, never a crash."""
import json
import os
import subprocess
import sys

import jax

from fwm.envs.jsonl import read_jsonl
from fwm.model import transformer
from fwm.model.checkpoint import save_params
from fwm.tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fwm(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "fwm.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_fwm_eval_end_to_end_on_a_random_model(tmp_path):
    data = tmp_path / "data"
    done = _fwm("data", "--config", "experiments/synthetic_search.py:runlocal", "--config.workers=0",
                "--config.progress=False", "--workdir", str(data))
    assert done.returncode == 0, done.stderr[-3000:]
    texts = [row["text"] for _, row in read_jsonl(data / "corpora" / "pretrain.jsonl")]
    tokenizer = train_sentencepiece(texts, str(tmp_path / "tok.model"), 400)
    cfg = transformer.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                  num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=512)
    save_params(tmp_path / "ckpt", cfg, transformer.init_params(cfg, jax.random.key(0)),
                {"tokenizer": str(tmp_path / "tok.model")})

    out = tmp_path / "eval"
    done = _fwm("eval", "--config", "experiments/eval.py:runlocal,sampled", f"--config.checkpoint={tmp_path / 'ckpt'}",
                f"--config.data_dir={data}", "--config.max_tasks=3", "--config.sampling.k=2",
                "--config.sampling.max_new_tokens=24", "--config.env.max_turns=3", "--config.progress=False",
                "--config.foresight.expected_q=True", "--workdir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())
    greedy, sampled = results["greedy"]["by_source"]["all"], results["sampled"]["by_source"]["all"]
    assert results["num_tasks"] == 3 and greedy["episodes"] == 3 and sampled["episodes"] == 6
    assert 0.0 <= greedy["format_adherence"] <= 1.0 and greedy["malformed_steps"] > 0  # random text, scored
    assert greedy["turns"] == 3.0 and greedy["score"] == 0.0 and "pass@2" in sampled
    assert results["constant_answer"]["all"]["exact_match"]["value"] > 0
    assert results["greedy"]["gold_chain"]["episodes"] == 3
    _check_world_model_keys(results, out)
    # E[q] over every greedy step that wrote <confidence> (random text: few or none), the others counted missing
    expected = results["greedy"]["expected_q"]
    steps = sum(len(row["steps"]) for _, row in read_jsonl(out / "episodes_greedy.jsonl"))
    assert expected["steps"]["count"] + expected["steps"]["missing"] == steps and expected["values"][-1] == 100
    assert expected["last_step"]["count"] + expected["last_step"]["missing"] == 3
    assert isinstance(sampled["selected@2"], float) and 0.0 <= sampled["selected@2"] <= 1.0
    # and at the last step of each sampled episode, with selected@k by it (a float: ties and no E[q] are uniform)
    sampled_expected = results["sampled"]["expected_q"]
    assert sampled_expected["last_step"]["count"] + sampled_expected["last_step"]["missing"] == 6
    assert 0.0 <= sampled_expected["selected@2"] <= 1.0
    page = (out / "eval.md").read_text()
    assert "| all | 3 |" in page and "mean@2" in page and "Best constant answers" in page
    assert "| selected@2 by E[q] % |" in page
    assert "selected@2" in page and "| q (every step): ECE / Brier / AUROC |" in page and "Risk-coverage" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "eval/greedy/by_source/all/score" in tags and "eval/sampled/by_source/all/selected_at_2" in tags
    assert "eval/greedy/recovery/share" in tags and "eval/sampled/calibration/steps/missing_share" in tags
    assert page.strip() in done.stdout
    rows = [row for _, row in read_jsonl(out / "episodes_greedy.jsonl")]
    assert len(rows) == 3
    for step in (step for row in rows for step in row["steps"]):
        assert len(step["response_ids"]) == len(step["span_ids"]) == len(step["logprobs"]) <= 24
        assert step["prompt_ids"][0] == tokenizer.bos_id and len(step["prompt_ids"]) <= 512 - 24


def _is_number_or_undefined(value):
    """A number, or None where the definition needs data the run lacks (no q, no keywords, one outcome)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_world_model_keys(results, out):
    """The world-model keys of each run mode exist and hold numbers (None only where undefined)."""
    for mode in ("greedy", "sampled"):
        run = results[mode]
        episodes = run["by_source"]["all"]["episodes"]
        for population in ("steps", "last_step"):
            cal = run["calibration"][population]
            assert {"count", "missing", "missing_share", "ece", "brier", "auroc", "reliability"} <= set(cal)
            assert isinstance(cal["count"], int) and isinstance(cal["missing"], int)
            assert all(_is_number_or_undefined(cal[key]) for key in ("missing_share", "ece", "brier", "auroc"))
            assert (cal["ece"] is None) == (cal["count"] == 0)
        assert run["calibration"]["last_step"]["count"] + run["calibration"]["last_step"]["missing"] == episodes
        assert _is_number_or_undefined(run["keyword_grounding"]["rate"])
        assert isinstance(run["keyword_grounding"]["steps_with_keywords"], float)
        sight = run["foresight"]
        assert _is_number_or_undefined(sight["precision"]) and _is_number_or_undefined(sight["recall"])
        assert sight["episodes_without_metadata"] == 0  # the synthetic world's tasks carry their gold hops
        assert _is_number_or_undefined(run["planning_horizon"]["horizon"])
        assert _is_number_or_undefined(run["planning_horizon"]["largest_offset_at_half"])
        assert isinstance(run["planning_horizon"]["by_offset"], list)
        recovery = run["recovery"]
        # Random text: nearly every episode has a step without an action (an unproductive one); a random model
        # can still write a parsable action (tag pieces are single tokens), so count them from the episodes.
        rows = [row for _, row in read_jsonl(out / f"episodes_{mode}.jsonl")]
        malformed = sum(any(step["action"] is None for step in row["steps"]) for row in rows)  # no action
        assert 0 < malformed <= recovery["episodes"] <= episodes
        steps = [step for row in rows for step in row["steps"]]
        assert recovery["rate"] == 0.0  # none succeeds
        assert recovery["unproductive_steps"] >= sum(step["action"] is None for step in steps) / len(steps) > 0  # a share
        assert recovery["share"] == recovery["episodes"] / episodes
        curve = run["risk_coverage"]
        assert [row["threshold"] for row in curve] == [i / 10 for i in range(11)]
        assert all(0.0 <= row["coverage"] <= 1.0 and _is_number_or_undefined(row["accuracy"]) for row in curve)


def test_fwm_eval_config_errors_name_the_key(tmp_path):
    done = _fwm("eval", "--config", "experiments/eval.py", "--config.sampling.max_new_tokns=3", "--workdir",
                str(tmp_path))
    assert done.returncode != 0 and "sampling.max_new_tokns" in done.stderr and "max_new_tokens" in done.stderr
    done = _fwm("eval", "--config", "experiments/eval.py", "--workdir", str(tmp_path))
    assert done.returncode != 0 and "'checkpoint'" in done.stderr
