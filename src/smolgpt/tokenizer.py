"""Text <-> token ids, at character or word level.

Both tokenizers learn their vocabulary from the training text, turn text into ids and back,
and serialise to plain JSON-compatible data (:meth:`to_dict` / :func:`tokenizer_from_dict`),
which every checkpoint carries, so a checkpoint alone is enough to generate.

- :class:`CharTokenizer`: one id per distinct character of the corpus, in code-point order.
- :class:`WordTokenizer`: lowercased words and punctuation marks split by an NLTK regular
  expression tokenizer (it needs no downloaded models, unlike ``nltk.word_tokenize``), words
  seen fewer than ``min_word_freq`` times mapped to ``<UNK>``. Ids 0 and 1 are ``<PAD>`` and
  ``<UNK>``. Decoding re-attaches punctuation so the text reads naturally.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Union

import functools

import numpy as np

from .config import LEVELS
from .errors import SmolGPTError

# A word is letters/digits, possibly joined by apostrophes (don't, holmes's); every other
# non-space character is a token of its own.
WORD_PATTERN = r"\w+(?:['’]\w+)*|[^\w\s]"


@functools.lru_cache(maxsize=None)
def _splitter():
    # Imported on first use: NLTK takes half a second to import, and char level needs none.
    from nltk.tokenize import RegexpTokenizer

    return RegexpTokenizer(WORD_PATTERN)

# Detokenization: marks that hug the previous token, and marks the next token hugs.
_NO_SPACE_BEFORE = set(".,;:!?)]}%”’…") | {"n't"}
_NO_SPACE_AFTER = set("([{“‘$#")
_JOINERS = set("-—–/")  # hyphens, dashes and slashes join their neighbours: red-headed
_TOGGLE_QUOTES = set("\"'")  # ASCII quotes: alternately opening and closing


class CharTokenizer:
    """One token per character; the vocabulary is every character of the training text."""

    level = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise SmolGPTError("cannot build a character vocabulary from empty text")
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        # Code points in id order, for vectorised encoding with np.searchsorted.
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def train(cls, chunks: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for chunk in chunks:
            seen.update(chunk)
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Characters of text that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(ch) for ch in missing[:10])
            raise SmolGPTError(
                f"characters not in the model's vocabulary: {shown}; "
                "remove them from the prompt (a character-level model knows only the "
                "characters of its training text)"
            )
        return [self.stoi[ch] for ch in text]

    def encode_array(self, text: str) -> np.ndarray:
        """Fast encoding of a large text known to be covered by the vocabulary."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codepoints, cps)
        if ids.size and (ids.max() >= len(self.chars) or (self._codepoints[ids] != cps).any()):
            self.encode(text)  # raises, naming the characters
        return ids.astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": list(self.chars)}


class WordTokenizer:
    """Lowercased words and punctuation; rare words become <UNK>."""

    level = "word"
    PAD, UNK = "<PAD>", "<UNK>"
    PAD_ID, UNK_ID = 0, 1

    def __init__(self, words: Iterable[str], min_word_freq: int = 3):
        self.itos = [self.PAD, self.UNK] + [w for w in words if w not in (self.PAD, self.UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.min_word_freq = min_word_freq

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercase and split into word and punctuation tokens."""
        return _splitter().tokenize(text.lower())

    @staticmethod
    def count(text: str) -> Counter:
        return Counter(WordTokenizer.split(text))

    @classmethod
    def from_counts(cls, counts: Counter, min_word_freq: int = 3) -> "WordTokenizer":
        """Keep words seen at least min_word_freq times, most frequent first (ties A-Z)."""
        kept = [w for w, n in counts.items() if n >= min_word_freq]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(kept, min_word_freq)

    @classmethod
    def train(cls, chunks: Iterable[str], min_word_freq: int = 3) -> "WordTokenizer":
        counts: Counter = Counter()
        for chunk in chunks:
            counts.update(cls.split(chunk))
        return cls.from_counts(counts, min_word_freq)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def unknown(self, text: str) -> list[str]:
        return list(dict.fromkeys(w for w in self.split(text) if w not in self.stoi))

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.UNK_ID) for w in self.split(text)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.fromiter(
            (self.stoi.get(w, self.UNK_ID) for w in self.split(text)), dtype=np.int64
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Join tokens with spaces, except where punctuation attaches to a neighbour."""
        out: list[str] = []
        glue_next = True  # no space before the very first token
        open_quotes = {q: False for q in _TOGGLE_QUOTES}
        for i in ids:
            tok = self.itos[i]
            if tok in _TOGGLE_QUOTES:
                opening = not open_quotes[tok]
                open_quotes[tok] = opening
                glue_before, glue_after = not opening, opening
            else:
                glue_before = tok in _NO_SPACE_BEFORE or tok in _JOINERS
                glue_after = tok in _NO_SPACE_AFTER or tok in _JOINERS
            if out and not (glue_next or glue_before):
                out.append(" ")
            out.append(tok)
            glue_next = glue_after
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "word", "words": self.itos[2:], "min_word_freq": self.min_word_freq}


Tokenizer = Union[CharTokenizer, WordTokenizer]


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`to_dict` output (as stored in a checkpoint)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in LEVELS:  # a tokenizer's type is the level it tokenizes at
        raise SmolGPTError(f"unknown tokenizer type {kind!r} in checkpoint")
    try:
        if kind == "char":
            return CharTokenizer(data["chars"])
        return WordTokenizer(data["words"], data.get("min_word_freq", 3))
    except (KeyError, TypeError) as exc:
        raise SmolGPTError(f"malformed {kind} tokenizer in checkpoint ({exc!r})") from None
