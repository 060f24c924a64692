"""The safetensors export, and what every export shares: the directory written in one
piece, smolgpt.json, and reading both back.

An export is a directory written in one piece (into a temporary sibling that is renamed into
place, so a failure never leaves a half directory behind). :func:`export_safetensors` writes
``model.safetensors`` with smolgpt's own tensor names (the tied head stored once, as
``wte.weight``; an untied one as ``lm_head.weight``) and ``smolgpt.json`` (a format marker,
the model config, the tokenizer, the training settings and what the run recorded of its
text: fingerprint, source, path). No pickle: it loads without torch.load and without
transformers. The Hugging Face export (:mod:`smolgpt.hf`) writes through the same pieces,
and :func:`smolgpt.interop.load_source` reads any export back.

Pickled weights (``pytorch_model.bin``) are refused: unpickling can run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import checkpoint
from .errors import SmolGPTError
from .extras import upgrade_advice
from .files import atomic_write, atomic_write_text, umask
from .model import GPT
from .rundir import EXPORT_META, HF_CONFIG
from .tokenizer import Tokenizer

FORMAT = "smolgpt-export"
FORMAT_VERSION = 1
META = EXPORT_META  # what smolgpt needs beyond the weights: tokenizer, configs
WEIGHTS = "model.safetensors"
PICKLED = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")

# ------------------------------------------------------------------ writing directories


def check_out_dir(out_dir: Union[str, Path], overwrite: bool = False) -> None:
    """Raise SmolGPTError unless an export may be written to out_dir: it is new or empty, or
    (with overwrite) an earlier export. Nothing else is ever replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SmolGPTError(f"{out_dir} is a file: choose a directory to export to")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise SmolGPTError(
            f"{out_dir} is not empty: choose a new directory, or pass "
            "--overwrite to replace an earlier export"
        )
    if not (out_dir / META).is_file():  # never delete what an export did not write
        raise SmolGPTError(
            f"{out_dir} is not an earlier export (it has no {META}): "
            "--overwrite replaces only those; choose a new directory"
        )


def write_dir(out_dir: Union[str, Path], overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call write(folder) on a new temporary folder beside out_dir, then rename it to
    out_dir (replacing an earlier export if overwrite): out_dir is complete or absent."""
    given = Path(out_dir)
    out_dir = Path(os.path.abspath(given))  # "." and "x/" have a name and a parent too
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old: Optional[Path] = None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is its owner's alone; mkdir's is not
        write(tmp)
        if out_dir.exists():  # empty, or an earlier export: set aside until the new is in
            old = tmp.with_suffix(".old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # put the earlier export back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return given


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(path, lambda f: f.write(data))


def float_state(module: GPT) -> dict[str, torch.Tensor]:
    """The module's weights as float32 CPU tensors; a tied head is left out (it is wte.weight)."""
    state = module.state_dict()
    if module.config.tie_embeddings:
        state.pop("lm_head.weight")
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def export_meta(
    module: GPT,
    tokenizer: Tokenizer,
    train_config: Optional[dict],
    data_info: Optional[dict],
    weights: str,
) -> dict[str, Any]:
    if tokenizer.vocab_size != module.config.vocab_size:
        raise SmolGPTError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"{module.config.vocab_size}: export a model with its own tokenizer"
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": weights,  # how model.safetensors names its tensors: smolgpt or hf
        "model_config": dataclasses.asdict(module.config),
        "tokenizer": tokenizer.to_dict(),
        "train_config": dict(train_config or {}),
        # The run's text as its checkpoint recorded it (older exports have none).
        "data": dict(data_info or {}),
    }


# --------------------------------------------------------------------- safetensors format


def export_safetensors(
    module: GPT,
    tokenizer: Tokenizer,
    out_dir: Union[str, Path],
    train_config: Optional[dict] = None,
    overwrite: bool = False,
    data_info: Optional[dict] = None,
) -> Path:
    """Write out_dir with model.safetensors (smolgpt's tensor names; a tied head is stored
    once, as wte.weight) and smolgpt.json; :func:`~smolgpt.interop.load_source` reads it
    back exactly. out_dir must be new or empty (or an earlier export, with overwrite).
    data_info: what the run recorded of its text (a checkpoint's "data"), kept in
    smolgpt.json. Returns out_dir."""
    meta = export_meta(module, tokenizer, train_config, data_info, "smolgpt")
    state = float_state(module)

    def write(folder: Path) -> None:
        write_weights(folder / WEIGHTS, state)
        write_json(folder / META, meta)

    return write_dir(out_dir, overwrite, write)


# ------------------------------------------------------------------------------ reading


def read_json(path: Path) -> dict:
    """A JSON object from an export's file; a SmolGPTError when missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmolGPTError(f"{path} is missing: the export is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SmolGPTError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SmolGPTError(f"{path} is not a JSON object")
    return data


def read_meta(folder: Path, why: str) -> dict:
    """smolgpt.json of an export (why: what is lost without it, for the error)."""
    if not (folder / META).is_file():
        raise SmolGPTError(
            f"{folder} has no {META}: {why}; smolgpt loads only directories smolgpt export wrote"
        )
    meta = read_json(folder / META)
    if meta.get("format") != FORMAT:
        raise SmolGPTError(f"{folder / META} is not a smolgpt export's (no format marker)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SmolGPTError(
            f"{folder / META} has export format version {version}, newer "
            f"than this smolgpt understands ({FORMAT_VERSION}): {upgrade_advice()}"
        )
    if "tokenizer" not in meta:
        raise SmolGPTError(f"{folder / META} has no tokenizer: the export is incomplete")
    return meta


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as float tensors; pickled weights are refused, not unpickled."""
    path = folder / WEIGHTS
    if not path.is_file():
        pickled = next((name for name in PICKLED if (folder / name).is_file()), None)
        if pickled:
            raise SmolGPTError(
                f"{folder} holds pickled weights ({pickled}), which smolgpt does not load "
                "(unpickling can run code): save the model as safetensors "
                f"(transformers' save_pretrained writes {WEIGHTS})"
            )
        raise SmolGPTError(f"{folder} has no {WEIGHTS}: the export is incomplete")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SmolGPTError(f"{path} is not a readable safetensors file ({exc})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SmolGPTError(f"{path}: tensor {name} holds {t.dtype}, not weights")
    return tensors


def read_safetensors_export(folder: Path):
    """(model config, smolgpt.json, smolgpt state dict) of a safetensors export."""
    meta = read_meta(folder, "it says what the weights are")
    if meta.get("weights") != "smolgpt":
        raise SmolGPTError(
            f"{folder} has Hugging Face weights but no {HF_CONFIG}: the export is incomplete"
        )
    config = checkpoint.model_config(meta, folder / META)
    state = read_weights(folder)
    if config.tie_embeddings and "wte.weight" in state:  # the tied head, stored once
        state["lm_head.weight"] = state["wte.weight"]
    return config, meta, state
