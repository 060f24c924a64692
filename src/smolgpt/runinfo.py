"""``smolgpt info``: what a checkpoint, a run directory or an export holds, at a glance.

:func:`describe` gathers it as plain data (what ``--json`` prints, and ``smolgpt.info``
returns); :func:`format_description` lays it out as aligned ``key: value`` lines. Every
checkpoint smolgpt ever wrote can be described: what an older one did not record (the
bits per character, the versions and precision it was written with, the time it was
saved) is None, and shown as "unknown", or for the time, the file's modification time,
labelled as such.

(The module is not called ``info``: importing ``smolgpt.info`` would then replace the
function ``smolgpt.info`` with the module.)
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import (
    checkpoint,
    gpt2tokenizer,  # noqa: F401 - tokenizer_from_dict rebuilds its "gpt2" form
    interop,
)
from .export import WEIGHTS
from .model import GPT
from .rundir import METRICS, RUN_CONFIG, locate
from .runlog import duration
from .tokenizer import tokenizer_from_dict

SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "position", "bias")


def describe(path: Union[str, Path]) -> dict[str, Any]:
    """What the model at path is and how it was trained, as a JSON-ready dict: a .pth
    checkpoint, a run directory (its best_model.pth, else its latest_model.pth, and the
    run's metrics.jsonl and config.json), or a directory smolgpt export wrote. The
    checkpoint is read as every checkpoint is (weights only, checked); a path that holds
    none is a SmolGPTError. Anything the file does not record is None."""
    located = locate(path)
    given = located.given
    if located.kind == "run directory":
        return {
            "path": str(given),
            "kind": "run directory",
            **_describe_checkpoint(located.model),
            **_run_files(given),
        }
    if located.kind == "export":
        return {"path": str(given), "kind": "export", **_describe_export(given)}
    return {"path": str(given), "kind": "checkpoint", **_describe_checkpoint(given)}


def _describe_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = checkpoint.load(path)
    progress, run_info, train_config = ckpt.progress, ckpt.run_info, ckpt.train_config
    saved, saved_from = run_info.get("saved"), "checkpoint"
    if saved is None:  # written before smolgpt 0.7
        saved, saved_from = _mtime(path), "file modification time"
    return {
        "checkpoint": str(path),
        "format_version": ckpt.format_version,
        **_model(ckpt.model_config, ckpt.tokenizer.to_dict()),
        "iterations": progress.iter,
        "best_val_loss": _number(progress.best_val_loss),
        "last_val_loss": _number(progress.last_val_loss),
        "best_val_bits_per_char": _number(progress.best_val_bits_per_char),
        "last_val_bits_per_char": _number(progress.last_val_bits_per_char),
        "training_time_s": _number(progress.elapsed_s),
        **_data(train_config, ckpt.data),
        "preset": train_config.get("preset"),
        "device": run_info.get("device"),
        "precision": run_info.get("precision"),
        "smolgpt_version": run_info.get("smolgpt"),
        "torch_version": run_info.get("torch"),
        "saved": saved,
        "saved_from": saved_from,
        "file_size": path.stat().st_size,
        "train_config": train_config,
    }


def _describe_export(folder: Path) -> dict[str, Any]:
    """An export records the model and its run's settings, not the run's progress."""
    module, tokenizer, train_config, data = interop.load_source(folder, torch.device("cpu"))
    weights = folder / WEIGHTS
    return {
        "checkpoint": None,
        **_model(module.config, tokenizer.to_dict()),
        **_data(train_config, data),
        "preset": train_config.get("preset"),
        "saved": _mtime(weights),
        "saved_from": "file modification time",
        "file_size": weights.stat().st_size,
        "train_config": train_config,
    }


def _data(train_config: dict, data: dict) -> dict[str, Any]:
    """The run's text: its --data as given, the name it was read by, its hash, and where
    it is as an absolute path (None for a built-in corpus or a URL, and for checkpoints,
    and exports, written before smolgpt recorded it)."""
    return {
        "data": train_config.get("data"),
        "data_source": data.get("source"),
        "data_fingerprint": data.get("fingerprint"),
        "data_path": data.get("path"),
    }


def _model(config, tokenizer: dict) -> dict[str, Any]:
    """The network's size and shape, and its tokenizer."""
    with torch.device("meta"):  # counted without allocating or initialising a weight
        parameters = GPT(config).num_parameters()
    built = tokenizer_from_dict(tokenizer)
    level = built.level
    described = {"vocab_size": config.vocab_size}
    # The settings it was learned with, as the checkpoint recorded them (None where not).
    described.update((k, tokenizer.get(k)) for k in built.training_settings() if k not in described)
    return {
        "parameters": parameters,
        "parameters_human": f"{parameters / 1e6:.2f}M",
        "shape": {name: getattr(config, name) for name in SHAPE},
        "level": level,
        "tokenizer": described,
    }


def _run_files(run_dir: Path) -> dict[str, Any]:
    """What a run directory holds beside its checkpoints: its evaluations (metrics.jsonl)
    and the settings its last process resolved to (config.json); None where absent."""
    evaluations = None
    if (run_dir / METRICS).is_file():
        lines = (run_dir / METRICS).read_text(encoding="utf-8", errors="replace").splitlines()
        evaluations = sum(1 for line in lines if _json_object(line) is not None)
    return {"evaluations": evaluations, "run_config": _run_config(run_dir)}


def _run_config(run_dir: Path) -> Optional[dict]:
    """The run's config.json, or None where it is absent or damaged (which takes nothing
    from the description of its checkpoints). A Hugging Face export's config.json is read
    too, but holds no smolgpt_version."""
    try:
        return _json_object((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def _json_object(line: str) -> Optional[dict]:
    """A metrics row, or None for a blank, damaged or half-written line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _number(value: Any) -> Optional[float]:
    """A finite number, else None (a loss is infinite before the first evaluation)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _mtime(path: Path) -> str:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return stamp.isoformat(timespec="seconds")


def format_description(info: dict[str, Any]) -> str:
    """:func:`describe`'s dict as aligned ``key: value`` lines; "unknown" for what the file
    does not record."""
    rows = _model_rows(info)
    if info["kind"] != "export":
        rows += _progress_rows(info)
    rows += _data_rows(info)
    if info["kind"] != "export":
        rows += _machine_rows(info)
    rows += _file_rows(info)
    rows = [(key, value) for key, value in rows if value is not None]
    width = max(len(key) for key, _ in rows) + 1
    return "\n".join(f"{key + ':':<{width}} {value}" for key, value in rows)


Rows = list[tuple[str, Optional[str]]]  # (key, value), None: a row not shown


def _shown(value: Any, fmt: str = "{}") -> str:
    return "unknown" if value is None else fmt.format(value)


def _model_rows(info: dict[str, Any]) -> Rows:
    """Where the model is, and what it is: size, shape, tokenizer, preset."""
    shape, tokenizer = info["shape"], info["tokenizer"]
    vocabulary = f"{info['level']}, {tokenizer['vocab_size']:,} tokens"
    if "min_word_freq" in tokenizer:
        vocabulary += f" (min_word_freq {_shown(tokenizer['min_word_freq'])})"
    return [
        ("path", info["path"]),
        ("checkpoint", info.get("checkpoint") if info["kind"] == "run directory" else None),
        ("parameters", f"{info['parameters']:,} ({info['parameters_human']})"),
        (
            "shape",
            ", ".join(
                f"{k} {'on' if v is True else 'off' if v is False else v}" for k, v in shape.items()
            ),
        ),
        ("tokenizer", vocabulary),
        ("preset", _shown(info.get("preset"))),
    ]


def _progress_rows(info: dict[str, Any]) -> Rows:
    """How far the run got: iterations, val loss and bits per character, training time."""
    seconds = info.get("training_time_s")
    return [
        ("iterations", _shown(info["iterations"], "{:,}")),
        (
            "val loss",
            f"best {_shown(info['best_val_loss'], '{:.4f}')}, "
            f"last {_shown(info['last_val_loss'], '{:.4f}')}",
        ),
        (
            "val bits/char",
            f"best {_shown(info['best_val_bits_per_char'], '{:.4f}')}, "
            f"last {_shown(info['last_val_bits_per_char'], '{:.4f}')}",
        ),
        (
            "training time",
            "unknown" if seconds is None else f"{duration(seconds)} ({seconds:.1f}s)",
        ),
    ]


def _data_rows(info: dict[str, Any]) -> Rows:
    """The text the run read, and its fingerprint."""
    # As given (relative to where the run was), then where that is; without the absolute
    # path (older files), the name the run read it by where that differs.
    data, source, where = info.get("data"), info.get("data_source"), info.get("data_path")
    if where is not None:
        data_row = _shown(data) + (f" ({where})" if where != data else "")
    else:
        data_row = _shown(data) + (f" (read as {source})" if source not in (None, data) else "")
    rows: Rows = [("data", data_row)]
    if info["kind"] != "export" or info.get("data_fingerprint") is not None:
        rows.append(("fingerprint", _shown(info.get("data_fingerprint"))))
    return rows


def _machine_rows(info: dict[str, Any]) -> Rows:
    """What the run trained on: device and precision, smolgpt's and torch's versions."""
    return [
        (
            "precision",
            "unknown" if info["precision"] is None else f"{info['device']}, {info['precision']}",
        ),
        (
            "versions",
            f"smolgpt {_shown(info['smolgpt_version'])}, torch {_shown(info['torch_version'])}",
        ),
    ]


def _file_rows(info: dict[str, Any]) -> Rows:
    """When the file was saved and its size; for a run directory, its other files."""
    saved = info["saved"]
    rows: Rows = [
        (
            "saved",
            saved if info["saved_from"] == "checkpoint" else f"{saved} ({info['saved_from']})",
        ),
        ("file size", f"{info['file_size'] / 1e6:.1f} MB ({info['file_size']:,} bytes)"),
    ]
    if info["kind"] == "run directory":
        rows += [
            ("evaluations", _shown(info["evaluations"], "{} (" + METRICS + ")")),
            (RUN_CONFIG, "present" if info["run_config"] is not None else "absent"),
        ]
    return rows
