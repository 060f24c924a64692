"""The command line: ``smolgpt train``, ``generate``, ``eval``, ``export``, ``plot``,
``inspect``, ``info`` and ``serve`` (and the root train.py / generate.py, which call the same
parsers).

A thin layer over the Python API (``smolgpt.train``, ``smolgpt.load``): every command's flags
are generated from its settings dataclass (``flags.py``), so each setting is defined once,
for both. This is the only
place that prints for the user or chooses an exit status: a :class:`SmolGPTError` becomes
one line on stderr and status 2; an interrupt saves first, then exits 130 (SIGINT), 143
(SIGTERM) or 129 (SIGHUP).

Every command it prints for the user to run next (how to resume, how to sample) starts the
way this process was started (a :class:`Launcher`), so that it can be pasted as it is.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, Optional, Sequence

from tqdm import tqdm

from .config import GenerateConfig
from .errors import Relayed, SmolGPTError
from .files import atomic_write_text, read_user_text
from .flags import COMMANDS, build_parser  # noqa: F401 - build_parser: cli's, as ever

if TYPE_CHECKING:
    from .config import EvalConfig, ExportConfig, InfoConfig, InspectConfig, PlotConfig

log = logging.getLogger("smolgpt")


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

    model = load(checkpoint_path, cfg.device, cfg.quantize)
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


def run_export(source: str, out: str, cfg: ExportConfig, launcher: Launcher) -> int:
    """Export the model at source to out in cfg's format ("hf", "safetensors" or "gguf")."""
    from .api import load

    _check_export_target(out, cfg)  # before the work of loading
    model = load(source, "cpu")
    written = model.export(out, cfg.format, cfg.overwrite, cfg.outtype)
    if cfg.format == "gguf":
        size = written.stat().st_size / 2**20
        print(f"wrote {written} ({size:.1f} MiB, {cfg.outtype})", file=sys.stderr)
        run = f"llama-completion -m {shlex.quote(str(written))} -c {model.config.block_size}"
        print(f"run it with llama.cpp: {run} --ignore-eos -n 200 -p 'ROMEO:'", file=sys.stderr)
        return 0
    print(
        f"wrote {written}: {', '.join(sorted(p.name for p in written.iterdir()))}",
        file=sys.stderr,
    )
    if cfg.format == "hf":
        print(
            f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(written)!r}), "
            f"AutoTokenizer.from_pretrained({str(written)!r})",
            file=sys.stderr,
        )
    else:
        print(f"sample with: {launcher.command('generate', [str(written)])}", file=sys.stderr)
    return 0


def _check_export_target(out: str, cfg: ExportConfig) -> None:
    """Refuse a missing extra or an output that may not be written, in one line."""
    if cfg.format == "gguf":
        from .gguf_export import check_out_file, require_gguf

        require_gguf()
        check_out_file(Path(out), cfg.overwrite)
        return
    from .export import check_out_dir
    from .hf import require_hf

    if cfg.format == "hf":
        require_hf()
    check_out_dir(out, cfg.overwrite)


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
    model = load(path, cfg.device, cfg.quantize)
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
            return run_plot(args.pop("run_dirs"), COMMANDS[command].settings(**args))
        source = args.pop("checkpoint")
        if command == "export":
            out_dir = args.pop("out_dir")
            return run_export(source, out_dir, COMMANDS[command].settings(**args), launcher)
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
