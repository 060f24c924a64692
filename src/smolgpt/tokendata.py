"""A tokenized corpus (:class:`TokenData`): its train and val ids, its tokenizer, and what
they say about the vocabulary: the share of <UNK> (reported at word level, and refused where
the vocabulary would teach nothing), characters a given tokenizer left out, and the
validation split as text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from .config import TrainConfig
from .errors import SmolGPTError
from .progress import PassMeter
from .sources import Corpus, text_chunks
from .tokenizer import Tokenizer

COUNT_BLOCK = 16 << 20  # token ids compared at a time when counting <UNK>

# At word level, more <UNK> than this in either split is warned about. At the default
# --min_word_freq 3, a whole novel (Sherlock Holmes, 560 KB) has 4.9% <UNK>, a 60 KB part of
# it 16%: beyond about one word in twenty, samples are visibly full of <UNK>.
UNK_WARN_RATE = 0.05
# More <UNK> than this in the training split (or no word in the vocabulary) is refused: the
# model would learn mostly to predict <UNK>, and its loss would look excellent.
UNK_REFUSE_RATE = 0.5


@dataclass
class TokenData:
    """A tokenized corpus: train and val id arrays (memory-mapped) and the tokenizer."""

    source: str
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    fingerprint: str
    # Whether the tokenizer was given (a fine-tuned model's) rather than learned from the text.
    given_tokenizer: bool = False
    # Characters a given char tokenizer does not know, dropped from the text: {char: count}.
    dropped: dict[str, int] = field(default_factory=dict)
    # The corpus, and how many tokens each chunk of iter_text(corpus) made: where the
    # validation text starts (val_text). None for data made without them.
    corpus: Optional[Corpus] = None
    chunk_tokens: Optional[list[int]] = None
    # At bpe level: the character of the text the validation split starts at (text_cut).
    cut: Optional[int] = None

    # The validation split's characters, and the UTF-8 bytes of the words its <UNK> stand
    # for (first token aside): what val bits per character divide by and charge (see
    # smolgpt.evaluate). None for data made without them.
    val_chars: Optional[int] = None
    val_unk_bytes: Optional[int] = None

    def describe(self) -> dict[str, Optional[str]]:
        """What a checkpoint records of the text: its hash, its name as read, and where it is."""
        return {
            "fingerprint": self.fingerprint,
            "source": self.source,
            "path": self.corpus.location if self.corpus else None,
        }

    def val_text(self) -> str:
        """The validation split as text (see :func:`text_from`); encoding it gives the
        validation ids again."""
        if self.corpus is None or self.chunk_tokens is None:
            raise SmolGPTError(f"the validation text of {self.source} is not known here")
        return text_from(self.corpus, self.tokenizer, self.chunk_tokens, len(self.train), self.cut)

    def summary(self) -> str:
        """One line: the token counts, the vocabulary and (word level) the share of <UNK>."""
        total = len(self.train) + len(self.val)
        line = (
            f"{self.source}: {total:,} tokens ({len(self.train):,} train, "
            f"{len(self.val):,} val), vocabulary {self.tokenizer.vocab_size:,}"
        )
        if self.unk_rates is not None:
            train, val = self.unk_rates
            line += f", <UNK> {percent(train)} of train and {percent(val)} of val"
        return line

    @functools.cached_property
    def unk_rates(self) -> Optional[tuple[float, float]]:
        """The share of <UNK> among the train and among the val ids; None at char level."""
        if (unk := self.tokenizer.unk_id) is None:
            return None
        return _share(self.train, unk), _share(self.val, unk)

    def unk_warning(self) -> Optional[str]:
        """A warning when <UNK> is more than UNK_WARN_RATE of either split, else None."""
        if self.unk_rates is None or max(self.unk_rates) <= UNK_WARN_RATE:
            return None
        train, val = self.unk_rates
        return (
            f"<UNK> is {train:.1%} of the training and {val:.1%} of the validation text "
            f"(over {UNK_WARN_RATE:.0%}), so the model will often write <UNK>: "
            f"{_fewer_unk(self.tokenizer.min_word_freq, self.given_tokenizer)}"
        )

    @property
    def dropped_share(self) -> float:
        """The share of the text's characters dropped as unknown to a given char tokenizer."""
        dropped = sum(self.dropped.values())
        return dropped / (dropped + len(self.train) + len(self.val)) if dropped else 0.0

    def dropped_warning(self) -> Optional[str]:
        """A warning naming the characters dropped (the most frequent first), else None."""
        if not self.dropped:
            return None
        common = sorted(self.dropped, key=lambda ch: (-self.dropped[ch], ch))
        shown = ", ".join(repr(ch) for ch in common[:10])
        more = f" and {len(common) - 10} more" if len(common) > 10 else ""
        return (
            f"{sum(self.dropped.values()):,} characters of the text "
            f"({percent(self.dropped_share)}) are not in the vocabulary of the --init_from "
            f"model and were left out: {len(common)} distinct, {shown}{more}"
        )


