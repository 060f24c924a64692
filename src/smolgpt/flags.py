"""The command line's parser: every subcommand (:data:`COMMANDS`) with its flags generated
from its settings dataclass, one --flag per field, so that each setting is defined once,
for the command line, the Python API and the manual's command-line reference
(``python -m smolgpt.docs`` writes docs/reference/cli.md). The commands themselves are in
``cli.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Optional

from .commandconfig import (
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    InfoConfig,
    InspectConfig,
    PlotConfig,
    ServeConfig,
)
from .config import HELP_GROUPS, PRESETS, TrainConfig, default_text
from .extras import install_command
from .version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and status 2), like every error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_help(cls: type, f: dataclasses.Field) -> str:
    """A setting's --help text (the command-line reference shows the same); a required one
    has no default to show."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {default_text(cls, f.name)})"


def flag_options(cls: type, f: dataclasses.Field, kind: Any) -> dict[str, Any]:
    """add_argument's keyword arguments for the field f of type kind (Optional unwrapped)."""
    options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": flag_help(cls, f)}
    if f.default is dataclasses.MISSING:
        options.update(required=True, default=None)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if items[-1] is Ellipsis:  # one or more strings: --stop A B --stop C
            options.update(nargs="+", action="extend", type=unescape, metavar="TEXT")
        else:  # a fixed number of values: --ylim 0 3
            options.update(nargs=len(items), type=items[0])
    else:
        options["type"] = unescape if f.metadata.get("escapes") else kind
        options["choices"] = f.metadata.get("choices")
        options["metavar"] = None if "choices" in f.metadata else kind.__name__.upper()
    return {**options, **f.metadata.get("argparse", {})}


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, under its group's heading; flags not given stay
    absent, so that presets (or the dataclass defaults) fill them."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    for group, title in HELP_GROUPS.items():
        members = [f for f in fields if f.metadata["group"] == group]
        if not members:
            continue
        section = parser.add_argument_group(title) if title else parser
        for f in members:
            kind = hints[f.name]
            if typing.get_origin(kind) is typing.Union:  # Optional[X]
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            section.add_argument(f"--{f.name}", **flag_options(cls, f, kind))


def unescape(text: str) -> str:
    """A string typed on the command line with \\n, \\t and \\\\ read as a line break, a tab
    and a backslash: a shell cannot easily pass a line break."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    out, chars = [], iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append(escapes.get(nxt, ch + nxt))
        else:
            out.append(ch)
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its description ({plot} and {serve}: the command
    that installs that extra, {presets}: the presets' names), its settings dataclass (one
    --flag per field) and the arguments that are no setting (positional ones, train's
    --config), as (name, add_argument's keyword arguments)."""

    help: str
    settings: type
    description: Optional[str] = None
    arguments: tuple[tuple[str, dict[str, Any]], ...] = ()


# A model to load, as every command that loads one takes it.
_CHECKPOINT = (
    "checkpoint",
    {
        "help": "a .pth checkpoint, a run directory (its best_model.pth), or a directory "
        "written by smolgpt export"
    },
)
COMMANDS = {
    "train": Command(
        "train a model",
        TrainConfig,
        "Train a GPT. Presets: {presets}; a preset sets the model size and its training "
        "recipe; any flag you give wins over it.",
        # Not a setting itself: its file's settings count as given, and the flags given win.
        arguments=(
            (
                "--config",
                {
                    "metavar": "FILE",
                    "default": argparse.SUPPRESS,
                    "help": "read settings from a TOML file whose keys are these flags' names "
                    "(see Config files in the training guide); a flag given wins over the file "
                    "(default: unset)",
                },
            ),
        ),
    ),
    "generate": Command(
        "generate text from a checkpoint", GenerateConfig, arguments=(_CHECKPOINT,)
    ),
    "export": Command(
        "export a model for Hugging Face transformers, llama.cpp (GGUF) or as safetensors",
        ExportConfig,
        "Write a model to a new directory: --format hf for transformers "
        "(AutoModelForCausalLM, AutoTokenizer), --format safetensors for smolgpt alone; or "
        "to one file, --format gguf, for llama.cpp, Ollama and LM Studio.",
        (
            _CHECKPOINT,
            (
                "out_dir",
                {
                    "metavar": "OUT",
                    "help": "where to write: a new or empty directory (hf, safetensors), or "
                    "a new file such as model.gguf (gguf)",
                },
            ),
        ),
    ),
    "eval": Command(
        "loss, perplexity and bits per character of a model on a text",
        EvalConfig,
        "Score a model on the validation split of the text it was trained on "
        "(default) or on any text (--data): every token after the first is predicted once. "
        "Bits per character compare models of any level on the same text.",
        (_CHECKPOINT,),
    ),
    "inspect": Command(
        "draw what a model does inside: attention, embeddings, loss by position",
        InspectConfig,
        "Draw PNGs of what a trained model does inside, and a text summary: the "
        "attention weights of every head for a prompt, the token embeddings projected to 2-D "
        "(with nearest neighbours), and the loss at each position of the context. Needs "
        "matplotlib ({plot}). See docs/tour.md.",
        (_CHECKPOINT,),
    ),
    "plot": Command(
        "draw the val loss curves of runs in one picture",
        PlotConfig,
        "Overlay the val loss of one or more runs (their metrics.jsonl) in a PNG, "
        "in nats per token or, for runs of different levels, in bits per character; "
        "needs matplotlib ({plot}).",
        (("run_dirs", {"nargs": "+", "metavar": "RUN_DIR", "help": "run directories"}),),
    ),
    "serve": Command(
        "serve models over HTTP: OpenAI's completions API and a playground page",
        ServeConfig,
        "Serve one or more models: a playground page at /, OpenAI's completions "
        "API at /v1/completions (streaming too), /v1/models, /health and /openapi.json. "
        "Needs the serve extra ({serve}). Listens on this computer only unless --host "
        "says otherwise.",
        (
            (
                "checkpoints",
                {
                    "nargs": "+",
                    "metavar": "CHECKPOINT",
                    "help": "a .pth checkpoint, a run directory (its best_model.pth), or a "
                    "directory written by smolgpt export; each is served under its run's "
                    "or file's name",
                },
            ),
        ),
    ),
    "info": Command(
        "describe a checkpoint or run: model, training, data and versions",
        InfoConfig,
        "Describe a checkpoint (.pth), a run directory (its best_model.pth, else "
        "latest_model.pth, with its metrics.jsonl and config.json) or an export: its size and "
        "shape, tokenizer, iterations, losses, data, precision, versions and times.",
        (_CHECKPOINT,),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smolgpt", description="Train and sample small GPT language models.")
    parser.add_argument("--version", action="version", version=f"smolgpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    filled = {
        "plot": install_command("plot"),
        "serve": install_command("serve"),
        "presets": ", ".join(PRESETS),
    }
    for name, command in COMMANDS.items():
        description = command.description and command.description.format(**filled)
        sub = commands.add_parser(name, help=command.help, description=description)
        for argument, options in command.arguments:
            sub.add_argument(argument, **options)
        add_config_flags(sub, command.settings)
    return parser
