"""Models that leave smolgpt and come back: export to Hugging Face transformers or to
safetensors, and load any of those (or a smolgpt checkpoint) as a smolgpt model.

Two export formats, each a directory written in one piece (into a temporary sibling that is
renamed into place, so a failure never leaves a half directory behind):

- :func:`export_safetensors`: ``model.safetensors`` with smolgpt's own tensor names (the
  tied head stored once, as ``wte.weight``; an untied one as ``lm_head.weight``) and
  ``smolgpt.json`` (a format marker, the model config, the tokenizer, the training
  settings and what the run recorded of its text: fingerprint, source, path). No pickle:
  it loads without torch.load and without transformers.
- :func:`export_hf`: a directory that ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` read with no custom code. Models with learned positions
  become ``GPT2LMHeadModel`` (GPT-2 is exactly that architecture, with exact GELU); rotary
  models become ``GPTNeoXForCausalLM`` with full rotary and sequential residuals. The
  head is tied or not as the model's is (``tie_word_embeddings``). The tokenizer is a
  ``tokenizer.json`` built with the tokenizers library that gives smolgpt's ids.
  ``smolgpt.json`` travels along, so the directory loads back exactly.

What the transformers tokenizer does differently from smolgpt's (the model is the same to
1e-4 in float32):

- Character level: a character outside the vocabulary raises an exception in tokenizers
  ("Missing [UNK] token"), as smolgpt refuses it: a character vocabulary has no unknown id.
- Word level: decoding re-attaches punctuation as smolgpt does, except ASCII quotes: smolgpt
  alternates ``"`` and ``'`` between opening and closing and attaches them to the quoted
  words, which the tokenizers decoders cannot count, so they keep a space on both sides.
  Text that literally contains ``<PAD>`` or ``<UNK>`` reads as those special tokens.
- Lowercasing: a Greek capital sigma ending a word becomes σ, where Python makes it ς.
  Characters newer than Python's Unicode database may split differently.
- Byte-pair level: ``tokenizer.json`` is the tokenizers object smolgpt encodes with, so the
  ids are the same for any text. Decoding ids whose bytes are not UTF-8 gives U+FFFD in
  both, though not always the same number of them.

:func:`load_source` reads a smolgpt checkpoint, a safetensors export, or a Hugging Face
directory in either layout, converting it back exactly. Whatever smolgpt cannot reproduce
exactly (another architecture, gelu_new, parallel residuals, partial rotary, a head said to
be tied that is not, a Hugging Face directory without ``smolgpt.json``) is refused with one
line saying why.
Pickled weights (``pytorch_model.bin``) are refused: unpickling can run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import checkpoint, kernels
from .config import ModelConfig
from .errors import SmolGPTError
from .extras import install_command, upgrade_advice
from .files import atomic_write, atomic_write_text, umask
from .model import GPT

# (The detokenization marks too: the export's decoder follows WordTokenizer.decode.)
from .tokenizer import (
    JOINERS,
    NO_SPACE_AFTER,
    NO_SPACE_BEFORE,
    TEXT_REPLACEMENTS,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    tokenizer_from_dict,
)

FORMAT = "smolgpt-export"
FORMAT_VERSION = 1
META = "smolgpt.json"  # what smolgpt needs beyond the weights: tokenizer, configs
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
PICKLED = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")
ROPE_BASE = 10000.0  # model.rotary_tables' base
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the model uses

# WORD_PATTERN for the tokenizers library's regex engine (Oniguruma), which reads \w
# otherwise than WordTokenizer's NLTK (3.10 runs patterns on the regex module): there, \w
# is a letter, mark, letter-like number, decimal digit, connector (_) or zero-width
# (non-)joiner, so "x²" is two tokens. Spelled out like this, the two agree on every
# character Python's Unicode database knows (checked for every code point).
_WORD_CHARS = r"\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}"
HF_WORD_PATTERN = (
    rf"[{_WORD_CHARS}]+(?:['’][{_WORD_CHARS}]+)*"  # a word ...
    rf"|[^{_WORD_CHARS}\s]"
)  # ... or any other mark but a space


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


def _write_dir(out_dir: Union[str, Path], overwrite: bool, write: Callable[[Path], None]) -> Path:
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


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(path, lambda f: f.write(data))


def _float_state(module: GPT) -> dict[str, torch.Tensor]:
    """The module's weights as float32 CPU tensors; a tied head is left out (it is wte.weight)."""
    state = module.state_dict()
    if module.config.tie_embeddings:
        state.pop("lm_head.weight")
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def _meta(
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
    once, as wte.weight) and smolgpt.json; :func:`load_source` reads it back exactly.
    out_dir must be new or empty (or an earlier export, with overwrite). data_info: what the
    run recorded of its text (a checkpoint's "data"), kept in smolgpt.json. Returns out_dir."""
    meta = _meta(module, tokenizer, train_config, data_info, "smolgpt")
    state = _float_state(module)

    def write(folder: Path) -> None:
        _write_weights(folder / WEIGHTS, state)
        _write_json(folder / META, meta)

    return _write_dir(out_dir, overwrite, write)


# --------------------------------------------------------------- Hugging Face layouts


@dataclass(frozen=True)
class _Layout:
    """How a transformers architecture names smolgpt's parts and configures them."""

    position: str  # the smolgpt models it holds: ModelConfig.position
    model_type: str
    architecture: str
    shape: dict[str, str]  # ModelConfig field -> config.json key
    inner: str  # config.json key of the MLP width (4 * n_embd)
    # config.json key -> (transformers' default when absent, the value smolgpt computes)
    requires: dict[str, tuple[Any, Any]]
    top: dict[str, str]  # smolgpt module -> tensor name prefix, outside the blocks
    blocks: str  # tensor name prefix of block i, with {i}
    block: dict[str, str]  # smolgpt module inside a block -> its name there
    heads: tuple[str, ...]  # names a saved output head may have; an untied one gets the first
    tied_default: bool  # transformers' tie_word_embeddings when config.json does not say


GPT2 = _Layout(
    position="learned",
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    shape={
        "vocab_size": "vocab_size",
        "block_size": "n_positions",
        "n_layer": "n_layer",
        "n_head": "n_head",
        "n_embd": "n_embd",
    },
    inner="n_inner",
    requires={
        "activation_function": ("gelu_new", "gelu"),  # GPT-2's own is tanh-approximate
        "layer_norm_epsilon": (1e-5, LAYER_NORM_EPS),
        "scale_attn_weights": (True, True),
        "scale_attn_by_inverse_layer_idx": (False, False),
        "add_cross_attention": (False, False),
    },
    top={"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f"},
    blocks="transformer.h.{i}",
    block={
        "ln_1": "ln_1",
        "attn.c_attn": "attn.c_attn",
        "attn.c_proj": "attn.c_proj",
        "ln_2": "ln_2",
        "mlp.c_fc": "mlp.c_fc",
        "mlp.c_proj": "mlp.c_proj",
    },
    heads=("lm_head.weight",),
    tied_default=True,
)

NEOX = _Layout(
    position="rope",
    model_type="gpt_neox",
    architecture="GPTNeoXForCausalLM",
    shape={
        "vocab_size": "vocab_size",
        "block_size": "max_position_embeddings",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_embd": "hidden_size",
    },
    inner="intermediate_size",
    requires={
        "hidden_act": ("gelu", "gelu"),
        "layer_norm_eps": (1e-5, LAYER_NORM_EPS),
        "use_parallel_residual": (True, False),  # smolgpt's blocks are sequential
        "attention_bias": (True, True),
    },
    top={"wte": "gpt_neox.embed_in", "ln_f": "gpt_neox.final_layer_norm"},
    blocks="gpt_neox.layers.{i}",
    block={
        "ln_1": "input_layernorm",
        "attn.c_attn": "attention.query_key_value",
        "attn.c_proj": "attention.dense",
        "ln_2": "post_attention_layernorm",
        "mlp.c_fc": "mlp.dense_h_to_4h",
        "mlp.c_proj": "mlp.dense_4h_to_h",
    },
    heads=("lm_head.weight", "embed_out.weight"),  # (embed_out: transformers 4)
    tied_default=False,
)

LAYOUTS = {layout.position: layout for layout in (GPT2, NEOX)}
# What full rotary with smolgpt's base is, and the defaults transformers assumes.
_ROPE = {
    "rope_type": ("default", "default"),
    "partial_rotary_factor": (0.25, 1.0),
    "rope_theta": (10000.0, ROPE_BASE),
}


def _modules(config: ModelConfig) -> list[tuple[str, str]]:
    """(smolgpt module, Hugging Face module) for every part with weights."""
    layout = LAYOUTS[config.position]
    pairs = list(layout.top.items())
    for i in range(config.n_layer):
        prefix = layout.blocks.format(i=i)
        pairs += [
            (f"blocks.{i}.{ours}", f"{prefix}.{theirs}") for ours, theirs in layout.block.items()
        ]
    return pairs


def _to_hf(name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A smolgpt tensor as the Hugging Face layout stores it."""
    if config.position == "learned" and t.dim() == 2 and name.startswith("blocks."):
        return t.t()  # GPT-2's Conv1D keeps its weight as (in, out), nn.Linear as (out, in)
    if config.position == "rope" and ".c_attn." in name:
        # smolgpt: [all queries | all keys | all values]; NeoX: per head, its q, k and v.
        return t.unflatten(0, (3, config.n_head, -1)).transpose(0, 1).flatten(0, 2)
    return t


def _from_hf(name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`_to_hf`."""
    if config.position == "learned" and t.dim() == 2 and name.startswith("blocks."):
        return t.t()
    if config.position == "rope" and ".c_attn." in name:
        return t.unflatten(0, (config.n_head, 3, -1)).transpose(0, 1).flatten(0, 2)
    return t


def hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """smolgpt weights under the Hugging Face names of config.position's layout (a tied
    head only as the embedding). The layouts have biases everywhere: a model without
    (config.bias False) gets zero biases, which compute the same."""
    out = {}
    if not config.tie_embeddings:
        out[LAYOUTS[config.position].heads[0]] = state["lm_head.weight"].contiguous()
    for ours, theirs in _modules(config):
        weight = state[f"{ours}.weight"]
        out[f"{theirs}.weight"] = _to_hf(f"{ours}.weight", weight, config).contiguous()
        if ours not in ("wte", "wpe"):  # embeddings have no bias
            bias = state.get(f"{ours}.bias")
            if bias is None:
                bias = weight.new_zeros(weight.shape[0])
            out[f"{theirs}.bias"] = _to_hf(f"{ours}.bias", bias, config).contiguous()
    return out


def smolgpt_state_dict(
    tensors: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_state_dict`, lm_head.weight included (wte.weight when tied);
    biases are dropped when config.bias is False (the caller checks they are zero)."""
    state = {}
    for ours, theirs in _modules(config):
        state[f"{ours}.weight"] = _from_hf(f"{ours}.weight", tensors[f"{theirs}.weight"], config)
        if config.bias and ours not in ("wte", "wpe"):
            state[f"{ours}.bias"] = _from_hf(f"{ours}.bias", tensors[f"{theirs}.bias"], config)
    head = LAYOUTS[config.position].heads[0]
    state["lm_head.weight"] = state["wte.weight"] if config.tie_embeddings else tensors[head]
    return state


def hf_config(config: ModelConfig, pad_token_id: Optional[int] = None) -> dict[str, Any]:
    """config.json of the transformers model that computes what a smolgpt model of config
    does (dropouts 0: an export is for inference and fine-tuning brings its own)."""
    layout = LAYOUTS[config.position]
    out: dict[str, Any] = {"architectures": [layout.architecture], "model_type": layout.model_type}
    out.update({key: getattr(config, field) for field, key in layout.shape.items()})
    out[layout.inner] = 4 * config.n_embd
    out.update({key: needed for key, (_, needed) in layout.requires.items()})
    out["tie_word_embeddings"] = config.tie_embeddings
    if layout is GPT2:
        out.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        out["rope_parameters"] = {key: needed for key, (_, needed) in _ROPE.items()}
        # The same for transformers 4, which reads these keys instead.
        out.update(
            rotary_pct=out["rope_parameters"]["partial_rotary_factor"], rotary_emb_base=ROPE_BASE
        )
        out.update(attention_dropout=0.0, hidden_dropout=0.0)
    out.update(bos_token_id=None, eos_token_id=None, pad_token_id=pad_token_id, dtype="float32")
    return out


# ----------------------------------------------------------------- Hugging Face tokenizer


def _word_decoder():
    """Tokens joined by spaces, then the spaces smolgpt's WordTokenizer.decode leaves out
    removed again (all but those around ASCII quotes: see the module's docstring)."""
    from tokenizers import Regex, decoders

    # WordPiece's decoder without its cleanup only joins with spaces (no token of ours
    # starts with its "##"); Fuse makes one string for the replacements to work on.
    steps = [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse()]
    for mark in sorted(NO_SPACE_BEFORE | JOINERS):
        # A mark of one character is always a token of its own; "n't" could begin a word.
        before = " " + mark if len(mark) == 1 else Regex(f" {mark}(?= |$)")
        steps.append(decoders.Replace(before, mark))
    for mark in sorted(NO_SPACE_AFTER | JOINERS):
        steps.append(decoders.Replace(mark + " ", mark))
    return decoders.Sequence(steps)


def hf_tokenizer(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` that gives the ids tokenizer gives (same normalisation,
    splitting and vocabulary; no BOS or EOS added), and decodes as the module's docstring
    says."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.decoders import Fuse
    from tokenizers.models import WordLevel

    if isinstance(tokenizer, BPETokenizer):  # built with the tokenizers library already
        return tokenizer.hf_tokenizer()
    steps = []
    if tokenizer.normalize:  # normalize_text, replacement by replacement
        steps += [normalizers.Replace("\r\n", "\n"), normalizers.Replace("\r", "\n")]
        steps += [normalizers.Replace(old, new) for old, new in TEXT_REPLACEMENTS]
    if isinstance(tokenizer, CharTokenizer):
        # No unknown token: a character outside the vocabulary is an error, as in smolgpt.
        hf = HFTokenizer(WordLevel(vocab=tokenizer.stoi))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # each character
        hf.decoder = Fuse()  # characters joined as they are
    else:
        hf = HFTokenizer(WordLevel(vocab=tokenizer.stoi, unk_token=WordTokenizer.UNK))
        steps.append(normalizers.Lowercase())
        # The matches of the pattern are the tokens; what lies between them (space) goes.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(HF_WORD_PATTERN), "removed", invert=True)
        hf.decoder = _word_decoder()
        hf.add_special_tokens([WordTokenizer.PAD, WordTokenizer.UNK])
    if steps:
        hf.normalizer = normalizers.Sequence(steps)
    return hf


def _hf_tokenizer_config(tokenizer: Tokenizer, block_size: int) -> dict[str, Any]:
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers' clean-up would eat spaces before punctuation (" ." -> "."), which
        # char level must keep and word level's decoder already handles.
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
    }
    if isinstance(tokenizer, WordTokenizer):
        out.update(pad_token=WordTokenizer.PAD, unk_token=WordTokenizer.UNK)
    return out


def require_hf() -> None:
    """Raise SmolGPTError unless the tokenizers library (the hf extra) is installed."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise SmolGPTError(
            "exporting for transformers needs the tokenizers library: install with "
            + install_command("hf")
        ) from None


def export_hf(
    module: GPT,
    tokenizer: Tokenizer,
    out_dir: Union[str, Path],
    train_config: Optional[dict] = None,
    overwrite: bool = False,
    data_info: Optional[dict] = None,
) -> Path:
    """Write out_dir so that transformers' AutoModelForCausalLM and AutoTokenizer load it
    without custom code: GPT2LMHeadModel (learned positions) or GPTNeoXForCausalLM (rotary),
    whose logits equal the module's to float precision, and a tokenizer giving the same ids.
    smolgpt.json makes it load back into smolgpt exactly, and keeps data_info as
    :func:`export_safetensors` does. out_dir must be new or empty (or an earlier export,
    with overwrite). Returns out_dir."""
    require_hf()
    config = module.config
    if not config.causal:
        raise SmolGPTError(
            "this model was trained without the causal mask (--no-causal), and "
            "transformers' models are causal: export it with --format "
            "safetensors"
        )
    meta = _meta(module, tokenizer, train_config, data_info, "hf")
    pad = WordTokenizer.PAD_ID if isinstance(tokenizer, WordTokenizer) else None
    tensors = hf_state_dict(_float_state(module), config)
    tokenizer_json = hf_tokenizer(tokenizer).to_str(pretty=True)

    def write(folder: Path) -> None:
        _write_weights(folder / WEIGHTS, tensors)
        _write_json(folder / HF_CONFIG, hf_config(config, pad))
        atomic_write_text(folder / "tokenizer.json", tokenizer_json)
        _write_json(
            folder / "tokenizer_config.json", _hf_tokenizer_config(tokenizer, config.block_size)
        )
        _write_json(folder / META, meta)

    return _write_dir(out_dir, overwrite, write)


# ------------------------------------------------------------------------------ loading


def load_source(
    path: Union[str, Path], device: torch.device
) -> tuple[GPT, Tokenizer, dict[str, Any], dict[str, Any]]:
    """A model (eval mode, on device), its tokenizer, the train_config dict of the run that
    trained it ({} when unknown) and what the run recorded of its text (a checkpoint's
    "data": fingerprint, source, path, which an export carries along; {} when unknown),
    from a smolgpt checkpoint (.pth), a safetensors export directory, or a Hugging Face
    directory in one of the layouts :func:`export_hf` writes. Anything else is a
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
        return module, tokenizer, ckpt.get("train_config", {}), ckpt.get("data", {})
    if (path / HF_CONFIG).is_file() and "smolgpt_version" in _read_json(path / HF_CONFIG):
        # A training run's config.json (config.RUN_CONFIG), not a transformers one.
        raise SmolGPTError(
            f"{path} is a training run that has not saved a checkpoint yet: "
            "wait for its first evaluation, or pass another model"
        )
    if (path / HF_CONFIG).is_file():
        config, meta, state = _read_hf(path)
    elif (path / META).is_file():
        config, meta, state = _read_safetensors_export(path)
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmolGPTError(f"{path} is missing: the export is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SmolGPTError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SmolGPTError(f"{path} is not a JSON object")
    return data


def _read_meta(folder: Path, why: str) -> dict:
    """smolgpt.json of an export (why: what is lost without it, for the error)."""
    if not (folder / META).is_file():
        raise SmolGPTError(
            f"{folder} has no {META}: {why}; smolgpt loads only directories smolgpt export wrote"
        )
    meta = _read_json(folder / META)
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


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
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


def _read_safetensors_export(folder: Path):
    meta = _read_meta(folder, "it says what the weights are")
    if meta.get("weights") != "smolgpt":
        raise SmolGPTError(
            f"{folder} has Hugging Face weights but no {HF_CONFIG}: the export is incomplete"
        )
    config = checkpoint.model_config(meta, folder / META)
    state = _read_weights(folder)
    if config.tie_embeddings and "wte.weight" in state:  # the tied head, stored once
        state["lm_head.weight"] = state["wte.weight"]
    return config, meta, state


def _hf_model_config(cfg: dict, path: Path) -> ModelConfig:
    """The ModelConfig a Hugging Face config.json describes, if smolgpt computes that model
    exactly (with biases and no dropout: config.json does not say)."""
    layout = next(
        (lay for lay in LAYOUTS.values() if lay.model_type == cfg.get("model_type")), None
    )
    if layout is None:
        raise SmolGPTError(
            f"{path} describes a {cfg.get('model_type')!r} model; smolgpt "
            "reads only the gpt2 and gpt_neox layouts smolgpt export writes: "
            "load it with transformers"
        )

    def refuse(key: str, value: Any, needed: Any) -> SmolGPTError:
        return SmolGPTError(
            f"{path}: smolgpt cannot reproduce this model exactly ({key} is "
            f"{value!r}, smolgpt computes {needed!r}): load it with transformers"
        )

    for key, (default, needed) in layout.requires.items():
        if cfg.get(key, default) != needed:
            raise refuse(key, cfg.get(key, default), needed)
    shape = {field: cfg.get(key) for field, key in layout.shape.items()}
    for field, key in layout.shape.items():
        value = shape[field]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SmolGPTError(f"{path}: {key} is missing or not a positive whole number")
    inner = cfg.get(layout.inner)
    if inner != 4 * shape["n_embd"] and not (layout is GPT2 and inner is None):
        raise refuse(layout.inner, inner, 4 * shape["n_embd"])
    if layout is NEOX:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        legacy = {
            "rope_type": rope.get("type"),
            "partial_rotary_factor": cfg.get("rotary_pct"),
            "rope_theta": cfg.get("rotary_emb_base"),
        }
        for key, (default, needed) in _ROPE.items():
            value = rope.get(key, legacy[key] if legacy[key] is not None else default)
            if value != needed:
                raise refuse(key, value, needed)
        head_dim = cfg.get("head_dim")
        if head_dim not in (None, shape["n_embd"] // shape["n_head"]):
            raise refuse("head_dim", head_dim, shape["n_embd"] // shape["n_head"])
    tied = cfg.get("tie_word_embeddings", layout.tied_default)
    if not isinstance(tied, bool):
        raise SmolGPTError(f"{path}: tie_word_embeddings is {tied!r}, not true or false")
    return ModelConfig(
        **shape, position=layout.position, bias=True, dropout=0.0, tie_embeddings=tied
    )


def _read_hf(folder: Path):
    config = _hf_model_config(_read_json(folder / HF_CONFIG), folder / HF_CONFIG)
    meta = _read_meta(folder, "smolgpt cannot rebuild the tokenizer of a model it did not export")
    tensors = _read_weights(folder)
    layout = LAYOUTS[config.position]
    if not config.tie_embeddings:  # an untied head under an older name: the current one
        for old in layout.heads[1:]:
            if old in tensors and layout.heads[0] not in tensors:
                tensors[layout.heads[0]] = tensors.pop(old)
    # A tied head saved beside the embedding must be the embedding; an untied one stays.
    for head in layout.heads if config.tie_embeddings else ():
        if head in tensors:
            embedding = tensors.get(f"{layout.top['wte']}.weight")
            if embedding is None or not torch.equal(tensors.pop(head), embedding):
                raise SmolGPTError(
                    f"{folder}: the output head ({head}) is not the token "
                    f"embedding, yet {HF_CONFIG} says they are tied: the export "
                    "is inconsistent"
                )
    # The names and shapes the layout has for this config (a meta model: no memory used).
    with torch.device("meta"):
        expected = hf_state_dict(GPT(config).state_dict(), config)
    for name in sorted(set(expected) | set(tensors)):
        if name not in tensors or name not in expected:
            what = "is missing" if name not in tensors else "is not part of the layout"
            raise SmolGPTError(
                f"{folder / WEIGHTS}: tensor {name} {what} ({HF_CONFIG} "
                f"describes a {layout.architecture}): the export is inconsistent"
            )
        if tensors[name].shape != expected[name].shape:
            raise SmolGPTError(
                f"{folder / WEIGHTS}: tensor {name} has shape "
                f"{tuple(tensors[name].shape)}, {HF_CONFIG} implies "
                f"{tuple(expected[name].shape)}"
            )
    # Not in config.json: dropout, and whether the model has biases. An export of a model
    # without has zero ones, but a fine-tuned one may have learned some: it keeps them.
    stored = meta.get("model_config") if isinstance(meta.get("model_config"), dict) else {}
    biases = any(t.any() for name, t in tensors.items() if name.endswith(".bias"))
    config = dataclasses.replace(
        config,
        bias=biases or bool(stored.get("bias", True)),
        dropout=float(stored.get("dropout", 0.0)),
    )
    return config, meta, smolgpt_state_dict(tensors, config)
