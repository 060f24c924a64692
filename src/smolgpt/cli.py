"""The command line: ``smolgpt train``, ``generate``, ``eval``, ``export``, ``plot``,
``info`` and ``serve`` (and the root train.py / generate.py, which call the same parsers).

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
import itertools
import json
import logging
import os
import shlex
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from . import __version__
from .config import (
    HELP_GROUPS,
    PRESETS,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    InfoConfig,
    InspectConfig,
    PlotConfig,
    ServeConfig,
    TrainConfig,
    default_text,
)
from .errors import Relayed, SmolGPTError
from .extras import install_command
from .files import atomic_write_text, read_user_text

log = logging.getLogger("smolgpt")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and status 2), like every error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_help(cls: type, f: dataclasses.Field) -> str:
    """A setting's --help text (the README's flag tables show the same); a required one
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
                    "(see Config files in the README); a flag given wins over the file "
                    "(default: unset)",
                },
            ),
        ),
    ),
    "generate": Command(
        "generate text from a checkpoint", GenerateConfig, arguments=(_CHECKPOINT,)
    ),
    "export": Command(
        "export a model for Hugging Face transformers or as safetensors",
        ExportConfig,
        "Write a model to a new directory: --format hf for transformers "
        "(AutoModelForCausalLM, AutoTokenizer), --format safetensors for smolgpt alone.",
        (_CHECKPOINT, ("out_dir", {"help": "the directory to write (new or empty)"})),
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

    def under_torchrun(self) -> "Launcher":
        """The commands to start training the way torchrun started it: on one machine with
        its LOCAL_WORLD_SIZE processes; on several, "torchrun ..." (each node's options, as
        it was launched)."""
        world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
        head = ["torchrun", "--standalone", f"--nproc_per_node={local}"]
        if world != local:
            head = ["torchrun", "..."]
        script = self.train[-1]
        program = [script] if script.endswith(".py") else ["-m", "smolgpt", "train"]
        return dataclasses.replace(self, train=(*head, *program))

    @classmethod
    def subcommands(cls, *head: str) -> "Launcher":
        """`HEAD train ...` and `HEAD generate ...`."""
        return cls((*head, "train"), (*head, "generate"))

    @classmethod
    def scripts(cls, folder: str) -> "Launcher":
        """`python FOLDER/train.py ...` and `python FOLDER/generate.py ...`, the root scripts,
        with the folder as the user typed it (relative paths stay relative)."""
        python = typed_name(sys.executable, "python")
        return cls(
            (python, os.path.join(folder, "train.py")),
            (python, os.path.join(folder, "generate.py")),
        )


def typed_name(path: str, name: str) -> str:
    """name if typing it in a shell starts the program at path, else path itself. The same
    program means the same file in the same folder: a virtual environment's python is a link
    to the base interpreter, and only its folder makes it the environment's."""
    found = shutil.which(name)
    if found is None:
        return path
    same_file = os.path.realpath(found) == os.path.realpath(path)
    same_folder = os.path.realpath(os.path.dirname(os.path.abspath(found))) == os.path.realpath(
        os.path.dirname(os.path.abspath(path))
    )
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
    from .distributed import from_environment
    from .training import TrainingInterrupted

    group = from_environment()  # under torchrun, rank 0 alone reports
    start = time.perf_counter()
    try:
        result = train(**explicit)
    except TrainingInterrupted as stop:
        if not group.is_main:
            return stop.exit_code
        if group.distributed:
            launcher = launcher.under_torchrun()
        resume = launcher.command("train", resume_args(args))
        print(
            f"{stop}: saved {stop.out_dir / 'latest_model.pth'}. Resume with: {resume}",
            file=sys.stderr,
        )
        return stop.exit_code
    if not group.is_main:
        return 0
    sample = launcher.command("generate", [str(result.best_checkpoint)])
    iterations = f"{result.iterations} iteration{'' if result.iterations == 1 else 's'}"
    print(
        f"done: {iterations} in {time.perf_counter() - start:.1f}s, best val "
        f"loss {result.best_val_loss:.4f}; checkpoints in {result.out_dir}/\n"
        f"sample with: {sample}",
        file=sys.stderr,
    )
    return 0


def run_generate(checkpoint_path: str, explicit: dict[str, Any]) -> int:
    """Generate with the parsed flags: streamed to stdout, or written to --out, or in a
    prompt loop (--interactive)."""
    cfg = GenerateConfig(**explicit)  # settings are checked before anything heavy
    prompt = read_prompt_file(cfg.prompt_file) if cfg.prompt_file else cfg.prompt
    if cfg.out:
        check_output_file(Path(cfg.out))
    from .api import load

    model = load(checkpoint_path, cfg.device)
    sampling = dataclasses.asdict(cfg.sampling())
    if cfg.interactive:
        return interactive(model, sampling)
    start = time.perf_counter()
    if cfg.num_samples == 1 and not cfg.out:
        stream = model.stream(prompt, **sampling)
        write_stream(stream)
        new_tokens = stream.new_tokens
    else:
        texts = model.generate(prompt, **sampling)
        text = "\n---\n".join([texts] if isinstance(texts, str) else texts) + "\n"
        if cfg.out:
            atomic_write_text(Path(cfg.out), text)
            log.info("wrote %s", cfg.out)
        else:
            sys.stdout.write(text)
        new_tokens = cfg.max_new_tokens * cfg.num_samples
        if cfg.stop:  # samples that stopped early made fewer: no rate to report
            log.info("generated at most %d tokens", new_tokens)
            return 0
    seconds = time.perf_counter() - start
    log.info(
        "generated %d tokens in %.2fs (%.0f tokens/s)",
        new_tokens,
        seconds,
        new_tokens / max(seconds, 1e-9),
    )
    return 0


def write_stream(pieces) -> None:
    """Write text pieces to stdout as they come, then a line break."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def interactive(model, sampling: dict[str, Any]) -> int:
    """Read prompts from stdin, one per line, and stream each continuation. A blank line or
    end of input quits; Ctrl-C stops the generation under way and asks for the next prompt.
    Turn n samples with seed + n - 1, so that a session replays exactly."""
    print(
        "type a prompt and press Enter; a blank line or Ctrl-D quits, Ctrl-C stops a generation",
        file=sys.stderr,
    )
    for turn in itertools.count():
        try:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt: discard the line, ask again
            sys.stderr.write("\n")
            continue
        prompt = line.rstrip("\r\n")
        if not prompt.strip():
            return 0
        stream = None
        try:
            stream = model.stream(prompt, **{**sampling, "seed": sampling["seed"] + turn})
            write_stream(stream)
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
            print("(stopped)", file=sys.stderr)
        except SmolGPTError as exc:  # a prompt the model cannot read: say so, ask again
            print(f"error: {exc}", file=sys.stderr)
    return 0


def read_prompt_file(path: str) -> str:
    """The text of a --prompt_file (UTF-8, or what its byte-order mark says)."""
    return read_user_text(Path(path), f"--prompt_file {path}")


def check_output_file(path: Path) -> None:
    """Refuse an --out the text could not be written to, before generating it."""
    if path.is_dir():
        raise SmolGPTError(f"--out {path} is a directory: give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise SmolGPTError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SmolGPTError(f"--out {path}: the folder {folder} is not writable")


def run_export(source: str, out_dir: str, cfg: ExportConfig, launcher: Launcher) -> int:
    """Export the model at source to out_dir in cfg's format ("hf" or "safetensors")."""
    from . import interop
    from .api import load

    fmt, overwrite = cfg.format, cfg.overwrite

    if fmt == "hf":
        interop.require_hf()
    interop.check_out_dir(out_dir, overwrite)  # both before the work of loading
    out = load(source, "cpu").export(out_dir, fmt, overwrite)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}", file=sys.stderr)
    if fmt == "hf":
        print(
            f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}), "
            f"AutoTokenizer.from_pretrained({str(out)!r})",
            file=sys.stderr,
        )
    else:
        print(f"sample with: {launcher.command('generate', [str(out)])}", file=sys.stderr)
    return 0


