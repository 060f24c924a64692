"""Text <-> token ids, at character, word or byte-pair level.

Each tokenizer learns its vocabulary from the training text (GPT-2's own, in
:mod:`smolgpt.gpt2tokenizer`, is pretrained), turns text into ids and back, and serialises to
JSON-compatible data (:meth:`to_dict` / :func:`tokenizer_from_dict`) that every checkpoint
carries, so a checkpoint alone is enough to generate.

:class:`Tokenizer` is what every level does (an abstract base class); each level is a
subclass that carries its own behaviour: its default prompt, its ``<UNK>`` (if any) and
what bits-per-char charges for it, its ``tokenizers`` form for exports, what a checkpoint
stores. The rest of smolgpt calls these methods and never asks which class it has.

The char and word tokenizers read text and prompts through :func:`normalize_text` (LF line
ends, no byte-order marks, ASCII quotes: a typed ``don't`` is the book's ``don’t``).

- :class:`CharTokenizer`: one id per distinct character of the corpus, in code-point order.
- :class:`WordTokenizer`: lowercased words and punctuation marks split by an NLTK regular
  expression tokenizer (it needs no downloaded models, unlike ``nltk.word_tokenize``), words
  seen fewer than ``min_word_freq`` times mapped to ``<UNK>``. Ids 0 and 1 are ``<PAD>`` and
  ``<UNK>``. Decoding re-attaches punctuation so the text reads naturally.
- :class:`BPETokenizer`: byte-level byte-pair encoding, as GPT-2's: the 256 byte values,
  then the most frequent adjacent pairs merged into new tokens until the vocabulary has
  ``vocab_size`` tokens, learned by the ``tokenizers`` library. Any text encodes (a
  character it never saw is spelled in bytes) and decodes back exactly: it reads text as
  given, without normalising.
"""

from __future__ import annotations

import bisect
import itertools
import json
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, Callable, Iterable, Optional

import numpy as np

from .config import LEVELS, check_vocab_size
from .errors import SmolGPTError
from .wordtext import (
    _BYTE_OF_SYMBOL,
    BYTE_SYMBOLS,
    HF_WORD_PATTERN,
    TEXT_REPLACEMENTS,
    BPEDecoder,
    CharDecoder,
    WordDecoder,
    _hf_word_decoder,
    _tokenizers,
    normalize_text,
    split_words,
    word_starts,
)


