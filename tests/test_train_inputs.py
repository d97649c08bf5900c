"""A training config's inputs from a `fwm data` manifest: files, trained roles, tokenizer; steps from epochs."""
import json
import math
import os

import pytest

from fwm import config as config_lib
from fwm.data import features, records
from fwm.files import write_json
from fwm.tokenizer import load_tokenizer, train_sentencepiece
from fwm.train import inputs

OBSERVATION = "<information>zebra river city</information>"


def _lm(i):
    return {"id": f"t{i}", "segments": [{"role": "prompt", "text": f"question {i} about the river "},
                                        {"role": "action", "text": "<action><search>river</search></action>"},
                                        {"role": "observation", "text": OBSERVATION}]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A `fwm data`-shaped workdir: corpora/ with an LM, an IWM and an SFT corpus, manifest.json, tokenizer."""
    root = tmp_path_factory.mktemp("data")
    corpora = root / "corpora"
    corpora.mkdir()
    texts = ["".join(s["text"] for s in _lm(i)["segments"]) for i in range(200)]
    train_sentencepiece(texts, str(corpora / "world.model"), 320)
    iwm = [_lm(i) | {"trained_roles": ["observation"]} for i in range(6)]
    files = {"mid.jsonl": [_lm(i) for i in range(10)], "mid_eval.jsonl": [_lm(i) for i in range(10, 12)],
             "iwm.jsonl": iwm, "sft.jsonl": [{"id": "s0", "prompt": "q", "response": "<think>a</think>",
                                              "variant": "plain"}]}
    for name, rows in files.items():
        (corpora / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json(corpora / "manifest.json", {"tokenizer": "world.model", "token_count": "words", "corpora": {
        "mid_train_plain": {"path": "mid.jsonl", "eval_path": "mid_eval.jsonl", "stage": "lm", "records": 10,
                            "trained_roles": list(features.DEFAULT_TRAINED_ROLES), "tokens": 100},
        "iwm": {"path": "iwm.jsonl", "stage": "lm", "records": 6, "tokens": 60},  # roles only in the records
        "sft_plain": {"path": "sft.jsonl", "stage": "sft", "records": 1, "tokens": 3}}})
    return root


def _config(data_dir, corpus, stage="mid_train", **data):
    config = config_lib.default_config()
    config.stage, config.data.manifest, config.data.corpus = stage, str(data_dir), corpus
    config.train.workdir = str(data_dir / "unused")
    config.data.update(data)
    return config_lib.validate(config)


def test_manifest_fills_files_roles_and_tokenizer(data_dir):
    resolved = inputs.resolve_config(_config(data_dir, "mid_train_plain"))
    corpora = data_dir / "corpora"
    assert resolved.data.train_files == (str(corpora / "mid.jsonl"),)
    assert resolved.data.eval_files == (str(corpora / "mid_eval.jsonl"),)
    assert resolved.data.trained_roles == features.DEFAULT_TRAINED_ROLES
    assert resolved.tokenizer.path == str(corpora / "world.model")
    # Explicit keys win over the manifest; the manifest file itself works as data.manifest too.
    explicit = _config(corpora / "manifest.json", "mid_train_plain", train_files=("x.jsonl",),
                       trained_roles=("action",))
    explicit.tokenizer.path = "mine.model"
    resolved = inputs.resolve_config(explicit)
    assert (resolved.data.train_files, resolved.data.trained_roles) == (("x.jsonl",), ("action",))
    assert resolved.tokenizer.path == "mine.model"


def test_iwm_records_train_their_observation_with_default_settings(data_dir):
    config = inputs.resolve_config(_config(data_dir, "iwm", batch_size=1, shuffle=False))
    assert config.data.trained_roles == ()  # unset: each record's own trained_roles decide
    tokenizer = load_tokenizer(config.tokenizer.path)
    batch = next(iter(inputs.make_dataset(config, tokenizer, config.data.eval_files or config.data.train_files,
                                          train=False)))
    row = batch["segment_ids_BxL"][0] == 1
    trained = batch["targets_BxL"][0][row & (batch["loss_weights_BxL"][0] > 0)]
    assert tokenizer.decode(trained.tolist()).strip() == OBSERVATION


@pytest.mark.parametrize("corpus, stage, match", [
    ("nope", "mid_train", r"'data.corpus': 'nope' is not in .*manifest.json; expected one of \['iwm'"),
    ("sft_plain", "mid_train", r"'data.corpus': 'sft_plain' holds sft records, but stage 'mid_train' reads lm"),
])
def test_manifest_errors_name_the_key(data_dir, corpus, stage, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        inputs.resolve_config(_config(data_dir, corpus, stage))


def test_missing_manifest_and_half_set_keys_are_config_errors(tmp_path, data_dir):
    with pytest.raises(config_lib.ConfigError, match=r"'data.manifest': .*nowhere does not exist"):
        inputs.resolve_config(_config(tmp_path / "nowhere", "iwm"))
    config = config_lib.default_config()
    config.data.corpus = "iwm"
    with pytest.raises(config_lib.ConfigError, match=r"'data.manifest' is empty, but data.corpus='iwm'"):
        config_lib.validate(config)


def test_epochs_set_the_step_count_from_the_corpus_size(data_dir):
    config = inputs.resolve_config(_config(data_dir, "mid_train_plain", seq_len=16, batch_size=4))
    tokenizer = load_tokenizer(config.tokenizer.path)
    tokens = sum(len(features.lm_example(records.validate_lm(_lm(i)), tokenizer)["tokens"]) for i in range(10))
    assert inputs.total_steps(config, tokenizer) == config.train.steps  # epochs 0: train.steps
    config.train.epochs = 2.5
    assert inputs.total_steps(config, tokenizer) == math.ceil(2.5 * tokens / 16 / 4)
    sft = inputs.resolve_config(_config(data_dir, "sft_plain", "sft", batch_size=2))
    sft.train.epochs = 3.0
    assert inputs.total_steps(sft, tokenizer) == 2  # 1 sample x 3 epochs / 2 rows per step


def test_a_recorded_tokenizer_that_moved_is_found_and_one_that_is_gone_is_named(tmp_path, data_dir):
    tokenizer = str(data_dir / "corpora" / "world.model")
    sha = inputs.tokenizer_fingerprint(tokenizer)
    workdir = tmp_path / "moved"
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    copy = inputs.copy_tokenizer(tokenizer, str(workdir))
    meta = {"tokenizer": "/elsewhere/old_workdir/tokenizer.model", "tokenizer_sha256": sha}
    found = inputs.recorded_tokenizer(meta, str(workdir / "checkpoints" / "5"), "init.source orbax:X")
    assert found.path == copy and found.sha256 == sha  # the workdir moved: its copy beside the checkpoint
    gone = inputs.recorded_tokenizer(meta, str(tmp_path / "nothing_here"), "init.source orbax:Y")
    config = config_lib.default_config()
    config.train.workdir = str(tmp_path / "next")
    with pytest.raises(inputs.TokenizerMismatchError, match=r"orbax:Y was trained with .*no longer there.*tokenizer\.path"):
        inputs.prepare_tokenizer(config, gone)
    config.tokenizer.path = tokenizer  # named: checked against the recorded sha256, then used
    assert inputs.prepare_tokenizer(config, gone)[1] == str(tmp_path / "next" / "tokenizer.model")
