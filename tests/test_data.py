"""Data pipelines: sources, validation, packing/masks/span ids, sharding, RL groups, iterator checkpoints."""
import json
import logging
import pickle

import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from fwm import schema
from fwm.data import checkpointing, features, pipelines, records, sources
from fwm.tokenizer import load_tokenizer, train_sentencepiece

WORDS = "search city river capital founded north museum bridge year population mayor team".split()
OBSERVATION_WORD = "zebra"  # appears only in observations, so its tokens must never be trained


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [_sentence(rng, 12) for _ in range(300)]
    texts += [
        f"<imaginary>{_sentence(rng, 4)}</imaginary><keyword>city; river</keyword><analysis>{_sentence(rng, 3)}"
        f"</analysis><confidence>{i}</confidence><think>{_sentence(rng, 5)}</think><action><search>"
        f"{_sentence(rng, 2)}</search></action><information>{OBSERVATION_WORD} {_sentence(rng, 4)}</information>"
        for i in range(100)
    ]
    model_path = str(tmp_path_factory.mktemp("tok") / "tiny.model")
    train_sentencepiece(texts, model_path, 400)
    return load_tokenizer(model_path)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _lm_records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"id": f"doc{i}", "text": _sentence(rng, int(rng.integers(3, 40)))})
        else:
            out.append({"id": f"traj{i}", "segments": [
                {"role": "prompt", "text": f"question {_sentence(rng, 3)} "},
                {"role": "action", "text": f"<action><search>{_sentence(rng, 2)}</search></action>"},
                {"role": "observation", "text": f"<information>{OBSERVATION_WORD} {_sentence(rng, 5)}</information>"},
                {"role": "policy", "text": f"<think>{_sentence(rng, 3)}</think><action><answer>river</answer></action>"},
            ]})
    return out


def _sft_records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{
        "id": f"s{i}",
        "prompt": f"question {_sentence(rng, int(rng.integers(2, 30)))}",
        "response": (
            f"<imaginary>{_sentence(rng, 3)}</imaginary><keyword>city; river</keyword><analysis>{_sentence(rng, 2)}"
            f"</analysis><confidence>{i % 100}</confidence><think>{_sentence(rng, 3)}</think>"
            f"<action><search>{_sentence(rng, 2)}</search></action>"),
        "variant": "full",
    } for i in range(n)]


def _rl_records(n):
    return [{"id": f"t{i}", "question": f"who founded city {i}?", "answers": [f"mayor {i}", f"m{i}"],
             "data_source": "nq", "metadata": {"hops": i % 3}} for i in range(n)]


def _batches(dataset, n):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), key


# ---------------------------------------------------------------- sources and validation