class Tokenizer(ABC):
    """What every level's tokenizer does; the rest of smolgpt uses tokenizers through this
    class only, and each level (:class:`CharTokenizer`, :class:`WordTokenizer`,
    :class:`BPETokenizer`) is a subclass that says how it does it.

    Class attributes: ``level`` ("char", "word" or "bpe", also the ``type`` its
    :meth:`to_dict` records), ``unk_id`` (the id of ``<UNK>``, None where no text becomes an
    unknown token), ``pad_id`` (the id of ``<PAD>``, or None), ``end_id`` (a pretrained
    tokenizer's end-of-text token, GPT-2's; None for smolgpt's own), and
    ``multiprocess_encoding`` (whether a large text encodes faster spread over processes).
    """

    level: str
    normalize: bool
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    end_id: Optional[int] = None
    multiprocess_encoding = False

    # ---------------------------------------------------------------- text <-> ids

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """How many ids there are (0 .. vocab_size - 1)."""

    def read(self, text: str) -> str:
        """text as this tokenizer reads it (normalize_text, unless normalize is off)."""
        return normalize_text(text) if self.normalize else text

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of text; SmolGPTError where it cannot be encoded."""

    @abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """The ids of text as an int64 array (fast, for large texts)."""

    def encode_known(self, text: str, dropped: Counter) -> np.ndarray:
        """The ids of text, leaving out (and counting into dropped) the characters this
        tokenizer cannot encode at all. Only a char tokenizer has such characters (a word
        tokenizer reads what it does not know as <UNK>, a bpe one spells it in bytes)."""
        return self.encode_array(text)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids."""

    @abstractmethod
    def decoder(self) -> Any:
        """An incremental decoder: text for ids given a few at a time (for streaming), with
        ``add(ids) -> str`` and ``flush() -> str``."""

    @abstractmethod
    def starts(self, text: str) -> list[int]:
        """Where each token of encode(text) begins in read(text)."""

    def token_start(self, text: str, index: int) -> int:
        """Where the index-th token of encode(text) begins in read(text)."""
        return self.starts(text)[index]

    # ---------------------------------------------------------------- unknown text

    @abstractmethod
    def unknown(self, text: str) -> list[str]:
        """What of text is not in the vocabulary, in order of first appearance: characters
        encode refuses where unk_id is None, words read as <UNK> where it is not."""

    def charged_unk_bytes(self, text: str, first: bool = True) -> int:
        """What bits-per-char charges for the <UNK> tokens of encode(text): the UTF-8 bytes
        of the words they stand for, all but the first token's where text comes first (the
        first token is never predicted; first=False: text continues a text before it).
        0 for a tokenizer without <UNK>."""
        return 0

    # ---------------------------------------------------------------- about the vocabulary

    @abstractmethod
    def default_prompt(self) -> str:
        """A prompt the model can read, for when none is given."""

    def frequent_ids(self, count: int) -> list[int]:
        """Up to count ids of the commonest tokens of the training text, most common first,
        as far as the vocabulary alone tells (a word vocabulary is in order of frequency);
        [] where it does not."""
        return []

    def training_settings(self) -> dict[str, Any]:
        """The training settings this vocabulary was learned with, by the names a run
        records them under (min_word_freq, vocab_size); {} where none applies."""
        return {}

    # ---------------------------------------------------------------- stored and exported

    @abstractmethod
    def to_dict(self) -> dict:
        """Plain JSON-compatible data that :func:`tokenizer_from_dict` rebuilds this
        tokenizer from: what a checkpoint stores."""

    @abstractmethod
    def hf_tokenizer(self):
        """A ``tokenizers.Tokenizer`` that gives the ids this tokenizer gives (same
        normalisation, splitting and vocabulary; no BOS or EOS added), for an export to
        transformers (see :mod:`smolgpt.hf`). Needs the tokenizers library."""

    def hf_special_tokens(self) -> dict[str, str]:
        """The special tokens an exported ``tokenizer_config.json`` names (pad_token,
        unk_token); {} where there are none."""
        return {}

    def boundary_id(self) -> int:
        """The begin token exports name (which lm-evaluation-harness starts texts from): the
        one smolgpt's generation starts from, its default prompt's (a line break)."""
        return self.encode(self.default_prompt())[0]

    def byte_level_bpe(self) -> tuple[list[str], list[tuple[str, str]]]:
        """(tokens, merges) of a byte-level BPE (tokens in BYTE_SYMBOLS) that encodes text to
        this tokenizer's ids, for GGUF (smolgpt.gguf_export); SmolGPTError where none does."""
        raise SmolGPTError(
            f"a {self.level}-level vocabulary has no exact GGUF form (GGUF tokenizers split "
            "text into pieces of its bytes): export it with --format hf"
        )


