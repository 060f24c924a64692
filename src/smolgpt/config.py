"""Every setting smolgpt has, defined once.

Typed dataclasses hold them; the training run's are here:

- :class:`ModelShape`: the network's size and architecture, shared by the two below;
- :class:`ModelConfig`: a shape plus the vocabulary size: enough to rebuild a network, and
  stored in every checkpoint;
- :class:`TrainConfig`: a training run (a shape plus data, optimisation, evaluation, ...).

The other commands' (:class:`SampleConfig`, :class:`GenerateConfig`, :class:`ServeConfig`,
and those of eval, inspect, plot, export and info) are in ``commandconfig.py``, and offered
here too. Each field carries its command-line help, its ``--help`` group and the values it
allows in ``metadata`` (``settings.py`` says what it may hold); the command line builds every
command's flags from the fields and the Python API passes keyword arguments straight to the
dataclasses, so both accept the same names with the same defaults. Every config checks
itself in ``__post_init__`` (what the metadata allows, then what spans several fields): a
bad value is a :class:`SmolGPTError` naming the setting, however the config was made.

Presets are plain data (:data:`PRESETS`, in ``presets.py``). A training setting is resolved
in three layers, later layers winning: the dataclass default, then the preset (its per-level
entries, and on a CPU that computes in float32 its ``cpu_float32`` entries), then a setting
the user gave: in a config file (:func:`read_config_file`, ``configfile.py``), or as a flag
or keyword argument, which wins over the file. A preset changes only the fields it names. A
fine-tuning run (``--init_from``) takes its level and shape from its source model instead,
and scales down a learning rate not given (see ``finetune.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .commandconfig import (  # noqa: F401 - where smolgpt.config has always offered them
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    InfoConfig,
    InspectConfig,
    PlotConfig,
    SampleConfig,
    ServeConfig,
)
from .configfile import read_settings_file
from .errors import SmolGPTError
from .presets import CPU_FLOAT32, PRESETS, preset_values  # noqa: F401 - as above
from .settings import (  # noqa: F401 - as above
    ACTIVATIONS,
    DEVICES,
    EXPORT_FORMATS,
    HELP_GROUPS,
    LEVELS,
    OPTIMIZERS,
    PLOT_AXES,
    PLOT_VALUES,
    POSITIONS,
    SCHEDULES,
    check_choice,
    check_fields,
    default_shown,
    device_setting,
    encoding_setting,
    opt,
)

DEFAULT_MAX_ITERS = 5000  # the original smolgpt's: the length of a run not given one
DEFAULT_EVAL_INTERVAL = 250  # steps between evaluations of a run counted in steps
# A time-budgeted run not given --eval_interval evaluates at its start and after each this
# many-th of its training time: a curve of six points, whatever its steps cost.
BUDGET_EVALUATIONS = 5
# Fine-tuning (--init_from) without a learning rate given trains at this share of the
# preset's: full-size steps on a new text would soon wipe out what the source had learned.
FINETUNE_LR_FACTOR = 0.1


def check_vocab_size(vocab_size: Any) -> None:
    """A bpe vocabulary holds at least the 256 byte values."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise SmolGPTError(
            f"--vocab_size must be at least 256 (the byte values every bpe "
            f"vocabulary starts from), got {vocab_size}"
        )


