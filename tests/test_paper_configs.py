"""The paper-scale experiment configs (experiments/paper_qwen3b_*.py): every stage x machine variant loads
and validates without weights or data, its batch splits over its mesh, and the estimated memory per device
(fwm.train.memory.estimate, the docstring's arithmetic) fits the machine's HBM."""
import dataclasses
import importlib.util
import os

import pytest

from fwm import config as config_lib
from fwm.model.transformer import ModelConfig
from fwm.train import memory, state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("paper_qwen3b_search.py", "paper_qwen3b_math.py")


def _load(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "experiments", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SEARCH = _load("paper_qwen3b_search.py")
COMBOS = [(stage, machine) for stage in SEARCH.STAGES for machine in SEARCH.HARDWARE]
# The docstring's totals (GiB) for the update step, within 5% of the estimate.
DOCSTRING_GIB = {("mid_train", "v4_32"): 18.9, ("sft", "v4_32"): 18.2, ("mid_train", "v5e_64"): 11.4,
                 ("sft", "v5e_64"): 6.9, ("mid_train", "v5e_8"): 11.2, ("mid_train", "gpu8"): 37.6}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("stage,machine", COMBOS)
def test_variant_validates_and_fits(name, stage, machine):
    config = _load(name).get_config(f"{stage},{machine}")
    config_lib.validate(config)
    hardware = SEARCH.HARDWARE[machine]
    assert config.stage == stage and config.mesh.to_dict() == hardware["mesh"]
    assert config.model.param_dtype == "float32" and config.model.compute_dtype == "bfloat16"
    assert config.train.loss_chunk_size > 0
    shards = hardware["mesh"]["data"] * hardware["mesh"]["fsdp"]
    rows = config.data.batch_size if stage != "rl" else (
        config.rl.rollout_batch * config.rl.max_turns // config.rl.mini_batches)
    per_micro = -(-rows // shards) // config.optim.micro_batches
    assert per_micro <= hardware["rows"], (rows, shards, config.optim.micro_batches)
    if stage != "rl":
        assert config.data.batch_size % (shards * config.optim.micro_batches) == 0
    model = dataclasses.replace(ModelConfig.from_dict(config.model.to_dict()))
    tx = state_lib.make_optimizer(config.optim, config.train.steps)
    estimate = memory.estimate(model, tx, hardware["mesh"], shards * config.optim.micro_batches * hardware["rows"],
                               config.data.seq_len, config.optim.micro_batches, config.train.loss_chunk_size)
    extra = estimate["params"] if stage == "rl" and config.rl.kl_beta > 0 else 0.0  # the frozen reference
    total_gib = (estimate["total"] + extra) / memory.GIB
    print(f"{name} {stage} {machine}: estimated {total_gib:.1f} GiB of {hardware['hbm_gib']} per device")
    assert total_gib < 0.9 * hardware["hbm_gib"]
    if stage != "rl" and (stage, machine) in DOCSTRING_GIB:
        actual_rows = -(-config.data.batch_size // shards) // config.optim.micro_batches
        if actual_rows == hardware["rows"]:
            assert abs(total_gib - DOCSTRING_GIB[stage, machine]) < 0.05 * DOCSTRING_GIB[stage, machine]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("machine", [m for m in SEARCH.HARDWARE if SEARCH.HARDWARE[m]["hosts"] > 1])
def test_rl_on_a_pod_gives_every_host_whole_groups(name, machine):
    # fwm/rl/loop.py: each host runs whole groups of its own tasks, and its own rows of every batch.
    config, hosts = _load(name).get_config(f"rl,{machine}"), SEARCH.HARDWARE[machine]["hosts"]
    assert config.rl.rollout_batch % (hosts * config.rl.group_size) == 0
    assert (config.mesh.data * config.mesh.fsdp) % hosts == 0


def test_search_and_math_differ_where_the_paper_does():
    search, math = SEARCH.get_config("rl,gpu8"), _load("paper_qwen3b_math.py").get_config("rl,gpu8")
    assert (search.rl.tool, search.rl.omega, bool(search.rl.retriever_url)) == ("search", 0.2, True)
    assert (math.rl.tool, math.rl.omega, math.rl.retriever_url) == ("python", 0.1, "")
    assert "/math/" in math.data.train_files[0] and "/search/" in search.data.train_files[0]
