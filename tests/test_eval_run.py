"""fwm.eval.run's inputs: real task formats (Search-R1 rows) searched over a Search-R1 HTTP server through the
env pool (one batched request per step), and the tool chosen from the data workdir or the task format."""
import json

import pytest

from fwm.configlib import ConfigError
from fwm.eval import run
from fwm.eval.config import default_eval_config, validate_eval_config
from fwm.rollout.envs import EnvPool
from fwm.schema import Action
from local_http import LocalJSONServer


def _config(**updates):
    config = default_eval_config()
    config.checkpoint = "/nowhere"
    for key, value in updates.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return validate_eval_config(config)


def test_search_r1_tasks_over_a_retriever_server(tmp_path):
    rows = [{"id": "nq-1", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare"], "data_source": "nq"},
            {"id": "hq-1", "question": "capital of peru?", "golden_answers": ["Lima"], "data_source": "hotpotqa"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    requests = []

    def respond(path, headers, body):
        requests.append(body)
        return 200, {"result": [[{"document": {"id": "d1", "contents": f"\"Title\"\n{q} text"}, "score": 1.0}]
                                for q in body["queries"]]}, 0.0

    server = LocalJSONServer(respond)
    try:
        config = _config(tasks_file=str(tmp_path / "test.jsonl"), tasks_format="search_r1", max_tasks=1,
                         **{"env.retriever_url": server.address + "/retrieve"})
        path, tasks = run.load_tasks(config)
        assert [t.data_source for t in tasks] == ["nq"] and tasks[0].answers == ("Shakespeare",)
        spec, retriever = run.env_spec(config)
        assert spec.tool == "search" and retriever is not None
        with EnvPool(spec, retriever=retriever) as pool:
            envs = [pool.new_env(), pool.new_env()]
            for env in envs:
                env.reset(tasks[0])
            results = pool.step(envs, [Action("search", "hamlet author"), Action("search", " hamlet author ")])
        assert [r[0] for r in results] == ['Doc 1(Title: "Title") hamlet author text\n'] * 2
        assert len(requests) == 1 and requests[0]["queries"] == ["hamlet author"]
    finally:
        server.close()


def test_tool_follows_the_data_workdir_or_the_task_format(tmp_path):
    (tmp_path / "world").mkdir()
    assert run.env_spec(_config(data_dir=str(tmp_path)))[0].tool == "python"  # an arithmetic world
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "so #### 2"}) + "\n")
    config = _config(tasks_file=str(tmp_path / "gsm.jsonl"), tasks_format="gsm8k")
    assert run.env_spec(config)[0].tool == "python" and run.load_tasks(config)[1][0].answers == ("2",)
    with pytest.raises(ConfigError, match="env.retriever_url"):
        run.env_spec(_config(tasks_file=str(tmp_path / "gsm.jsonl"), tasks_format="search_r1"))
    with pytest.raises(ConfigError, match="'tasks_format'"):
        _config(tasks_file="x", tasks_format="csv")
    with pytest.raises(ConfigError, match="'data_dir'"):
        _config()


def test_tokenizer_is_found_beside_the_training_checkpoints(tmp_path):
    train = tmp_path / "train"
    (train / "checkpoints" / "8").mkdir(parents=True)
    (train / "tokenizer.model").write_text("x")
    step_dir = str(train / "checkpoints" / "8")
    assert run.resolve_tokenizer("", step_dir, {"tokenizer": "relative/tokenizer.model"}) == str(train / "tokenizer.model")
    assert run.resolve_checkpoint(str(train)) == str(train / "checkpoints")
    (tmp_path / "params").mkdir()
    with pytest.raises(FileNotFoundError, match="--config.tokenizer"):
        run.resolve_tokenizer("", str(tmp_path / "params"), {})


def test_tensorboard_scalars_are_the_numbers_of_each_mode():
    results = {"num_tasks": 3, "greedy": {"by_source": {"all": {"score": 0.5, "episodes": 2, "mean@4": 0.25}},
                                          "calibration": {"steps": {"ece": 0.1, "auroc": None, "reliability": [{}]}},
                                          "recovery": {"rate": None, "episodes": 0}, "risk_coverage": [{}],
                                          "flag": True, "k": 4}}
    assert run.tensorboard_scalars(results) == {
        "eval/greedy/by_source/all/score": 0.5, "eval/greedy/by_source/all/episodes": 2.0,
        "eval/greedy/by_source/all/mean_at_4": 0.25, "eval/greedy/calibration/steps/ece": 0.1,
        "eval/greedy/recovery/episodes": 0.0, "eval/greedy/k": 4.0}


def test_turns_and_topk_default_to_the_data_workdirs_own(tmp_path):
    config = default_eval_config()
    config.data_dir = str(tmp_path)
    assert run.turns_and_topk(config) == (8, 3)  # no stats.json: the defaults
    (tmp_path / "stats.json").write_text(json.dumps({"env": {"max_turns": 6, "topk": 1}}))
    assert run.turns_and_topk(config) == (6, 1)  # what the trajectories were collected with
    config.env.topk = 2
    assert run.turns_and_topk(config) == (6, 2)  # an explicit value wins
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(ConfigError, match="stats.json"):
        run.turns_and_topk(config)
