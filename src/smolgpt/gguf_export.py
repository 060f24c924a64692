"""Export to GGUF, the one-file format of llama.cpp and of what is built on it (Ollama,
LM Studio, llama.cpp's server), written with the ``gguf`` package (the ``gguf`` extra).

llama.cpp has no "smolgpt" architecture, so the file names one it already runs, as the hf
export does: GPT-2 ("gpt2") for learned positions and GPT-NeoX ("gptneox", with sequential
residuals) for rotary ones. Both take smolgpt's weights as they are: one fused q|k|v matrix
laid out as smolgpt's, pre-LayerNorm blocks, a 4x GELU MLP. What differs is filled in
exactly: a model without biases gets zero biases, a tied head its own copy of the
embedding matrix. One difference cannot be removed: llama.cpp's GELU is GPT-2's tanh
approximation, looked up in a table of float16 inputs, where smolgpt computes the exact
(erf) GELU; the log-probabilities llama.cpp gives therefore differ from smolgpt's by a
little (docs/guides/export.md says how much), while every other part computes the same.

The tokenizer goes into GGUF's own fields as a byte-level BPE (the "gpt2" tokenizer model,
GPT-2's pre-tokenizer): at bpe level smolgpt's vocabulary and merges as they are; at char
level one token per character, written as its UTF-8 bytes, with merges that join exactly
those bytes, so llama.cpp's ids for a text are smolgpt's. A word-level vocabulary (whole
words, lowercased, <UNK>) has no exact GGUF form, and is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .errors import SmolGPTError
from .export import float_state
from .extras import install_command
from .model import GPT
from .tokenizer import Tokenizer
from .wordtext import BYTE_SYMBOLS

# What the weight matrices are stored as (--outtype): float32, float16, or 8-bit blocks
# (q8_0: 32 weights share one float16 scale; llama.cpp's near-lossless quantised type).
OUTTYPES = ("f32", "f16", "q8_0")
MAGIC = b"GGUF"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which smolgpt's model uses
ROPE_BASE = 10000.0  # model.rotary_tables'


def require_gguf():
    """The gguf package, or SmolGPTError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise SmolGPTError(
            f"--format gguf needs the gguf package: {install_command('gguf')}"
        ) from None
    return gguf


def check_out_file(path: Path, overwrite: bool) -> None:
    """Raise SmolGPTError unless a GGUF file may be written at path: nothing is there, or
    (with overwrite) an earlier GGUF file. Nothing else is ever replaced."""
    if path.is_dir():
        raise SmolGPTError(f"{path} is a directory: give a file name, such as model.gguf")
    if not path.exists():
        return
    if not overwrite:
        raise SmolGPTError(f"{path} exists: choose a new file name, or pass --overwrite")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:  # never replace what an export did not write
            raise SmolGPTError(
                f"{path} is not a GGUF file: --overwrite replaces only those; "
                "choose a new file name"
            )


def tensors(module: GPT) -> dict[str, torch.Tensor]:
    """The module's weights under llama.cpp's names for GPT-2 and GPT-NeoX (the same names
    in both), in float32, every bias present (zeros where the model has none)."""
    state, config = float_state(module), module.config
    C = config.n_embd

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))

    out = {"token_embd.weight": state["wte.weight"]}
    if config.position == "learned":
        out["position_embd.weight"] = state["wpe.weight"]
    parts = {  # llama.cpp's name: (smolgpt's module, its output size)
        "attn_norm": ("ln_1", C),
        "attn_qkv": ("attn.c_attn", 3 * C),
        "attn_output": ("attn.c_proj", C),
        "ffn_norm": ("ln_2", C),
        "ffn_up": ("mlp.c_fc", 4 * C),
        "ffn_down": ("mlp.c_proj", C),
    }
    for i in range(config.n_layer):
        for theirs, (ours, size) in parts.items():
            out[f"blk.{i}.{theirs}.weight"] = state[f"blocks.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.bias"] = bias(f"blocks.{i}.{ours}.bias", size)
    out["output_norm.weight"] = state["ln_f.weight"]
    out["output_norm.bias"] = bias("ln_f.bias", C)
    out["output.weight"] = state.get("lm_head.weight", state["wte.weight"])  # tied: wte
    return out


