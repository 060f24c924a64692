"""The command line: ``smolgpt train`` and ``smolgpt generate`` (and the root train.py /
generate.py, which call the same parsers).

A thin layer over the Python API (``smolgpt.train``, ``smolgpt.load``): flags are generated
from the config dataclasses, so each setting is defined once, for both. This is the only
place that prints for the user or chooses an exit status: a :class:`SmolGPTError` becomes
one line on stderr and status 2; an interrupt saves first, then exits 130 (SIGINT) or 143
(SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from . import __version__
from .config import HELP_GROUPS, PRESETS, GenerateConfig, TrainConfig, default_text
from .errors import SmolGPTError

log = logging.getLogger("smolgpt")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and status 2), like every error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_help(cls: type, f: dataclasses.Field) -> str:
    """A setting's --help text (the README's flag tables show the same)."""
    return f"{f.metadata['help']} (default: {default_text(cls, f.name)})"


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, under its group's heading; flags not given stay
    absent, so that presets can fill them."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    for group, title in HELP_GROUPS.items():
        members = [f for f in fields if f.metadata["group"] == group]
        if not members:
            continue
        section = parser.add_argument_group(title)
        for f in members:
            kind = hints[f.name]
            if typing.get_origin(kind) is typing.Union:  # Optional[X]
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if kind is bool:
                section.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                     default=argparse.SUPPRESS, help=flag_help(cls, f))
            else:
                section.add_argument(
                    f"--{f.name}", type=kind, default=argparse.SUPPRESS, help=flag_help(cls, f),
                    choices=f.metadata.get("choices"),
                    metavar=None if "choices" in f.metadata else kind.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smolgpt", description="Train and sample small GPT language models.")
    parser.add_argument("--version", action="version", version=f"smolgpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train", help="train a model",
        description=f"Train a GPT. Presets: {', '.join(PRESETS)}; a preset sets the model "
        "size and its training recipe; any flag you give wins over it.",
    )
    add_config_flags(train, TrainConfig)
    generate = commands.add_parser("generate", help="generate text from a checkpoint")
    generate.add_argument("checkpoint", help="a .pth checkpoint written by smolgpt train")
    add_config_flags(generate, GenerateConfig)
    return parser


def run_train(explicit: dict[str, Any]) -> int:
    from .api import train
    from .training import TrainingInterrupted

    start = time.perf_counter()
    try:
        result = train(**explicit)
    except TrainingInterrupted as stop:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        resume_hint = command if "--resume" in sys.argv else command + " --resume"
        print(f"{stop}: saved {stop.out_dir / 'latest_model.pth'}. Resume with: {resume_hint}",
              file=sys.stderr)
        return stop.exit_code
    print(
        f"done: {result.iterations} iterations in {time.perf_counter() - start:.1f}s, best val "
        f"loss {result.best_val_loss:.4f}; checkpoints in {result.out_dir}/\n"
        f"sample with: python generate.py {result.best_checkpoint} --prompt \"...\"",
        file=sys.stderr,
    )
    return 0


def run_generate(checkpoint_path: str, explicit: dict[str, Any]) -> int:
    cfg = GenerateConfig(**explicit)  # settings are checked before anything heavy
    from .api import load

    model = load(checkpoint_path, cfg.device)
    start = time.perf_counter()
    texts = model.generate(cfg.prompt, **dataclasses.asdict(cfg.sampling()))
    seconds = time.perf_counter() - start
    print("\n---\n".join([texts] if isinstance(texts, str) else texts))
    total = cfg.max_new_tokens * cfg.num_samples
    log.info("generated %d tokens in %.2fs (%.0f tokens/s)", total, seconds, total / max(seconds, 1e-9))
    return 0


# ----------------------------------------------------------------------------------- main

class _TqdmHandler(logging.Handler):
    """Log lines to stderr that do not break a progress bar on the same terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    _setup_logging()
    command = args.pop("command")
    try:
        if command == "train":
            return run_train(args)
        return run_generate(args.pop("checkpoint"), args)
    except SmolGPTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _exit(code: int) -> typing.NoReturn:
    """End the process with code at once. The interpreter's usual teardown of torch's
    modules takes about a second on a small CPU and does nothing a finished command needs:
    by now every file it wrote is closed and every lock released."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by its reader (`| head`): nothing to lose
            pass
    os._exit(code)


def console_main() -> typing.NoReturn:
    """Entry point of the `smolgpt` command and of `python -m smolgpt`."""
    _exit(main())


def train_main() -> typing.NoReturn:
    """Entry point of the root train.py: `smolgpt train` with the same flags."""
    _exit(main(["train", *sys.argv[1:]]))


def generate_main() -> typing.NoReturn:
    """Entry point of the root generate.py: `smolgpt generate` with the same flags."""
    _exit(main(["generate", *sys.argv[1:]]))
