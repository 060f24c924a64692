"""Models that come back to smolgpt: :func:`load_source` reads a smolgpt checkpoint, a
safetensors export (:mod:`smolgpt.export`) or a Hugging Face directory in either layout
(:mod:`smolgpt.hf`), converting it back exactly, with the checks every checkpoint gets.
Anything else is refused with one line saying why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Union

import torch

from . import (
    checkpoint,
    gpt2tokenizer,  # noqa: F401 - tokenizer_from_dict rebuilds its "gpt2" form
    kernels,
)
from .errors import SmolGPTError
from .export import META, WEIGHTS, read_safetensors_export
from .hf import read_hf
from .model import GPT
from .rundir import HF_CONFIG, is_run_config
from .tokenizer import Tokenizer, tokenizer_from_dict


def load_source(
    path: Union[str, Path], device: torch.device
) -> tuple[GPT, Tokenizer, dict[str, Any], dict[str, Any]]:
    """A model (eval mode, on device), its tokenizer, the train_config dict of the run that
    trained it ({} when unknown) and what the run recorded of its text (a checkpoint's
    "data": fingerprint, source, path, which an export carries along; {} when unknown),
    from a smolgpt checkpoint (.pth), a safetensors export directory, or a Hugging Face
    directory in one of the layouts :func:`~smolgpt.hf.export_hf` writes. Anything else is a
    SmolGPTError naming what is wrong.

    The model is the plain one with kernels.py's faster versions of its parts swapped in
    (:func:`smolgpt.kernels.use_fast_kernels`): the same numbers, sooner."""
    module, tokenizer, train_config, data = _load_source(path, device)
    return kernels.use_fast_kernels(module), tokenizer, train_config, data


def _load_source(
    path: Union[str, Path], device: torch.device
) -> tuple[GPT, Tokenizer, dict[str, Any], dict[str, Any]]:
    path = Path(path)
    if path.is_file() and path.name in (META, WEIGHTS, HF_CONFIG):
        path = path.parent  # a file of an export: the export
    if not path.is_dir():
        module, tokenizer, ckpt = checkpoint.load_model(path, device)
        return module, tokenizer, ckpt.train_config, ckpt.data
    if is_run_config(path / HF_CONFIG):  # a training run's config.json, not transformers'
        raise SmolGPTError(
            f"{path} is a training run that has not saved a checkpoint yet: "
            "wait for its first evaluation, or pass another model"
        )
    if (path / HF_CONFIG).is_file():
        config, meta, state = read_hf(path)
    elif (path / META).is_file():
        config, meta, state = read_safetensors_export(path)
    else:
        raise SmolGPTError(
            f"{path} holds no model smolgpt can read (no {META} or "
            f"{HF_CONFIG}): pass a checkpoint (.pth), a run directory, or a "
            "directory smolgpt export wrote"
        )
    # The checks every checkpoint gets: tokenizer, vocabulary size, tensor names and shapes.
    checkpoint.validate(
        {
            "format": checkpoint.FORMAT,
            "format_version": checkpoint.FORMAT_VERSION,
            "model_config": dataclasses.asdict(config),
            "tokenizer": meta["tokenizer"],
            "model": state,
        },
        path,
    )
    module = GPT(config)
    module.load_state_dict(state)
    module.to(device).eval()
    return (
        module,
        tokenizer_from_dict(meta["tokenizer"]),
        dict(meta.get("train_config") or {}),
        dict(meta["data"]) if isinstance(meta.get("data"), dict) else {},
    )
