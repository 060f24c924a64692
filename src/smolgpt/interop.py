"""Models that leave smolgpt and come back: export to Hugging Face transformers or to
safetensors, and load any of those (or a smolgpt checkpoint) as a smolgpt model.

(Skeleton: the formats other than smolgpt's own checkpoint are being written.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from . import checkpoint
from .model import GPT
from .tokenizer import Tokenizer


def load_source(path: Union[str, Path], device: torch.device) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A model (eval mode, on device), its tokenizer and the train_config dict of the run that
    trained it ({} when unknown), from a smolgpt checkpoint (.pth), a safetensors export
    directory, or a Hugging Face directory in one of the layouts :func:`export_hf` writes.
    Anything else is a SmolGPTError naming what is wrong."""
    module, tokenizer, ckpt = checkpoint.load_model(Path(path), device)
    return module, tokenizer, ckpt.get("train_config", {})