def test_malformed_jsonl_line_names_file_and_line_and_skip_mode_counts(tmp_path, tokenizer, caplog):
    good = _lm_records(12)
    lines = [json.dumps(r) for r in good[:2]] + ["", '{"id": "x", "text": ', json.dumps(good[2])]
    lines += [json.dumps({"id": "y", "segments": [{"role": "narrator", "text": "hi"}]})]
    lines += [json.dumps(r) for r in good[3:]]
    path = _write_jsonl(tmp_path / "corpus.jsonl", lines)
    source = sources.open_source(path)
    assert len(source) == len(lines) - 1  # the blank line is not a record
    with pytest.raises(records.BadRecordError, match=r"corpus\.jsonl, line 4: field '<record>'.*JSON"):
        records.parse_record(source[2], "lm")
    with pytest.raises(records.BadRecordError, match=r"line 6: field 'segments\[0\]\.role': expected one of"):
        records.parse_record(source[4], "lm")
    # The pipeline raises the same error when it reaches the bad line.
    kwargs = dict(seq_len=32, batch_size=2, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    with pytest.raises(records.BadRecordError, match=r"corpus\.jsonl, line 4"):
        list(pipelines.lm_pipeline(path, tokenizer, **kwargs))
    # Skip mode: both bad records are dropped, counted and logged; every good token still arrives.
    validator = records.RecordValidator("lm", on_bad_record="skip")
    assert sum(validator(source[i]) is None for i in range(len(source))) == 2 and validator.num_bad == 2
    assert "line 4" in validator.reasons[0] and "line 6" in validator.reasons[1]
    with caplog.at_level(logging.WARNING):
        batches = list(pipelines.lm_pipeline(path, tokenizer, on_bad_record="skip", **{**kwargs, "batch_size": 1}))
    assert "skipping bad lm record" in caplog.text and "line 6" in caplog.text
    expected_tokens = sum(len(features.lm_example(records.validate_lm(r), tokenizer)["tokens"]) for r in good)
    assert sum(int((b["segment_ids_BxL"] > 0).sum()) for b in batches) == expected_tokens


@pytest.mark.parametrize("stage,record,field", [
    ("lm", {"id": "a"}, "text"),
    ("lm", {"id": "a", "text": "x", "segments": []}, "text"),
    ("sft", {"id": "a", "prompt": "p", "response": "r", "variant": "fancy"}, "variant"),
    ("sft", {"id": "a", "prompt": 3, "response": "r", "variant": "full"}, "prompt"),
    ("rl", {"id": "a", "question": "q", "answers": ["x", 2]}, "answers[1]"),
    ("rl", {"question": "q", "answers": ["x"]}, "id"),
])
def test_validation_names_the_field(stage, record, field):
    raw = sources.SourceRecord("f.jsonl", "line 9", json.dumps(record).encode())
    with pytest.raises(records.BadRecordError) as error:
        records.parse_record(raw, stage)
    assert error.value.field == field and "f.jsonl, line 9" in str(error.value)


def test_parquet_and_array_record_sources_read(tmp_path):
    rows = _rl_records(10)
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "tasks.parquet", row_group_size=4)
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "tasks.array_record"), "group_size:1")
    for row in rows[6:]:
        writer.write(json.dumps(row).encode())
    writer.close()
    source = sources.open_source([str(tmp_path / "*.parquet"), str(tmp_path / "tasks.array_record")])
    assert len(source) == 10
    assert [records.parse_record(source[i], "rl") for i in range(10)] == rows
    assert source[5].location == "row 5" and source[5].path.endswith("tasks.parquet")
    assert source[7].location == "row 1" and source[7].path.endswith("tasks.array_record")
    jsonl = sources.open_source(_write_jsonl(tmp_path / "tasks.jsonl", rows))
    for copy in (pickle.loads(pickle.dumps(source)), pickle.loads(pickle.dumps(jsonl))):  # as Grain workers get them
        assert [records.parse_record(copy[i], "rl") for i in range(10)] == rows
    bad = dict(rows[0], question=None)  # Parquet columns are typed: a null is the typical bad value
    pq.write_table(pa.Table.from_pylist([rows[1], bad]), tmp_path / "bad.parquet")
    with pytest.raises(records.BadRecordError, match=r"bad\.parquet, row 1: field 'question'"):
        pipelines.load_rl_tasks(str(tmp_path / "bad.parquet"), process_index=0, process_count=1)
    assert len(pipelines.load_rl_tasks(str(tmp_path / "bad.parquet"), on_bad_record="skip",
                                       process_index=0, process_count=1)) == 1
    with pytest.raises(ValueError, match="cannot tell the format"):
        sources.open_source(_write_jsonl(tmp_path / "tasks.txt", rows))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.open_source(str(tmp_path / "missing-*.jsonl"))


def test_two_processes_read_disjoint_shards_that_cover_the_data(tmp_path):
    path = _write_jsonl(tmp_path / "tasks.jsonl", _rl_records(23))
    shards = [
        [r.location for r in pipelines.shuffled_shard(path, seed=1, shuffle=True, num_epochs=1,
                                                      process_index=p, process_count=2)]
        for p in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1], key=lambda s: int(s.split()[1])) == [f"line {i}" for i in range(1, 24)]
    task_ids = [
        {str(t) for b in pipelines.rl_pipeline(path, batch_size=1, group_size=1, num_epochs=1,
                                               process_index=p, process_count=2) for t in b["task_ids_B"]}
        for p in range(2)
    ]
    assert not task_ids[0] & task_ids[1] and task_ids[0] | task_ids[1] == {f"t{i}" for i in range(23)}


# ---------------------------------------------------------------- LM packing


