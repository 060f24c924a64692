"""Every setting smolgpt has, defined once.

Three typed dataclasses hold them: :class:`ModelConfig` (the network's shape, stored in every
checkpoint), :class:`TrainConfig` (a training run) and :class:`SampleConfig` (a generation
run). Each field carries its command-line help in ``metadata``, and ``cli.py`` builds the
flags from the fields, so an option is added in one place and appears everywhere.

Presets are plain data (:data:`PRESETS`). A setting is resolved in three layers, later
layers winning: the dataclass default, then the preset (its per-level entries, and on a CPU
that computes in float32 its ``cpu_float32`` entries), then a flag the user typed. A preset
changes only the fields it names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import SmolGPTError

LEVELS = ("char", "word")
DEVICES = ("auto", "cpu", "cuda", "mps")
POSITIONS = ("rope", "learned")
OPTIMIZERS = ("adamw", "muon")
# The preset entries that apply on a CPU without native bf16, which trains in float32.
CPU_FLOAT32 = "cpu_float32"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose help text (and argparse extras such as choices) travel along."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelConfig:
    """The shape of a GPT; enough to rebuild the network from a checkpoint."""

    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    bias: bool = True
    position: str = "rope"  # "rope" (rotary) or "learned" (GPT-2's position embeddings)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SmolGPTError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise SmolGPTError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"choose e.g. --n_embd {self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if self.position not in POSITIONS:
            raise SmolGPTError(
                f"unknown position encoding {self.position!r}: choose {' or '.join(POSITIONS)}"
            )
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise SmolGPTError(
                f"rotary positions need an even head size, got n_embd / n_head = "
                f"{self.n_embd // self.n_head}: change --n_embd or use --position learned"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise SmolGPTError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """One training run. Field order is the order of ``smolgpt train --help``."""

    level: str = _opt("word", "tokenization level", choices=LEVELS)
    preset: str = _opt("tiny", "model size preset (see the preset table in README)")
    data: str = _opt(
        "shakespeare",
        "training text: a built-in corpus (shakespeare, sherlock), a .txt file, "
        "a directory of .txt files, or an http(s) URL",
    )
    out_dir: Optional[str] = _opt(None, "run directory (default: checkpoints/<level>_<preset>)")
    # Model shape; the preset fills these in.
    n_layer: int = _opt(4, "transformer blocks")
    n_head: int = _opt(4, "attention heads per block")
    n_embd: int = _opt(128, "embedding width (divisible by n_head)")
    block_size: int = _opt(128, "context length in tokens")
    dropout: float = _opt(0.1, "dropout probability")
    bias: bool = _opt(True, "biases in linear layers and LayerNorms")
    position: str = _opt(
        "rope", "how the model knows token positions: rotary (rope) or GPT-2's learned "
        "embeddings", choices=POSITIONS,
    )
    # Optimisation.
    batch_size: int = _opt(32, "sequences per micro-batch")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimiser step")
    max_iters: int = _opt(5000, "optimiser steps to train for")
    time_budget: Optional[float] = _opt(
        None, "train for this many seconds of wall time instead of max_iters"
    )
    optimizer: str = _opt(
        "adamw", "adamw, or muon: Muon for the blocks' weight matrices and AdamW for the rest",
        choices=OPTIMIZERS,
    )
    learning_rate: float = _opt(
        3e-4, "peak learning rate (of AdamW: with --optimizer muon, of the embeddings, biases "
        "and norms)"
    )
    muon_lr: float = _opt(0.05, "peak learning rate of Muon's matrices (--optimizer muon)")
    muon_ns_steps: int = _opt(
        5, "Newton-Schulz iterations of Muon's orthogonalisation (fewer: cheaper steps, "
        "rougher orthogonalisation)"
    )
    min_lr: Optional[float] = _opt(None, "final learning rate of the cosine decay (default lr/10)")
    warmup_iters: int = _opt(100, "linear warm-up steps")
    lr_schedule: str = _opt(
        "cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant")
    )
    weight_decay: float = _opt(0.1, "weight decay of matrices and embeddings (AdamW and Muon; not biases or norms)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip gradient norm to this (0 disables)")
    # Evaluation, stopping, logging.
    eval_interval: int = _opt(250, "steps between evaluations (and checkpoints)")
    eval_iters: int = _opt(20, "batches per evaluation of train and val loss")
    log_interval: int = _opt(50, "steps between progress lines when stderr is not a terminal")
    early_stop_patience: int = _opt(
        0, "stop after this many evaluations without a new best val loss (0: never)"
    )
    # Tokenizer.
    min_word_freq: int = _opt(3, "word level: words seen fewer times become <UNK>")
    # Hardware and bookkeeping.
    amp: bool = _opt(True, "reduced precision where the hardware computes it natively (see "
                     "Precision); --no-amp: float32 everywhere")
    device: str = _opt("auto", "where to train", choices=DEVICES)
    compile: bool = _opt(False, "torch.compile the model (slow start, can be faster)")
    seed: int = _opt(1337, "random seed")
    resume: bool = _opt(False, "continue from latest_model.pth in the run directory")
    colab_drive: bool = _opt(False, "on Colab: write the run to Google Drive")

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def default_out_dir(self) -> str:
        return f"checkpoints/{self.level}_{self.preset}"

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            bias=self.bias,
            position=self.position,
        )


@dataclass
class SampleConfig:
    """One generation run; names follow Hugging Face ``generate`` where one exists."""

    prompt: str = _opt("Hello,", "text to continue")
    max_new_tokens: int = _opt(100, "tokens (words or characters) to generate")
    temperature: float = _opt(0.8, "sampling temperature; 0 means greedy decoding")
    top_k: int = _opt(50, "sample only from the k most likely tokens (0 disables)")
    top_p: float = _opt(1.0, "nucleus sampling: smallest set of tokens with this much probability")
    num_samples: int = _opt(1, "independent continuations to print")
    seed: int = _opt(1337, "random seed; the same seed gives the same text")
    device: str = _opt("auto", "where to run", choices=DEVICES)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SmolGPTError(f"--max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SmolGPTError(
                f"--temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise SmolGPTError(f"--top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SmolGPTError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise SmolGPTError(f"--num_samples must be >= 1, got {self.num_samples}")


# Presets: the original smolgpt's model sizes, plus a training recipe for each size and level
# (see benchmarks/RESULTS.md for the experiments behind them). Entries under "char"/"word"
# apply at that level only; anything not named keeps the TrainConfig default.
#
# Why the recipes differ from the original (AdamW, constant lr 3e-4, dropout 0.1 everywhere):
# on a 2-core CPU (benchmarks/RESULTS.md), nano and micro learn several times faster with
# Muon for the blocks' matrices and a high AdamW rate (1e-2 to 5e-2) for the embeddings,
# warmed up and decayed. Character models of these sizes barely overfit in the time they
# train, so they go without dropout (which costs a quarter of a CPU step); char micro uses
# batches of 16 so that a short run still makes enough steps. Word models overfit within a
# few epochs: they keep dropout (more for the larger micro) and stop early once validation
# stops improving. tiny and small are GPU-sized and were not measured here; they keep AdamW
# at conventional rates.
#
# On a CPU without native bf16 (most laptops), Muon's iteration runs in float32 and costs a
# larger share of a step, while every step is slower: micro orthogonalises with three
# Newton-Schulz iterations instead of five there, and at word level it makes more, smaller
# steps (batches of 16) with less dropout (the fewer steps overfit less).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": {
        "n_layer": 3, "n_head": 3, "n_embd": 48, "optimizer": "muon",
        "char": {"learning_rate": 2e-2, "dropout": 0.0},
        "word": {"learning_rate": 1e-2, "dropout": 0.2, "early_stop_patience": 4},
    },
    "micro": {
        "n_layer": 4, "n_head": 4, "n_embd": 128, "optimizer": "muon",
        "char": {"batch_size": 16, "learning_rate": 5e-2, "dropout": 0.0},
        "word": {"learning_rate": 1e-2, "dropout": 0.3, "early_stop_patience": 4},
        CPU_FLOAT32: {
            "char": {"muon_ns_steps": 3},
            "word": {"batch_size": 16, "dropout": 0.2, "muon_ns_steps": 3},
        },
    },
    "tiny": {
        "n_layer": 6, "n_head": 6, "n_embd": 384,
        "char": {"batch_size": 64, "learning_rate": 1e-3, "dropout": 0.2},
        "word": {"learning_rate": 5e-4, "dropout": 0.3, "early_stop_patience": 4},
    },
    "small": {
        "n_layer": 12, "n_head": 12, "n_embd": 768, "batch_size": 16,
        "char": {"learning_rate": 6e-4, "dropout": 0.2},
        "word": {"learning_rate": 3e-4, "dropout": 0.3, "early_stop_patience": 4},
    },
}


def preset_values(preset: str, level: str, cpu_float32: bool = False) -> dict[str, Any]:
    """The fields a preset sets at a level: its common entries, then the level's own, then
    (on a CPU that computes in float32, see ``hardware.PrecisionPolicy``) the level's
    ``cpu_float32`` entries."""
    if preset not in PRESETS:
        raise SmolGPTError(
            f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}"
        )
    if level not in LEVELS:
        raise SmolGPTError(f"unknown level {level!r}: choose one of {', '.join(LEVELS)}")
    entry = PRESETS[preset]
    values = {k: v for k, v in entry.items() if k not in (*LEVELS, CPU_FLOAT32)}
    values.update(entry.get(level, {}))
    if cpu_float32:
        values.update(entry.get(CPU_FLOAT32, {}).get(level, {}))
    return values


def resolve_train_config(explicit: dict[str, Any], cpu_float32: bool = False) -> TrainConfig:
    """Build a TrainConfig from the flags a user typed: defaults < preset < explicit flags.
    cpu_float32: the run trains on a CPU without native bf16 (the preset may differ there)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(explicit) - known
    if unknown:
        raise SmolGPTError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    base = TrainConfig()
    level = explicit.get("level", base.level)
    preset = explicit.get("preset", base.preset)
    values = preset_values(preset, level, cpu_float32)
    values.update(explicit)
    cfg = dataclasses.replace(base, **values)
    validate_train_config(cfg)
    return cfg


