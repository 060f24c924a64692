"""Fine-tuning (``--init_from``): a training run that starts from a trained model instead of
random weights.

The source (a smolgpt checkpoint, a run directory, or a directory ``smolgpt export`` wrote,
all read by :func:`smolgpt.interop.load_source`; or OpenAI's GPT-2, by name or as a
transformers directory, read by :mod:`smolgpt.gpt2`) gives the new run:

- its weights, in place of the random initialisation;
- its tokenizer: the new text is encoded with the source's vocabulary, since the model's
  embeddings mean those tokens. Words it lacks become <UNK>; characters a char vocabulary
  lacks are left out, with a warning (it has no unknown id);
- its level and shape (n_layer, n_head, n_embd, block_size, bias, position, and the
  ablations tie_embeddings and causal). A flag that differs from the source's is refused;
  one not given is the source's. The one exception is a smaller --block_size: the model
  keeps its first block_size positions (:meth:`Source.crop`), which compute exactly what
  the source computes there, so that a GPT-2 (1024 positions) can be fine-tuned on short
  windows, as a CPU allows.

The training recipe is a preset's as usual: ``--preset`` if given, else the one the source
was trained with (the default preset when the source does not say). One change: a learning
rate not given (``--learning_rate``, and ``--muon_lr`` with Muon) is FINETUNE_LR_FACTOR times
the recipe's, because full-size steps on a new text soon wipe out what the source learned.

A fine-tuning run's checkpoints are ordinary ones: it resumes like any run, from its own
latest_model.pth and tokenizer, without looking at the source again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import gpt2, interop
from .config import FINETUNE_LR_FACTOR, PRESETS, TrainConfig
from .errors import SmolGPTError
from .model import GPT
from .rundir import locate
from .tokenizer import Tokenizer

# The settings that decide the weights' shapes (with the vocabulary, which is the
# tokenizer's); dropout is not among them: it is part of the recipe.
SHAPE = (
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "bias",
    "position",
    "activation",
    "tie_embeddings",
    "causal",
)


@dataclass
class Source:
    """A model to fine-tune, as read from --init_from."""

    path: Path  # what was read: a checkpoint file or an export directory
    module: GPT
    tokenizer: Tokenizer
    train_config: dict[str, Any]  # of the run that trained it; {} when unknown

    @property
    def level(self) -> str:
        return self.tokenizer.level

    def shape(self) -> dict[str, Any]:
        return {name: getattr(self.module.config, name) for name in SHAPE}

    def crop(self, block_size: int) -> None:
        """Keep the model's first block_size positions (at most its own): the first rows
        of a learned position table, of rotary's tables. Done in place, since building a
        second model would draw random weights for all of a GPT-2 only to overwrite them."""
        module = self.module
        if block_size == module.config.block_size:
            return
        if module.config.position == "learned":
            module.wpe = nn.Embedding.from_pretrained(
                module.wpe.weight.detach()[:block_size].clone(), freeze=False
            )
        else:  # buffers: not saved, rebuilt from the config, cut here all the same
            module.rotary_cos = module.rotary_cos[:block_size].clone()
            module.rotary_sin = module.rotary_sin[:block_size].clone()
        module.config = dataclasses.replace(module.config, block_size=block_size)


def load_source(init_from: str) -> Source:
    """The model --init_from names (a run directory means its best_model.pth, else its
    latest_model.pth; gpt2, gpt2-medium, gpt2-large or gpt2-xl OpenAI's GPT-2, downloaded
    once; a transformers GPT-2 directory that GPT-2), on the CPU: the trainer copies its
    weights to the run's device. A path that is missing or holds no model is a
    SmolGPTError."""
    if init_from in gpt2.PRETRAINED or gpt2.is_gpt2_dir(Path(init_from).expanduser()):
        return _gpt2_source(init_from)
    try:
        path = locate(init_from).model
        module, tokenizer, train_config, _ = interop.load_source(path, torch.device("cpu"))
    except SmolGPTError as exc:
        if Path(init_from).name == init_from and not Path(init_from).exists():
            # A bare name that is no file: most likely a pretrained model's, mistyped.
            names = ", ".join(gpt2.PRETRAINED)
            raise SmolGPTError(
                f"--init_from {init_from}: no such file or directory, nor a GPT-2 name "
                f"({names}): pass one of those, or a checkpoint, run or export directory"
            ) from None
        raise SmolGPTError(f"--init_from: {exc}") from None
    return Source(path, module, tokenizer, dict(train_config or {}))


def _gpt2_source(init_from: str) -> Source:
    """OpenAI's GPT-2 (a release name, downloaded once, or a transformers directory)."""
    if init_from in gpt2.PRETRAINED:
        folder = gpt2.download(init_from)
    else:
        folder = Path(init_from).expanduser()
    try:
        module, tokenizer = gpt2.read_gpt2(folder)
    except SmolGPTError as exc:
        raise SmolGPTError(f"--init_from: {exc}") from None
    return Source(folder, module, tokenizer, {})