def _hf_normalizers(tokenizer: Tokenizer) -> list:
    """normalize_text as tokenizers normalizers, replacement by replacement ([] where the
    tokenizer reads text as given)."""
    if not tokenizer.normalize:
        return []
    normalizers = _tokenizers().normalizers
    steps = [normalizers.Replace("\r\n", "\n"), normalizers.Replace("\r", "\n")]
    return steps + [normalizers.Replace(old, new) for old, new in TEXT_REPLACEMENTS]


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is every character of the training text
    (normalised, so it holds no CR, byte-order mark or curly quote)."""

    level = "char"

    def __init__(self, chars: Iterable[str], normalize: bool = True):
        self.normalize = normalize
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
            seen.update(normalize_text(chunk))
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Characters of text that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in self.read(text) if ch not in self.stoi))

    def encode(self, text: str) -> list[int]:
        text = self.read(text)
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
        text = self.read(text)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codepoints, cps)
        if ids.size and (ids.max() >= len(self.chars) or (self._codepoints[ids] != cps).any()):
            self.encode(text)  # raises, naming the characters
        return ids.astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def starts(self, text: str) -> list[int]:
        """Where each token of text begins in read(text): every character the vocabulary
        knows (characters it does not know are skipped, as tokencache.prepare leaves them out)."""
        return [i for i, ch in enumerate(self.read(text)) if ch in self.stoi]

    def encode_known(self, text: str, dropped: Counter) -> np.ndarray:
        """The ids of text's characters, leaving out (and counting into dropped) those the
        vocabulary lacks. A char tokenizer has no unknown id; a learned one knows every
        character of its text, a given one (a fine-tuned model's) may not."""
        text = self.read(text)
        missing = set(text).difference(self.stoi)
        if missing:
            for ch in missing:
                dropped[ch] += text.count(ch)
            text = text.translate(dict.fromkeys(map(ord, missing)))
        return self.encode_array(text)

    def decoder(self) -> "CharDecoder":
        """An incremental decoder: text for ids given a few at a time (for streaming)."""
        return CharDecoder(self)

    def default_prompt(self) -> str:
        """A line break, if the training text had any; else its last character."""
        return "\n" if "\n" in self.stoi else self.chars[-1]

    def byte_level_bpe(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Each character as its UTF-8 bytes, with merges that join those bytes left to right
        and nothing else: no merge ever joins two characters."""
        tokens = ["".join(BYTE_SYMBOLS[b] for b in ch.encode()) for ch in self.chars]
        merges = {(t[:i], t[i]): None for t in tokens for i in range(1, len(t))}
        return tokens, list(merges)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": list(self.chars), "normalize": self.normalize}

    def hf_tokenizer(self):
        """One token per character; no unknown token: a character outside the vocabulary
        is an error, as in smolgpt."""
        tk = _tokenizers()
        hf = tk.Tokenizer(tk.models.WordLevel(vocab=self.stoi))
        hf.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), "isolated")
        hf.decoder = tk.decoders.Fuse()  # characters joined as they are
        if steps := _hf_normalizers(self):
            hf.normalizer = tk.normalizers.Sequence(steps)
        return hf


class WordTokenizer(Tokenizer):
    """Lowercased words and punctuation of normalised text; rare words become <UNK>."""

    level = "word"
    PAD, UNK = "<PAD>", "<UNK>"
    PAD_ID, UNK_ID = 0, 1
    pad_id, unk_id = PAD_ID, UNK_ID
    multiprocess_encoding = True  # NLTK's splitting is Python, one core per process

    def __init__(self, words: Iterable[str], min_word_freq: int = 3, normalize: bool = True):
        self.normalize = normalize
        self.itos = [self.PAD, self.UNK] + [w for w in words if w not in (self.PAD, self.UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.min_word_freq = min_word_freq

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercase and split into word and punctuation tokens (text as it is given)."""
        return split_words(text.lower())

    @staticmethod
    def count(text: str) -> Counter:
        """How often each token occurs in the normalised text (what training counts)."""
        return Counter(WordTokenizer.split(normalize_text(text)))

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
            counts.update(cls.count(chunk))
        return cls.from_counts(counts, min_word_freq)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def unknown(self, text: str) -> list[str]:
        return list(dict.fromkeys(w for w in self.split(self.read(text)) if w not in self.stoi))

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.UNK_ID) for w in self.split(self.read(text))]

    def unk_bytes(self, text: str) -> list[int]:
        """For each token of encode(text): the UTF-8 bytes of the (lowercased) word an
        <UNK> stands for, 0 for a known word."""
        return [
            0 if w in self.stoi else len(w.encode("utf-8")) for w in self.split(self.read(text))
        ]

    def charged_unk_bytes(self, text: str, first: bool = True) -> int:
        return sum(self.unk_bytes(text)[1 if first else 0 :])

    def starts(self, text: str) -> list[int]:
        """Where each token of encode(text) begins in read(text)."""
        text = self.read(text)
        lowered = text.lower()
        starts = word_starts(lowered)
        if len(lowered) == len(text):  # lowercasing kept every position
            return starts
        # A few characters lowercase to two (İ: i + a combining dot): map positions back.
        ends = list(itertools.accumulate(len(ch.lower()) for ch in text))
        return [bisect.bisect_right(ends, start) for start in starts]

    def encode_array(self, text: str) -> np.ndarray:
        return np.fromiter(
            (self.stoi.get(w, self.UNK_ID) for w in self.split(self.read(text))), dtype=np.int64
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Join tokens with spaces, except where punctuation attaches to a neighbour."""
        return self.decoder().add(ids)

    def decoder(self) -> "WordDecoder":
        """An incremental decoder: text for ids given a few at a time (for streaming)."""
        return WordDecoder(self)

    def default_prompt(self) -> str:
        """The most frequent word (the vocabulary is by frequency); else the last token."""
        return next((w for w in self.itos if w.isalpha()), self.itos[-1])

    def frequent_ids(self, count: int) -> list[int]:
        """The first count words after <PAD> and <UNK>: the vocabulary is by frequency."""
        return list(range(2, min(self.vocab_size, 2 + count)))

    def training_settings(self) -> dict[str, Any]:
        return {"min_word_freq": self.min_word_freq}

    def to_dict(self) -> dict:
        return {
            "type": "word",
            "words": self.itos[2:],
            "min_word_freq": self.min_word_freq,
            "normalize": self.normalize,
        }

    def hf_tokenizer(self):
        """The same words (HF_WORD_PATTERN) and vocabulary, <UNK> for the rest; decoding
        joins as :meth:`decode` does, but for ASCII quotes (see :mod:`smolgpt.hf`)."""
        tk = _tokenizers()
        hf = tk.Tokenizer(tk.models.WordLevel(vocab=self.stoi, unk_token=self.UNK))
        steps = _hf_normalizers(self) + [tk.normalizers.Lowercase()]
        # The matches of the pattern are the tokens; what lies between them (space) goes.
        hf.pre_tokenizer = tk.pre_tokenizers.Split(
            tk.Regex(HF_WORD_PATTERN), "removed", invert=True
        )
        hf.decoder = _hf_word_decoder()
        hf.add_special_tokens([self.PAD, self.UNK])
        hf.normalizer = tk.normalizers.Sequence(steps)
        return hf

    def hf_special_tokens(self) -> dict[str, str]:
        return {"pad_token": self.PAD, "unk_token": self.UNK}

    def boundary_id(self) -> int:
        return self.pad_id  # not a word: transformers would cut a special "the" from "theatre"


# Text is encoded in pieces of about this many characters, cut after line breaks, on all
# cores at once; the pieces give the same ids as the whole (see BPETokenizer).
BPE_PIECE_CHARS = 1 << 16


def _pieces(text: str, size: int = BPE_PIECE_CHARS) -> list[str]:
    """text cut into pieces of at least size characters (the last may be shorter), each
    ending just after a line break (but the last)."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size - 1) + 1 or len(text)
        pieces.append(text[start:cut])
        start = cut
    return pieces


class BPETokenizer(Tokenizer):
    """Byte-level byte-pair encoding learned by the tokenizers library (no merge loop here).

    Text is first cut into pre-tokens: every line break on its own, then GPT-2's pattern
    (a word with the space before it, a number, a run of punctuation, whitespace); each
    pre-token's UTF-8 bytes are merged by the learned merges, in the order learned. Because
    a line break is always a pre-token of its own, text cut just after a line break encodes
    to the ids of its pieces joined: a large text is encoded piece by piece on all cores,
    and a file read in chunks gives the ids of the whole. (GPT-2 also merges runs of line
    breaks; here each costs one token.)"""

    level = "bpe"
    normalize = False  # decoding must give back exactly the text that was encoded

    def __init__(self, vocab: list[str], merges: Iterable[Iterable[str]]):
        tk = _tokenizers()
        self.vocab = list(vocab)
        self.merges = [tuple(pair) for pair in merges]
        ids = {token: i for i, token in enumerate(self.vocab)}
        if (
            len(ids) != len(self.vocab)
            or not set(BYTE_SYMBOLS) <= ids.keys()
            or any(len(pair) != 2 or "".join(pair) not in ids for pair in self.merges)
        ):
            raise SmolGPTError(
                "malformed bpe tokenizer: its vocabulary lacks byte values or "
                "the tokens its merges make"
            )
        self._hf = tk.Tokenizer(tk.models.BPE(vocab=ids, merges=self.merges))
        self._hf.pre_tokenizer = self.pre_tokenizer()
        self._hf.decoder = tk.decoders.ByteLevel()  # (for exports; decode is ours)
        self.token_bytes = [bytes(_BYTE_OF_SYMBOL[c] for c in token) for token in self.vocab]

    @staticmethod
    def pre_tokenizer():
        tk = _tokenizers()
        return tk.pre_tokenizers.Sequence(
            [
                tk.pre_tokenizers.Split("\n", "isolated"),
                tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int, strict: bool = True) -> "BPETokenizer":
        """Learn merges from chunks of text until the vocabulary holds vocab_size tokens.
        SmolGPTError where vocab_size is below the 256 byte values, or (strict) above what
        the text allows (every adjacent pair of its pre-tokens merged); not strict, the
        vocabulary is then smaller."""
        check_vocab_size(vocab_size)
        tk = _tokenizers()
        learner = tk.Tokenizer(tk.models.BPE())
        learner.pre_tokenizer = cls.pre_tokenizer()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        )
        learner.train_from_iterator(
            (piece for chunk in chunks for piece in _pieces(chunk)), trainer
        )
        model = json.loads(learner.to_str())["model"]
        vocab = sorted(model["vocab"], key=model["vocab"].get)
        if len(vocab) < vocab_size and strict:
            raise SmolGPTError(
                f"--vocab_size {vocab_size} is more than the training text allows: merging "
                f"every pair in it gives {len(vocab)} tokens; use --vocab_size {len(vocab)} "
                "or less, or train on more text"
            )
        return cls(vocab, model["merges"])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def read(self, text: str) -> str:
        return text

    def unknown(self, text: str) -> list[str]:
        return []  # every text is bytes, and every byte is a token

    def _encodings(self, text: str, offsets: bool) -> list:
        pieces = _pieces(text)
        try:
            return self._hf.encode_batch(pieces) if offsets else self._hf.encode_batch_fast(pieces)
        except TypeError:  # a lone surrogate: a str that is not Unicode text
            raise SmolGPTError(
                "the text holds characters that are not Unicode (lone "
                "surrogates, e.g. from undecodable bytes): give UTF-8 "
                "text"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        ids = [e.ids for e in self._encodings(text, offsets=False)]
        return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def token_start(self, text: str, index: int) -> int:
        # (no character is ever skipped: the first token starts the text)
        return 0 if index == 0 else self.starts(text)[index]

    def starts(self, text: str) -> list[int]:
        """Where each token of encode(text) begins in text (a token that is part of a
        character's bytes: where that character begins)."""
        found, start = [], 0
        for piece, encoding in zip(_pieces(text), self._encodings(text, offsets=True)):
            found.extend(start + begin for begin, _ in encoding.offsets)
            start += len(piece)
        return found

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids; bytes that do not form UTF-8 (a model may sample them) read as
        U+FFFD."""
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", "replace")

    def decoder(self) -> "BPEDecoder":
        """An incremental decoder: text for ids given a few at a time (for streaming)."""
        return BPEDecoder(self)

    def default_prompt(self) -> str:
        """A line break (any text encodes)."""
        return "\n"

    def training_settings(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size}

    def hf_tokenizer(self):
        """A copy of the tokenizers library's object that does the encoding."""
        return _tokenizers().Tokenizer.from_str(self._hf.to_str())

    def byte_level_bpe(self) -> tuple[list[str], list[tuple[str, str]]]:
        return list(self.vocab), list(self.merges)  # learned as such

    def to_dict(self) -> dict:
        return {"type": "bpe", "vocab": self.vocab, "merges": [list(m) for m in self.merges]}


# Stored forms beyond the levels' own: type -> rebuild(data), added by gpt2tokenizer ("gpt2").
FORMS: dict[str, Callable[[dict], Tokenizer]] = {}


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`to_dict` output (as stored in a checkpoint)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in LEVELS and kind not in FORMS:  # a level's tokenizer has its level as type
        raise SmolGPTError(f"unknown tokenizer type {kind!r} in checkpoint")
    # A tokenizer saved before 0.5 has no "normalize": it learned from text as given, and
    # reads prompts the same way.
    normalize = bool(data.get("normalize", False))
    try:
        if kind in FORMS:
            return FORMS[kind](data)
        if kind == "char":
            return CharTokenizer(data["chars"], normalize)
        if kind == "bpe":
            return BPETokenizer(data["vocab"], data["merges"])
        return WordTokenizer(data["words"], data.get("min_word_freq", 3), normalize)
    except (KeyError, TypeError) as exc:
        raise SmolGPTError(f"malformed {kind} tokenizer in checkpoint ({exc!r})") from None