@dataclass
class ModelShape:
    """The size and architecture of a GPT, declared once for models and training runs."""

    n_layer: int = opt(4, "transformer blocks", "model", positive=True, resume="fixed")
    n_head: int = opt(4, "attention heads per block", "model", positive=True, resume="fixed")
    n_embd: int = opt(
        128, "embedding width (divisible by n_head)", "model", positive=True, resume="fixed"
    )
    block_size: int = opt(128, "context length in tokens", "model", positive=True, resume="fixed")
    dropout: float = opt(0.1, "dropout probability", "model", interval="[0, 1)")
    bias: bool = opt(True, "biases in linear layers and LayerNorms", "model", resume="fixed")
    position: str = opt(
        "rope",
        "how the model knows token positions: rotary (rope) or GPT-2's learned embeddings",
        "model",
        choices=POSITIONS,
        label="position encoding",
        resume="fixed",
        legacy="learned",
    )
    activation: str = opt(
        "gelu",
        "the MLP's GELU: exact (gelu) or GPT-2's tanh approximation (gelu_tanh), which "
        "models started from GPT-2 use",
        "model",
        choices=ACTIVATIONS,
        resume="fixed",
        legacy="gelu",
    )
    tie_embeddings: bool = opt(
        True,
        "the output head reuses the token embedding matrix (weight tying); "
        "off, the head has a matrix of its own",
        "ablation",
    )
    causal: bool = opt(
        True,
        "each token attends only to itself and earlier tokens; off, training sees the "
        "next token (the loss collapses and samples are garbage)",
        "ablation",
    )

    def __post_init__(self) -> None:
        check_fields(self, ModelShape)
        if self.n_embd % self.n_head:
            raise SmolGPTError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"choose e.g. --n_embd {self.nearest_valid_width()}"
            )
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise SmolGPTError(
                f"rotary positions need an even head size, got n_embd / n_head = "
                f"{self.n_embd // self.n_head}: choose e.g. --n_embd "
                f"{self.nearest_valid_width()}, or use --position learned"
            )

    def nearest_valid_width(self) -> int:
        """The n_embd nearest this one that every check above accepts with this n_head and
        position scheme: a multiple of n_head, and of 2 * n_head for rotary positions (which
        rotate pairs of a head's dimensions)."""
        step = self.n_head * (2 if self.position == "rope" else 1)
        return step * max(1, round(self.n_embd / step))

    def shape(self) -> dict[str, Any]:
        """The shape fields alone, as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelShape)}


@dataclass
class ModelConfig(ModelShape):
    """A model shape and its vocabulary: enough to rebuild the network from a checkpoint."""

    vocab_size: int = field(kw_only=True, metadata={"positive": True})  # the tokenizer's

    def __post_init__(self) -> None:
        check_fields(self, ModelConfig)
        super().__post_init__()


@dataclass
class TrainConfig(ModelShape):
    """One training run: a model shape (from :class:`ModelShape`) and everything else."""

    level: str = opt("word", "tokenization level", "data", choices=LEVELS, resume="fixed")
    preset: str = opt(
        "tiny",
        "model size and training recipe (see Presets in the training guide)",
        "data",
        choices=tuple(PRESETS),
        resume="fixed",
    )
    data: str = opt(
        "shakespeare",
        "training text: a built-in corpus (shakespeare, sherlock), a .txt file, "
        "a directory of .txt files, or an http(s) URL",
        "data",
        resume="ignored",
    )
    init_from: Optional[str] = opt(
        None,
        "fine-tune: start from this model's weights, tokenizer and shape (a .pth "
        "checkpoint, a run directory, or a directory written by smolgpt export)",
        "data",
        shown="unset: a new model",
        resume="kept",
    )
    out_dir: Optional[str] = opt(
        None,
        "run directory",
        "data",
        shown="checkpoints/<level>_<preset>; with --init_from, checkpoints/<source>_finetune",
        resume="ignored",
    )
    # Optimisation.
    batch_size: int = opt(
        32, "sequences per micro-batch", "optimisation", positive=True, resume="fixed"
    )
    gradient_accumulation_steps: int = opt(
        1, "micro-batches per optimiser step", "optimisation", positive=True
    )
    max_iters: Optional[int] = opt(
        None,
        "optimiser steps to train for; with --time_budget, a cap on them",
        "optimisation",
        shown=f"{DEFAULT_MAX_ITERS}; no cap with --time_budget",
        positive=True,
    )
    time_budget: Optional[float] = opt(
        None,
        "train for this many seconds of wall time (instead of, or up to, max_iters)",
        "optimisation",
        positive=True,
    )
    optimizer: str = opt(
        "adamw",
        "adamw, or muon: Muon for the blocks' weight matrices and AdamW for the rest",
        "optimisation",
        choices=OPTIMIZERS,
        resume="fixed",
        legacy="adamw",
    )
    learning_rate: float = opt(
        3e-4,
        "peak learning rate (of AdamW: with --optimizer muon, of the embeddings, biases and norms)",
        "optimisation",
        positive=True,
    )
    muon_lr: float = opt(
        0.05,
        "peak learning rate of Muon's matrices (--optimizer muon)",
        "optimisation",
        positive=True,
    )
    muon_ns_steps: int = opt(
        5,
        "Newton-Schulz iterations of Muon's orthogonalisation (fewer: cheaper steps, "
        "rougher orthogonalisation)",
        "optimisation",
        positive=True,
    )
    min_lr: Optional[float] = opt(
        None, "final learning rate of the decay", "optimisation", shown="learning_rate / 10"
    )
    warmup_iters: int = opt(100, "linear warm-up steps", "optimisation", minimum=0)
    warmup_budget_share: float = opt(
        0.02,
        "with --time_budget: the share of the budget spent warming up, instead of warmup_iters",
        "optimisation",
        interval="[0, 1)",
    )
    lr_schedule: str = opt(
        "cosine",
        "learning-rate schedule after warm-up: cosine or linear decay to min_lr, or constant",
        "optimisation",
        choices=SCHEDULES,
    )
    batch_warmup: float = opt(
        0.0,
        "share of training over which each step's batch grows linearly from a quarter "
        "of batch_size to all of it (0: whole batches from the first step)",
        "optimisation",
        interval="[0, 1]",
    )
    weight_decay: float = opt(
        0.1,
        "weight decay of matrices and embeddings (AdamW and Muon; not biases or norms)",
        "optimisation",
        minimum=0,
    )
    beta1: float = opt(0.9, "AdamW beta1", "optimisation")
    beta2: float = opt(0.99, "AdamW beta2", "optimisation")
    grad_clip: float = opt(
        1.0, "clip gradient norm to this (0 disables)", "optimisation", minimum=0
    )
    # Evaluation, stopping, logging.
    eval_interval: Optional[int] = opt(
        None,
        "steps between evaluations (and checkpoints)",
        "evaluation",
        shown=f"{DEFAULT_EVAL_INTERVAL}; with --time_budget, {BUDGET_EVALUATIONS} spread over it",
        positive=True,
    )
    eval_iters: int = opt(
        20,
        "batches per evaluation of train and val loss (under --time_budget, fewer where "
        "evaluations would take more than a tenth of it)",
        "evaluation",
        positive=True,
    )
    log_interval: int = opt(
        50,
        "steps between progress lines when stderr is not a terminal",
        "evaluation",
        positive=True,
    )
    plot: bool = opt(
        True,
        "redraw loss.png in the run directory at every evaluation "
        "(needs matplotlib: the plot extra)",
        "evaluation",
    )
    sample_every: int = opt(
        0,
        "at the evaluations this many steps apart, print a short sample (the same prompt "
        "and seed each time, so the text changes only as the model learns) and add it to "
        "samples.txt in the run directory (0: never)",
        "evaluation",
        minimum=0,
    )
    tensorboard: bool = opt(
        False,
        "also log the metrics for TensorBoard, in the run "
        "directory's tensorboard/ (needs the tensorboard extra)",
        "evaluation",
    )
    early_stop_patience: int = opt(
        0,
        "stop after this many evaluations without a new best val loss (0: never)",
        "evaluation",
        minimum=0,
    )
    # Tokenizer.
    min_word_freq: int = opt(
        3,
        "word level: words seen fewer times become <UNK>",
        "data",
        levels=("word",),
        positive=True,
        resume="fixed",
    )
    vocab_size: Optional[int] = opt(
        None,
        "bpe level: tokens in the vocabulary, the 256 byte values and then the merges "
        "learned from the training split",
        "data",
        resume="fixed",
    )
    encoding: str = encoding_setting("data", resume="fixed")
    # Hardware and bookkeeping.
    amp: bool = opt(
        True,
        "reduced precision where the hardware computes it natively (see "
        "Precision); --no-amp: float32 everywhere",
        "system",
    )
    device: str = device_setting(help="where to train")
    compile: bool = opt(False, "torch.compile the model (slow start, can be faster)", "system")
    gradient_checkpointing: bool = opt(
        False,
        "recompute each block's activations in the backward pass instead of keeping "
        "them: less memory (longer contexts, bigger models), about a third more compute",
        "system",
    )
    seed: int = opt(1337, "random seed", "system", resume="fixed")
    resume: bool = opt(
        False, "continue from latest_model.pth in the run directory", "system", resume="ignored"
    )
    overwrite: bool = opt(
        False,
        "start a new run in an --out_dir that holds one: the old run is moved aside "
        "(renamed with a timestamp), never deleted",
        "system",
        resume="ignored",
    )
    colab_drive: bool = opt(
        False, "on Colab: write the run to Google Drive", "system", resume="ignored"
    )

    def __post_init__(self) -> None:
        """Reject settings no run could use, naming the flag to change."""
        check_fields(self, TrainConfig)
        if self.level == "bpe":
            check_vocab_size(self.vocab_size)
        elif self.vocab_size is not None:
            raise SmolGPTError(
                f"--vocab_size applies at --level bpe only (the {self.level} "
                "level's vocabulary is what the text holds): drop the flag"
            )
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise SmolGPTError(f"--min_lr must be in [0, learning_rate], got {self.min_lr}")
        if self.resume and self.overwrite:
            raise SmolGPTError(
                "--resume continues the run in --out_dir and --overwrite "
                "starts a new one there: pass one of them"
            )
        super().__post_init__()  # the shape

    @property
    def step_limit(self) -> Optional[int]:
        """The steps a run may make: max_iters if given, else DEFAULT_MAX_ITERS, and no limit
        under a time budget (which then ends training alone)."""
        if self.max_iters is not None:
            return self.max_iters
        return None if self.time_budget else DEFAULT_MAX_ITERS

    @property
    def eval_every(self) -> Optional[int]:
        """Steps between evaluations: eval_interval if given, else DEFAULT_EVAL_INTERVAL; None
        under a time budget, whose evaluations then follow the clock (BUDGET_EVALUATIONS)."""
        if self.eval_interval is not None:
            return self.eval_interval
        return None if self.time_budget else DEFAULT_EVAL_INTERVAL

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def default_out_dir(self) -> str:
        """``checkpoints/<level>_<preset>``; fine-tuning, ``checkpoints/<source>_finetune``,
        named after --init_from as typed (so that resuming needs no look at the source), and
        never the source's own run directory."""
        if self.init_from:
            return f"checkpoints/{source_name(self.init_from)}_finetune"
        return f"checkpoints/{self.level}_{self.preset}"

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **self.shape())


