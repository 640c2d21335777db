"""`--config config.yaml`: a flat YAML mapping of long CLI flags, merged under the command line.

Every long option of the parser is a key (`max-num-seqs` or `max_num_seqs`); nothing here
names a flag, so options added to the parser later work without edits. File values become the
parser's defaults before the command line is parsed, which gives command line > config file >
built-in defaults with argparse's own rules, and lets a file switch any boolean off (a
store_true flag cannot be negated by splicing argv).

Values are converted with the option's own `type` and `choices`, so a bad value fails at
start-up exactly as it would on the command line, but naming the YAML key.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIG_FLAG = "--config"


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message is one line naming the file and key."""


def find_config_path(argv: Sequence[str]) -> str | None:
    """The path given with `--config PATH` or `--config=PATH`; at most one is allowed."""
    paths: list[str] = []
    for index, token in enumerate(argv):
        if token == "--":
            break
        if token == CONFIG_FLAG:
            if index + 1 >= len(argv):
                raise ConfigFileError("--config needs a file path")
            paths.append(argv[index + 1])
        elif token.startswith(CONFIG_FLAG + "="):
            paths.append(token[len(CONFIG_FLAG) + 1:])
    if len(paths) > 1:
        raise ConfigFileError("--config may be given only once")
    return paths[0] if paths else None


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse `argv` with the values of the `--config` file (if any) as defaults.

    Raises ConfigFileError for an unreadable file, an unknown key or a bad value; argparse
    itself still exits for bad command-line arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = find_config_path(args)
    if path is not None:
        parser.set_defaults(**load_config_defaults(parser, path))
    return parser.parse_args(args)


def load_config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """{dest: converted value} for every key of the YAML file at `path`."""
    source = Path(path)
    if source.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigFileError(f"config file {path}: expected a .yaml, .yml or .json file")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigFileError(f"config file {path}: not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: expected a mapping of option: value")
    options = long_options(parser)
    defaults: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).strip().lstrip("-").replace("_", "-")
        action = options.get(key)
        if action is None or key == CONFIG_FLAG[2:]:
            raise ConfigFileError(f"config file {path}: unknown key {raw_key!r}")
        try:
            defaults[action.dest] = convert_value(action, key, value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigFileError(f"config file {path}: key {raw_key!r}: {_one_line(exc)}") from None
    return defaults


def long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{'flag-name': action} for every long option (without the leading dashes)."""
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse offers no public iterator over its actions
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                options[option[2:]] = action
    return options


def primary_long_option(action: argparse.Action) -> str | None:
    """The positive long name of an action (`enable-x`, not `no-enable-x`)."""
    for option in action.option_strings:
        if option.startswith("--") and not (
            isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-")
        ):
            return option[2:]
    return None


def convert_value(action: argparse.Action, key: str, value: Any) -> Any:
    """Turn one YAML value into what argparse would have stored for that option."""
    if isinstance(action, argparse.BooleanOptionalAction):
        flag = _require_bool(value)
        # The `no-` spelling of the key means the opposite.
        return (not flag) if key.startswith("no-") and key != primary_long_option(action) else flag
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false / store_const
        if isinstance(action.const, bool):
            flag = _require_bool(value)
            return action.const if flag else (not action.const)
        return action.const if _require_bool(value) else action.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"expected a count (a non-negative integer), got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(
        action, (argparse._AppendAction, argparse._ExtendAction)
    )
    if many:
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ValueError("expected at least one value")
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"expected {action.nargs} values, got {len(items)}")
        return [_convert_one(action, item) for item in items]
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (list, dict)):
        # Options that parse JSON themselves (e.g. a list of origins) get the value as JSON;
        # any other scalar option rejects it through its own type below.
        if action.type is None:
            raise TypeError(f"expected a string, number or boolean, got {type(value).__name__}")
        text = json.dumps(value)
    elif isinstance(value, bool):
        # YAML true/false would stringify as "True"/"False"; spell it as on a command line.
        text = "true" if value else "false"
    else:
        text = str(value)
    converted: Any = text
    if action.type is not None:
        if isinstance(value, bool) and action.type in (int, float):
            raise TypeError(f"expected a number, got {value!r}")
        try:
            converted = action.type(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid value {value!r}: {_one_line(exc)}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise ValueError(f"invalid choice {value!r} (choose from {choices})")
    return converted


def _require_bool(value: Any) -> bool:
    # YAML 1.1 already maps yes/no/on/off to booleans; strings like "false" are accepted too
    # because operators quote values out of habit.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise TypeError(f"expected true or false, got {value!r}")


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