def stored(gguf, name: str, tensor: torch.Tensor, outtype: str):
    """(data, raw_dtype) of one tensor in the file: norms, biases and position embeddings
    always float32 (as llama.cpp's own converter keeps them), matrices as outtype; q8_0
    needs rows of whole 32-weight blocks, and a matrix whose rows are not stays float16."""
    data = tensor.numpy()
    if data.ndim == 1 or name == "position_embd.weight" or outtype == "f32":
        return data.astype(np.float32), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
        return gguf.quants.quantize(data.astype(np.float32), q8), q8
    return data.astype(np.float16), None


def write_metadata(
    gguf, writer, module: GPT, tokenizer: Tokenizer, vocabulary: tuple, outtype: str, name: str
) -> None:
    """The file's metadata: the architecture's shape, the file type, and the tokenizer, whose
    vocabulary is its (tokens, merges) as Tokenizer.byte_level_bpe gives them."""
    config = module.config
    arch = writer.arch
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[outtype]))
    if arch == "gptneox":
        writer.add_rope_dimension_count(config.n_embd // config.n_head)  # every channel
        writer.add_rope_freq_base(ROPE_BASE)
        writer.add_bool(f"{arch}.use_parallel_residual", False)
    tokens, merges = vocabulary
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    # A pretrained tokenizer's end token (GPT-2's <|endoftext|>) is a control token, found in
    # a prompt as such, as transformers' tokenizer finds it; every other token is text.
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if i == tokenizer.end_id else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    # llama.cpp refuses a file without merges, and a character vocabulary of single bytes
    # (ASCII text) needs none: a merge of two 0xFF bytes, which no UTF-8 text holds, stands in.
    never = BYTE_SYMBOLS[0xFF]
    writer.add_token_merges([f"{a} {b}" for a, b in merges] or [f"{never} {never}"])
    bos, eos = special_ids(tokenizer, tokens)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # prompts are encoded as smolgpt encodes them


def special_ids(tokenizer: Tokenizer, tokens: list[str]) -> tuple[int, int]:
    """(begin, end) token ids for GGUF, which llama.cpp requires (without them it takes
    token 11) and smolgpt's models do not have. Begin: the token smolgpt's own generation
    starts from (the default prompt, a line break). End, where llama.cpp stops generating:
    a token the model never produces where the vocabulary has one, the byte 0xFF, which no
    UTF-8 text contains (bpe level); a character vocabulary has none, and there it is the
    line break too."""
    begin = tokenizer.boundary_id()
    if tokenizer.end_id is not None:  # a pretrained tokenizer's own (GPT-2's <|endoftext|>)
        return begin, tokenizer.end_id
    never = BYTE_SYMBOLS[0xFF]
    return begin, tokens.index(never) if never in tokens else begin


def export_gguf(
    module: GPT,
    tokenizer: Tokenizer,
    out_file: Union[str, Path],
    outtype: str = "f32",
    overwrite: bool = False,
    name: Optional[str] = None,
) -> Path:
    """Write module and tokenizer to one GGUF file that llama.cpp runs (see the module's
    docstring), its weight matrices as outtype (f32, f16 or q8_0). The file appears whole
    or not at all; an existing one is replaced only with overwrite, and only if it is a GGUF
    file. SmolGPTError for a word-level model or one trained without the causal mask."""
    gguf = require_gguf()
    if outtype not in OUTTYPES:
        raise SmolGPTError(f"unknown --outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if not module.config.causal:
        raise SmolGPTError(
            "this model was trained without the causal mask (--no-causal), and llama.cpp's "
            "models are causal: export it with --format safetensors"
        )
    vocabulary = tokenizer.byte_level_bpe()  # a word-level tokenizer refuses before any writing
    given = Path(out_file)
    path = Path(os.path.abspath(given))
    check_out_file(path, overwrite)
    arch = "gpt2" if module.config.position == "learned" else "gptneox"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the file and renamed over it once complete: old file or new file,
    # never half of one (as files.atomic_write does; GGUFWriter opens its file itself).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        write_metadata(gguf, writer, module, tokenizer, vocabulary, outtype, name or path.stem)
        for tensor_name, tensor in tensors(module).items():
            data, raw_dtype = stored(gguf, tensor_name, tensor, outtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return given
