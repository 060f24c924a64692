"""The Hugging Face transformers format: :func:`export_hf` writes a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read with no
custom code, and :func:`read_hf` reads one back. Models with learned positions become
``GPT2LMHeadModel`` (GPT-2 is exactly that architecture; smolgpt's exact GELU is
``activation_function: gelu``, GPT-2's tanh approximation ``gelu_new``); rotary models
become ``GPTNeoXForCausalLM`` with full rotary and sequential residuals. The head is tied or
not as the model's is (``tie_word_embeddings``). The tokenizer is a ``tokenizer.json`` built
with the tokenizers library that gives smolgpt's ids. ``smolgpt.json`` travels along (see
:mod:`smolgpt.export`), so the directory loads back exactly.

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

Read back (by :func:`smolgpt.interop.load_source`), whatever smolgpt cannot reproduce
exactly (another architecture, an activation other than GELU, parallel residuals, partial
rotary, a head said to be tied that is not, a directory without ``smolgpt.json``) is
refused with one line saying why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import ModelConfig
from .errors import SmolGPTError
from .export import (
    META,
    WEIGHTS,
    export_meta,
    float_state,
    read_json,
    read_meta,
    read_weights,
    write_dir,
    write_json,
    write_weights,
)
from .extras import install_command
from .files import atomic_write_text
from .model import GPT
from .rundir import HF_CONFIG
from .tokenizer import Tokenizer

ROPE_BASE = 10000.0  # model.rotary_tables' base
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the model uses

# --------------------------------------------------------------- Hugging Face layouts


@dataclass(frozen=True)
class _Layout:
    """How a transformers architecture names smolgpt's parts and configures them."""

    position: str  # the smolgpt models it holds: ModelConfig.position
    model_type: str
    architecture: str
    shape: dict[str, str]  # ModelConfig field -> config.json key
    inner: str  # config.json key of the MLP width (4 * n_embd)
    # config.json key of the MLP's activation, and transformers' default when absent
    activation: tuple[str, str]
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
    activation=("activation_function", "gelu_new"),  # GPT-2's own is tanh-approximate
    requires={
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
    activation=("hidden_act", "gelu"),
    requires={
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
# transformers' names of the activations smolgpt computes (ModelConfig.activation); an
# export writes the first of each. gelu_new is the tanh formula written out, and
# gelu_pytorch_tanh PyTorch's kernel of it, which smolgpt's nn.GELU("tanh") is.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
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


def hf_config(
    config: ModelConfig, pad_token_id: Optional[int] = None, bos_token_id: Optional[int] = None
) -> dict[str, Any]:
    """config.json of the transformers model that computes what a smolgpt model of config
    does (dropouts 0: an export is for inference and fine-tuning brings its own)."""
    layout = LAYOUTS[config.position]
    out: dict[str, Any] = {"architectures": [layout.architecture], "model_type": layout.model_type}
    out.update({key: getattr(config, field) for field, key in layout.shape.items()})
    out[layout.inner] = 4 * config.n_embd
    out.update({key: needed for key, (_, needed) in layout.requires.items()})
    out[layout.activation[0]] = next(k for k, v in ACTIVATIONS.items() if v == config.activation)
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
    # No end token: transformers' generate would stop at it, where smolgpt goes on.
    out.update(bos_token_id=bos_token_id, eos_token_id=None, pad_token_id=pad_token_id)
    out["dtype"] = "float32"
    return out


# ----------------------------------------------------------------- Hugging Face tokenizer


def hf_tokenizer(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` that gives the ids tokenizer gives (same normalisation,
    splitting and vocabulary; no BOS or EOS added), and decodes as the module's docstring
    says: each level's :meth:`~smolgpt.tokenizer.Tokenizer.hf_tokenizer`."""
    return tokenizer.hf_tokenizer()


def _hf_tokenizer_config(tokenizer: Tokenizer, bos_token: str, block_size: int) -> dict[str, Any]:
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers' clean-up would eat spaces before punctuation (" ." -> "."), which
        # char level must keep and word level's decoder already handles.
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
    }
    out.update(tokenizer.hf_special_tokens())
    # The begin token, which lm-evaluation-harness starts every text from (it refuses a
    # tokenizer without one): named by its vocabulary entry, so its id is the model's, and
    # found in text after normalisation, as the rest is ("\r\n" is one line break).
    out["bos_token"] = {
        "__type": "AddedToken",
        "content": bos_token,
        "normalized": True,
        "special": True,
        "lstrip": False,
        "rstrip": False,
        "single_word": False,
    }
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
    :func:`~smolgpt.export.export_safetensors` does. out_dir must be new or empty (or an
    earlier export, with overwrite). Returns out_dir."""
    require_hf()
    config = module.config
    if not config.causal:
        raise SmolGPTError(
            "this model was trained without the causal mask (--no-causal), and "
            "transformers' models are causal: export it with --format "
            "safetensors"
        )
    meta = export_meta(module, tokenizer, train_config, data_info, "hf")
    pad = tokenizer.pad_id
    tensors = hf_state_dict(float_state(module), config)
    built = hf_tokenizer(tokenizer)
    tokenizer_json = built.to_str(pretty=True)
    bos_token = built.id_to_token(tokenizer.boundary_id())

    def write(folder: Path) -> None:
        write_weights(folder / WEIGHTS, tensors)
        write_json(folder / HF_CONFIG, hf_config(config, pad, tokenizer.boundary_id()))
        atomic_write_text(folder / "tokenizer.json", tokenizer_json)
        write_json(
            folder / "tokenizer_config.json",
            _hf_tokenizer_config(tokenizer, bos_token, config.block_size),
        )
        write_json(folder / META, meta)

    return write_dir(out_dir, overwrite, write)


# ------------------------------------------------------------------------------ reading


def hf_model_config(cfg: dict, path: Path) -> ModelConfig:
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
    key, default = layout.activation
    activation = ACTIVATIONS.get(cfg.get(key, default))
    if activation is None:
        raise refuse(key, cfg.get(key, default), " or ".join(ACTIVATIONS))
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
        **shape,
        position=layout.position,
        activation=activation,
        bias=True,
        dropout=0.0,
        tie_embeddings=tied,
    )


def checked_tensors(
    folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """tensors (of folder's model.safetensors), checked to be exactly what config's layout
    has (names and shapes), a tied head that repeats the embedding dropped."""
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
    return tensors


def read_hf(folder: Path):
    """(model config, smolgpt.json, smolgpt state dict) of a Hugging Face export."""
    config = hf_model_config(read_json(folder / HF_CONFIG), folder / HF_CONFIG)
    meta = read_meta(folder, "smolgpt cannot rebuild the tokenizer of a model it did not export")
    tensors = checked_tensors(folder, config, read_weights(folder))
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
