"""Settings from a file (``smolgpt train --config``): a flat TOML table, or a run's
config.json, checked against a settings dataclass's field names and types.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Union

from .errors import SmolGPTError
from .files import read_user_text

# How a config file's values are named when one has the wrong type.
_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
    type(None): "null",
}


def read_settings_file(path: Union[str, Path], cls: type) -> dict[str, Any]:
    """The settings in a config file (``--config``): one flat TOML table, or a JSON object
    such as a run's config.json (its "smolgpt_version" is skipped), keyed by cls's
    field names (the flags' names), each value of its field's type. The values are settings
    as given, to be resolved like flags; relative paths in them stay relative to the current
    directory, as a flag's would. Every problem is a SmolGPTError naming the file."""
    path = Path(path).expanduser()
    where = f"--config {path}"
    if path.is_dir():
        raise SmolGPTError(f"{where} is a directory: give a .toml file")
    text = read_user_text(path, where)
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SmolGPTError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise SmolGPTError(f"{where} must hold one JSON object of settings")
        values.pop("smolgpt_version", None)  # written beside the settings in config.json
    else:
        try:
            values = _toml().loads(text)
        except ValueError as exc:  # tomllib.TOMLDecodeError: its message gives the line
            raise SmolGPTError(f"{where} is not valid TOML: {exc}") from None
    return _typed_settings(values, where, cls)


def _toml():
    """tomllib (Python 3.11), or on 3.10 the tomli package it came from."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise SmolGPTError(
                "reading a TOML --config needs Python 3.11 or the tomli package: pip install tomli"
            ) from None
    return tomllib


def _typed_settings(values: dict[str, Any], where: str, cls: type) -> dict[str, Any]:
    """values, checked against cls's fields: their names and types (an integer is a
    number too, and becomes a float where one is expected; true is not an integer)."""
    tables = [k for k, v in values.items() if isinstance(v, dict)]
    if tables:  # a [section] header reads as a nested table
        raise SmolGPTError(
            f"{where}: [{tables[0]}] is a table; a config file is one flat "
            "list of settings (key = value), without [sections]"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        shown = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            shown.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise SmolGPTError(
            f"{where}: unknown setting(s) {', '.join(shown)}; the keys are "
            "the flag names of smolgpt train --help, without the dashes"
        )
    typed = {}
    for key, value in values.items():
        kind, optional = hints[key], False
        if typing.get_origin(kind) is Union:  # Optional[X]
            optional = True
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is float and type(value) is int:
            value = float(value)
        if not (type(value) is kind or (value is None and optional)):
            got = _TYPE_NAMES.get(type(value), type(value).__name__)
            raise SmolGPTError(f"{where}: {key} must be {_TYPE_NAMES[kind]}, got {value!r} ({got})")
        typed[key] = value
    return typed
