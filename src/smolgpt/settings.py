"""What every settings dataclass is made of: :func:`opt`, a field that carries its
command-line help, ``--help`` group and allowed values in its metadata; the settings more
than one command shares (``--device``, ``--encoding``), defined once here; and
:func:`check_fields`, which enforces the allowed values a field declares, and
:func:`json_schema`, which states them as JSON schema (the server's request schemas are made of it).

The metadata :func:`opt` understands:

- ``help`` and ``group`` (a key of :data:`HELP_GROUPS`): the flag's help text and heading;
- ``shown``: the default as --help shows it, where the value itself would not say it;
- ``choices``: the values allowed (argparse offers them; ``label`` names the setting in the
  error, when not its flag);
- ``positive``: a positive integer (int fields) or a positive, finite number (float
  fields); ``minimum``: at least this (an integer for int fields, a finite number for float
  ones); ``interval``: within this, e.g. ``"[0, 1)"``; ``note``: words after the bound in
  the error, e.g. ``"(0 disables it)"``; ``check``: a function of the value that raises
  :class:`SmolGPTError` (None passes them all, and the choices too where the default is
  None: "unset");
- ``levels``: the tokenizer levels a setting means anything at (all when absent);
- ``resume``: what ``train --resume`` does with the setting: ``"fixed"`` (it defines what
  a run is: refused if changed), ``"kept"`` (the run's history: the saved value stays,
  whatever is given), ``"ignored"`` (bookkeeping: applied, not reported); absent: applied,
  and reported as a change;
- ``legacy``: the value checkpoints written before the field existed imply;
- ``escapes``: on the command line, \\n and \\t in the text mean a line break and a tab;
- ``argparse``: keyword arguments for ``add_argument`` beyond those the type implies.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import field
from typing import Any

from .errors import SmolGPTError

LEVELS = ("char", "word", "bpe")
DEVICES = ("auto", "cpu", "cuda", "mps")
POSITIONS = ("rope", "learned")
# The MLP's GELU: exact (erf), or GPT-2's tanh approximation (transformers' gelu_new).
ACTIVATIONS = ("gelu", "gelu_tanh")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "constant")
EXPORT_FORMATS = ("hf", "safetensors", "gguf")  # smolgpt export --format
# smolgpt export --format gguf --outtype: how the weight matrices are stored (see gguf_export).
GGUF_OUTTYPES = ("f32", "f16", "q8_0")
# --quantize of the commands that load a model to generate or score with: how its weight
# matrices are stored (see quantize.py).
QUANTIZE = ("none", "int8")
PLOT_AXES = ("iter", "time", "tokens")  # smolgpt plot --x: what the curves are drawn against
# smolgpt plot --y: what the curves show, val loss in nats per token (comparable between runs
# of one tokenizer only) or val bits per character (comparable across levels).
PLOT_VALUES = ("loss", "bits_per_char")
# The headings of `--help`, in order; every field names one in its metadata. "options" is
# argparse's own list (for commands with a few flags, no headings).
HELP_GROUPS = {
    "options": None,
    "data": "what to train on",
    "model": "model shape",
    "optimisation": "optimisation",
    "evaluation": "evaluation, stopping and logging",
    "input": "input",
    "sampling": "sampling",
    "output": "output",
    "server": "server",
    "limits": "limits per request and for the server",
    "system": "hardware and bookkeeping",
    "ablation": "ablations, to see what a part does (docs/exercises.md)",
}


def opt(default: Any, help: str, group: str, **extra: Any) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field whose help text, --help group and extras (see the module's
    docstring) travel along with it. default=dataclasses.MISSING: a required setting."""
    metadata = {"help": help, "group": group, **extra}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def check_encoding(encoding: str) -> None:
    """A Python codec name."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise SmolGPTError(
            f"unknown --encoding {encoding!r}: use a Python codec "
            "name such as utf-8, utf-16, cp1252 or latin-1"
        ) from None


def device_setting(group: str = "system", help: str = "where to run") -> Any:  # noqa: A002
    """--device, of every command that loads a model or trains one."""
    return opt("auto", help, group, choices=DEVICES)


QUANTIZE_HELP = (
    "int8: the larger weight matrices (131,072 weights and up: the tiny and small presets') "
    "stored as 8-bit integers, which makes CPU generation faster and costs a little "
    "quality (greedy text may differ from float32's); smaller ones stay float32, which is "
    "faster for them; a CPU only, which --device auto then picks"
)


def quantize_setting(group: str = "system", help: str = QUANTIZE_HELP) -> Any:  # noqa: A002
    """--quantize, of every command that loads a model to generate text or score it."""
    return opt("none", help, group, choices=QUANTIZE)


def encoding_setting(group: str, **extra: Any) -> Any:
    """--encoding, of every command that reads a --data text."""
    return opt(
        "utf-8",
        "text encoding of --data files (a UTF-8 or UTF-16 byte-order mark is "
        "recognised by itself); e.g. cp1252 or latin-1 for older Windows or European texts",
        group,
        check=check_encoding,
        **extra,
    )


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise SmolGPTError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SmolGPTError(f"--{name} must be a positive integer, got {value!r}")


def check_positive_number(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SmolGPTError(f"--{name} must be a positive number, got {value!r}")


def check_fields(cfg: Any, cls: type) -> None:
    """Enforce what the fields cls declares (its own, not a base class's, which checks its
    own) allow: choices, positive, minimum, interval and check. None passes all but the
    choices, and those too where the default is None: unset."""
    inherited = {
        f.name
        for base in cls.__mro__[1:]
        if dataclasses.is_dataclass(base)
        for f in dataclasses.fields(base)
    }
    for f in dataclasses.fields(cls):
        if f.name in inherited:
            continue
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None and f.default is None:
            continue
        if "choices" in meta:
            check_choice(meta.get("label", f.name), value, meta["choices"])
        if value is not None:
            _check_number(f, value)
            if "check" in meta:
                meta["check"](value)


def _check_number(f: dataclasses.Field, value: Any) -> None:
    """What f's metadata says of its number: positive, minimum, interval (a note after the
    bound, e.g. "(0 disables it)", goes into the message)."""
    meta, real = f.metadata, "float" in str(f.type)
    note = f" {meta['note']}" if "note" in meta else ""
    if meta.get("positive"):
        (check_positive_number if real else check_positive_int)(f.name, value)
    number = not isinstance(value, bool) and isinstance(value, (float, int) if real else int)
    if "minimum" in meta and not (number and math.isfinite(value) and value >= meta["minimum"]):
        raise SmolGPTError(f"--{f.name} must be >= {meta['minimum']}{note}, got {value!r}")
    if "interval" in meta:  # "[0, 1)": closed at 0, open at 1
        interval = meta["interval"]
        low, high = _ends(interval)
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[-1] == "]" else value < high
        if not (number and above and below):
            raise SmolGPTError(f"--{f.name} must be in {interval}{note}, got {value!r}")


def _ends(interval: str) -> tuple[float, float]:
    """An interval's ends: "[0, 1)" gives (0, 1); whole numbers as ints, as a schema shows them."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return int(low) if low.is_integer() else low, int(high) if high.is_integer() else high


