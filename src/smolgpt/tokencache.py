"""The token cache: a corpus is tokenized once, and its ids kept on disk.

:func:`prepare` reads the text in chunks (so a corpus larger than memory works), learns the
tokenizer, encodes everything once, and caches the ids on disk (``tokens.bin``, memory-mapped
when read, beside ``meta.json``), keyed by the text's SHA-256, its --encoding and the
tokenizer settings; the next run with the same text starts at once. (A fine-tuning run gives
its source model's tokenizer instead of learning one: the cache is then keyed by that
tokenizer.) The tokenizer normalises the text (:func:`~smolgpt.wordtext.normalize_text`: no
byte-order mark, typographic quotes as ASCII). At word level, training is refused when the
vocabulary would teach nothing, and the share of <UNK> is reported. Word-level tokenization
is spread over all CPU cores. Every open checks the cached ids against the size and CRC-32
recorded when they were written, and rebuilds an entry that was damaged since (cut short, a
flipped bit, lost or garbled metadata) instead of training on what is left.

The ids are split 90/10, contiguously, validation last. At bpe level the text is split
instead (at the first line break after 90% of its characters, :func:`~smolgpt.sources.text_cut`),
before the tokenizer is learned, so that it learns from the training split only, and each
split is tokenized on its own.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import json
import logging
import os
import shutil
import signal
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from . import (
    gpt2tokenizer,  # noqa: F401 - tokenizer_from_dict rebuilds its "gpt2" form
    sources,
)
from .config import LEVELS, check_vocab_size
from .errors import SmolGPTError
from .files import atomic_write, atomic_write_text, cache_dir
from .progress import PassMeter
from .sources import (
    TRAIN_FRACTION,
    Corpus,
    corpus_bytes,
    fingerprint,
    iter_text,
    text_chunks,
    text_cut,
)
from .tokendata import TokenData, check_vocabulary, chunks_from
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

# Bump when tokenization or the entry's layout changes, so old caches are not reused.
# 2 (smolgpt 0.4): meta.json records the format, size and CRC-32 of tokens.bin.
# 3 (smolgpt 0.5): line endings, byte-order marks and quotes normalised; keyed by encoding.
# 4 (smolgpt 0.7): meta.json records the tokens of each chunk read (TokenData.val_text).
# 5 (smolgpt 0.8): meta.json records the split (and at bpe level the character it is at).
# 6 (smolgpt 0.13): a line longer than a chunk is cut at a space (sources.iter_text).
CACHE_FORMAT = 6
CHECKSUM_BLOCK = 16 << 20  # bytes read at a time when checking tokens.bin
# At bpe level, merges are learned from at most this many characters of the training split,
# taken evenly from all of it: the pair counts of a larger text change little, and learning
# costs about 0.17 s per MB on 2 cores (15.4 s for 90 MB: benchmarks/RESULTS.md).
BPE_LEARN_CHARS = 20_000_000


# At word level, every distinct word seen is counted in one dict (about 100 bytes each).
# Real text keeps meeting new words (names, numbers, typos): past this many, the words seen
# only once so far are forgotten (then twice, ... until half remain), so a corpus of
# gigabytes is counted in bounded memory. A word forgotten early and seen again later is
# undercounted by what was forgotten; only words near --min_word_freq can change sides.
WORD_COUNT_LIMIT = 2_000_000
# Chunks a process pool holds at a time, per worker: Executor.map would submit every chunk
# of the corpus at once, reading all of it into memory.
CHUNKS_AHEAD = 2


def _word_counts(chunk: str) -> Counter:
    return WordTokenizer.count(chunk)


_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_dict: Optional[dict] = None) -> None:
    """In each worker process: leave Ctrl-C to the main process (which stops the pool and
    says so in one line) and, for encoding, rebuild the tokenizer."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # (blocked by _pool)
    if tokenizer_dict is not None:
        _worker_tokenizer = tokenizer_from_dict(tokenizer_dict)


def _encode_chunk(chunk: str) -> np.ndarray:
    return _worker_tokenizer.encode_array(chunk)


