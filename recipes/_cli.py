"""`--config file.yaml` plus `--key value` overrides for the recipes, on top of `HfArgumentParser`.

The YAML mapping is turned into command-line tokens placed *before* the user's own tokens, so every value
goes through the same argparse conversion and `choices` checks as a typed flag, and the command line wins on
a clash (argparse keeps the last value). Unknown keys, in the file or on the command line, fail with the
list of valid keys instead of being silently ignored. Every rejected input (a bad value, a failed dataclass
check) is a `ConfigError`; `run_cli` prints it as one line.

`--help` lists each dataclass's own options under its own heading, in the order given, and the options a
dataclass inherits (e.g. `TrainingArguments` under `StarSSEConfig`) after all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
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
    """One short line: the close matches of each unknown key, not the hundreds of valid ones (`--help`)."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ConfigError(
        f"Unknown key(s) {', '.join(hints)} {where}; --help lists the {len(valid)} valid keys."
    )


def _plain(text: str) -> str:
    """A docstring line as terminal text: ``x`` -> x, :class:`~a.B` -> B (Sphinx markup reads as noise)."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def _takes_list(parser: argparse.ArgumentParser, key: str) -> bool:
    return any(a.dest == key and a.nargs in ("+", "*") for a in parser._actions)


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


class _Parser(HfArgumentParser):
    """argparse errors (bad value, missing required option) as `ConfigError` instead of a usage + exit."""

    def error(self, message: str):
        raise ConfigError(message)


def _own_fields(dtype: type) -> set[str]:
    """Fields `dtype` declares itself, not those of a dataclass it inherits from."""
    inherited = {
        f.name
        for base in dtype.__mro__[1:]
        if dataclasses.is_dataclass(base)
        for f in dataclasses.fields(base)
    }
    return {f.name for f in dataclasses.fields(dtype)} - inherited


def _group_help(parser: argparse.ArgumentParser, dataclass_types: Sequence[type]) -> None:
    """One heading per dataclass (its own options, in the order given), then every inherited option."""
    groups, inherited = [], []
    for dtype in dataclass_types:
        doc = (dtype.__doc__ or "").strip().splitlines()
        title = f"{dtype.__name__} options"
        group = argparse._ArgumentGroup(parser, title, _plain(doc[0]) if doc else None)
        own = _own_fields(dtype)
        for action in list(parser._optionals._group_actions):
            if action.dest in own:
                parser._optionals._group_actions.remove(action)
                group._group_actions.append(action)
        groups.append(group)
        bases = [b.__name__ for b in dtype.__mro__[1:] if dataclasses.is_dataclass(b)]
        if bases and len(own) < len(dataclasses.fields(dtype)):
            inherited.append(f"{bases[0]} options (inherited by {dtype.__name__})")
    rest = parser._optionals
    if inherited:
        rest.title = "; ".join(inherited)
    # positionals (none), the script's own groups, then everything else (--help, --config, inherited options)
    config = [a for a in rest._group_actions if a.dest in ("help", "config")]
    for action in config:
        rest._group_actions.remove(action)
    general = argparse._ArgumentGroup(parser, "help and config file")
    general._group_actions.extend(config)
    parser._action_groups = [general, *groups, rest]
    for action in parser._actions:  # HfArgumentParser gives --no_X the help text of --X
        negative = [o for o in action.option_strings if o.startswith("--no_")]
        if negative and isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn --{action.dest} off (same as --{action.dest} false)."
            action.default = argparse.SUPPRESS  # the namespace default comes from --{dest} itself


def parse_config_and_args(
    dataclass_types: Sequence[type] | type,
    args: Sequence[str] | None = None,
    description: str | None = None,
    default_config: str | os.PathLike | None = None,
) -> tuple:
    """Parse `[--config file.yaml] [--key value ...]` into instances of `dataclass_types` (in that order).

    Values from the YAML file come first, command-line flags override them; `key: null` in YAML sets None.
    Without `--config`, `default_config` (if given) is the file; `--help` shows its values as the defaults.
    Every rejected input raises `ConfigError`.
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
    config_path = known.config if known.config is not None else default_config

    usage = "%(prog)s [-h] [--config FILE.yaml] [--key value ...]"
    parser = _Parser(dataclass_types, description=description, allow_abbrev=False, usage=usage)
    config_help = "YAML file of `key: value` settings; flags override it."
    if default_config is not None:
        shown = os.path.relpath(default_config)
        shown = shown if not shown.startswith("..") else str(default_config)
        config_help += f" Without it: {shown} (its values are the defaults shown below)."
    parser.add_argument("--config", default=None, help=config_help)
    valid = _valid_keys(dataclass_types)
    tokens: list[str] = []
    if config_path is not None:
        config = load_yaml_config(config_path)
        unknown = [k for k in config if k not in valid]
        if unknown:
            raise _unknown_key_error(unknown, valid, f"in {config_path}")
        for key, value in config.items():
            if isinstance(value, (list, tuple)) and not _takes_list(parser, key):
                raise ConfigError(
                    f"Config key {key!r} in {config_path} is a list ({value!r}) but takes one value."
                )
        nulls = {k: v for k, v in config.items() if v is None}
        for action in parser._actions:  # a null in YAML satisfies a required field like any other value
            if action.dest in nulls:
                action.required = False
        parser.set_defaults(**config)  # for --help; the tokens below carry the values through argparse
        for key, value in config.items():
            if value is not None:
                tokens += _to_tokens(key, value)
    _group_help(parser, dataclass_types)
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(
            args=tokens + rest, return_remaining_strings=True, look_for_args_file=False
        )
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass's own check (__post_init__)
        raise ConfigError(str(err)) from err
    if remaining:
        flags = [r.lstrip("-").split("=")[0] for r in remaining if r.startswith("--")]
        if flags:
            raise _unknown_key_error(flags, valid, "on the command line")
        raise ConfigError(f"Unexpected command-line arguments {remaining}; use --key value.")
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))


def run_cli(main: Callable[[], Any]) -> None:
    """Run a recipe's `main()`; a `ConfigError` (bad input, found before any work) is one line, exit 2."""
    try:
        main()
    except ConfigError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        sys.exit(2)
