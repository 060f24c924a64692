"""Setting up a training run before its first step: what it continues (a --resume, an
--overwrite that moves the old run aside), its text read into tokens and checked against
the run it continues, its run directory and config.json.
:func:`smolgpt.train` (api.py) calls :func:`prepare_run`, then trains."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import (
    batches,
    checkpoint,
    distributed,
    finetune,
    sources,
    tokencache,
    tokendata,
)
from .config import (
    HELP_GROUPS,
    TrainConfig,
    resume_train_config,
)
from .errors import SmolGPTError
from .files import RunLock, atomic_write_text
from .rundir import LATEST, RUN_CONFIG, clean_stale_temporaries, move_aside
from .version import __version__

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def prepare_run(
    settings: dict[str, Any],
    requested: TrainConfig,
    source: Optional[finetune.Source],
    out_dir: Path,
    lock: Optional[RunLock],
    group: distributed.Group,
) -> tuple[TrainConfig, tokendata.TokenData, Optional[dict]]:
    """Check the run directory and the text, and read them: (the run's config, its tokens,
    the checkpoint it resumes or None). Only rank 0 (which holds the lock) changes anything
    on disk: stale temporaries, a run moved aside, config.json."""
    if group.is_main:
        clean_stale_temporaries(out_dir)
    resume_from, cfg = _run_to_continue(settings, requested, out_dir)
    tokens = _read_text(settings, cfg, source, resume_from)
    if resume_from is not None:
        _check_same_text(cfg, tokens, resume_from, out_dir)
    if group.is_main:
        _start_run_directory(settings, requested, cfg, source, out_dir, lock)
    return cfg, tokens, resume_from


def _run_to_continue(
    settings: dict[str, Any], requested: TrainConfig, out_dir: Path
) -> tuple[Optional[dict], TrainConfig]:
    """(the checkpoint to resume or None, the run's config): a run already in out_dir is
    resumed with --resume, and refused without --resume or --overwrite."""
    if requested.resume:
        return _resumable(out_dir, settings)
    if (out_dir / LATEST).exists() and not requested.overwrite:
        # A run exists once it has a latest checkpoint (saved before any best one); a
        # directory killed before that holds nothing worth keeping and starts afresh.
        raise SmolGPTError(
            f"{out_dir} already holds a run ({LATEST}); pass --resume to continue it, "
            "--overwrite to start afresh (the old run is moved aside), or choose another "
            "--out_dir"
        )
    return None, requested


def _read_text(
    settings: dict[str, Any],
    cfg: TrainConfig,
    source: Optional[finetune.Source],
    resume_from: Optional[checkpoint.Checkpoint],
) -> tokendata.TokenData:
    """The run's text as tokens, long enough for its context, with what it says logged."""
    # A fine-tuning run reads its text with its source's tokenizer, on resume too.
    tokenizer = None
    if source is not None:
        tokenizer = source.tokenizer
    elif resume_from is not None and cfg.init_from:
        tokenizer = resume_from.tokenizer
    # A preset's vocab_size gives way to a text too small for it; one asked for does not.
    tokens = tokencache.prepare(
        sources.resolve_corpus(cfg.data, cfg.encoding),
        cfg.level,
        cfg.min_word_freq,
        tokenizer,
        cfg.vocab_size,
        strict="vocab_size" in settings,
    )
    batches.check_long_enough(tokens, cfg.block_size)
    log.info(tokens.summary())
    for warning in (tokens.unk_warning(), tokens.dropped_warning()):
        if warning:
            log.warning(warning)
    return tokens


def _check_same_text(
    cfg: TrainConfig,
    tokens: tokendata.TokenData,
    resume_from: checkpoint.Checkpoint,
    out_dir: Path,
) -> None:
    """Raise SmolGPTError unless a resumed run reads the text it was trained on, into the
    same vocabulary."""
    if resume_from.data.get("fingerprint") != tokens.fingerprint:
        raise SmolGPTError(
            f"--data {cfg.data} is not the text this run was trained on; pass the "
            "original text, or start a new run in another --out_dir"
        )
    if resume_from.tokenizer.to_dict() != tokens.tokenizer.to_dict():
        # The same text, read by another smolgpt version (0.5 normalises line endings
        # and quotes): ids would no longer mean what the model learned.
        raise SmolGPTError(
            f"this smolgpt reads {cfg.data} into another vocabulary than the one the run "
            f"in {out_dir} was trained with (written by an older smolgpt?); start a new "
            "run with --overwrite or another --out_dir"
        )


def _start_run_directory(
    settings: dict[str, Any],
    requested: TrainConfig,
    cfg: TrainConfig,
    source: Optional[finetune.Source],
    out_dir: Path,
    lock: Optional[RunLock],
) -> None:
    """Rank 0, once the text is good: move an overwritten run aside, log the settings and
    write config.json."""
    if requested.overwrite and (out_dir / LATEST).exists():
        log.info("--overwrite: moved the previous run to %s", move_aside(out_dir, lock))
    if source is not None:
        log.info(finetune.describe(source, cfg, settings))
    log.info(describe_settings(cfg))
    write_run_config(out_dir, cfg)


def _resumable(out_dir: Path, settings: dict[str, Any]) -> tuple[dict, TrainConfig]:
    """The checkpoint to resume and the run's config, with the settings given now applied."""
    latest = out_dir / LATEST
    if not latest.exists():
        raise SmolGPTError(
            f"--resume: nothing to resume in {out_dir} (no {LATEST}); "
            "start a new run without --resume"
        )
    ckpt = checkpoint.load(latest)
    cfg, changed = resume_train_config(ckpt.train_config, settings)
    for key, (old, new) in changed.items():
        log.info("resume: %s changed from %s to %s", key, old, new)
    if settings.get("init_from") and settings["init_from"] != cfg.init_from:
        log.info(
            "resume: --init_from %s is not used: the run continues from its %s",
            settings["init_from"],
            LATEST,
        )
    return ckpt, cfg


def write_run_config(out_dir: Path, cfg: TrainConfig) -> Path:
    """Write <out_dir>/config.json (atomically): the settings the run resolved to, and the
    smolgpt that resolved them. Every process of a run rewrites it; --config reads it back."""
    path = out_dir / RUN_CONFIG
    settings = {**dataclasses.asdict(cfg), "smolgpt_version": __version__}
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return path


def describe_settings(cfg: TrainConfig) -> str:
    """The resolved settings of a run, compactly: one line per --help group, without the
    settings that mean nothing at the run's level (min_word_freq but at word level)."""
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None and cfg.level in f.metadata.get("levels", (cfg.level,)):
            groups.setdefault(f.metadata["group"], []).append(f"{f.name}={value}")
    return "settings:\n" + "\n".join(
        f"  {title}: {' '.join(groups[g])}" for g, title in HELP_GROUPS.items() if g in groups
    )


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
