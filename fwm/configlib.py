"""Schema checks shared by every config (training and data): unknown keys with the nearest valid name,
override paths checked before flag parsing, leaf types against the defaults, and the ConfigError they raise.

A schema is the ConfigDict of defaults (`fwm.config.default_config()`,
`fwm.trajectories.pipeline.default_data_config()`): every valid key exists in it, so a typo anywhere
is an error naming the full dotted path. This module imports no other part of fwm, so any stage may
use it without knowing the stages downstream of it.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key and what was expected."""


# Names users bring from other trainers (HF, optax, PyTorch) -> ours. Checked first, because no
# string distance links 'learning_rate' to 'lr' (difflib prefers 'min_lr_ratio').
ALIASES: dict[str, str] = {
    "learning_rate": "lr", "learningrate": "lr", "peak_lr": "lr", "max_lr": "lr",
    "beta1": "b1", "beta2": "b2", "adam_beta1": "b1", "adam_beta2": "b2", "epsilon": "eps", "adam_eps": "eps",
    "wd": "weight_decay", "decay": "weight_decay", "grad_clip": "clip_norm", "max_grad_norm": "clip_norm",
    "gradient_clipping": "clip_norm", "clip": "clip_norm", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps",
    "lr_schedule": "schedule", "scheduler": "schedule", "grad_accum": "micro_batches",
    "gradient_accumulation_steps": "micro_batches", "accumulation_steps": "micro_batches",
    "num_steps": "steps", "max_steps": "steps", "total_steps": "steps", "train_steps": "steps",
    "num_epochs": "epochs", "bs": "batch_size", "batch": "batch_size", "global_batch_size": "batch_size",
    "max_length": "seq_len", "max_len": "seq_len", "seq_length": "seq_len", "sequence_length": "seq_len",
    "context_length": "seq_len", "output_dir": "workdir", "out_dir": "workdir", "tokenizer_path": "path",
    "from": "source", "checkpoint": "source", "init_from": "source", "n_layers": "num_layers",
    "num_hidden_layers": "num_layers", "d_model": "hidden_size", "n_heads": "num_heads",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "intermediate_size": "mlp_dim",
}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[_\W]+", name.lower()) if w]


def _similarity(name: str, option: str) -> tuple[float, float, float]:
    """(abbreviation match, shared words, string ratio): compared in that order."""
    name_words, option_words = _words(name), _words(option)
    initials = lambda words: "".join(w[0] for w in words)  # noqa: E731
    abbreviation = float(len(name_words) > 1 and initials(name_words) == option.lower()
                         or len(option_words) > 1 and initials(option_words) == name.lower())
    union = set(name_words) | set(option_words)
    overlap = len(set(name_words) & set(option_words)) / len(union) if union else 0.0
    return abbreviation, overlap, difflib.SequenceMatcher(None, name.lower(), option.lower()).ratio()


def nearest(name: str, options: Iterable[str]) -> str:
    """'did you mean X?' with X: a known alias (ALIASES) among the options, else the option whose
    initials `name` abbreviates (or the reverse), else most shared '_'-words, else closest by
    difflib's ratio; then every valid key."""
    options = sorted(options)
    if not options:
        return "this section has no keys"
    alias = ALIASES.get(name.lower())
    best = alias if alias in options else max(options, key=lambda option: _similarity(name, option))
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


def load_experiment(name: str, near: str) -> Any:
    """The experiment file `name` (e.g. 'rl.py' or '../quickstart.py') beside the file `near` as a module:
    experiment files are loaded by path (as `--config` loads them), not imported as a package."""
    import importlib.util
    import os

    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(near)), name))
    if not os.path.isfile(path):
        raise ConfigError(f"{near}: no experiment file {path}")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
