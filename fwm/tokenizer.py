"""Tokenizers: one interface, two backends (SentencePiece trained here, Hugging Face tokenizer.json).

Interface (`Tokenizer`): `encode`, `encode_with_offsets`, `decode`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id` and `tag_ids` (every `schema.ALL_TAG_TOKENS` entry -> its single token id). Contracts:
- every format tag is exactly one token wherever it appears in text;
- `encode_with_offsets` returns [start, end) character offsets into the text, one per token, that
  tile it: non-decreasing, every character covered, a token covers the characters it decodes to
  (backends that trim the space off a "Ġword" / "▁" piece have that space given back to the token);
  the byte pieces of one multi-byte character share its range (SentencePiece gives all but the
  last an empty range at that character);
- `decode` concatenates: decode(a + b) == decode(a) + decode(b) whenever the cut is not inside a
  multi-byte character, so the tokens of a character range decode to exactly those characters.
  pad/bos/eos and ids outside [0, vocab_size) decode to nothing; decode never raises.

SentencePiece (`train_sentencepiece`, `SentencePieceTokenizer`): the tags are `user_defined_symbols`
(control symbols would never be matched in text), byte fallback is on (no <unk> for unseen
characters; the vocabulary needs 256 byte pieces + the special and tag pieces + the corpus
characters), ids are pad 0, unk 1, bos 2, eos 3, then the tags. The trap "a space before a tag
becomes its own token" ("word <think>" -> "word", "▁", "<think>": user-defined symbols split the
text before pieces are matched) is harmless here because the model is trained with the identity
normaliser, no whitespace collapsing and no dummy prefix: the lone "▁" has the space as its offset
and decodes back to it, and decode(encode(x)) == x for every string without U+2581 (the character
SentencePiece uses for a space). With a dummy prefix, decoding would drop the space of whichever
"▁" piece comes first, so span decodes would not match the text.

Hugging Face (`HFTokenizer`): a checkpoint's tokenizer.json (Llama-3, Qwen2, ...) with the tags
added as special tokens (not normalised, never split; a tag already in the vocabulary keeps its id).
pad/bos/eos come from explicit arguments, else tokenizer_config.json, special_tokens_map.json,
config.json / generation_config.json ids, well-known token names; a missing bos or pad falls back
to eos (Qwen2 has no bos, Llama-3 no pad); no eos at all is an error.

When tags are new to a checkpoint (`num_added_tags` > 0, ids `new_tag_ids`, all >= `base_vocab_size`),
the model's embedding (and untied LM head) grows by that many rows initialised to the mean row:
`fwm.model.transformer.resize_vocab(cfg, params, tokenizer.vocab_size)`. Checkpoints whose embedding
is already padded past the tokenizer (Qwen2.5: 151,665 tokens, 151,936 rows) need no growth; the
tags then land on spare rows that were never trained, and those rows (`new_tag_ids`) deserve the
same mean-row initialisation.
"""
from __future__ import annotations

import abc
import io
import itertools
import json
import os
from typing import Any, Iterable, Sequence

import sentencepiece as spm
import tokenizers
from absl import logging

from fwm.files import atomic_open
from fwm.schema import ALL_TAG_TOKENS

Offsets = list[tuple[int, int]]
# SentencePiece special ids; the tags follow them (ids 4 ...), then the 256 byte pieces.
_SP_SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
_SP_PROTECTED = ("byte_fallback", "model_writer", "sentence_iterator", "input", "model_prefix", "vocab_size",
                 *_SP_SPECIAL_IDS)
_WELL_KNOWN = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"),
    "pad": ("<pad>", "<|pad|>"),
}


class Tokenizer(abc.ABC):
    """Text <-> token ids, with single-token format tags and character offsets (contracts: module doc)."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of text, optionally with bos first / eos last."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Token ids of text (no bos/eos) and each token's [start, end) character offsets into text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; pad/bos/eos and out-of-range ids give nothing; never raises."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer can produce."""

    # Backends set _pad_id, _bos_id, _eos_id and _tag_ids in __init__.
    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def tag_ids(self) -> dict[str, int]:
        """Every schema.ALL_TAG_TOKENS entry -> its single token id."""
        return dict(self._tag_ids)

    def _with_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def _decodable(self, ids: Sequence[int]) -> list[int]:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        return [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in skip]


def _tile_offsets(offsets: Iterable[tuple[int, int]], text_len: int) -> Offsets:
    """Offsets made to cover every character: a gap before a token (a trimmed space) joins that token."""
    tiled: Offsets = []
    covered = 0
    for start, end in offsets:
        start, end = min(start, covered), max(end, min(start, covered))
        tiled.append((start, end))
        covered = max(covered, end)
    if tiled and covered < text_len:
        tiled[-1] = (tiled[-1][0], text_len)
    return tiled