def _runs(mask):
    """[start, end) of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_lm_example_loss_weights_follow_roles(tokenizer):
    record = records.validate_lm(_lm_records(2)[1])
    example = features.lm_example(record, tokenizer)
    tokens, targets, weights = example["tokens"], example["targets"], example["loss_weights"]
    text = "".join(t for _, t in record["segments"])
    assert tokens.tolist() == [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    assert targets[:-1].tolist() == tokens[1:].tolist() and weights[-1] == 0
    # Trained targets decode to exactly the trained segments; masked ones to the observation.
    trained_text = [tokenizer.decode(targets[s:e].tolist()) for s, e in _runs(weights > 0)]
    masked_text = [tokenizer.decode(targets[s:e].tolist()) for s, e in _runs(weights[:-1] == 0)]
    prompt, action, observation, policy = (t for _, t in record["segments"])
    assert [t.strip() for t in trained_text] == [(prompt + action).strip(), policy.strip()]
    assert [t.strip() for t in masked_text] == [observation.strip()]
    everything = features.lm_example(record, tokenizer, trained_roles=records.ROLES)
    assert everything["loss_weights"][:-1].all()


def _iwm_record():
    return {"id": "iwm0", "trained_roles": ["observation"], "segments": [
        {"role": "prompt", "text": "question city river "},
        {"role": "action", "text": "<action><search>north bridge</search></action>"},
        {"role": "observation", "text": f"<information>{OBSERVATION_WORD} museum year</information>"}]}


def test_record_trained_roles_decide_the_targets_unless_the_run_sets_them(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "iwm.jsonl", [_iwm_record()])
    observation = _iwm_record()["segments"][2]["text"]

    def trained_text(**kwargs):
        (batch,) = pipelines.lm_pipeline(path, tokenizer, seq_len=64, batch_size=1, num_epochs=1, shuffle=False,
                                         drop_remainder=False, process_index=0, process_count=1, **kwargs)
        targets, weights = batch["targets_BxL"][0], batch["loss_weights_BxL"][0]
        return tokenizer.decode(targets[weights > 0].tolist())

    # Default settings (trained_roles unset): the record's own roles, i.e. its observation (and EOS) only.
    assert trained_text().strip() == observation.strip()
    # A run that sets the roles overrides the record.
    assert OBSERVATION_WORD not in trained_text(trained_roles=features.DEFAULT_TRAINED_ROLES)
    # Records without the key keep DEFAULT_TRAINED_ROLES.
    plain = records.validate_lm(_lm_records(2)[1])
    assert plain["trained_roles"] is None
    assert features.roles_for(plain, None) == features.DEFAULT_TRAINED_ROLES


def test_record_trained_roles_are_validated():
    raw = sources.SourceRecord("iwm.jsonl", "line 4", json.dumps(_iwm_record() | {"trained_roles": ["obs"]}))
    with pytest.raises(records.BadRecordError, match=r"iwm.jsonl, line 4: field 'trained_roles\[0\]'"):
        records.parse_record(raw, "lm")
    raw = sources.SourceRecord("iwm.jsonl", "line 5", json.dumps(_iwm_record() | {"trained_roles": "observation"}))
    with pytest.raises(records.BadRecordError, match=r"line 5: field 'trained_roles'"):
        records.parse_record(raw, "lm")


def test_finite_pass_keeps_every_token_once(tmp_path, tokenizer):
    docs = _lm_records(13)
    path = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    batches = list(pipelines.lm_pipeline(path, tokenizer, seq_len=32, batch_size=4, num_epochs=1, shuffle=False,
                                         drop_remainder=False, process_index=0, process_count=1))
    expected = sum(float(features.lm_example(records.validate_lm(d), tokenizer)["loss_weights"].sum()) for d in docs)
    assert sum(float(b["loss_weights_BxL"].sum()) for b in batches) == expected
    assert len(batches[-1]["tokens_BxL"]) <= 4  # the last batch may be short: the loop pads it


def test_lm_packing_invariants(tmp_path, tokenizer):
    docs = _lm_records(40)
    path = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    seq_len = 48
    batches = list(pipelines.lm_pipeline(path, tokenizer, seq_len=seq_len, batch_size=2, num_epochs=1,
                                         process_index=0, process_count=1))
    encoded = [features.lm_example(records.validate_lm(d), tokenizer) for d in docs]
    full = [e["tokens"].tolist() for e in encoded]
    split_segments = 0
    for batch in batches:
        assert batch["tokens_BxL"].shape == (2, seq_len) and batch["tokens_BxL"].dtype == np.int32
        for row in range(2):
            seg, pos = batch["segment_ids_BxL"][row], batch["positions_BxL"][row]
            tok, tgt, w = batch["tokens_BxL"][row], batch["targets_BxL"][row], batch["loss_weights_BxL"][row]
            assert (w[seg == 0] == 0).all() and (tok[seg == 0] == tokenizer.pad_id).all()
            ids = [s for s in np.unique(seg) if s > 0]
            assert ids == list(range(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
                assert pos[where].tolist() == list(range(len(where)))
                assert tgt[where[:-1]].tolist() == tok[where[1:]].tolist()
                # The segment is a contiguous piece of one document, with that document's weights.
                piece = tok[where].tolist()
                owners = [(d, i) for d, f in enumerate(full) for i in range(len(f) - len(piece) + 1)
                          if f[i:i + len(piece)] == piece
                          and np.array_equal(w[where], encoded[d]["loss_weights"][i:i + len(piece)])
                          and tgt[where[-1]] == encoded[d]["targets"][i + len(piece) - 1]]
                assert owners, "segment is not a piece of any document (with its weights and targets)"
                split_segments += all(i > 0 for _, i in owners)
                trained = tgt[where][w[where] > 0].tolist()
                assert OBSERVATION_WORD not in tokenizer.decode(trained)
    assert split_segments > 0  # some documents were split across rows
    total = sum(int((b["segment_ids_BxL"] > 0).sum()) for b in batches)
    assert total > sum(map(len, full)) - 2 * seq_len  # only the dropped remainder batch is missing


def test_lm_pipeline_is_deterministic_for_a_seed(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "corpus.jsonl", _lm_records(30))
    make = lambda seed: pipelines.lm_pipeline(path, tokenizer, seq_len=32, batch_size=2, seed=seed,
                                              process_index=0, process_count=1)
    _assert_same_batches(_batches(make(3), 6), _batches(make(3), 6))
    assert not np.array_equal(_batches(make(3), 1)[0]["tokens_BxL"], _batches(make(4), 1)[0]["tokens_BxL"])


# ---------------------------------------------------------------- SFT


@pytest.mark.parametrize("pack", [False, True])
def test_sft_masks_and_span_ids_align_with_response(tmp_path, tokenizer, pack):
    samples = _sft_records(12)
    path = _write_jsonl(tmp_path / "sft.jsonl", samples)
    batches = list(pipelines.sft_pipeline(path, tokenizer, seq_len=96, batch_size=2, pack=pack, shuffle=False,
                                          num_epochs=1, process_index=0, process_count=1))
    responses = {s["response"]: s for s in samples}
    seen = set()
    for batch in batches:
        assert batch["span_ids_BxL"].dtype == np.int8
        for row in range(2):
            seg = batch["segment_ids_BxL"][row]
            for s in [s for s in np.unique(seg) if s > 0]:
                where = seg == s
                tgt, w, span = (batch[k][row][where] for k in ("targets_BxL", "loss_weights_BxL", "span_ids_BxL"))
                (run,) = _runs(w > 0)  # one trained run: the response, after the prompt
                assert tgt[run[1] - 1] == tokenizer.eos_id and run[1] == len(tgt) - 1
                response = tokenizer.decode(tgt[run[0]:run[1] - 1].tolist())
                assert response in responses
                seen.add(response)
                assert (span[w == 0] == schema.SPAN_NONE).all()
                chars = schema.char_span_ids(response)
                for span_id in (schema.SPAN_WM, schema.SPAN_POLICY):
                    expected = "".join(c for c, i in zip(response, chars) if i == span_id)
                    got = tokenizer.decode(tgt[:-1][span[:-1] == span_id].tolist())
                    assert got.replace(" ", "") == expected.replace(" ", "") and expected
    assert len(seen) == 12 if not pack else len(seen) >= 8  # packing may leave a partial last batch


def test_sft_truncation_keeps_the_response(tokenizer):
    sample = records.validate_sft(_sft_records(1)[0] | {"prompt": "question " + " ".join(WORDS * 8)})
    example = features.sft_example(sample, tokenizer, seq_len=64)
    response_ids = tokenizer.encode_with_offsets(sample["response"])[0] + [tokenizer.eos_id]
    prompt_ids = tokenizer.encode(sample["prompt"])
    kept = 64 - 1 - len(response_ids)
    assert len(example["tokens"]) == 64 and example["tokens"][0] == tokenizer.bos_id
    assert example["tokens"][1:1 + kept].tolist() == prompt_ids[-kept:]  # prompt cut from the left
    assert example["targets"][kept:-1].tolist() == response_ids and example["loss_weights"][kept:-1].all()


def test_sft_prompt_that_fits_is_kept_whole(tokenizer):
    # A prompt longer than half its budget but within it was once cut from the left (negative slice start).
    sample = records.validate_sft(_sft_records(1)[0] | {"prompt": "question " + " ".join(WORDS * 2)})
    prompt_ids = tokenizer.encode(sample["prompt"])
    response_ids = tokenizer.encode_with_offsets(sample["response"])[0] + [tokenizer.eos_id]
    seq_len = 1 + len(prompt_ids) + len(response_ids) + len(prompt_ids) // 2  # budget < 2 x prompt
    example = features.sft_example(sample, tokenizer, seq_len=seq_len)
    assert example["tokens"][1:1 + len(prompt_ids)].tolist() == prompt_ids
    assert not example["truncated"].any()


@pytest.mark.parametrize("pack", [False, True])
def test_sft_batches_count_truncated_samples(tmp_path, tokenizer, pack):
    long_prompt = "question " + " ".join(WORDS * 8)
    samples = [s | {"prompt": long_prompt} if i % 3 == 0 else s for i, s in enumerate(_sft_records(9))]
    path = _write_jsonl(tmp_path / "sft.jsonl", samples)
    lengths = [len(features.sft_example(records.validate_sft(s), tokenizer, seq_len=10_000)["tokens"]) for s in samples]
    assert max(lengths) > 80 >= min(lengths)
    batches = list(pipelines.sft_pipeline(path, tokenizer, seq_len=80, batch_size=3, pack=pack, shuffle=False,
                                          num_epochs=1, drop_remainder=False, process_index=0, process_count=1))
    assert sum(int(b["samples_B"].sum()) for b in batches) == 9
    assert sum(int(b["truncated_B"].sum()) for b in batches) == sum(n > 80 for n in lengths)


# ---------------------------------------------------------------- RL


def test_rl_batches_group_tasks(tmp_path):
    path = _write_jsonl(tmp_path / "tasks.jsonl", _rl_records(11))
    batches = list(pipelines.rl_pipeline(path, batch_size=6, group_size=2, seed=5, num_epochs=3,
                                         process_index=0, process_count=1))
    assert len(batches) == 3 * (11 // 3)
    tasks = {r["id"]: r for r in _rl_records(11)}
    for batch in batches:
        ids = batch["task_ids_B"].tolist()
        assert batch["group_ids_B"].tolist() == [0, 0, 1, 1, 2, 2]
        assert ids[0::2] == ids[1::2] and len(set(ids)) == 3
        for i, task_id in enumerate(ids):
            assert batch["questions_B"][i] == tasks[task_id]["question"]
            assert batch["answers_B"][i] == tasks[task_id]["answers"]
    epochs = [[t for b in batches[e * 3:(e + 1) * 3] for t in b["task_ids_B"][::2]] for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs) and epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="multiple of group_size"):
        pipelines.rl_pipeline(path, batch_size=5, group_size=2, process_index=0, process_count=1)


# ---------------------------------------------------------------- iterator checkpoints


def _make_pipeline(kind, tmp_path, tokenizer):
    if kind.startswith("lm"):
        path = _write_jsonl(tmp_path / "corpus.jsonl", _lm_records(30))
        workers = 2 if kind == "lm_with_workers" else 0  # Grain worker processes, as in training
        return lambda: pipelines.lm_pipeline(path, tokenizer, seq_len=32, batch_size=2, seed=7,
                                             process_index=0, process_count=1, worker_count=workers)
    if kind == "sft":
        path = _write_jsonl(tmp_path / "sft.jsonl", _sft_records(9))
        return lambda: pipelines.sft_pipeline(path, tokenizer, seq_len=96, batch_size=2, pack=True, seed=7,
                                              process_index=0, process_count=1)
    path = _write_jsonl(tmp_path / "tasks.jsonl", _rl_records(7))
    return lambda: pipelines.rl_pipeline(path, batch_size=4, group_size=2, seed=7, process_index=0, process_count=1)


@pytest.mark.parametrize("kind", ["lm", "sft", "rl", "lm_with_workers"])
def test_iterator_restored_from_orbax_composite_resumes_on_the_next_batch(tmp_path, tokenizer, kind):
    make, k, n = _make_pipeline(kind, tmp_path, tokenizer), 5, 6
    reference = iter(make())
    uninterrupted = _batches_from(reference, k + n)
    iterator = iter(make())
    _batches_from(iterator, k)
    state = {"w": np.arange(4.0)}
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(k, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=checkpointing.checkpoint_args_save(iterator)))
    manager.wait_until_finished()
    manager.close()
    _batches_from(iterator, 3)  # the original moves on; the restore must not care
    fresh = iter(make())
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=checkpointing.checkpoint_args_restore(fresh)))
    manager.close()
    assert np.array_equal(restored["state"]["w"], state["w"])
    _assert_same_batches(_batches_from(fresh, n), uninterrupted[k:])
    for it in (reference, iterator, fresh):
        it.close()  # stops worker processes, if any


def _batches_from(iterator, n):
    return [next(iterator) for _ in range(n)]
