"""GPT-2's own tokenizer, as OpenAI trained it: what a model started from GPT-2's weights
(``--init_from gpt2``) reads text with, since its embeddings mean those tokens.

:class:`GPT2Tokenizer` is the ``tokenizers`` library's object built from the model's own
files (``tokenizer.json``, or ``vocab.json`` and ``merges.txt``), not a rewrite of it: its
ids are transformers' ``GPT2TokenizerFast``'s for any text, ``<|endoftext|>`` included, and
decoding gives back the text exactly. A checkpoint stores the whole ``tokenizer.json``, so a
model fine-tuned from GPT-2 needs nothing but its checkpoint.

It is a byte-level BPE, so its level is "bpe" (the presets and statistics of that level
apply); its form in a checkpoint is "gpt2", which :func:`smolgpt.tokenizer.tokenizer_from_dict`
rebuilds once this module is imported (the modules that read checkpoints import it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from .errors import SmolGPTError
from .tokenizer import FORMS, Tokenizer
from .wordtext import _BYTE_OF_SYMBOL, BPEDecoder, _tokenizers

END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: where a document ends


class GPT2Tokenizer(Tokenizer):
    """A pretrained byte-level BPE (GPT-2's), encoding text as given, whole: GPT-2's
    pre-tokenizer joins runs of line breaks and spaces, so text is not cut into pieces.
    (A training text read in chunks is encoded chunk by chunk: at a chunk's edge, a run
    of line breaks may become two tokens instead of one.)"""

    level = "bpe"
    form = "gpt2"  # the type to_dict records
    normalize = False  # decoding gives back exactly the text that was encoded

    def __init__(self, tokenizer_json: str):
        tk = _tokenizers()
        try:
            self._hf = tk.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises Exception subclasses of its own
            raise SmolGPTError(f"malformed gpt2 tokenizer ({exc})") from None
        self._hf.no_padding()
        self._hf.no_truncation()
        self._json = tokenizer_json
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            self.tokens[i] = token
        special = {t.content for t in self._hf.get_added_tokens_decoder().values()}
        # A byte-level token's characters stand for bytes; a special token is its own text.
        self.token_bytes = [
            t.encode()
            if t in special or not set(t) <= _BYTE_OF_SYMBOL.keys()
            # (a token made of byte symbols is those bytes)
            else bytes(_BYTE_OF_SYMBOL[c] for c in t)
            for t in self.tokens
        ]
        self.end_id = vocab.get(END_OF_TEXT)

    @classmethod
    def from_files(cls, folder: Union[str, Path]) -> "GPT2Tokenizer":
        """The tokenizer of a transformers GPT-2 directory: its tokenizer.json, else its
        vocab.json and merges.txt (as GPT2TokenizerFast builds it from them)."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls((folder / "tokenizer.json").read_text(encoding="utf-8"))
        if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            raise SmolGPTError(
                f"{folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
            )
        tk = _tokenizers()
        built = tk.Tokenizer(
            tk.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        )
        # GPT2TokenizerFast's pipeline: byte-level pre-tokenizer and decoder, no prefix space.
        built.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        built.decoder = tk.decoders.ByteLevel()
        # As GPT2TokenizerFast: <|endoftext|> special, after the vocabulary if not in it.
        built.add_special_tokens([END_OF_TEXT])
        return cls(built.to_str())

    @classmethod
    def from_dict(cls, data: dict) -> "GPT2Tokenizer":
        """The tokenizer :meth:`to_dict` describes."""
        return cls(data["tokenizer_json"])

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def read(self, text: str) -> str:
        return text

    def unknown(self, text: str) -> list[str]:
        return []  # every text is bytes, and every byte is a token

    def _encoding(self, text: str):
        try:
            return self._hf.encode(text, add_special_tokens=False)
        except TypeError:  # a lone surrogate: a str that is not Unicode text
            raise SmolGPTError(
                "the text holds characters that are not Unicode (lone surrogates, e.g. "
                "from undecodable bytes): give UTF-8 text"
            ) from None

    def encode(self, text: str) -> list[int]:
        return self._encoding(text).ids if text else []

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def starts(self, text: str) -> list[int]:
        """Where each token begins in text (a token that is part of a character's bytes:
        where that character begins)."""
        return [begin for begin, _ in self._encoding(text).offsets] if text else []

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids; bytes that do not form UTF-8 read as U+FFFD."""
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", "replace")

    def decoder(self) -> BPEDecoder:
        return BPEDecoder(self)

    def default_prompt(self) -> str:
        """A line break (any text encodes)."""
        return "\n"

    def boundary_id(self) -> int:
        """<|endoftext|>, GPT-2's begin and end of every document, where it has one."""
        return self.end_id if self.end_id is not None else super().boundary_id()

    def byte_level_bpe(self) -> tuple[list[str], list[tuple[str, str]]]:
        """GPT-2's vocabulary and merges as they are (tokenizer.json writes a merge as
        "a b" or as ["a", "b"])."""
        merges = json.loads(self._json)["model"]["merges"]
        return list(self.tokens), [
            tuple(m.split(" ", 1) if isinstance(m, str) else m) for m in merges
        ]

    def to_dict(self) -> dict:
        return {"type": self.form, "tokenizer_json": self._json}

    def hf_tokenizer(self):
        return _tokenizers().Tokenizer.from_str(self._json)

    def hf_special_tokens(self) -> dict[str, str]:
        return {"eos_token": END_OF_TEXT} if self.end_id is not None else {}


FORMS[GPT2Tokenizer.form] = GPT2Tokenizer.from_dict