def _single_token_tags(encode, tag_to_id) -> tuple[dict[str, int], list[str]]:
    """(tag -> id for tags that are one token inside text, tags that are not).

    Checked inside text ("a<tag>a") because a dummy-prefix model puts a lone "▁" before a tag that
    starts the text; the tag itself is still one token.
    """
    tag_ids, broken = {}, []
    for tag in ALL_TAG_TOKENS:
        tag_id = tag_to_id(tag)
        if tag_id is not None and encode(f"a{tag}a").count(tag_id) == 1:
            tag_ids[tag] = tag_id
        else:
            broken.append(tag)
    return tag_ids, broken


# ----------------------------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose format tags are user-defined symbols (see train_sentencepiece)."""

    def __init__(self, model_proto: bytes, path: str = "<in memory>"):
        self.path = path
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id()}
        for name, value in ids.items():
            if value < 0:
                raise ValueError(f"SentencePiece model {path} defines no {name} piece; train it with "
                                 f"fwm.tokenizer.train_sentencepiece")
        self._bos_id, self._eos_id = ids["bos"], ids["eos"]
        # A model without pad uses eos as padding (padded positions carry no loss).
        self._pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._eos_id
        self._tag_ids, missing = _single_token_tags(
            lambda text: self._sp.encode(text, out_type=int),
            lambda tag: None if self._sp.piece_to_id(tag) == self._sp.unk_id() else self._sp.piece_to_id(tag))
        if missing:
            raise ValueError(f"SentencePiece model {path} lacks the format tags {missing} as single pieces "
                             f"(user_defined_symbols); train one with fwm.tokenizer.train_sentencepiece or use "
                             f"a Hugging Face tokenizer.json, to which tags are added on load")

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """Loads a .model file written by train_sentencepiece."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def __getstate__(self) -> dict[str, Any]:  # the C++ processor does not pickle (Grain workers need it)
        return {"path": self.path, "model_proto": self._model_proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["path"])

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._with_specials(list(self._sp.encode(text, out_type=int)), add_bos, add_eos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        if not text:
            return [], []
        mapping = self._sp.encode(text, return_type="offset_mapping", return_bytes=False)
        return list(mapping["ids"]), _tile_offsets(mapping["offsets"], len(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._decodable(ids))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int, *, model_type: str = "bpe",
                        character_coverage: float = 1.0, seed: int = 0, max_texts: int | None = None,
                        **sentencepiece_options: Any) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on texts and writes it atomically to model_path.

    Tags are user_defined_symbols, byte fallback is on, ids are pad 0 / unk 1 / bos 2 / eos 3, the
    text is not normalised (identity rule, whitespace kept, no dummy prefix: see the module doc).
    The vocabulary may come out smaller than vocab_size on a small corpus (hard_vocab_limit=False);
    read `.vocab_size`. Further SentencePiece trainer flags pass through sentencepiece_options
    (extra user_defined_symbols are added to the tags).
    """
    protected = sorted(set(sentencepiece_options) & set(_SP_PROTECTED))
    if protected:
        raise ValueError(f"train_sentencepiece sets {protected} itself; remove them from the options")
    extra_symbols = list(sentencepiece_options.pop("user_defined_symbols", []))
    minimum = len(_SP_SPECIAL_IDS) + len(ALL_TAG_TOKENS) + len(extra_symbols) + 256 + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for {model_path}: byte fallback needs 256 byte "
                         f"pieces plus {len(_SP_SPECIAL_IDS)} special and {len(ALL_TAG_TOKENS) + len(extra_symbols)} "
                         f"tag pieces, so at least {minimum} (plus one piece per distinct character kept by "
                         f"character_coverage); use e.g. {max(512, minimum + 64)}")
    sentences = [text for text in itertools.islice(texts, max_texts) if text]
    if not sentences:
        raise ValueError(f"no non-empty texts to train the SentencePiece model {model_path} on")
    options = dict(
        model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
        user_defined_symbols=ALL_TAG_TOKENS + extra_symbols, byte_fallback=True, **_SP_SPECIAL_IDS,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
        max_sentence_length=1 << 16, num_threads=min(16, os.cpu_count() or 1), minloglevel=2,
    )
    options.update(sentencepiece_options)
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer, **options)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"SentencePiece training for {model_path} failed ({len(sentences)} texts, vocab_size="
                         f"{vocab_size}): {error}. If the corpus has more distinct characters than fit, raise "
                         f"vocab_size or lower character_coverage (rare characters then fall back to bytes)") from error
    tokenizer = SentencePieceTokenizer(buffer.getvalue(), model_path)
    with atomic_open(model_path, "wb", suffix=".model") as f:
        f.write(buffer.getvalue())
    return tokenizer


