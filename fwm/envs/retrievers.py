"""Retrievers behind one interface: a local BM25 index (bm25s) and a Search-R1-compatible HTTP server.

`Retriever.search(queries, topk) -> list[list[Doc]]` (one list per query, best first) raises
`RetrievalError` when the search could not be done; the search environment turns that into an
observation. Corpora are JSONL in the Search-R1 wiki-18 form: `{"id": ..., "contents": "Title\\ntext"}`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from fwm.envs.jsonl import DataFormatError, read_jsonl, write_json

_INDEX_FORMAT = "fwm-bm25-v1"


class RetrievalError(RuntimeError):
    """A search could not be done (server down, timeout, bad response)."""


@dataclasses.dataclass(frozen=True)
class Doc:
    """One retrieved passage; `contents` keeps the Search-R1 form (title on the first line)."""

    id: str
    contents: str
    score: float = 0.0

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0]

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) > 1 else ""


def format_docs(docs: Sequence[Doc]) -> str:
    """Search-R1's rendering of a result list: one `Doc i(Title: t) text` line per passage, i from 1."""
    return "".join(f"Doc {i}(Title: {doc.title}) {doc.text}\n" for i, doc in enumerate(docs, start=1))


class Retriever(Protocol):
    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        """Top-k documents for each query, best first; raises RetrievalError on failure."""


def read_corpus(path: str | os.PathLike) -> list[Doc]:
    """Reads a corpus JSONL; each line needs a string "id" (or int) and a string "contents"."""
    docs = []
    for line, row in read_jsonl(path):
        doc_id, contents = row.get("id"), row.get("contents")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise DataFormatError(f"{os.fspath(path)}, line {line}: field 'id' must be a string, got {doc_id!r}")
        if not isinstance(contents, str) or not contents.strip():
            raise DataFormatError(f"{os.fspath(path)}, line {line}: field 'contents' must be a non-empty "
                                  f"string (title on the first line), got {contents!r:.80}")
        docs.append(Doc(id=str(doc_id), contents=contents))
    return docs


