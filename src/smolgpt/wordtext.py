"""How the word level reads and writes text, apart from any vocabulary: the normalisation
every level reads text through, the word pattern, the rules that join words back with
spaces (detokenization), their form for the tokenizers library, and the streaming decoders
of every level. tokenizer.py builds the tokenizers on these."""

from __future__ import annotations

import codecs
import functools
import re
from typing import Any, Iterable, Iterator

from .errors import SmolGPTError
from .extras import install_command

# A word is letters/digits, possibly joined by apostrophes (don't, holmes's); every other
# non-space character is a token of its own. (’ is for vocabularies from before 0.5.)
WORD_PATTERN = r"\w+(?:['’]\w+)*|[^\w\s]"

# What normalize_text replaces. Books (Project Gutenberg's among them) print quotes and
# apostrophes curly; keyboards type them straight.
TEXT_REPLACEMENTS = (
    ("\ufeff", ""),  # a byte-order mark, or one left mid-text by joining files
    ("\u2018", "'"),
    ("\u2019", "'"),
    ("\u201a", "'"),
    ("\u201b", "'"),  # ‘ ’ ‚ ‛
    ("\u201c", '"'),
    ("\u201d", '"'),
    ("\u201e", '"'),
    ("\u201f", '"'),  # “ ” „ ‟
)


def normalize_text(text: str) -> str:
    """text as the tokenizers read it: CRLF and lone CR line endings as LF, without U+FEFF,
    and with the typographic quotes of TEXT_REPLACEMENTS as ASCII ' and ". Normalising
    twice changes nothing, and neither does normalising piecewise, as long as no piece ends
    between the CR and LF of a CRLF."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    for typographic, plain in TEXT_REPLACEMENTS:
        if typographic in text:  # (a str.replace chain is 10x faster than str.translate)
            text = text.replace(typographic, plain)
    return text


@functools.lru_cache(maxsize=None)
def _splitter():
    # Imported on first use: NLTK takes half a second to import, and char level needs none.
    from nltk.tokenize import RegexpTokenizer

    return RegexpTokenizer(WORD_PATTERN)


# The word pattern runs on pieces of about this many characters: NLTK (3.10.4 on) stops any
# one regular-expression call that runs past 5 s, which a few megabytes of text reach on a
# slow core; a piece costs a few milliseconds.
WORD_PIECE_CHARS = 1 << 14
_SPACE = re.compile(r"\s")


def word_pieces(text: str, size: int = WORD_PIECE_CHARS) -> Iterator[tuple[int, str]]:
    """(offset, piece) for text cut into pieces of about size characters, each but the last
    ending just before a whitespace character. No token of WORD_PATTERN holds whitespace,
    so the pieces' tokens are the whole text's (a text without whitespace stays whole)."""
    start = 0
    while start < len(text):
        found = _SPACE.search(text, start + size)
        end = found.start() if found else len(text)
        yield start, text[start:end]
        start = end


def split_words(text: str) -> list[str]:
    """The tokens of WORD_PATTERN in text, in order, found piece by piece (word_pieces)."""
    return [word for _, piece in word_pieces(text) for word in _splitter().tokenize(piece)]


def word_starts(text: str) -> list[int]:
    """Where each token of split_words(text) begins in text."""
    return [
        offset + start
        for offset, piece in word_pieces(text)
        for start, _ in _splitter().span_tokenize(piece)
    ]


# Detokenization: marks that hug the previous token, and marks the next token hugs. (The
# curly quotes are in vocabularies from before 0.5 only.)
NO_SPACE_BEFORE = set(".,;:!?)]}%”’…") | {"n't"}
NO_SPACE_AFTER = set("([{“‘$#")
JOINERS = set("-—–/")  # hyphens, dashes and slashes join their neighbours: red-headed
TOGGLE_QUOTES = set("\"'")  # ASCII quotes: alternately opening and closing


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


def _tokenizers():
    """The tokenizers library, or a SmolGPTError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise SmolGPTError(
            f"--level bpe needs the tokenizers library: {install_command('bpe')}"
        ) from None
    return tokenizers


