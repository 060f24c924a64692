"""Checkpoints: save atomically, load safely, validate before use.

A checkpoint is a plain dictionary of tensors and Python primitives::

    format, format_version      what this file is
    model_config                ModelConfig fields (enough to rebuild the network)
    tokenizer                   the tokenizer's to_dict() (enough to encode and decode)
    model                       the network's state_dict
    train_config                the TrainConfig of the run that wrote it
    optimizer, scaler           the state of each optimiser (a list), and of the gradient scaler
    progress                    iteration, best val loss, evaluations since best, elapsed time
    rng                         RNG states: torch CPU, CUDA, and the batch sampler
    checksums                   CRC-32 of every tensor's bytes, by its place in the dictionary

It is written with ``torch.save`` through :func:`smolgpt.files.atomic_write` and always read
with ``weights_only=True``: the unpickler then builds only tensors and primitive containers,
so a malicious file cannot run code. Every tensor is then checked against its checksum
(atomic writes guard against our own crashes, checksums against bytes changed afterwards:
a bad copy, a failing disk), and everything against the stored config, before a model is
built from it.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import LEGACY_DEFAULTS, ModelConfig
from .errors import SmolGPTError
from .extras import upgrade_advice
from .files import atomic_write
from .model import GPT
from .tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "smolgpt-checkpoint"
# 2 (smolgpt 0.2): rotary positions (model_config["position"]) and a list of optimiser
# states. Version 1 files still load: their models learned position embeddings.
FORMAT_VERSION = 2
REQUIRED = ("format_version", "model_config", "tokenizer", "model")

log = logging.getLogger(__name__)


def _tensors(obj: Any, place: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its place ("model/wte.weight")."""
    if isinstance(obj, torch.Tensor):
        yield place, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{place}/{key}" if place else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{place}/{i}")


def checksums(checkpoint: dict[str, Any]) -> dict[str, int]:
    """CRC-32 of the bytes of every tensor in a checkpoint (its "checksums" entry aside)."""
    out = {}
    for place, tensor in _tensors({k: v for k, v in checkpoint.items() if k != "checksums"}):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        out[place] = zlib.crc32(data.numpy())
    return out


def save(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint dictionary atomically (old file or new file, never half of one),
    with the checksum of every tensor."""
    checkpoint = {"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}
    checkpoint["checksums"] = checksums(checkpoint)
    atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def load(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; every problem is a SmolGPTError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SmolGPTError(f"checkpoint {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise SmolGPTError(f"checkpoint {path} is empty (an interrupted copy?)")
    if not _written_by_torch_save(path):
        raise SmolGPTError(
            f"{path} is not a smolgpt checkpoint (not a file torch.save "
            "writes): pass a best_model.pth or latest_model.pth"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise SmolGPTError(
                f"{path} contains Python objects other than tensors and plain data, which "
                "could run code when loaded; refusing to load it"
            ) from None
        raise SmolGPTError(f"{path} is not a readable checkpoint (corrupt or truncated)") from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
    ) as exc:
        raise SmolGPTError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {type(exc).__name__})"
        ) from None
    verify_checksums(ckpt, path)
    validate(ckpt, path)
    return ckpt


def _written_by_torch_save(path: Path) -> bool:
    """Whether the file starts like a torch.save file: a zip archive (PyTorch's format since
    1.6; a cut one still starts so, and is reported as truncated) or a pickle (older files,
    and hand-made ones). Anything else (text, random bytes) is simply not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def verify_checksums(ckpt: Any, path: Path) -> None:
    """Every tensor's bytes must match the checksum saved with it. Files written before
    checksums were (smolgpt 0.3 and earlier) load with a note."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        return  # not a smolgpt checkpoint: validate() says so
    saved = ckpt.get("checksums")
    if saved is None:
        log.info(
            "%s was written before smolgpt checkpoints carried checksums: its bytes "
            "cannot be verified",
            path,
        )
        return
    found = checksums(ckpt)
    if not isinstance(saved, dict):  # the checksums themselves were garbled
        saved = {}
    damaged = sorted(k for k in set(saved) | set(found) if saved.get(k) != found.get(k))
    if damaged:
        raise SmolGPTError(
            f"{path} is damaged: the bytes of {damaged[0]}"
            f"{f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''} no longer match "
            "their checksum (a bad copy or disk?); use another copy, or the run's other "
            "checkpoint (best_model.pth / latest_model.pth)"
        )


def validate(ckpt: Any, path: Path) -> None:
    """Check format, version, keys and tensor shapes against the stored model config."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SmolGPTError(f"{path} is not a smolgpt checkpoint (no smolgpt format marker)")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise SmolGPTError(f"{path} is missing {', '.join(missing)}: not a complete checkpoint")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SmolGPTError(
            f"{path} has checkpoint format version {version}, newer than this smolgpt "
            f"understands ({FORMAT_VERSION}): {upgrade_advice()}"
        )
    config = model_config(ckpt, path)
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    if tokenizer.vocab_size != config.vocab_size:
        raise SmolGPTError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
            f"{config.vocab_size}; the checkpoint is inconsistent"
        )
    expected = _expected_shapes(config)
    state = ckpt["model"]
    if not isinstance(state, dict) or set(state) != set(expected):
        raise SmolGPTError(f"{path}: the stored weights do not match the stored model config")
    for name, shape in expected.items():
        if not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != shape:
            raise SmolGPTError(
                f"{path}: weight {name} has shape {tuple(getattr(state[name], 'shape', ()))}, "
                f"expected {shape}; the checkpoint is inconsistent"
            )


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    # Built on the meta device: shapes without allocating or initialising any weights.
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_config(ckpt: dict, path: Path = Path("checkpoint")) -> ModelConfig:
    raw = ckpt.get("model_config")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(raw, dict) or not set(raw) <= names or "vocab_size" not in raw:
        raise SmolGPTError(f"{path}: model_config is missing or malformed")
    legacy = {k: v for k, v in LEGACY_DEFAULTS.items() if k in names}
    return ModelConfig(**{**legacy, **raw})


def load_model(path: Path, device: torch.device) -> tuple[GPT, Tokenizer, dict]:
    """A ready-to-use model (eval mode, on device), its tokenizer, and the raw checkpoint."""
    ckpt = load(path, map_location=device)
    model = GPT(model_config(ckpt, path))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, tokenizer_from_dict(ckpt["tokenizer"]), ckpt