def _pool_map(pool: ProcessPoolExecutor, fn, items: Iterable, ahead: int) -> Iterator:
    """fn over items on the pool, results in order, with at most ahead items in flight."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _pool(workers: int, tokenizer_dict: Optional[dict] = None) -> ProcessPoolExecutor:
    """A pool of workers, started now with SIGINT blocked: a Ctrl-C that lands while they
    are being forked waits in the main process until they ignore it, then interrupts it."""
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer_dict,))
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pool.submit(os.getpid)  # (the first task forks every worker)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    except BaseException:  # the Ctrl-C that waited, or a failed fork
        _stop(pool)
        raise
    return pool


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the pool: chunks not started are dropped (after an interrupt, at once)."""
    pool.shutdown(cancel_futures=True)


def prune_counts(counts: Counter, limit: int) -> None:
    """Forget the rarest words of counts (seen once, then twice, ...) until at most half of
    limit remain, where it holds more than limit: see WORD_COUNT_LIMIT."""
    if len(counts) <= limit:
        return
    floor = 1
    while len(counts) > limit // 2:
        for word in [w for w, n in counts.items() if n <= floor]:
            del counts[word]
        floor += 1
    log.info("more than %d distinct words: forgot those seen fewer than %d times", limit, floor)


def _meter(what: str, corpus: Corpus) -> PassMeter:
    return PassMeter(f"{what} {Path(corpus.name).name}", corpus_bytes(corpus))