def run_eval(source: str, cfg: EvalConfig) -> int:
    """Score the model at source on cfg.data (default: its validation split) and print
    the scores on stdout."""
    from .api import load
    from .rundir import locate
    from .sources import iter_text, resolve_corpus

    text_spec = cfg.data
    text = None
    if text_spec is not None:  # read before the model: a wrong path fails at once
        text = "".join(iter_text(resolve_corpus(text_spec, cfg.encoding)))
    path = locate(source).model  # a run directory: its checkpoint, which the output names
    model = load(path, cfg.device)
    what = (
        f"--data {text_spec}"
        if text_spec
        else "the validation split of " + str(model.train_config.get("data", "its training text"))
    )
    scores = model.evaluate(text, cfg.batch_size)
    if cfg.json:
        print(json.dumps(scores.to_dict()))
    else:
        print(
            f"{path}, {what}: {scores.chars:,} characters, {scores.tokens:,} tokens"
            + (f" ({scores.unk_tokens:,} <UNK>)" if scores.unk_tokens else "")
        )
        print(f"loss           {scores.loss:.4f} nats per token")
        print(f"perplexity     {scores.perplexity:.3f}")
        print(f"bits per char  {scores.bits_per_char:.4f}")
    return 0


def run_info(path: str, cfg: InfoConfig) -> int:
    """Describe the checkpoint, run or export at path on stdout: aligned key: value lines,
    or one JSON object (null for what it does not record)."""
    from .runinfo import describe, format_description

    description = describe(path)
    print(json.dumps(description) if cfg.json else format_description(description))
    return 0