def source_name(init_from: str) -> str:
    """A short name for an --init_from path: its run directory's for a checkpoint a run wrote
    (runs/x/best_model.pth: x), else the file's stem or the directory's name."""
    path = Path(init_from).expanduser().resolve()
    if path.name in ("best_model.pth", "latest_model.pth"):  # training.BEST and LATEST
        path = path.parent
    return (path.stem if path.suffix == ".pth" else path.name) or "source"


def resolve_train_config(explicit: dict[str, Any], cpu_float32: bool = False) -> TrainConfig:
    """Build a TrainConfig from the settings a user gave: defaults < preset < given.
    cpu_float32: the run trains on a CPU without native bf16 (the preset may differ there)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(explicit) - known
    if unknown:
        raise SmolGPTError(
            f"unknown setting(s): {', '.join(sorted(unknown))} (see smolgpt train --help)"
        )
    level = explicit.get("level", TrainConfig.level)
    preset = explicit.get("preset", TrainConfig.preset)
    return TrainConfig(**{**preset_values(preset, level, cpu_float32), **explicit})


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """The settings in a config file (``--config``) for a training run: see
    :func:`configfile.read_settings_file`."""
    return read_settings_file(path, TrainConfig)


def preset_default(name: str) -> Optional[str]:
    """What the presets set a TrainConfig field to, for --help and the command-line reference
    ("nano 3, micro 4, tiny 6, small 12"), or None if no preset sets it."""
    if not any(
        name in preset_values(p, level, f32)
        for p in PRESETS
        for level in LEVELS
        for f32 in (False, True)
    ):
        return None
    fallback = getattr(TrainConfig, name)
    parts, unset = [], []
    for preset in PRESETS:
        if not any(
            name in preset_values(preset, level, f32) for level in LEVELS for f32 in (False, True)
        ):
            unset.append(preset)  # shown together, at the plain default
            continue
        by_level = {level: preset_values(preset, level).get(name, fallback) for level in LEVELS}
        by_level = {level: v for level, v in by_level.items() if v is not None}
        if len(set(by_level.values())) == 1 and len(by_level) == len(LEVELS):
            text = f"{preset} {by_level[LEVELS[0]]}"
        else:
            text = f"{preset} " + ", ".join(f"{v} {level}" for level, v in by_level.items())
        on_float32 = {
            level: preset_values(preset, level, True).get(name, fallback) for level in LEVELS
        }
        changed = {
            level: v
            for level, v in on_float32.items()
            if level in by_level and v != by_level[level]
        }
        if len(changed) == len(LEVELS) and len(set(changed.values())) == 1:
            text += f" ({changed[LEVELS[0]]} on a float32 CPU)"
        elif changed:
            text += (
                " ("
                + ", ".join(f"{v} {level}" for level, v in changed.items())
                + " on a float32 CPU)"
            )
        parts.append(text)
    if unset:
        field_ = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
        plain = field_.metadata.get("shown") or ("unset" if fallback is None else fallback)
        parts.append(f"{', '.join(unset)} {plain}")
    return "from --preset: " + "; ".join(parts)


def default_text(cls: type, name: str) -> str:
    """The default of a setting as --help and the command-line reference show it."""
    if cls is TrainConfig:
        from_preset = preset_default(name)
        if from_preset:
            return from_preset
    return default_shown(next(f for f in dataclasses.fields(cls) if f.name == name))


def _marked(key: str, value: Any = None) -> dict[str, Any]:
    """{name: metadata[key]} of TrainConfig's fields whose metadata has key (equal to
    value, if given)."""
    return {
        f.name: f.metadata[key]
        for f in dataclasses.fields(TrainConfig)
        if key in f.metadata and (value is None or f.metadata[key] == value)
    }


# Fields added after checkpoints were first written, with the value those older checkpoints
# imply (their metadata's "legacy": they predate rotary positions, so their models learned
# position embeddings).
LEGACY_DEFAULTS: dict[str, Any] = _marked("legacy")
# What --resume does with each setting is its metadata's "resume" (see settings.py).
# "fixed": what a run *is*, which a resumed run may not change. (The training text is checked
# by content, not by the --data string.) gradient_accumulation_steps may change: with the
# number of processes (torchrun), to keep the global batch. "kept": where a run started, its
# history, which a resumed run keeps whatever is given now (it continues from its own
# latest_model.pth, so a --init_from given then is neither refused nor used). "ignored":
# bookkeeping that is not part of a run's recipe.
RESUME_FIXED = tuple(_marked("resume", "fixed"))
RESUME_KEPT = tuple(_marked("resume", "kept"))
_RESUME_IGNORED = tuple(_marked("resume", "ignored"))


def resume_train_config(
    saved: dict[str, Any], explicit: dict[str, Any]
) -> tuple[TrainConfig, dict]:
    """The config of a resumed run: the saved one, with the flags typed now applied.

    Flags that would change what the run is (model shape, level, tokenizer, batch stream)
    are refused; others (--max_iters to train longer, --eval_interval, ...) are applied and
    returned as {name: (old, new)} so the caller can report them.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {**LEGACY_DEFAULTS, **saved}
    explicit = {k: v for k, v in explicit.items() if k not in RESUME_KEPT}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    conflicts = [k for k in RESUME_FIXED if k in explicit and explicit[k] != getattr(base, k)]
    if conflicts:
        shown = ", ".join(
            f"--{k} {explicit[k]} (checkpoint: {getattr(base, k)})" for k in conflicts
        )
        raise SmolGPTError(
            f"--resume cannot change {shown}; drop the flag(s), or start a new run in "
            "another --out_dir"
        )
    changed = {
        k: (getattr(base, k), v)
        for k, v in explicit.items()
        if k not in _RESUME_IGNORED and getattr(base, k) != v
    }
    return dataclasses.replace(base, **explicit), changed