def percent(share: float) -> str:
    """A share as a percentage to one decimal, never a rounded 0.0% (or 100.0%) beside a
    count that is not zero (or not all): "<0.1%" and ">99.9%" instead."""
    if 0 < share < 0.0005:
        return "<0.1%"
    if 0.9995 <= share < 1:
        return ">99.9%"
    return f"{share:.1%}"


def text_from(
    corpus: Corpus,
    tokenizer: Tokenizer,
    chunk_tokens: list[int],
    token: int,
    cut: Optional[int] = None,
) -> str:
    """The corpus from the first character of its token-th token on, as the tokenizer reads
    it (line endings as LF, normalised quotes): :func:`chunks_from` joined."""
    return "".join(chunks_from(corpus, tokenizer, chunk_tokens, token, cut))


def chunks_from(
    corpus: Corpus,
    tokenizer: Tokenizer,
    chunk_tokens: list[int],
    token: int,
    cut: Optional[int] = None,
    meter: Optional[PassMeter] = None,
) -> Iterator[str]:
    """:func:`text_from` a chunk at a time (memory for one chunk, whatever the corpus's
    size). chunk_tokens: the tokens each chunk of text_chunks(corpus, cut) made, so that only
    the chunk where that token lies is tokenized again (at bpe level, none where the token
    starts a chunk). meter: told the bytes read."""
    before, started = 0, False
    for chunk, count in zip(text_chunks(corpus, cut, meter), chunk_tokens):
        if started:
            yield tokenizer.read(chunk)
        elif before + count > token:
            start = tokenizer.token_start(chunk, token - before)
            started = True
            yield tokenizer.read(chunk)[start:]
        before += count


def _share(ids: np.ndarray, token: int) -> float:
    """The share of token among ids, compared a block at a time (ids may be a memory map
    larger than memory)."""
    hits = sum(
        int(np.count_nonzero(ids[i : i + COUNT_BLOCK] == token))
        for i in range(0, len(ids), COUNT_BLOCK)
    )
    return hits / len(ids) if len(ids) else 0.0


def _fewer_unk(min_word_freq: int, given_tokenizer: bool = False) -> str:
    """What makes fewer words <UNK>: a lower --min_word_freq (half, and no more than the
    default), or more text; with a given (fine-tuned model's) vocabulary, other text."""
    if given_tokenizer:
        return (
            "the vocabulary is the --init_from model's: fine-tune on text closer to what "
            "it learned, or train a new model without --init_from"
        )
    if min_word_freq > 1:
        lower = min(min_word_freq // 2, TrainConfig.min_word_freq)
        return f"keep rarer words with --min_word_freq {lower}, or train on more text"
    return "train on a text with more words, or use --level char"


def check_vocabulary(data: TokenData) -> None:
    """Refuse a word-level vocabulary that would teach nothing: one without a single word
    (punctuation at most), or one that leaves more than UNK_REFUSE_RATE of the training
    text <UNK>; and a given char vocabulary that leaves out more than UNK_REFUSE_RATE of
    the text's characters."""
    tokenizer = data.tokenizer
    if data.dropped_share > UNK_REFUSE_RATE:
        raise SmolGPTError(
            f"{data.dropped_share:.0%} of the characters of {data.source} are not in the "
            "vocabulary of the --init_from model: fine-tune on text in the characters it "
            "knows, or train a new model without --init_from"
        )
    if tokenizer.unk_id is None:  # (only a word vocabulary has <UNK>)
        return
    if data.given_tokenizer and data.unk_rates[0] > UNK_REFUSE_RATE:
        raise SmolGPTError(
            f"{data.unk_rates[0]:.0%} of the training text is <UNK> in the vocabulary of the "
            f"--init_from model: the model would learn nothing from it; "
            f"{_fewer_unk(tokenizer.min_word_freq, True)}"
        )
    words = sum(1 for token in tokenizer.itos[2:] if re.match(r"\w", token))
    train_unk = data.unk_rates[0]
    if words == 0 or train_unk > UNK_REFUSE_RATE:
        raise SmolGPTError(
            f"--min_word_freq {tokenizer.min_word_freq} leaves {words:,} words in the "
            f"vocabulary and {train_unk:.0%} of the training text <UNK>: the model would "
            f"learn nothing from it; {_fewer_unk(tokenizer.min_word_freq)}"
        )
