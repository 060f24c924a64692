"""Checkpoints: what they hold (:class:`Checkpoint`), saved atomically, loaded safely,
validated before use.

On disk a checkpoint is a plain dictionary of tensors and Python primitives (the only kind the
weights-only unpickler reads), :meth:`Checkpoint.to_dict`'s::

    format, format_version      what this file is
    model_config                ModelConfig fields (enough to rebuild the network)
    tokenizer                   the tokenizer's to_dict() (enough to encode and decode)
    model                       the network's state_dict
    train_config                the TrainConfig of the run that wrote it
    optimizer, scaler           the state of each optimiser (a list), and of the gradient scaler
    progress                    Progress: iteration, best val loss, elapsed time, ...
    rng                         RNG states: torch CPU, CUDA (every rank's), the batch sampler
    data                        the training text: its fingerprint, name and path
    run_info                    what wrote it: smolgpt, torch, device, precision, when
    checksums                   CRC-32 of every tensor's bytes, by its place in the dictionary

It is written with ``torch.save`` through :func:`smolgpt.files.atomic_write` and always read
with ``weights_only=True``: the unpickler then builds only tensors and primitive containers,
so a malicious file cannot run code. Every tensor is then checked against its checksum
(atomic writes guard against our own crashes, checksums against bytes changed afterwards:
a bad copy, a failing disk), and everything against the stored config, before a model is
built from it. Files written by older versions load: what they lack takes its default.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from . import gpt2tokenizer  # noqa: F401 - tokenizer_from_dict rebuilds its "gpt2" form
from .config import LEGACY_DEFAULTS, ModelConfig
from .distributed import Group
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


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    iter: int = 0  # optimiser steps completed
    evaluated: bool = False  # whether the evaluation at `iter` has been made and logged
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    elapsed_s: float = 0.0  # training wall time, summed over all processes of the run
    last_val_loss: float = math.inf
    # Fields added later have defaults, so that older checkpoints still load.
    # How far along its learning-rate schedule the run was when saved (Budget.done); None
    # in checkpoints written before it was recorded.
    done: Optional[float] = None
    # Set when --resume changed the run's horizon (max_iters or time_budget) after warm-up:
    # [iteration, elapsed_s, decay share reached there]; see Budget.done.
    extended_at: Optional[list] = None
    # Bits per character of the validation text (see RunLog.evaluation); None before the
    # first evaluation and in checkpoints written before smolgpt 0.7.
    best_val_bits_per_char: Optional[float] = None
    last_val_bits_per_char: Optional[float] = None
    # Training tokens seen, every rank's; None in checkpoints written before smolgpt 0.12
    # (restored as steps x tokens per step: there was no --batch_warmup then).
    tokens: Optional[int] = None
    # Batches of each split that every evaluation of the run scores: planned once by a
    # time-budgeted run (Budget.plan_eval_batches); None: eval_iters.
    eval_batches: Optional[int] = None

    def record(self, losses: dict[str, float]) -> bool:
        """Take in an evaluation's losses ("val", optionally "val_bits_per_char"); return
        whether its val loss is a new best."""
        new_best = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.evals_since_best = 0 if new_best else self.evals_since_best + 1
        self.last_val_loss = losses["val"]
        self.last_val_bits_per_char = losses.get("val_bits_per_char")
        if new_best:
            self.best_val_bits_per_char = self.last_val_bits_per_char
        return new_best

    @classmethod
    def from_dict(cls, saved: Optional[dict]) -> "Progress":
        """A saved progress; fields a newer smolgpt added (and this one does not know) are
        left out, fields an older one lacked take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (saved or {}).items() if k in names})


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, typed: enough to rebuild the model and its tokenizer,
    and for a training run everything that decides its future, so that a resumed run
    continues exactly where the saved one stopped."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    model: dict[str, torch.Tensor]  # the network's state_dict
    # The run's TrainConfig as a dict: the settings of older runs are read from it by
    # config.resume_train_config, which knows their defaults. Empty for hand-made files.
    train_config: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    optimizer: list[dict] = field(default_factory=list)  # one state per optimiser
    scaler: Optional[dict] = None  # the fp16 gradient scaler's state, if it had one
    rng: dict[str, Any] = field(default_factory=dict)  # see rng_states
    data: dict[str, Any] = field(default_factory=dict)  # fingerprint, source, path
    run_info: dict[str, Any] = field(default_factory=dict)  # see run_info; {} before 0.7
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The plain data save() writes (tensors and primitives only)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model_config": dataclasses.asdict(self.model_config),
            "tokenizer": self.tokenizer.to_dict(),
            "model": self.model,
            "train_config": self.train_config,
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "progress": dataclasses.asdict(self.progress),
            "rng": self.rng,
            "data": self.data,
            "run_info": self.run_info,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path) -> "Checkpoint":
        """The checkpoint in validated plain data (see validate), read from path."""
        optimizer = raw.get("optimizer") or []
        return cls(
            model_config=model_config(raw, path),
            tokenizer=tokenizer_from_dict(raw["tokenizer"]),
            model=raw["model"],
            train_config=raw.get("train_config") or {},
            progress=Progress.from_dict(raw.get("progress")),
            # Written before runs could have several optimisers: one state, not a list.
            optimizer=[optimizer] if isinstance(optimizer, dict) else list(optimizer),
            scaler=raw.get("scaler") or None,
            rng=raw.get("rng") or {},
            data=raw.get("data") or {},
            run_info=raw.get("run_info") or {},
            format_version=raw["format_version"],
        )


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


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write a checkpoint atomically (old file or new file, never half of one), with the
    checksum of every tensor."""
    save_dict(path, checkpoint.to_dict())


def save_dict(path: Path, data: dict[str, Any]) -> None:
    """Write a checkpoint's plain data as save() does (the tests write broken ones so)."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data}
    data["checksums"] = checksums(data)
    atomic_write(Path(path), lambda f: torch.save(data, f))


