"""The learnable search setting: its data and training configs validate, and the teacher-forced probe
(experiments/action_match.py) scores exactly the tokens it claims to."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from fwm import config as config_lib
from fwm.data import features
from fwm.model import transformer
from fwm.tokenizer import train_sentencepiece
from fwm.trajectories import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learnable_configs_validate():
    data = _module("synthetic_learnable")
    for arg in (None, "runlocal", "noisy_sft,topk3", "hops4,runlocal"):
        config = data.get_config(arg)
        pipeline.validate_data_config(config)
        assert config.world.knowledge.fresh_entities and pipeline.world_config(config).fresh_entities
    train = _module("synthetic_learnable_train")
    for arg in (None, "full", "state,big", "pretrain", "plain,runlocal"):
        config_lib.validate(train.get_config(arg))
    assert train.get_config("full").data.train_files[0].endswith("sft_full.jsonl")
    with pytest.raises(ValueError, match="at most one"):
        train.get_config("plain,full")
    rl = _module("rl").get_config("learnable")  # RL on the same world: its env, tasks and index
    rl.init.source = "orbax:/sft/checkpoints"
    config_lib.validate(rl)
    assert (rl.rl.topk, rl.rl.max_turns) == (1, 6) and rl.data.train_files[0].endswith("rl_tasks.jsonl")


def test_probe_masks_the_response_and_its_action(tmp_path):
    probe = _module("action_match")
    record = {"id": "sft/oracle/knowledge-train-00003/0/1/plain", "variant": "plain",
              "prompt": "Question: What is the city where Kalo Mite was born?\n\nStep 2:\n",
              "response": "<think>I will search for Dapu.</think><action><search>Dapu</search></action>"}
    tokenizer = train_sentencepiece([record["prompt"] + record["response"]] * 20, str(tmp_path / "sp.model"), 340)
    example = features.sft_example(record, tokenizer, seq_len=128)
    masks = probe.target_masks(example, record["response"], tokenizer)
    response_ids = tokenizer.encode(record["response"])
    assert masks["response"].sum() == len(response_ids)  # every response token, not the EOS
    assert tokenizer.decode(example["targets"][masks["response"]]) == record["response"]
    assert tokenizer.decode(example["targets"][masks["action"]]) == "<action><search>Dapu</search></action>"
    assert [probe.step_kind(s, 2) for s in range(3)] == ["search_subject", "search_linked", "answer"]

    cfg = transformer.ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    result = probe.evaluate(params, cfg, tokenizer, [record], {"knowledge-train-00003": 2}, seq_len=128,
                            batch_size=2)
    assert set(result) == {"all", "search_linked", "search_linked/2hop"} and result["all"]["n"] == 1
    assert result["all"]["response"] == 0.0  # an untrained model does not write the gold step


@pytest.mark.parametrize("rl_documents", [True, False])
def test_learnable_data_end_to_end_keeps_eval_documents_out_of_stage_0(tmp_path, rl_documents):
    config = _module("synthetic_learnable").get_config("runlocal")
    config.corpora.pretrain_rl_documents = rl_documents
    config.workdir, config.workers, config.progress = str(tmp_path), 0, False
    config.world.knowledge.update(dict(num_train_questions=24, num_test_questions=6))
    config.splits.update(dict(sft_tasks=8, rl_tasks=4))
    config.collect.policies = config.corpora.mid_train_policies = config.corpora.sft_policies = ("oracle",)
    config.blocks.mc_k = 1
    stats = pipeline.run(config)
    assert stats["blocks"]["rejections"] == 0 and stats["corpora"]["sft_trajectories"] == 8
    eval_tasks = [json.loads(line) for line in open(tmp_path / "world" / "splits" / "eval.jsonl")]
    eval_docs = {hop["subject_id"] for task in eval_tasks for hop in task["metadata"]["hops"]}
    rl_tasks = [json.loads(line) for line in open(tmp_path / "world" / "splits" / "rl.jsonl")]
    rl_docs = {hop["subject_id"] for task in rl_tasks for hop in task["metadata"]["hops"]}
    # stage-0 records are documents and their paraphrases ("DOC/pN"), split into train and eval files
    pretrain = {json.loads(line)["id"].split("/")[0] for name in ("pretrain.jsonl", "pretrain_eval.jsonl")
                if (tmp_path / "corpora" / name).exists() for line in open(tmp_path / "corpora" / name)}
    corpus = {json.loads(line)["id"] for line in open(tmp_path / "world" / "corpus.jsonl")}
    held_out = eval_docs if rl_documents else eval_docs | rl_docs
    assert eval_docs and rl_docs and pretrain == corpus - held_out  # every other question's documents stay in