class BM25Retriever:
    """Okapi BM25 (bm25s, Lucene variant) over a corpus; lower-cased word tokens, English stop words."""

    def __init__(self, index: Any, contents_path: str, offsets: np.ndarray, ids: list[str]):
        self._index = index
        self._contents_path = contents_path
        self._offsets = offsets  # byte offset of document i in contents_path; offsets[-1] = file size
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    @classmethod
    def build(cls, docs: Iterable[Doc], directory: str | os.PathLike, k1: float = 1.5, b: float = 0.75
              ) -> "BM25Retriever":
        """Indexes `docs` and saves the index to `directory` (replaced atomically); returns the loaded index."""
        bm25s = _bm25s()
        docs = list(docs)
        if not docs:
            raise ValueError("BM25Retriever.build: the corpus is empty")
        directory = os.path.abspath(os.fspath(directory))
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".tmp_bm25_", dir=parent)
        try:
            index = bm25s.BM25(k1=k1, b=b)
            index.index(_tokenize([doc.contents for doc in docs]), show_progress=False)
            index.save(staging, show_progress=False)
            offsets = [0]
            with open(os.path.join(staging, "docs.jsonl"), "wb") as f:
                for doc in docs:
                    line = (json.dumps({"id": doc.id, "contents": doc.contents}, ensure_ascii=False) + "\n").encode()
                    f.write(line)
                    offsets.append(offsets[-1] + len(line))
            np.save(os.path.join(staging, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
            write_json(os.path.join(staging, "fwm_index.json"),
                       {"format": _INDEX_FORMAT, "num_docs": len(docs), "k1": k1, "b": b})
            _replace_directory(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.load(directory)

    @classmethod
    def build_from_corpus(cls, corpus_path: str | os.PathLike, directory: str | os.PathLike) -> "BM25Retriever":
        """read_corpus(corpus_path) then build (errors name the corpus file and line)."""
        return cls.build(read_corpus(corpus_path), directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = False) -> "BM25Retriever":
        bm25s = _bm25s()
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, "fwm_index.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise FileNotFoundError(f"{meta_path}: not a BM25 index written by BM25Retriever.build ({error})") from None
        if meta.get("format") != _INDEX_FORMAT:
            raise ValueError(f"{meta_path}: index format {meta.get('format')!r}, expected {_INDEX_FORMAT!r}")
        index = bm25s.BM25.load(directory, mmap=mmap, show_progress=False)
        offsets = np.load(os.path.join(directory, "offsets.npy"), mmap_mode="r" if mmap else None)
        contents_path = os.path.join(directory, "docs.jsonl")
        with open(contents_path, "rb") as f:
            ids = [json.loads(line)["id"] for line in f]
        if len(ids) != meta["num_docs"] or len(offsets) != len(ids) + 1:
            raise ValueError(f"{directory}: index holds {meta['num_docs']} documents but docs.jsonl has "
                             f"{len(ids)} and offsets.npy {len(offsets) - 1}; rebuild it")
        return cls(index, contents_path, offsets, ids)

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        """Top-k by BM25 score; documents sharing no term with the query are left out."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        k = min(topk, len(self._ids))
        tokens = _tokenize(list(queries))
        results = []
        with open(self._contents_path, "rb") as f:
            for query_tokens in tokens:
                if not query_tokens:
                    results.append([])
                    continue
                indices, scores = self._index.retrieve([query_tokens], k=k, show_progress=False, n_threads=1,
                                                       backend_selection="numpy")
                docs = []
                for i, score in zip(indices[0], scores[0]):
                    if score <= 0:
                        continue
                    start, end = int(self._offsets[i]), int(self._offsets[i + 1])
                    f.seek(start)
                    row = json.loads(f.read(end - start))
                    docs.append(Doc(id=row["id"], contents=row["contents"], score=float(score)))
                results.append(docs)
        return results


def _bm25s():
    """The bm25s module, imported with jax.lax hidden from it.

    bm25s.selection imports jax.lax and runs a top-k at import time when it can. In a data worker that
    op claims the accelerator: on a TPU host a second process cannot open the chips, on a GPU jax
    preallocates most of its memory. Retrieval here uses numpy top-k, so bm25s never needs jax.
    """
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    import jax  # noqa: F401  (imported for real first, so hiding jax.lax cannot leave jax half-imported)

    hidden = sys.modules.get("jax.lax")
    sys.modules["jax.lax"] = None  # makes bm25s's `import jax.lax` raise ImportError
    try:
        import bm25s
    finally:
        if hidden is None:
            del sys.modules["jax.lax"]
        else:
            sys.modules["jax.lax"] = hidden
    return bm25s


def _tokenize(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


def _replace_directory(source: str, target: str) -> None:
    """Moves `source` onto `target`, replacing an existing directory without a window where neither exists
    under `target`'s name half-written."""
    if not os.path.exists(target):
        os.replace(source, target)
        return
    retired = tempfile.mkdtemp(prefix=".old_", dir=os.path.dirname(target))
    os.rmdir(retired)
    os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)


class HTTPRetriever:
    """Client of a Search-R1 retrieval server: POST `url` with {"queries", "topk", "return_scores": true}.

    Accepts responses {"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]} (or, without
    scores, lists of documents). Connection errors, timeouts and 5xx answers are retried `retries` times
    with exponential backoff (backoff_s * 2**attempt); anything else raises RetrievalError at once.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5):
        import requests

        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._session = requests.Session()

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        import requests

        payload = {"queries": list(queries), "topk": topk, "return_scores": True}
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._session.post(self.url, json=payload, timeout=self.timeout_s)
            except requests.RequestException as error:
                last_problem = f"{type(error).__name__}: {error}"
                continue
            if response.status_code >= 500:
                last_problem = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise RetrievalError(f"{self.url}: HTTP {response.status_code}: {response.text[:200]}")
            try:
                return _parse_response(response.json(), len(payload["queries"]))
            except (ValueError, KeyError, TypeError) as error:
                raise RetrievalError(f"{self.url}: unexpected response ({error})") from None
        raise RetrievalError(f"{self.url}: no answer after {self.retries + 1} attempts ({last_problem})")


def _parse_response(body: Any, num_queries: int) -> list[list[Doc]]:
    result = body["result"]
    if not isinstance(result, list) or len(result) != num_queries:
        raise ValueError(f"expected 'result' to hold {num_queries} lists, got {str(result)[:100]}")
    parsed = []
    for hits in result:
        docs = []
        for hit in hits:
            is_scored = isinstance(hit, dict) and "document" in hit
            document, score = (hit["document"], float(hit.get("score", 0.0))) if is_scored else (hit, 0.0)
            if isinstance(document, str):
                document = {"id": "", "contents": document}
            docs.append(Doc(id=str(document.get("id", "")), contents=str(document["contents"]), score=score))
        parsed.append(docs)
    return parsed