def load(path: Path, map_location: Any = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; every problem is a SmolGPTError naming the file."""
    path = Path(path)
    return validate(_read(path, map_location), path)


def _read(path: Path, map_location: Any) -> Any:
    """A checkpoint file's data, every tensor's bytes checked against its checksum."""
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


def validate(ckpt: Any, path: Path) -> Checkpoint:
    """The checkpoint in a file's data, once its format, version, keys and tensor shapes
    are checked against the stored model config."""
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
    checked = Checkpoint.from_dict(ckpt, path)
    config, tokenizer = checked.model_config, checked.tokenizer
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
    return checked


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


def load_model(path: Path, device: torch.device) -> tuple[GPT, Tokenizer, Checkpoint]:
    """A ready-to-use model (eval mode, on device), its tokenizer, and the checkpoint."""
    ckpt = load(path, map_location=device)
    model = GPT(ckpt.model_config)
    model.load_state_dict(ckpt.model)
    model.to(device).eval()
    return model, ckpt.tokenizer, ckpt


# ------------------------------------------------------------ a training run's state


def rng_states(group: Group, device: torch.device) -> dict[str, Any]:
    """Every rank's RNG states as a checkpoint keeps them: rank 0's under "torch" and
    "cuda", the other ranks' (their dropout masks differ) under "other_ranks". A
    collective under distributed training: every rank calls it."""
    cuda = device.type == "cuda"
    cpu_states = group.gather(torch.get_rng_state())
    cuda_states = group.gather([torch.cuda.get_rng_state(device)] if cuda else [])
    return {
        "torch": cpu_states[0],
        "cuda": cuda_states[0],
        "other_ranks": {"torch": cpu_states[1:], "cuda": cuda_states[1:]},
    }


def restore_rng(rng: dict[str, Any], rank: int, device: torch.device) -> None:
    """Set this rank's RNG states from a checkpoint's (see rng_states). A rank without a
    saved state (the run was saved with fewer ranks) keeps its seed's."""
    others = rng.get("other_ranks") or {"torch": [], "cuda": []}
    states = [(rng["torch"], rng.get("cuda"))] + list(zip(others["torch"], others["cuda"]))
    if rank < len(states):
        cpu_state, cuda_states = states[rank]
        torch.set_rng_state(cpu_state)
        if device.type == "cuda" and cuda_states:
            torch.cuda.set_rng_state(cuda_states[0], device)


def restore_training(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: Optional[torch.amp.GradScaler],
    sampler: Any,
    group: Group,
    device: torch.device,
) -> None:
    """Put a training run's state back from a checkpoint: the weights, the optimisers (see
    restore_optimizers), the gradient scaler, this rank's RNG states and the batch sampler's
    (a BatchSampler)."""
    model.load_state_dict(ckpt.model)
    restore_optimizers(optimizers, ckpt.optimizer)
    if scaler is not None and ckpt.scaler:
        scaler.load_state_dict(ckpt.scaler)
    restore_rng(ckpt.rng, group.rank, device)
    sampler.load_state_dict(ckpt.rng["sampler"])


def restore_optimizers(optimizers: list, states: list[dict]) -> None:
    """Load a checkpoint's optimiser states into a run's optimisers, refusing a checkpoint
    written with another --optimizer (another number of them)."""
    if len(states) != len(optimizers):
        raise SmolGPTError(
            f"the checkpoint holds {len(states)} optimiser states, this run has "
            f"{len(optimizers)}: it was written with another --optimizer"
        )
    for optimizer, state in zip(optimizers, states):
        optimizer.load_state_dict(state)


def run_info(version: str, device: torch.device, precision: str, world_size: int) -> dict:
    """What wrote a checkpoint, for `smolgpt info` (absent before smolgpt 0.7)."""
    return {
        "smolgpt": version,
        "torch": str(torch.__version__),  # a TorchVersion, which pickles as a class
        "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "precision": precision,
        "world_size": world_size,
    }


def check_replicas(model: torch.nn.Module, group: Group, iteration: int) -> None:
    """Under distributed training, check that every rank holds the same weights (DDP and a
    deterministic optimiser keep them so; a difference is a bug, not noise)."""
    if not group.distributed:
        return
    crcs = checksums({"model": model.state_dict()})
    digests = group.gather(zlib.crc32(json.dumps(crcs, sort_keys=True).encode()))
    if len(set(digests)) > 1:
        raise SmolGPTError(
            f"the ranks' weights differ at iteration {iteration} "
            f"(checksums {digests}): please report this as a bug"
        )
