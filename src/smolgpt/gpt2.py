"""OpenAI's GPT-2 as a starting point (``--init_from gpt2``, or a transformers GPT-2
directory): :func:`read_gpt2` builds smolgpt's model with GPT-2's exact shape (learned
positions, biases, tied head, GELU's tanh approximation) and its weights, and its own
tokenizer (:class:`~smolgpt.gpt2tokenizer.GPT2Tokenizer`); :func:`download` fetches the
released sizes from the Hugging Face Hub once, into huggingface_hub's usual cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import SmolGPTError
from .export import read_json, read_weights
from .extras import install_command
from .gpt2tokenizer import GPT2Tokenizer
from .hf import checked_tensors, hf_model_config, smolgpt_state_dict
from .model import GPT
from .rundir import HF_CONFIG, is_run_config

# --init_from names -> Hub repositories (OpenAI's releases, 124M to 1.5B parameters).
PRETRAINED = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# What a download fetches: the config, the safetensors weights and the tokenizer files
# (not the pickled, TensorFlow, Flax or ONNX copies the repositories also hold).
FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
]
OFFLINE = (
    "--init_from {name} needs the network once (to download it into the Hugging Face "
    "cache), or --init_from DIR"
)
# GPT-2's attention mask buffers, which older checkpoints saved with the weights.
_MASKS = re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias")


def is_gpt2_dir(path: Path) -> bool:
    """Whether path is a transformers directory that smolgpt did not export (a config.json
    that is not a training run's, no smolgpt.json): what read_gpt2 reads."""
    config = path / HF_CONFIG
    return config.is_file() and not is_run_config(config) and not (path / "smolgpt.json").is_file()


def download(name: str) -> Path:
    """The local directory of GPT-2 release name (a key of PRETRAINED), downloaded once
    into huggingface_hub's cache; SmolGPTError when it cannot be had."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise SmolGPTError(
            f"--init_from {name} downloads from the Hugging Face Hub: install with "
            + install_command("hub")
        ) from None
    try:
        folder = huggingface_hub.snapshot_download(PRETRAINED[name], allow_patterns=FILES)
    except LocalEntryNotFoundError:  # offline (or the Hub unreachable), and not cached
        raise SmolGPTError(OFFLINE.format(name=name)) from None
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmolGPTError(f"--init_from {name}: the download failed ({first})") from None
    return Path(folder)


def read_gpt2(folder: Path) -> tuple[GPT, GPT2Tokenizer]:
    """GPT-2 of a transformers directory (config.json of model_type gpt2, model.safetensors
    and tokenizer files) as smolgpt's model, in eval mode on the CPU, and its tokenizer;
    SmolGPTError, naming what is wrong, for anything else."""
    cfg: Any = read_json(folder / HF_CONFIG)
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gpt2":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise SmolGPTError(
            f"{folder} is not a GPT-2 directory ({HF_CONFIG} says model_type {kind!r}, "
            "not 'gpt2'): pass a transformers GPT-2, or a smolgpt model"
        )
    config = hf_model_config(cfg, folder / HF_CONFIG)
    tokenizer = GPT2Tokenizer.from_files(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise SmolGPTError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
            f"{config.vocab_size}: they do not belong together"
        )
    tensors = {}
    for name, tensor in read_weights(folder).items():
        # The Hub's original files name the parts without the "transformer." prefix.
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"
        if not _MASKS.fullmatch(name):
            tensors[name] = tensor.float()
    state = smolgpt_state_dict(checked_tensors(folder, config, tensors), config)
    module = GPT(config)
    module.load_state_dict(state)
    return module.eval(), tokenizer
