"""Schema checks shared by every config (training and data): unknown keys with the nearest valid name,
override paths checked before flag parsing, leaf types against the defaults, and the ConfigError they raise.

A schema is the ConfigDict of defaults (`fwm.config.default_config()`,
`fwm.trajectories.pipeline.default_data_config()`): every valid key exists in it, so a typo anywhere
is an error naming the full dotted path. This module imports no other part of fwm, so any stage may
use it without knowing the stages downstream of it.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key and what was expected."""


def nearest(name: str, options: Iterable[str]) -> str:
    """'did you mean X?' with the closest option by difflib's ratio, then every valid key."""
    options = sorted(options)
    if not options:
        return "this section has no keys"
    best = max(options, key=lambda option: difflib.SequenceMatcher(None, name, option).ratio())
    return f"did you mean {best!r}? (valid keys here: {', '.join(options)})"


def require(ok: bool, path: str, expected: str, value: Any) -> None:
    """ConfigError naming `path` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key {path!r}: expected {expected}, got {value!r}")


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Raises ConfigError on the first key of `config` that `schema` lacks."""
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {path!r}: {nearest(key, schema.keys())}")
        value, expected = config[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"config key {path!r} is a section; expected a dict of {sorted(expected.keys())}, "
                                  f"got {value!r}")
            check_keys(ml_collections.ConfigDict(value) if isinstance(value, dict) else value, expected, path + ".")


def check_override_args(argv: Iterable[str], schema: ml_collections.ConfigDict, flag_name: str = "config") -> None:
    """Checks the dotted paths of `--config.a.b=v` arguments against `schema`.

    ml_collections' own error for an unknown override path is a traceback without the path; this
    one runs before flag parsing and names the full path and the nearest valid key.
    """
    marker = f"--{flag_name}."
    for arg in argv:
        if not arg.startswith(marker):
            continue
        path = arg[len(marker):].split("=", 1)[0]
        node, walked = schema, []
        for part in path.split("."):
            here = ".".join(walked + [part])
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--{flag_name}.{path}: {'.'.join(walked)!r} is not a section")
            if part not in node:
                raise ConfigError(f"unknown config key {here!r} (from {arg.split('=', 1)[0]}): "
                                  f"{nearest(part, node.keys())}")
            node, walked = node[part], walked + [part]


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key {path!r}: expected {expected}, got {value!r} ({type(value).__name__})")


def check_types(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "",
                nullable: Mapping[str, tuple[type, ...]] | None = None) -> None:
    """Every leaf has its default's type (ints accepted for floats, lists for tuples).

    nullable: dotted paths whose default is None -> the types accepted besides None (other None
    defaults accept anything).
    """
    nullable = nullable or {}
    for key in schema.keys():
        path, expected = f"{prefix}{key}", schema[key]
        if key not in config:
            raise ConfigError(f"config key {path!r} is missing (the defaults have it)")
        value = config[key]
        if isinstance(expected, ml_collections.ConfigDict):
            check_types(value, expected, path + ".", nullable)
        elif expected is None:
            allowed = nullable.get(path, (object,))
            if value is not None and not isinstance(value, allowed):
                raise _type_error(path, f"None or one of {[t.__name__ for t in allowed]}", value)
        elif isinstance(expected, bool):
            if not isinstance(value, bool):
                raise _type_error(path, "a bool", value)
        elif isinstance(expected, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(path, "an int", value)
        elif isinstance(expected, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(path, "a number", value)
        elif isinstance(expected, str):
            if not isinstance(value, str):
                raise _type_error(path, "a string", value)
        elif isinstance(expected, (tuple, list)):
            if not isinstance(value, (tuple, list)):
                raise _type_error(path, "a tuple/list", value)


def parse_variants(arg: str | None, allowed: Iterable[str], where: str, default: str = "") -> set[str]:
    """The comma-separated variants of an experiment's `get_config(arg)` ('sft,runlocal'); `default` when
    arg is empty. An unknown variant raises ConfigError naming `where` (the experiment file) and the choices."""
    allowed = tuple(allowed)
    variants = {v.strip() for v in (arg or default).split(",") if v.strip()}
    unknown = sorted(variants - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown variant(s) {unknown}; expected a comma-separated subset of {allowed}")
    return variants