def _workers(corpus: Corpus) -> int:
    # sources.CHUNK_BYTES read at call time, as iter_text and fingerprint read it.
    chunk_bytes = sources.CHUNK_BYTES
    size = sum(p.stat().st_size for p in corpus.paths)
    if size < 2 * chunk_bytes:  # a process pool costs more than it saves on small texts
        return 1
    return max(1, min(os.cpu_count() or 1, size // chunk_bytes))


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
    with _meter("learning the vocabulary of", corpus) as meter:
        if level == "char":
            return CharTokenizer.train(iter_text(corpus, meter=meter))
        if level == "bpe":
            return _learn_bpe(corpus, vocab_size, cut, strict, meter)
        return _learn_words(corpus, min_word_freq, meter)


def _learn_bpe(
    corpus: Corpus, vocab_size: int, cut: int, strict: bool, meter: PassMeter
) -> BPETokenizer:
    """Merges learned from an even sample of the text before cut (BPE_LEARN_CHARS)."""
    bpe = BPETokenizer.train(
        _sample(_before(corpus, cut, meter), cut, BPE_LEARN_CHARS), vocab_size, strict
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


def _learn_words(corpus: Corpus, min_word_freq: int, meter: PassMeter) -> WordTokenizer:
    """The word vocabulary, counted a chunk at a time (on every core for a large corpus)
    in bounded memory (WORD_COUNT_LIMIT)."""
    workers = _workers(corpus)
    chunks = iter_text(corpus, meter=meter)
    pool = _pool(workers) if workers > 1 else None
    counted = _pool_map(pool, _word_counts, chunks, workers * CHUNKS_AHEAD) if pool else None
    counts: Counter = Counter()
    try:
        for chunk_counts in counted or map(_word_counts, chunks):
            counts.update(chunk_counts)
            prune_counts(counts, WORD_COUNT_LIMIT)
    finally:
        if pool is not None:
            _stop(pool)
    return WordTokenizer.from_counts(counts, min_word_freq)


def _before(corpus: Corpus, cut: int, meter: Optional[PassMeter] = None) -> Iterator[str]:
    """The chunks of text_chunks(corpus, cut) before the cut."""
    at = 0
    for chunk in text_chunks(corpus, cut, meter):
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
    meter = _meter("encoding", corpus)
    chunks = text_chunks(corpus, cut, meter)
    if tokenizer.multiprocess_encoding and (workers := _workers(corpus)) > 1:
        pool = _pool(workers, tokenizer.to_dict())
        encoded = _pool_map(pool, _encode_chunk, chunks, workers * CHUNKS_AHEAD)
    else:  # (the bpe tokenizer encodes on every core by itself)
        encoded = (tokenizer.encode_known(chunk, dropped) for chunk in chunks)
    dtype = token_dtype(tokenizer.vocab_size)
    count = crc = 0
    chunk_tokens = []
    try:
        for ids in encoded:
            ids = np.ascontiguousarray(ids, dtype=dtype)
            # A Python write, not ids.tofile(out): a Ctrl-C inside numpy's tofile surfaced
            # as a TypeError about the file object, with a traceback, not KeyboardInterrupt.
            out.write(memoryview(ids).cast("B"))
            crc = zlib.crc32(ids, crc)
            count += len(ids)
            chunk_tokens.append(len(ids))
    finally:
        meter.close()
        if pool is not None:
            _stop(pool)
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
    _check_level(level, tokenizer)
    with _meter("reading", corpus) as meter:
        text_hash = fingerprint(corpus, meter)
    key = _cache_key(text_hash, corpus, level, min_word_freq, tokenizer, vocab_size)
    entry = cache_dir() / "tokens" / key
    meta, damage = _checked_entry(entry / "meta.json", entry / "tokens.bin")
    if damage:
        log.warning("token cache for %s was damaged (%s): rebuilding", corpus.name, damage)
    if meta is None:
        meta = _build(entry, corpus, text_hash, level, tokenizer, min_word_freq, vocab_size, strict)
    tokens = _token_data(corpus, text_hash, meta, entry / "tokens.bin", tokenizer is not None)
    check_vocabulary(tokens)
    return tokens


def _build(
    entry: Path,
    corpus: Corpus,
    text_hash: str,
    level: str,
    tokenizer: Optional[Tokenizer],
    min_word_freq: int,
    vocab_size: Optional[int],
    strict: bool,
) -> dict:
    """Write the cache entry (tokens.bin, then meta.json) of the corpus at level: learn the
    tokenizer unless given one, check the disk has room for the ids, encode; return its
    metadata. An interrupted build leaves no entry (both files are written whole or not at
    all), and the next run builds it again."""
    cut = None
    if level == "bpe":
        with _meter("finding the validation split of", corpus) as meter:
            cut = text_cut(corpus, meter)
    tokenizer = tokenizer or _learn(corpus, level, min_word_freq, vocab_size, cut, strict)
    check_room(entry, _expected_bytes(corpus, tokenizer), corpus.name)
    made: dict = {}
    atomic_write(entry / "tokens.bin", lambda f: made.update(_tokenize(corpus, tokenizer, f, cut)))
    meta = _entry_meta(corpus, text_hash, cut, made)
    # Written last: an entry without it is incomplete (or damaged) and is rebuilt.
    atomic_write_text(entry / "meta.json", json.dumps(meta))
    return meta


def _check_level(level: str, tokenizer: Optional[Tokenizer]) -> None:
    """Refuse an unknown level, or a given tokenizer of another level."""
    if level not in LEVELS:
        raise SmolGPTError(f"unknown level {level!r}: choose {' or '.join(LEVELS)}")
    if tokenizer is not None and tokenizer.level != level:
        raise SmolGPTError(
            f"a {tokenizer.level}-level tokenizer cannot tokenize at {level} "
            f"level: use --level {tokenizer.level}"
        )


def _cache_key(
    text_hash: str,
    corpus: Corpus,
    level: str,
    min_word_freq: int,
    tokenizer: Optional[Tokenizer],
    vocab_size: Optional[int],
) -> str:
    """The name of the cache entry of the corpus's ids (text_hash: its fingerprint) with
    these tokenizer settings."""
    # The hash is of the bytes; read in another encoding they are another text.
    encoding = codecs.lookup(corpus.encoding).name  # one name for utf8, UTF-8, ...
    settings = f"v{CACHE_FORMAT}-{encoding}-{level}"
    if tokenizer is not None:  # the ids depend on the whole vocabulary
        settings += f"-tokenizer{tokenizer_hash(tokenizer)}"
    elif level == "word":
        settings += f"-min{min_word_freq}"
    elif level == "bpe":
        check_vocab_size(vocab_size)
        settings += f"-vocab{vocab_size}"
    return hashlib.sha256(f"{text_hash}-{settings}".encode()).hexdigest()[:24]


def _expected_bytes(corpus: Corpus, tokenizer: Tokenizer) -> int:
    """About how many bytes the corpus's ids take: the tokens per byte of its first chunk
    (up to a megabyte of it), over all of its bytes, a tenth more for safety."""
    sample = next(iter_text(corpus, 1 << 20), "")[: 1 << 20]
    per_byte = len(tokenizer.encode_known(sample, Counter())) / max(
        len(sample.encode("utf-8", "surrogatepass")), 1
    )
    itemsize = np.dtype(token_dtype(tokenizer.vocab_size)).itemsize
    return int(per_byte * corpus_bytes(corpus) * itemsize * 1.1)


def check_room(directory: Path, needed: int, name: str) -> None:
    """Refuse, before anything is written, where directory's disk has not needed bytes free."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise SmolGPTError(
            f"the token cache of {name} needs about {_mb(needed)} in {directory.parent}, and "
            f"only {_mb(free)} are free there: free some space, or set SMOLGPT_CACHE_DIR "
            "to a directory on a disk with room"
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 1e9 else f"{size / 1e9:,.1f} GB"


def _tokenize(corpus: Corpus, tokenizer: Tokenizer, out, cut: Optional[int]) -> dict:
    """Write the corpus's ids to out; return what meta.json records of them (see
    :func:`_entry_meta`)."""
    count, crc, dropped, chunk_tokens = _encode(corpus, tokenizer, out, cut)
    # Worked out before tokens.bin appears: another process that finds it without
    # meta.json takes the entry for damaged.
    split = (
        _tokens_before(corpus, cut, chunk_tokens)
        if cut is not None
        else int(count * TRAIN_FRACTION)
    )
    return {
        "tokenizer": tokenizer,
        "count": count,
        "crc32": crc,
        "dropped": dropped,
        "chunk_tokens": chunk_tokens,
        "split": split,
        "val_stats": _val_stats(corpus, tokenizer, chunk_tokens, split, cut),
    }


def _val_stats(
    corpus: Corpus, tokenizer: Tokenizer, chunk_tokens: list[int], split: int, cut: Optional[int]
) -> dict[str, int]:
    """The validation split's characters and <UNK> bytes (TokenData.val_chars, val_unk_bytes),
    counted a chunk at a time."""
    chars = unk_bytes = 0
    with _meter("counting the validation text of", corpus) as meter:
        chunks = chunks_from(corpus, tokenizer, chunk_tokens, split, cut, meter)
        for n, chunk in enumerate(chunks):
            chars += len(chunk)
            unk_bytes += tokenizer.charged_unk_bytes(chunk, first=n == 0)
    return {"val_chars": chars, "val_unk_bytes": unk_bytes}


def _entry_meta(corpus: Corpus, text_hash: str, cut: Optional[int], made: dict) -> dict:
    """The metadata of a cache entry (meta.json), from what :func:`_tokenize` made."""
    dtype = np.dtype(token_dtype(made["tokenizer"].vocab_size))
    return {
        "format": CACHE_FORMAT,
        "source": corpus.name,
        "fingerprint": text_hash,
        "count": made["count"],
        "dtype": dtype.name,
        "bytes": made["count"] * dtype.itemsize,
        "crc32": made["crc32"],
        "tokenizer": made["tokenizer"].to_dict(),
        "dropped": dict(made["dropped"]),
        "chunk_tokens": made["chunk_tokens"],
        "split": made["split"],
        "cut": cut,
        **made["val_stats"],
    }


def _token_data(
    corpus: Corpus, text_hash: str, meta: dict, ids_path: Path, given: bool
) -> TokenData:
    """The corpus's TokenData from its checked cache entry: the ids memory-mapped."""
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    ids = np.memmap(ids_path, dtype=meta["dtype"], mode="r") if meta["count"] else np.zeros(0)
    split = meta["split"]
    return TokenData(
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