# ---------------------------------------------------------------------------------------- Hugging Face
def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special-token entry: a string, {"content": string, ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (the `tokenizers` package) with the format tags added."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int, eos_id: int, pad_id: int,
                 base_vocab_size: int, new_tag_ids: list[int], tag_ids: dict[str, int], path: str):
        self._tokenizer = tokenizer
        self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
        self._base_vocab_size = base_vocab_size
        self._new_tag_ids = list(new_tag_ids)
        self._tag_ids = dict(tag_ids)
        self._vocab_size = self._full_size(tokenizer)
        self.path = path

    @staticmethod
    def _full_size(tokenizer: tokenizers.Tokenizer) -> int:
        added = tokenizer.get_added_tokens_decoder()
        return max([tokenizer.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in added])

    @classmethod
    def load(cls, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
             pad_token: str | None = None) -> HFTokenizer:
        """Loads a tokenizer.json (or a directory holding one) and adds the format tags.

        Special tokens: explicit arguments, else the checkpoint's files (see the module doc).
        """
        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"no tokenizer.json at {json_path}")
        directory = os.path.dirname(os.path.abspath(json_path))
        try:
            tokenizer = tokenizers.Tokenizer.from_file(json_path)
        except Exception as error:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot load the Hugging Face tokenizer {json_path}: {error}") from error
        # Length limits in a tokenizer.json would silently cut or pad our sequences.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        base_vocab_size = cls._full_size(tokenizer)
        new_tags = [tag for tag in ALL_TAG_TOKENS if tokenizer.token_to_id(tag) is None]
        tokenizer.add_special_tokens([tokenizers.AddedToken(tag, special=True, normalized=False)
                                      for tag in ALL_TAG_TOKENS])
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
        tag_ids, broken = _single_token_tags(encode, tokenizer.token_to_id)
        if broken:
            raise ValueError(f"{json_path}: the format tags {broken} do not encode as single tokens after "
                             f"adding them; the tokenizer's pre-processing splits them")

        explicit = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
        model_configs = [(name, _read_json(os.path.join(directory, name)))
                         for name in ("config.json", "generation_config.json")]

        def resolve(role: str) -> int | None:
            for source, value in ((f"{role}_token argument", explicit[role]),
                                  (f"tokenizer_config.json {role}_token", tokenizer_config.get(f"{role}_token")),
                                  (f"special_tokens_map.json {role}_token", special_map.get(f"{role}_token"))):
                content = _token_content(value)
                if content is not None:
                    token_id = tokenizer.token_to_id(content)
                    if token_id is None:
                        raise ValueError(f"{directory}: {source} is {content!r}, which is not in {json_path}")
                    return token_id
            for name, config in model_configs:
                value = config.get(f"{role}_token_id")
                value = value[0] if isinstance(value, list) and value else value
                if isinstance(value, int) and 0 <= value < cls._full_size(tokenizer):
                    return value
            for content in _WELL_KNOWN[role]:
                if tokenizer.token_to_id(content) is not None:
                    logging.info("%s: no %s token configured; using %r", json_path, role, content)
                    return tokenizer.token_to_id(content)
            return None

        eos_id = resolve("eos")
        if eos_id is None:
            raise ValueError(f"{json_path}: no EOS token found; set eos_token in {directory}/tokenizer_config.json "
                             f"or pass eos_token= to HFTokenizer.load")
        bos_id, pad_id = resolve("bos"), resolve("pad")
        if bos_id is None:
            logging.info("%s: no bos token; using eos (id %d) to start sequences", json_path, eos_id)
        if pad_id is None:
            logging.info("%s: no pad token; using eos (id %d) for padding", json_path, eos_id)
        return cls(tokenizer, bos_id=eos_id if bos_id is None else bos_id, eos_id=eos_id,
                   pad_id=eos_id if pad_id is None else pad_id, base_vocab_size=base_vocab_size,
                   new_tag_ids=[tag_ids[tag] for tag in new_tags], tag_ids=tag_ids, path=json_path)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._with_specials(list(self._tokenizer.encode(text, add_special_tokens=False).ids), add_bos, add_eos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), _tile_offsets(encoding.offsets, len(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(self._decodable(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def base_vocab_size(self) -> int:
        """The checkpoint tokenizer's size before the tags were added."""
        return self._base_vocab_size

    @property
    def num_added_tags(self) -> int:
        """How many format tags were new to the checkpoint (embedding rows to add / initialise)."""
        return len(self._new_tag_ids)

    @property
    def new_tag_ids(self) -> list[int]:
        """Ids of the tags that were new to the checkpoint."""
        return list(self._new_tag_ids)


def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece .model, or a Hugging Face tokenizer.json / directory holding one."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.load(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer.load(os.path.join(path, "tokenizer.model"))
        raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path} (expected a SentencePiece .model, a tokenizer.json "
                                f"or a directory holding one)")
    if path.endswith(".json"):
        return HFTokenizer.load(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer.load(path)
    raise ValueError(f"unknown tokenizer file {path}: expected a SentencePiece .model or a tokenizer.json")
