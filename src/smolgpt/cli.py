"""The command line: ``smolgpt train`` and ``smolgpt generate`` (and the root train.py /
generate.py, which call the same parsers).

A thin layer over the Python API (``smolgpt.train``, ``smolgpt.load``): flags are generated
from the config dataclasses, so each setting is defined once, for both. This is the only
place that prints for the user or chooses an exit status: a :class:`SmolGPTError` becomes
one line on stderr and status 2; an interrupt saves first, then exits 130 (SIGINT), 143
(SIGTERM) or 129 (SIGHUP).

Every command it prints for the user to run next (how to resume, how to sample) starts the
way this process was started (a :class:`Launcher`), so that it can be pasted as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import time
import typing
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


# ------------------------------------------------------------------ commands to paste

@dataclasses.dataclass(frozen=True)
class Launcher:
    """How the user starts each command, as the shell words before its arguments: the way
    this process was started, so that a printed command can be pasted as it is."""

    train: tuple[str, ...]  # ("python", "train.py"), ("smolgpt", "train"), ...
    generate: tuple[str, ...]

    def command(self, name: str, args: Sequence[str]) -> str:
        """The command line of `name` ("train" or "generate") with args, quoted for a shell."""
        return shlex.join([*getattr(self, name), *args])

    @classmethod
    def subcommands(cls, *head: str) -> "Launcher":
        """`HEAD train ...` and `HEAD generate ...`."""
        return cls((*head, "train"), (*head, "generate"))

    @classmethod
    def scripts(cls, folder: str) -> "Launcher":
        """`python FOLDER/train.py ...` and `python FOLDER/generate.py ...`, the root scripts,
        with the folder as the user typed it (relative paths stay relative)."""
        python = typed_name(sys.executable, "python")
        return cls((python, os.path.join(folder, "train.py")),
                   (python, os.path.join(folder, "generate.py")))


def typed_name(path: str, name: str) -> str:
    """name if typing it in a shell starts the program at path, else path itself. The same
    program means the same file in the same folder: a virtual environment's python is a link
    to the base interpreter, and only its folder makes it the environment's."""
    found = shutil.which(name)
    if found is None:
        return path
    same_file = os.path.realpath(found) == os.path.realpath(path)
    same_folder = (os.path.realpath(os.path.dirname(os.path.abspath(found)))
                   == os.path.realpath(os.path.dirname(os.path.abspath(path))))
    return name if same_file and same_folder else path


SMOLGPT = Launcher.subcommands("smolgpt")  # what main() assumes unless told


def resume_args(args: Sequence[str]) -> list[str]:
    """The arguments of a train command changed to continue its run: --resume added, and
    --overwrite (which would move the run aside and start afresh) removed."""
    dropped = ("--resume", "--no-resume", "--overwrite", "--no-overwrite")
    return [a for a in args if a not in dropped] + ["--resume"]


# ---------------------------------------------------------------------------- commands

def run_train(explicit: dict[str, Any], args: Sequence[str], launcher: Launcher) -> int:
    """Train with the parsed flags; args (as typed) and launcher make the printed commands."""
    from .api import train
    from .training import TrainingInterrupted

    start = time.perf_counter()
    try:
        result = train(**explicit)
    except TrainingInterrupted as stop:
        resume = launcher.command("train", resume_args(args))
        print(f"{stop}: saved {stop.out_dir / 'latest_model.pth'}. Resume with: {resume}",
              file=sys.stderr)
        return stop.exit_code
    sample = launcher.command("generate", [str(result.best_checkpoint)])
    print(
        f"done: {result.iterations} iterations in {time.perf_counter() - start:.1f}s, best val "
        f"loss {result.best_val_loss:.4f}; checkpoints in {result.out_dir}/\n"
        f"sample with: {sample}",
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


def main(argv: Optional[Sequence[str]] = None, launcher: Launcher = SMOLGPT) -> int:
    """Run one command (argv: its words after the program's name; default sys.argv[1:]) and
    return the exit status. launcher: how the user started it, for the commands printed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    _setup_logging()
    command = args.pop("command")
    try:
        if command == "train":
            # The parser takes no words before the command but --help and --version, which
            # exit: argv[0] is the command.
            return run_train(args, argv[1:], launcher)
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
    main_module = sys.modules["__main__"]
    if getattr(main_module.__spec__, "name", None) == "smolgpt.__main__":  # python -m smolgpt
        launcher = Launcher.subcommands(typed_name(sys.executable, "python"), "-m", "smolgpt")
    else:  # the console script, as typed or found on PATH
        launcher = Launcher.subcommands(typed_name(sys.argv[0], "smolgpt"))
    _exit(main(launcher=launcher))


def train_main() -> typing.NoReturn:
    """Entry point of the root train.py: `smolgpt train` with the same flags."""
    _exit(main(["train", *sys.argv[1:]], Launcher.scripts(os.path.dirname(sys.argv[0]))))


def generate_main() -> typing.NoReturn:
    """Entry point of the root generate.py: `smolgpt generate` with the same flags."""
    _exit(main(["generate", *sys.argv[1:]], Launcher.scripts(os.path.dirname(sys.argv[0]))))