def run_plot(run_dirs: list[str], cfg: PlotConfig) -> int:
    """Overlay the runs' val curves (cfg.y, by default as plot_runs chooses, which says why
    in a log line) in the PNG cfg.out; the last line says where it went, as an absolute path
    (the default lands in the current directory)."""
    from .plots import plot_runs

    written = plot_runs(run_dirs, cfg.out, cfg.x, cfg.ylim, cfg.title, cfg.y)
    print(f"wrote {Path(written).resolve()}", file=sys.stderr)
    return 0


def run_inspect(source: str, cfg: InspectConfig) -> int:
    """Draw the look inside the model at source; print the summary on stdout and the files
    written on stderr."""
    from .api import load
    from .plots import _figure_classes
    from .sources import iter_text, resolve_corpus

    _figure_classes()  # matplotlib missing: one line, before anything is loaded
    text = None
    if cfg.data is not None:  # read before the model: a wrong path fails at once
        text = "".join(iter_text(resolve_corpus(cfg.data, cfg.encoding)))
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    out = Path(cfg.out) if cfg.out else folder / "inspect"
    result = load(path, cfg.device).inspect(out, cfg.prompt, text)
    print(result.summary, end="")
    print("wrote " + ", ".join(str(f) for f in result.files), file=sys.stderr)
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
        if command == "serve":
            from .server import serve

            serve(args.pop("checkpoints"), **args)
            return 0
        if command == "generate":
            return run_generate(args.pop("checkpoint"), args)
        if command == "plot":
            return run_plot(args.pop("run_dirs"), PlotConfig(**args))
        source = args.pop("checkpoint")
        if command == "export":
            return run_export(source, args.pop("out_dir"), ExportConfig(**args), launcher)
        runner = {"eval": run_eval, "inspect": run_inspect, "info": run_info}[command]
        return runner(source, COMMANDS[command].settings(**args))
    except SmolGPTError as exc:
        if not isinstance(exc, Relayed):  # (rank 0's, which rank 0 reported)
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
