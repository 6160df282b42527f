"""`--config file.yaml` plus `--key value` overrides for the recipes, on top of `HfArgumentParser`.

The YAML mapping is turned into command-line tokens placed *before* the user's own tokens, so every value
goes through the same argparse conversion and `choices` checks as a typed flag, and the command line wins on
a clash (argparse keeps the last value). Unknown keys, in the file or on the command line, fail with the
list of valid keys instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A recipe configuration problem (bad file, unknown key) reported before any work starts."""


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of `field: value`; an empty file is an empty config."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}."
        )
    return data


def _valid_keys(dataclass_types: Sequence[type]) -> list[str]:
    return sorted(f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init)


def _unknown_key_error(unknown: Sequence[str], valid: list[str], where: str) -> ConfigError:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ConfigError(f"Unknown key(s) {', '.join(hints)} {where}. Valid keys: {', '.join(valid)}.")


def _to_tokens(key: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"Config key {key!r} is an empty list; drop the key to keep the default.")
        return [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def parse_config_and_args(
    dataclass_types: Sequence[type] | type,
    args: Sequence[str] | None = None,
    description: str | None = None,
) -> tuple:
    """Parse `[--config file.yaml] [--key value ...]` into instances of `dataclass_types` (in that order).

    Values from the YAML file come first, command-line flags override them; `key: null` in YAML sets None.
    """
    if dataclasses.is_dataclass(dataclass_types):
        dataclass_types = [dataclass_types]
    dataclass_types = list(dataclass_types)
    seen: dict[str, str] = {}
    for dtype in dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.name in seen:
                raise TypeError(f"{seen[f.name]} and {dtype.__name__} both define {f.name!r}; rename one.")
            seen[f.name] = dtype.__name__
    args = list(sys.argv[1:] if args is None else args)

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(args)

    parser = HfArgumentParser(dataclass_types, description=description, allow_abbrev=False)
    parser.add_argument(
        "--config", default=None, help="YAML file of `key: value` defaults; flags override it."
    )
    valid = _valid_keys(dataclass_types)
    tokens: list[str] = []
    if known.config is not None:
        config = load_yaml_config(known.config)
        unknown = [k for k in config if k not in valid]
        if unknown:
            raise _unknown_key_error(unknown, valid, f"in {known.config}")
        nulls = {k: v for k, v in config.items() if v is None}
        for action in parser._actions:  # a null in YAML satisfies a required field like any other value
            if action.dest in nulls:
                action.required = False
        parser.set_defaults(**nulls)
        for key, value in config.items():
            if value is not None:
                tokens += _to_tokens(key, value)
    *outputs, remaining = parser.parse_args_into_dataclasses(
        args=tokens + rest, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        flags = [r.lstrip("-").split("=")[0] for r in remaining if r.startswith("--")]
        if flags:
            raise _unknown_key_error(flags, valid, "on the command line")
        raise ConfigError(f"Unexpected command-line arguments {remaining}; use --key value.")
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))
