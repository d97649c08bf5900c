"""Tokenizers: SentencePiece train/save/load, the HF tokenizer.json backend, round trips, offsets, span ids."""
import json
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from fwm import schema
from fwm.schema import Action, StepResponse, WorldModelBlock
from fwm.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

WORDS = "search city river capital founded north museum bridge year population mayor team who is the of".split()
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))) for _ in range(n)]


def _steps():
    """Responses with the awkward parts: spaces and newlines next to tags, indentation, unicode, digits."""
    block = WorldModelBlock("find [CITY] ,  then [MAYOR] ", ["mayor", "city hall", "é中"], "\nmissing: mayor\n", 7)
    return [
        StepResponse("who is  the mayor?\n", Action("search", " mayor of the city "), block),
        StepResponse(" x ", Action("python", "def f(x):\n    return x  +  1\n\nprint(f(41))"), block),
        StepResponse("done", Action("answer", "Zoë 🙂 Straße"), WorldModelBlock("r", [], "a", 100)),
    ]


def _format_texts():
    texts = [schema.render_response(step, v) for step in _steps() for v in schema.VARIANTS]
    texts.append(schema.render_prompt("Who founded the museum?", [
        (schema.render_action(Action("search", "museum founder")), schema.render_observation("search", "doc one"))],
        lambda s: len(s), 10**6))
    # Malformed model output must round trip too: space before tags, stray and unclosed tags.
    texts += ["word <think> x </think> <action> <answer>y</answer> </action>",
              "Sure! <think>a<action><search>q", "  lead and trail  ", "<confidence> 73% </confidence>"]
    return texts


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sp") / "sub" / "tiny.model")  # sub/ does not exist yet
    texts = _sentences(300) + _format_texts()
    return train_sentencepiece(texts, path, 400), path


