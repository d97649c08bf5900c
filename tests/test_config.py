"""Config defaults and validation: unknown keys name the nearest valid key; bad types/values name the key."""
import os
import subprocess
import sys

import ml_collections
import pytest

from fwm import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_experiment(name, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_defaults_and_experiment_variants_validate():
    config_lib.validate(config_lib.default_config())
    for arg in (None, "sft", "mid_train,runlocal"):
        config = _load_experiment("tiny", arg)
        config_lib.validate(config)
    assert _load_experiment("tiny", "sft").stage == "sft"
    assert _load_experiment("tiny", "runlocal").train.steps < _load_experiment("tiny").train.steps
    with pytest.raises(ValueError, match="unknown variant"):
        _load_experiment("tiny", "sfft")


@pytest.mark.parametrize("name", ["synthetic_search_train", "synthetic_math_train"])
def test_synthetic_training_configs_validate_and_compare_arms_at_equal_epochs(name):
    stages = ("mid_train_plain", "mid_train_wm", "iwm", "sft_plain", "sft_state", "sft_full")
    if name == "synthetic_math_train":  # no documents in the arithmetic world: no stage 0
        with pytest.raises(ValueError, match="no stage 0"):
            _load_experiment(name, "pretrain,runlocal")
    else:
        stages += ("pretrain",)
    for stage in stages:
        for arg in (stage, f"{stage},runlocal"):
            config = _load_experiment(name, arg)
            with pytest.raises(config_lib.ConfigError, match=r"pass --config.data.manifest=DIR"):
                config_lib.validate(config)
            config.data.manifest = "/data/synthetic_search"
            config_lib.validate(config)
            assert config.data.corpus == stage and config.train.epochs > 0 and not config.tokenizer.path
    plain, wm = (_load_experiment(name, f"mid_train_{arm}") for arm in ("plain", "wm"))
    plain.data.corpus = wm.data.corpus
    assert plain.to_dict() == wm.to_dict()  # the arms differ by their corpus only
    with pytest.raises(ValueError, match="exactly one stage"):
        _load_experiment(name, "sft_full,iwm")


@pytest.mark.parametrize("path, typo, nearest", [
    ("optim", "warmup_step", "warmup_steps"),
    ("model", "hiden_size", "hidden_size"),
    ("tokenizer.train", "vocab_sise", "vocab_size"),
    ("", "stag", "stage"),
    ("optim", "learning_rate", "lr"),        # an alias: difflib alone says 'min_lr_ratio'
    ("optim", "max_grad_norm", "clip_norm"),
    ("data", "batchsize", "batch_size"),
    ("train", "num_epochs", "epochs"),
])
def test_unknown_key_names_full_path_and_nearest(path, typo, nearest):
    config = config_lib.default_config()
    section = config
    for part in filter(None, path.split(".")):
        section = section[part]
    section[typo] = 1
    dotted = f"{path}.{typo}" if path else typo
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(config)
    assert repr(dotted) in str(err.value) and repr(nearest) in str(err.value)


def test_wrong_types_and_values_name_key_and_expectation():
    cases = [
        (lambda c: c.optim.__setitem__("schedule", "cosin"), "optim.schedule", "cosine"),
        (lambda c: c.__setitem__("stage", "pretraining"), "stage", "mid_train"),
        (lambda c: c.init.__setitem__("source", "orbax"), "init.source", "orbax:PATH"),
        (lambda c: c.optim.__setitem__("micro_batches", 3), "optim.micro_batches", "divisor"),
        (lambda c: c.data.__setitem__("trained_roles", ("document", "obs")), "data.trained_roles", "roles"),
        (lambda c: c.model.__setitem__("num_kv_heads", 3), "model", "multiple"),
        (lambda c: c.data.__setitem__("seq_len", 4096), "data.seq_len", "max_seq_len"),
    ]
    for mutate, key, expected in cases:
        config = config_lib.default_config()
        mutate(config)
        with pytest.raises(config_lib.ConfigError) as err:
            config_lib.validate(config)
        assert repr(key) in str(err.value) or f"'{key}'" in str(err.value), (key, str(err.value))
        assert expected in str(err.value), (key, str(err.value))
    # A type that ConfigDict's own assignment check lets through (a replaced section) is caught too.
    config = config_lib.default_config()
    config.mesh = ml_collections.ConfigDict({"data": "all", "fsdp": 1, "tensor": 1})
    with pytest.raises(config_lib.ConfigError, match="'mesh.data': expected an int"):
        config_lib.validate(config)


def test_override_paths_are_checked_before_flag_parsing():
    config_lib.check_override_args(["fwm", "train", "--config.optim.lr=1e-3", "--workdir=/x"])
    with pytest.raises(config_lib.ConfigError, match=r"'optim\.lrr'.*did you mean 'lr'"):
        config_lib.check_override_args(["--config.optim.lrr=1e-3"])
    with pytest.raises(config_lib.ConfigError, match=r"'trian'.*did you mean 'train'"):
        config_lib.check_override_args(["--config.trian.steps=3"])


def test_cli_unknown_override_fails_with_nearest_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fwm.cli", "train", "--config", os.path.join(REPO, "experiments", "tiny.py"),
         "--config.train.stpes=3", "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode != 0
    assert "'train.stpes'" in proc.stderr and "did you mean 'steps'" in proc.stderr, proc.stderr[-2000:]
    assert not os.listdir(tmp_path)  # nothing ran