# JSON schema's types of the settings that have one (Optional[...] of them too).
JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}


def json_schema(f: dataclasses.Field) -> dict[str, Any]:
    """A setting as JSON schema (OpenAPI 3.0's dialect, whose exclusiveMinimum and
    exclusiveMaximum are booleans): the type of its annotation (nullable where Optional), the
    values its metadata allows (choices, positive, minimum, interval), its default and its
    help. The check metadata, a function, has no schema; a type JSON_TYPES lacks raises
    TypeError."""
    kind, meta = str(f.type), f.metadata
    optional = kind.startswith("Optional[")
    kind = kind[len("Optional[") : -1] if optional else kind
    if kind not in JSON_TYPES:
        raise TypeError(f"no JSON schema for {f.name}: {f.type}")
    schema: dict[str, Any] = {"type": JSON_TYPES[kind], **({"nullable": True} if optional else {})}
    if "choices" in meta:
        schema["enum"] = list(meta["choices"])
    if meta.get("positive"):
        schema.update(
            {"minimum": 0, "exclusiveMinimum": True} if kind == "float" else {"minimum": 1}
        )
    if "minimum" in meta:
        schema["minimum"] = meta["minimum"]
    if "interval" in meta:
        interval = meta["interval"]
        schema["minimum"], schema["maximum"] = _ends(interval)
        if interval[0] == "(":
            schema["exclusiveMinimum"] = True
        if interval[-1] == ")":
            schema["exclusiveMaximum"] = True
    if f.default is not dataclasses.MISSING:
        schema["default"] = f.default
    return {**schema, "description": meta["help"]}


def default_shown(f: dataclasses.Field) -> str:
    """A field's default as --help and the command-line reference show it."""
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    default = f.default
    if isinstance(default, bool):
        return "on" if default else "off"
    return "unset" if default is None else str(default)
