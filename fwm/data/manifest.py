"""The corpora manifest that `fwm data` writes (DATA_WORKDIR/corpora/manifest.json), read by training configs.

Format (fwm/trajectories/corpora.py writes it): `{"corpora": {NAME: {"path": "NAME.jsonl",
"eval_path": "NAME_eval.jsonl" (optional), "stage": "lm" | "sft" | "rl", "trained_roles": [...]
(LM corpora), "tokens": int, "records": int, ...}, ...}, "tokenizer": "PATH" (optional)}`. File paths
are relative to the manifest's directory (absolute ones are kept); lists of paths are accepted too.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from fwm.files import DataFormatError, read_json

MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One corpus of a manifest, its paths made absolute."""

    name: str
    stage: str                        # the fwm.data.records stage of its records: lm, sft or rl
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]       # empty when the corpus has no held-out split
    trained_roles: tuple[str, ...]    # LM corpora: the roles that are targets; () when not recorded
    tokens: int                       # as counted by `fwm data` (the manifest's `token_count` says in what)
    records: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: str                         # the manifest.json read
    corpora: dict[str, Corpus]
    tokenizer: str                    # absolute path of the world's tokenizer; '' when the manifest names none


def manifest_file(path: str) -> str:
    """The manifest.json that `path` names: the file itself, DIR/manifest.json or DIR/corpora/manifest.json
    (so a `fwm data` workdir works as well as its corpora directory)."""
    for candidate in (path, os.path.join(path, MANIFEST_NAME), os.path.join(path, "corpora", MANIFEST_NAME)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise DataFormatError(f"{path} does not exist or holds no {MANIFEST_NAME} (nor corpora/{MANIFEST_NAME}); "
                          f"write one with `fwm data --config experiments/synthetic_search.py --workdir DIR`")


def _paths(value: Any, base: str, where: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise DataFormatError(f"{where}: expected a path or a list of paths, got {value!r}")
    return tuple(os.path.normpath(os.path.join(base, v)) for v in values)


def read_manifest(path: str) -> Manifest:
    """The manifest named by `path` (see manifest_file); DataFormatError naming the file and entry."""
    file = manifest_file(path)
    base = os.path.dirname(file)
    raw = read_json(file)
    if not isinstance(raw, dict) or not isinstance(raw.get("corpora"), dict):
        raise DataFormatError(f"{file}: expected an object with a 'corpora' object")
    corpora = {}
    for name, entry in raw["corpora"].items():
        where = f"{file}, corpus {name!r}"
        if not isinstance(entry, dict) or "path" not in entry or "stage" not in entry:
            raise DataFormatError(f"{where}: expected an object with 'path' and 'stage', got {entry!r:.120}")
        eval_files = _paths(entry["eval_path"], base, f"{where}, 'eval_path'") if entry.get("eval_path") else ()
        roles = entry.get("trained_roles") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise DataFormatError(f"{where}, 'trained_roles': expected a list of role names, got {roles!r}")
        corpora[name] = Corpus(name=name, stage=str(entry["stage"]), train_files=_paths(entry["path"], base,
                               f"{where}, 'path'"), eval_files=eval_files, trained_roles=tuple(roles),
                               tokens=int(entry.get("tokens", 0)), records=int(entry.get("records", 0)))
    tokenizer = raw.get("tokenizer") or ""
    if not isinstance(tokenizer, str):
        raise DataFormatError(f"{file}, 'tokenizer': expected a path, got {tokenizer!r}")
    return Manifest(path=file, corpora=corpora,
                    tokenizer=os.path.normpath(os.path.join(base, tokenizer)) if tokenizer else "")