def validate_train_config(cfg: TrainConfig) -> None:
    """Reject settings no run could use, with the flag to change."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
                 "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                 "min_word_freq", "muon_ns_steps"):
        value = getattr(cfg, name)
        if value <= 0:
            raise SmolGPTError(f"--{name} must be a positive integer, got {value}")
    for name in ("warmup_iters", "early_stop_patience"):
        if getattr(cfg, name) < 0:
            raise SmolGPTError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise SmolGPTError(f"--learning_rate must be a positive number, got {cfg.learning_rate}")
    if not (math.isfinite(cfg.muon_lr) and cfg.muon_lr > 0):
        raise SmolGPTError(f"--muon_lr must be a positive number, got {cfg.muon_lr}")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise SmolGPTError(f"--min_lr must be in [0, learning_rate], got {cfg.min_lr}")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise SmolGPTError(f"--time_budget must be a positive number of seconds, got {cfg.time_budget}")
    if cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise SmolGPTError("--grad_clip and --weight_decay must be >= 0")
    if cfg.device not in DEVICES:
        raise SmolGPTError(f"unknown device {cfg.device!r}: choose one of {', '.join(DEVICES)}")
    cfg.model_config(vocab_size=1)  # shape checks (n_embd % n_head, dropout range)


# Fields added after checkpoints were first written, with the value those older checkpoints
# imply (they predate rotary positions, so their models learned position embeddings).
LEGACY_DEFAULTS: dict[str, Any] = {"position": "learned", "optimizer": "adamw"}

# Settings that define what a run *is*; a resumed run may not change them. (The training
# text is checked by content, not by the --data string.)
RESUME_FIXED = ("level", "preset", "n_layer", "n_head", "n_embd", "block_size", "bias",
                "position", "optimizer", "min_word_freq", "batch_size", "gradient_accumulation_steps", "seed")
# Bookkeeping that is not part of a run's recipe.
_RESUME_IGNORED = ("resume", "out_dir", "data", "colab_drive")


def resume_train_config(saved: dict[str, Any], explicit: dict[str, Any]) -> tuple[TrainConfig, dict]:
    """The config of a resumed run: the saved one, with the flags typed now applied.

    Flags that would change what the run is (model shape, level, tokenizer, batch stream)
    are refused; others (--max_iters to train longer, --eval_interval, ...) are applied and
    returned as {name: (old, new)} so the caller can report them.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {**LEGACY_DEFAULTS, **saved}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    conflicts = [k for k in RESUME_FIXED if k in explicit and explicit[k] != getattr(base, k)]
    if conflicts:
        shown = ", ".join(f"--{k} {explicit[k]} (checkpoint: {getattr(base, k)})" for k in conflicts)
        raise SmolGPTError(
            f"--resume cannot change {shown}; drop the flag(s), or start a new run in "
            "another --out_dir"
        )
    changed = {k: (getattr(base, k), v) for k, v in explicit.items()
               if k not in _RESUME_IGNORED and getattr(base, k) != v}
    cfg = dataclasses.replace(base, **explicit)
    validate_train_config(cfg)
    return cfg, changed