def _hf_word_decoder():
    """Tokens joined by spaces, then the spaces WordTokenizer.decode leaves out removed
    again (all but those around ASCII quotes: see smolgpt.hf's docstring)."""
    decoders, regex = _tokenizers().decoders, _tokenizers().Regex

    # WordPiece's decoder without its cleanup only joins with spaces (no token of ours
    # starts with its "##"); Fuse makes one string for the replacements to work on.
    steps = [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse()]
    for mark in sorted(NO_SPACE_BEFORE | JOINERS):
        # A mark of one character is always a token of its own; "n't" could begin a word.
        before = " " + mark if len(mark) == 1 else regex(f" {mark}(?= |$)")
        steps.append(decoders.Replace(before, mark))
    for mark in sorted(NO_SPACE_AFTER | JOINERS):
        steps.append(decoders.Replace(mark + " ", mark))
    return decoders.Sequence(steps)


class CharDecoder:
    """Text of ids given a few at a time; the pieces join into :meth:`CharTokenizer.decode`."""

    def __init__(self, tokenizer: Any):  # a CharTokenizer (tokenizer.py, above)
        self.chars = tokenizer.chars

    def add(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def flush(self) -> str:
        return ""  # nothing is ever held back


class WordDecoder:
    """Text of ids given a few at a time; the pieces join into :meth:`WordTokenizer.decode`.

    Whether a space goes before a token depends on the token before it (an opening bracket
    takes none after it) and on the quotes opened so far, so the decoder keeps both. A token's
    text therefore never changes once given: what streams out is the final text.
    """

    def __init__(self, tokenizer: Any):  # a WordTokenizer (tokenizer.py, above)
        self.itos = tokenizer.itos
        self.glue_next = True  # no space before the very first token
        self.open_quotes = {q: False for q in TOGGLE_QUOTES}

    def add(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        for i in ids:
            tok = self.itos[i]
            if tok in TOGGLE_QUOTES:
                opening = not self.open_quotes[tok]
                self.open_quotes[tok] = opening
                glue_before, glue_after = not opening, opening
            else:
                glue_before = tok in NO_SPACE_BEFORE or tok in JOINERS
                glue_after = tok in NO_SPACE_AFTER or tok in JOINERS
            if not (self.glue_next or glue_before):
                out.append(" ")
            out.append(tok)
            self.glue_next = glue_after
        return "".join(out)

    def flush(self) -> str:
        return ""  # nothing is ever held back


# Byte-level BPE. GPT-2's alphabet: one printable character for each byte value, so that
# merges work on strings. Printable bytes stand for themselves; the others, in order, for the
# characters from U+0100 on (a space is "Ġ", a line break "Ċ").
_PRINTABLE_BYTES = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
BYTE_SYMBOLS = [
    chr(b)
    if b in _PRINTABLE_BYTES
    else chr(0x100 + sum(1 for c in range(b) if c not in _PRINTABLE_BYTES))
    for b in range(256)
]
_BYTE_OF_SYMBOL = {symbol: b for b, symbol in enumerate(BYTE_SYMBOLS)}


class BPEDecoder:
    """Text of ids given a few at a time, for a byte-level tokenizer (``token_bytes``: each
    id's bytes); the pieces (and :meth:`flush`) join into its decode. A character whose bytes
    are split over tokens appears once its last byte arrives."""

    def __init__(self, tokenizer: Any):
        self.token_bytes = tokenizer.token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, ids: Iterable[int]) -> str:
        return self.utf8.decode(b"".join(self.token_bytes[i] for i in ids))

    def flush(self) -> str:
        """The bytes held back for a character that never completed, as U+FFFD."""
        return self.utf8.decode(b"", final=True)