def _tiny_hf_dir(root, specials, config=None, name="hf"):
    """A byte-level BPE tokenizer.json like Llama-3 / Qwen2 ones, trained here on a few sentences."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # trims spaces off offsets
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_sentences(200, seed=1), trainer)
    directory = root / name
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def hf_qwen_like(tmp_path_factory):
    # Qwen2 convention: no bos, eos and pad "<|endoftext|>". "<think>" already exists, as in Qwen3.
    root = tmp_path_factory.mktemp("hf")
    directory = _tiny_hf_dir(root, ["<|endoftext|>", "<think>"],
                             {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": {"content": "<|endoftext|>"}})
    return HFTokenizer.load(str(directory))


def _check_single_token_tags(tokenizer):
    tag_ids = tokenizer.tag_ids
    assert sorted(tag_ids) == sorted(schema.ALL_TAG_TOKENS) and len(set(tag_ids.values())) == len(tag_ids)
    for tag, tag_id in tag_ids.items():
        assert tokenizer.encode(tag) == [tag_id]
        for context in (f"city{tag}river", f"city {tag} river", f"\n{tag}\n", f"{tag}{tag}"):
            assert tokenizer.encode(context).count(tag_id) == context.count(tag)
            assert tokenizer.decode(tokenizer.encode(context)) == context


def _check_offsets_tile(text, offsets):
    covered = 0
    for start, end in offsets:
        assert 0 <= start <= covered and start <= end <= len(text)  # no gaps, in order
        covered = max(covered, end)
    assert covered == len(text)


def _check_span_alignment(tokenizer, text):
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert tokenizer.decode(ids) == text
    _check_offsets_tile(text, offsets)
    char_ids = schema.char_span_ids(text)
    token_ids = schema.token_span_ids(char_ids, offsets)
    for span_id in (schema.SPAN_NONE, schema.SPAN_WM, schema.SPAN_POLICY):
        span_text = "".join(c for c, i in zip(text, char_ids) if i == span_id)
        assert tokenizer.decode([t for t, i in zip(ids, token_ids) if i == span_id]) == span_text, span_id
    for tag, tag_id in tokenizer.tag_ids.items():  # each tag token sits on its own characters
        for (start, end), token in zip(offsets, ids):
            if token == tag_id:
                assert text[start:end] == tag


# ------------------------------------------------------------------------------------------ SentencePiece
def test_sentencepiece_train_save_load_round_trip(sp_model):
    trained, path = sp_model
    assert os.listdir(os.path.dirname(path)) == ["tiny.model"]  # written atomically, no temp file left
    loaded = load_tokenizer(path)
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.vocab_size == trained.vocab_size <= 400
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 2, 3)
    assert loaded.tag_ids == trained.tag_ids
    _check_single_token_tags(loaded)
    for text in _format_texts():
        assert loaded.encode(text) == trained.encode(text)
        assert loaded.decode(loaded.encode(text, add_bos=True, add_eos=True)) == text
    assert loaded.encode("city", add_bos=True, add_eos=True)[::len(loaded.encode("city")) + 1] == [2, 3]
    clone = pickle.loads(pickle.dumps(loaded))  # Grain worker processes receive it pickled
    assert clone.encode(_format_texts()[0]) == loaded.encode(_format_texts()[0]) and clone.tag_ids == loaded.tag_ids


def test_sentencepiece_space_before_a_tag(sp_model):
    tokenizer, _ = sp_model
    text = "city <think> river"
    ids, offsets = tokenizer.encode_with_offsets(text)
    tag_position = ids.index(tokenizer.tag_ids["<think>"])
    # The trap: the space before the tag is its own token; it must own the space and decode to it.
    assert offsets[tag_position - 1] == (4, 5) and tokenizer.decode([ids[tag_position - 1]]) == " "
    assert [tokenizer.decode([i]) for i in ids] == [text[s:e] for s, e in offsets]


@FAST
@given(text=st.text(alphabet=st.characters(blacklist_characters="\u2581"), max_size=60))
def test_sentencepiece_round_trips_any_text(sp_model, text):
    tokenizer, _ = sp_model
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text) and tokenizer.decode(ids) == text
    _check_offsets_tile(text, offsets)


@pytest.mark.parametrize("backend", ["sentencepiece", "hf"])
def test_span_ids_line_up_with_tokens(sp_model, hf_qwen_like, backend):
    tokenizer = sp_model[0] if backend == "sentencepiece" else hf_qwen_like
    for text in _format_texts():
        _check_span_alignment(tokenizer, text)
    # Rendered responses: the WM tokens decode to exactly the world-model span text.
    text = schema.render_response(_steps()[0], "full")
    ids, offsets = tokenizer.encode_with_offsets(text)
    token_ids = schema.token_span_ids(schema.char_span_ids(text), offsets)
    parsed = schema.parse_response(text)
    assert tokenizer.decode([t for t, i in zip(ids, token_ids) if i == schema.SPAN_WM]) == text[
        slice(*parsed.world_model_span)]
    assert tokenizer.decode([t for t, i in zip(ids, token_ids) if i == schema.SPAN_POLICY]) == text[
        slice(*parsed.policy_span)]


def test_train_sentencepiece_errors(tmp_path):
    with pytest.raises(ValueError, match="256 byte pieces"):
        train_sentencepiece(_sentences(20), str(tmp_path / "a.model"), 200)
    with pytest.raises(ValueError, match="byte_fallback"):
        train_sentencepiece(_sentences(20), str(tmp_path / "a.model"), 400, byte_fallback=False)
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", ""], str(tmp_path / "a.model"), 400)
    many_chars = ["".join(chr(0x4E00 + i + j) for j in range(5)) for i in range(0, 400, 5)]
    with pytest.raises(ValueError, match="character_coverage"):
        train_sentencepiece(many_chars, str(tmp_path / "a.model"), 400)
    assert os.listdir(tmp_path) == []  # nothing written on failure


def test_sentencepiece_model_without_tags_is_rejected(tmp_path):
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_sentences(100)), model_prefix=prefix, vocab_size=60,
                                   minloglevel=2, hard_vocab_limit=False, num_threads=1)
    with pytest.raises(ValueError, match="lacks the format tags"):
        load_tokenizer(prefix + ".model")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "weird.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown tokenizer file"):
        load_tokenizer(str(tmp_path / "weird.bin"))


# ---------------------------------------------------------------------------------------- Hugging Face
def test_hf_backend_adds_the_tags(hf_qwen_like, tmp_path_factory):
    tokenizer = hf_qwen_like
    think_id = tokenizers.Tokenizer.from_file(os.path.join(os.path.dirname(tokenizer.path), "tokenizer.json")
                                              ).token_to_id("<think>")
    assert tokenizer.tag_ids["<think>"] == think_id < tokenizer.base_vocab_size  # existing tag keeps its id
    assert tokenizer.num_added_tags == len(schema.ALL_TAG_TOKENS) - 1
    assert tokenizer.vocab_size == tokenizer.base_vocab_size + tokenizer.num_added_tags
    assert sorted(tokenizer.new_tag_ids) == list(range(tokenizer.base_vocab_size, tokenizer.vocab_size))
    _check_single_token_tags(tokenizer)
    eos = tokenizer.encode("<|endoftext|>")
    assert (tokenizer.bos_id, tokenizer.pad_id) == (tokenizer.eos_id, tokenizer.eos_id) and eos == [tokenizer.eos_id]
    text = schema.render_response(_steps()[1], "full")
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == ids[-1] == tokenizer.eos_id and tokenizer.decode(ids) == text  # specials decode to nothing
    assert tokenizer.decode(ids + [tokenizer.vocab_size, -1]) == text  # out-of-range ids never raise
    # The file and its directory load the same; pickling keeps the added tags.
    by_file = load_tokenizer(tokenizer.path)
    assert isinstance(by_file, HFTokenizer) and by_file.encode(text) == tokenizer.encode(text)
    assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == tokenizer.encode(text)


def test_hf_space_before_a_tag_keeps_its_character(hf_qwen_like):
    text = "city <think> river"
    ids, offsets = hf_qwen_like.encode_with_offsets(text)
    tag_position = ids.index(hf_qwen_like.tag_ids["<think>"])
    assert offsets[tag_position - 1] == (4, 5)  # byte-level "Ġ": tokenizers trims it to (5, 5)
    assert [hf_qwen_like.decode([i]) for i in ids] == [text[s:e] for s, e in offsets]


def test_hf_special_tokens_conventions(tmp_path):
    llama = _tiny_hf_dir(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, name="llama")
    tokenizer = HFTokenizer.load(str(llama))
    assert tokenizer.num_added_tags == len(schema.ALL_TAG_TOKENS)
    ids = tokenizer.encode("<|begin_of_text|><|eot_id|>")
    assert [tokenizer.bos_id, tokenizer.eos_id] == ids and tokenizer.pad_id == tokenizer.eos_id  # no pad: eos
    assert HFTokenizer.load(str(llama), eos_token="<|end_of_text|>").eos_id == tokenizer.encode("<|end_of_text|>")[0]
    # No tokenizer_config.json: config.json ids, then well-known names.
    bare = _tiny_hf_dir(tmp_path, ["<s>", "</s>", "<pad>"], name="bare")
    tokenizer = HFTokenizer.load(str(bare))
    assert [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id] == tokenizer.encode("<s></s><pad>")
    (bare / "config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    assert (HFTokenizer.load(str(bare)).bos_id, HFTokenizer.load(str(bare)).eos_id) == (1, 2)
    nothing = _tiny_hf_dir(tmp_path, ["<unusual>"], name="nothing")
    with pytest.raises(ValueError, match="no EOS token"):
        HFTokenizer.load(str(nothing))
    (nothing / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json eos_token"):
        HFTokenizer.load(str(nothing))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "absent"))


def test_unigram_model_and_deterministic_training(tmp_path):
    texts = _sentences(200) + _format_texts()
    first = train_sentencepiece(texts, str(tmp_path / "u1.model"), 400, model_type="unigram", seed=3)
    again = train_sentencepiece(texts, str(tmp_path / "u2.model"), 400, model_type="unigram", seed=3)
    assert (tmp_path / "u1.model").read_bytes() == (tmp_path / "u2.model").read_bytes()
    _check_single_token_tags(first)
    for text in _format_texts():
        _check_span_alignment(again, text)
