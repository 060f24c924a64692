"""The command line: ``smolgpt train`` and ``smolgpt generate`` (and the root train.py /
generate.py, which call the same parsers).

Flags are generated from the config dataclasses, so each is defined once. This is the only
place that prints for the user or chooses an exit status: a :class:`SmolGPTError` becomes
one line on stderr and status 2; an interrupt saves first, then exits 130 (SIGINT) or 143
(SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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
from .config import PRESETS, SampleConfig, TrainConfig, resolve_train_config, resume_train_config
from .errors import SmolGPTError

log = logging.getLogger("smolgpt")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and status 2), like every error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field; unset flags stay absent, so presets can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default if f.default is not None else "unset"
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), help=help_text,
                                metavar=None if "choices" in f.metadata else kind.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smolgpt", description="Train and sample small GPT language models.")
    parser.add_argument("--version", action="version", version=f"smolgpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train", help="train a model",
        description=f"Train a GPT. Presets: {', '.join(PRESETS)}; a preset sets the model "
        "size (and some defaults); any flag you give wins over it.",
    )
    add_config_flags(train, TrainConfig)
    generate = commands.add_parser("generate", help="generate text from a checkpoint")
    generate.add_argument("checkpoint", help="a .pth checkpoint written by smolgpt train")
    add_config_flags(generate, SampleConfig)
    return parser


# ---------------------------------------------------------------------------------- train

def colab_run_dir() -> Path:
    """Mount Google Drive (Colab only) and return MyDrive/smolgpt."""
    try:
        in_colab = importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:
        in_colab = False
    if not in_colab:
        raise SmolGPTError("--colab_drive works only inside Google Colab; elsewhere use --out_dir")
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount("/content/drive")
    return Path("/content/drive/MyDrive/smolgpt")


def run_train(explicit: dict[str, Any]) -> int:
    requested = resolve_train_config(explicit)  # flags are checked before anything heavy

    from . import checkpoint, data, hardware
    from .files import RunLock, ensure_writable_dir
    from .training import LATEST, Trainer, TrainingInterrupted, clean_stale_temporaries

    # The device and its precision policy are checked before anything touches the disk.
    policy = hardware.precision_policy(hardware.resolve_device(requested.device), requested.amp)
    if policy.float32_cpu and not requested.resume:
        # A preset's recipe can differ on CPUs that compute in float32 (no native bf16); a
        # resumed run keeps the recipe it started with.
        adapted = resolve_train_config(explicit, cpu_float32=True)
        changes = {k: v for k, v in dataclasses.asdict(adapted).items()
                   if v != getattr(requested, k)}
        if changes:
            log.info("preset %s for a CPU computing in float32: %s", adapted.preset,
                     ", ".join(f"{k} {v}" for k, v in changes.items()))
        requested = adapted
    if requested.colab_drive:  # relative paths (and the default) land under MyDrive/smolgpt
        out_dir = colab_run_dir() / Path(explicit.get("out_dir", requested.default_out_dir))
    else:
        out_dir = Path(explicit.get("out_dir", requested.default_out_dir))
    ensure_writable_dir(out_dir)
    with RunLock(out_dir):
        clean_stale_temporaries(out_dir)
        resume_from = None
        if requested.resume:
            latest = out_dir / LATEST
            if not latest.exists():
                raise SmolGPTError(
                    f"--resume: nothing to resume in {out_dir} (no {LATEST}); "
                    "start a new run without --resume"
                )
            resume_from = checkpoint.load(latest)
            cfg, changed = resume_train_config(resume_from.get("train_config", {}), explicit)
            for key, (old, new) in changed.items():
                log.info("resume: %s changed from %s to %s", key, old, new)
        else:
            # A run exists once it has a latest checkpoint (saved before any best one); a
            # directory killed before that holds nothing worth keeping and starts afresh.
            if (out_dir / LATEST).exists():
                raise SmolGPTError(
                    f"{out_dir} already holds a run ({LATEST}); pass --resume to continue "
                    "it, or choose another --out_dir"
                )
            cfg = requested
        device = hardware.resolve_device(cfg.device)
        tokens = data.prepare(data.resolve_corpus(cfg.data), cfg.level, cfg.min_word_freq)
        data.check_long_enough(tokens, cfg.block_size)
        log.info(tokens.summary())
        if resume_from is not None and resume_from.get("data", {}).get("fingerprint") != tokens.fingerprint:
            raise SmolGPTError(
                f"--data {cfg.data} is not the text this run was trained on; pass the "
                "original text, or start a new run in another --out_dir"
            )
        trainer = Trainer(cfg, tokens, out_dir, device, resume_from)
        start = time.perf_counter()
        try:
            progress = trainer.run()
        except TrainingInterrupted as stop:
            command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
            resume_hint = command if "--resume" in sys.argv else command + " --resume"
            print(f"{stop}: saved {out_dir / LATEST}. Resume with: {resume_hint}",
                  file=sys.stderr)
            return stop.exit_code
    print(
        f"done: {progress.iter} iterations in {time.perf_counter() - start:.1f}s, best val loss "
        f"{progress.best_val_loss:.4f}; checkpoints in {out_dir}/\n"
        f"sample with: python generate.py {out_dir / 'best_model.pth'} --prompt \"...\"",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------- generate

def run_generate(checkpoint_path: str, explicit: dict[str, Any]) -> int:
    cfg = SampleConfig(**explicit)  # settings are checked before anything heavy

    import torch

    from . import hardware
    from .checkpoint import load_model
    from .sampling import generate
    from .tokenizer import WordTokenizer

    device = hardware.resolve_device(cfg.device)
    model, tokenizer, _ = load_model(Path(checkpoint_path), device)
    if not cfg.prompt:
        raise SmolGPTError("--prompt is empty: give some text to continue")
    prompt_ids = tokenizer.encode(cfg.prompt)  # raises for unknown characters
    if isinstance(tokenizer, WordTokenizer):
        unknown = tokenizer.unknown(cfg.prompt)
        if unknown:
            log.warning("words not in the vocabulary, read as <UNK>: %s", ", ".join(unknown[:10]))
    if not prompt_ids:
        raise SmolGPTError("--prompt has no words the model can read: give some text")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    samples = generate(model, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                       cfg.top_p, cfg.num_samples, generator)
    seconds = time.perf_counter() - start
    for n, new_ids in enumerate(samples):
        if n:
            print("\n---")
        text = tokenizer.decode(prompt_ids + new_ids)
        print(text)
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
