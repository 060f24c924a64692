"""A run directory, and what a command may be pointed at.

A training run keeps everything in one directory::

    best_model.pth    the checkpoint with the lowest val loss so far (BEST)
    latest_model.pth  the last evaluation's, what --resume continues (LATEST)
    metrics.jsonl     a row per evaluation (METRICS)
    config.json       the settings the run resolved to (RUN_CONFIG)
    loss.png          the loss curves (LOSS_PLOT); samples.txt with --sample_every
                      (SAMPLES); tensorboard/ with --tensorboard (TENSORBOARD)
    .lock             held by the process training in it (files.RunLock)

Commands that read a model (generate, eval, info, serve, export, --init_from) accept a
checkpoint file, a run directory (meaning its best checkpoint, else its latest) or a
directory ``smolgpt export`` wrote; :func:`locate` tells them apart, once for all of them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import SmolGPTError
from .files import RunLock

BEST, LATEST = "best_model.pth", "latest_model.pth"
METRICS = "metrics.jsonl"
RUN_CONFIG = "config.json"
LOSS_PLOT = "loss.png"
SAMPLES = "samples.txt"
TENSORBOARD = "tensorboard"
# An export: smolgpt.json beside the weights (both formats); a Hugging Face export has a
# transformers config.json too (the same name as a run's RUN_CONFIG, told apart by content).
EXPORT_META = "smolgpt.json"
HF_CONFIG = "config.json"


def run_checkpoint(run_dir: Union[str, Path]) -> Optional[Path]:
    """The checkpoint that stands for a run directory: its best_model.pth, else its
    latest_model.pth; None if it holds neither."""
    return next((Path(run_dir) / n for n in (BEST, LATEST) if (Path(run_dir) / n).is_file()), None)


def is_run_config(path: Path) -> bool:
    """Whether a config.json is a training run's (it records the smolgpt that wrote it),
    not a transformers export's."""
    try:
        return "smolgpt_version" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Located:
    """What a path a user gave turned out to be: kind ("checkpoint", "run directory" or
    "export"), the path as given, and model, the file or directory to load the model from
    (a run directory's checkpoint; the path itself otherwise)."""

    kind: str
    given: Path
    model: Path


WHAT_TO_PASS = (
    "pass a checkpoint (.pth), a run directory that smolgpt train wrote, or a directory "
    "smolgpt export wrote"
)


def locate(path: Union[str, Path], transformers_dirs: bool = False) -> Located:
    """Tell what path is (see Located), or raise a SmolGPTError saying what is wrong and
    what to pass instead: it does not exist, or it is a directory holding no model (a run
    that has not saved a checkpoint yet says so). transformers_dirs: a directory with a
    transformers config.json but no smolgpt.json counts as an export too (for the loader,
    whose error then says what it lacks)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise SmolGPTError(f"{given} does not exist: {WHAT_TO_PASS}")
    if not given.is_dir():
        return Located("checkpoint", given, given)
    found = run_checkpoint(given)
    if found is not None:
        return Located("run directory", given, found)
    if is_run_config(given / RUN_CONFIG) or (given / METRICS).is_file():
        raise SmolGPTError(
            f"{given} is a training run without a checkpoint yet (no {BEST} or {LATEST}): "
            "use it after its first evaluation"
        )
    if (given / EXPORT_META).is_file() or (transformers_dirs and (given / HF_CONFIG).is_file()):
        return Located("export", given, given)
    raise SmolGPTError(
        f"{given} is a directory without {BEST} or {LATEST} (nor an export's "
        f"{EXPORT_META}): {WHAT_TO_PASS}"
    )


def move_aside(out_dir: Path, lock: RunLock) -> Path:
    """Move a run's files into a new sibling directory named after the time, never deleting
    anything; the run directory itself, and the lock this process holds in it, stay."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out_dir.with_name(f"{out_dir.name}.{stamp}"), 1
    while target.exists():
        target, n = out_dir.with_name(f"{out_dir.name}.{stamp}-{n}"), n + 1
    target.mkdir()
    for entry in out_dir.iterdir():
        if entry != lock.path:
            entry.rename(target / entry.name)
    return target


def clean_stale_temporaries(out_dir: Path) -> None:
    """Remove half-written checkpoint files left by a process killed mid-save. Call only
    while holding the run directory's lock (no live writer can own them then)."""
    for tmp in Path(out_dir).glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