def source_settings(settings: dict[str, Any], source: Source) -> dict[str, Any]:
    """The settings given, completed with what the source decides: its level, shape and
    (word level) min_word_freq, and unless --preset is given, its preset. A given level or
    shape that differs from the source's is refused (a smaller --block_size aside: the
    caller then crops the source), and so is --min_word_freq: the vocabulary is the
    source's."""
    where = f"--init_from {settings['init_from']}"
    if settings.get("level", source.level) != source.level:
        raise SmolGPTError(
            f"--level {settings['level']} does not match {where}, a {source.level}-level "
            "model: drop --level (a fine-tuned model reads text as its source does)"
        )
    for name in ("min_word_freq", "vocab_size"):
        if name in settings:
            raise SmolGPTError(
                f"--{name} does not apply with {where}: the vocabulary is "
                "the source model's; drop the flag"
            )
    shape = source.shape()
    if "block_size" in settings:
        if settings["block_size"] > shape["block_size"]:
            raise SmolGPTError(
                f"--block_size {settings['block_size']} is more than the "
                f"{shape['block_size']} positions of {where}: a fine-tuned model can use "
                "fewer positions than its source, not more"
            )
        shape["block_size"] = settings["block_size"]
    conflicts = [k for k in SHAPE if k in settings and settings[k] != shape[k]]
    if conflicts:
        shown = ", ".join(
            f"{_flag(k, settings[k])} (source: {_value(shape[k])})" for k in conflicts
        )
        raise SmolGPTError(
            f"{shown}: a fine-tuned model keeps the shape of {where}; drop the flag(s)"
        )
    # The tokenizer's settings (min_word_freq, vocab_size) recorded, so the run says what it used.
    completed = {**settings, **shape, "level": source.level}
    completed.update(source.tokenizer.training_settings())
    if "preset" not in settings and source.train_config.get("preset") in PRESETS:
        completed["preset"] = source.train_config["preset"]
    return completed


def _flag(name: str, value: Any) -> str:
    """A setting as it is typed: --n_layer 2, --bias, --no-bias."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value}"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def scale_learning_rates(cfg: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """cfg with the peak learning rates not given in settings (learning_rate, and muon_lr
    with Muon) at FINETUNE_LR_FACTOR times the recipe's."""

    def scale(rate: float) -> float:  # to 12 digits: 0.005, not 0.005000000000000001
        return float(f"{rate * FINETUNE_LR_FACTOR:.12g}")

    scaled = {}
    if "learning_rate" not in settings:
        scaled["learning_rate"] = scale(cfg.learning_rate)
    if cfg.optimizer == "muon" and "muon_lr" not in settings:
        scaled["muon_lr"] = scale(cfg.muon_lr)
    lr = scaled.get("learning_rate")
    if lr is not None and cfg.min_lr is not None and cfg.min_lr > lr:
        # (Against a rate given, TrainConfig checks --min_lr itself.)
        raise SmolGPTError(
            f"--min_lr {cfg.min_lr:g} is above the learning rate {lr:g} of this fine-tuning "
            f"run (--init_from: {FINETUNE_LR_FACTOR:g} x the preset's): lower --min_lr, or "
            "give --learning_rate"
        )
    return dataclasses.replace(cfg, **scaled)


def describe(source: Source, cfg: TrainConfig, settings: dict[str, Any]) -> str:
    """The start-up line of a fine-tuning run: the source, what it gives the run, and the
    peak learning rates (saying which were scaled down)."""

    def rate(name: str) -> str:
        scaled = "" if name in settings else f" ({FINETUNE_LR_FACTOR:g} x the preset's)"
        return f"{name} {getattr(cfg, name):g}{scaled}"

    rates = [rate("learning_rate")] + ([rate("muon_lr")] if cfg.optimizer == "muon" else [])
    return (
        f"fine-tuning {source.path}: its weights "
        f"({source.module.num_parameters() / 1e6:.2f}M parameters), shape and "
        f"{source.level}-level tokenizer ({source.tokenizer.vocab_size:,} tokens); "
        f"{', '.join(rates)}"
    )
