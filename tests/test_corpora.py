"""Corpora of gigabytes: text read in bounded pieces (long lines too), the word pattern run a
piece at a time (NLTK stops any one regular-expression call past 5 s), word counts in
bounded memory, a progress bar with MB/s and the time left, an interrupt that leaves the
cache as it was, and a full disk refused before anything is written."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path

import nltk.redos
import pytest

from smolgpt import progress, sources, tokencache
from smolgpt.errors import SmolGPTError
from smolgpt.sources import Corpus, iter_text
from smolgpt.tokenizer import BPETokenizer, CharTokenizer, WordTokenizer
from smolgpt.wordtext import _splitter, split_words, word_pieces

WORDS = [
    "the", "holmes", "watson", "said", "don't", "it's", "street", "baker", "x²", "naïve",
    "café", "1895", "a", "of", "and", "to", "in", "that", "was", "he",
]  # fmt: skip
MARKS = [".", ",", ";", "!", "?", '"', "'", "(", ")", "—", "-"]


def pseudo_text(chars: int, seed: int = 0, line: int = 70, rare: float = 0.02) -> str:
    """About chars characters of word-like text in lines of about line characters: common
    words, punctuation, and now and then a word seen only once (for <UNK>)."""
    rng = random.Random(seed)
    lines, size, serial = [], 0, 0
    while size < chars:
        words, width = [], 0
        while width < min(line, chars):
            roll = rng.random()
            if roll < rare:
                serial += 1
                words.append(f"zq{serial}")
            elif roll < 0.2:
                words.append(rng.choice(MARKS))
            else:
                words.append(rng.choice(WORDS))
            width += len(words[-1]) + 1
        lines.append(" ".join(words))
        size += len(lines[-1]) + 1
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the word pattern


def test_word_pieces_give_the_tokens_of_the_whole():
    text = "a  b\tc\n\nd" + "x" * 50 + " y,z " * 40 + "   end"
    for size in (1, 3, 7, 50, 10_000):
        pieces = list(word_pieces(text, size))
        assert "".join(p for _, p in pieces) == text
        assert all(text[at : at + len(p)] == p for at, p in pieces)
        # Every cut is just before whitespace.
        assert all(text[at].isspace() for at, _ in pieces[1:])
        found = [w for _, p in pieces for w in _splitter().tokenize(p)]
        assert found == _splitter().tokenize(text)


def test_no_regular_expression_runs_over_the_whole_text(monkeypatch):
    """NLTK's time limit, lowered so that one call over this text would pass it (checked),
    while word level's splitting, encoding, token starts and <UNK> bytes all succeed."""
    text = pseudo_text(1_500_000, rare=0.05)
    started = time.perf_counter()
    whole = _splitter().tokenize(text.lower())  # within the usual 5 s
    one_call_s = time.perf_counter() - started
    tokenizer = WordTokenizer.train([pseudo_text(200_000, seed=1, rare=0.0)])
    assert tokenizer.unknown(text)  # the rare words are <UNK>: unk_bytes has work to do

    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", one_call_s / 4)
    with pytest.raises(TimeoutError):
        _splitter().tokenize(text.lower())  # the whole text in one call: over the limit
    assert split_words(text.lower()) == whole
    assert WordTokenizer.split(text) == whole
    ids = tokenizer.encode_array(text)
    assert len(ids) == len(whole)
    assert len(tokenizer.starts(text)) == len(whole)
    expected = sum(len(w.encode()) for w in whole[1:] if w not in tokenizer.stoi)
    assert tokenizer.charged_unk_bytes(text) == expected > 0


@pytest.mark.slow
def test_word_level_at_nltks_own_time_limit():
    """The real 5 s limit, with a text whose one call passes it on this machine: encoding it
    and counting its <UNK> bytes (what preparing the validation split and `smolgpt eval` do)
    succeed, and so does a whole prepare of a corpus whose validation split is that large."""
    limit = nltk.redos.DEFAULT_TIMEOUT
    probe = pseudo_text(1_000_000)
    started = time.perf_counter()
    _splitter().tokenize(probe)
    per_char = (time.perf_counter() - started) / len(probe)
    chars = min(int(1.6 * limit / per_char), 80_000_000)
    text = pseudo_text(chars, seed=2)
    with pytest.raises(TimeoutError):
        _splitter().tokenize(text)
    tokenizer = WordTokenizer.train([probe])
    assert len(tokenizer.encode_array(text)) > 0
    assert tokenizer.charged_unk_bytes(text) > 0


# ------------------------------------------------------------------ reading text


@pytest.mark.parametrize("level", ["char", "word", "bpe"])
def test_a_line_longer_than_a_chunk_is_read_in_pieces(level, tmp_path, monkeypatch):
    text = " ".join(pseudo_text(30_000, line=10**9).split("\n")) + "\nlast line\n"
    assert text.count("\n") == 2  # (the generator's line break, then the last line's)
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    chunks = list(iter_text(Corpus("long", (path,))))
    assert "".join(chunks) == text
    assert len(chunks) > 5 and max(map(len, chunks)) < 2 * 4096
    for chunk in chunks[:-2]:  # each cut just before a space that follows a non-space
        assert chunk[-1] != " " and not chunk[-1].isspace()
    tokenizer = {
        "char": lambda: CharTokenizer.train([text]),
        "word": lambda: WordTokenizer.train([text], 1),
        "bpe": lambda: BPETokenizer.train([text], 300),
    }[level]()
    pieces = [i for chunk in chunks for i in tokenizer.encode(chunk)]
    assert pieces == tokenizer.encode(text)


def test_word_counts_stay_bounded():
    counts = Counter({f"once{i}": 1 for i in range(90)})
    counts.update({f"twice{i}": 2 for i in range(20)})
    counts.update({"the": 500, "holmes": 40})
    tokencache.prune_counts(counts, 100)
    assert len(counts) <= 50
    assert counts["the"] == 500 and counts["holmes"] == 40
    assert not any(w.startswith("once") for w in counts)
    small = Counter({"a": 1, "b": 5})
    tokencache.prune_counts(small, 100)
    assert small == Counter({"a": 1, "b": 5})  # under the limit: nothing is forgotten


def test_a_vocabulary_counted_in_bounded_memory_keeps_the_frequent_words(write_text, monkeypatch):
    monkeypatch.setattr(tokencache, "WORD_COUNT_LIMIT", 200)
    path = write_text("many.txt", pseudo_text(300_000, rare=0.1))
    tokens = tokencache.prepare(sources.resolve_corpus(str(path)), "word", min_word_freq=3)
    words = set(tokens.tokenizer.itos)
    assert {"the", "holmes", "don't", "café", "1895"} | set(MARKS) <= words
    assert not any(w.startswith("zq") for w in words)  # each seen once


# ------------------------------------------------------------------ progress


def test_progress_lines_away_from_a_terminal(write_text, monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    path = write_text("corpus.txt", pseudo_text(200_000))
    with caplog.at_level(logging.INFO, logger="smolgpt.progress"):
        tokencache.prepare(sources.resolve_corpus(str(path)), "word")
    lines = [r.getMessage() for r in caplog.records if r.name == "smolgpt.progress"]
    for what in ("reading", "learning the vocabulary of", "encoding"):
        assert any(line.startswith(f"{what} corpus.txt:") for line in lines), lines
    assert all(" MB/s, about " in line and line.endswith(" left") for line in lines), lines


@pytest.mark.slow
def test_progress_bar_on_a_terminal(write_text):
    """prepare in a process whose stderr is a terminal (a pseudo-terminal): a bar per pass
    with its bytes, MB/s and the time left."""
    path = write_text("corpus.txt", pseudo_text(2_000_000))
    script = (
        "import sys; from smolgpt import progress, sources, tokencache\n"
        # A small corpus's passes end within the usual second, in one 4 MiB chunk.
        "progress.SHOW_AFTER_S = 0; sources.CHUNK_BYTES = 1 << 16\n"
        f"tokencache.prepare(sources.resolve_corpus({str(path)!r}), 'word')\n"
    )
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 wide
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.DEVNULL, stderr=follower,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            block = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not block:
            break
        seen += block
    assert proc.wait(60) == 0, seen.decode(errors="replace")
    screen = seen.decode(errors="replace")
    assert "encoding corpus.txt:" in screen and "learning the vocabulary of corpus.txt:" in screen
    # Bytes done of the total, time taken and left, and the rate.
    bar = r"[\d.]+[kM]B/2\.\d\dMB \[\d\d:\d\d<\d\d:\d\d, [\d.]+[kM]B/s\]"
    assert re.search(r"encoding corpus\.txt: +\d+%\|.*?\| " + bar, screen), screen


# ------------------------------------------------------------------ interrupts, full disks


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place between the listing and now
        return 0


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "tokens").glob("*/*")) if cache.exists() else []


@pytest.mark.slow
def test_ctrl_c_while_preparing_leaves_the_cache_as_it_was(smol_cli, tmp_path):
    """SIGINT to the whole process group (as a terminal's Ctrl-C sends it, workers too) while
    the ids are being written: one line, exit 130, no traceback from any process, no cache
    entry; the next run prepares the corpus whole."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(pseudo_text(12_000_000), encoding="utf-8")  # 3 chunks: 2 workers
    args = ["--level", "word", "--data", corpus, "--preset", "nano", "--max_iters", "2"]
    args += ["--eval_interval", "1", "--eval_iters", "1", "--no-plot"]
    cache = tmp_path / "cache"  # this test's own: the session's holds other tests' entries
    env = smol_cli.env(SMOLGPT_CACHE_DIR=str(cache))
    run = smol_cli.popen(
        "train", *args, "--out_dir", tmp_path / "run", env=env, start_new_session=True
    )
    deadline = time.monotonic() + 120
    # Ids written already: the encoding workers run (a signal that lands while a worker is
    # being forked, before it ignores SIGINT, is a narrower case this test does not aim at).
    while not any(_size(p) for p in cache.glob("tokens/*/.tokens.bin.*.tmp")):
        assert run.poll() is None and time.monotonic() < deadline, run.stderr_so_far()
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGINT)
    result = run.wait(60)
    assert result.returncode == 130, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert result.stderr.strip().splitlines()[-1] == "interrupted", result.describe()
    assert _entries(cache) == [], _entries(cache)
    again = smol_cli.run("train", *args, "--out_dir", tmp_path / "run2", env=env)
    assert again.returncode == 0, again.describe()
    assert _entries(cache) == ["meta.json", "tokens.bin"]


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and a tmpfs mount")
def test_a_full_disk_is_refused_before_anything_is_written(smol_cli, tmp_path):
    """The cache on a real 256 KB file system (a tmpfs in a private mount namespace), a text
    whose ids need more: one line saying how much is needed and free, exit 2, nothing written."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pseudo_text(400_000), encoding="utf-8")  # ids: about 800 KB
    listing = tmp_path / "listing"
    command = " ".join(
        map(str, smol_cli.argv("train", "--level", "char", "--data", corpus, "--preset", "nano",
                               "--max_iters", "2", "--out_dir", tmp_path / "run"))
    )  # fmt: skip
    script = (
        'mount -t tmpfs -o size=256k none "$SMOLGPT_CACHE_DIR" || exit 99\n'
        f"{command}\n"
        "status=$?\n"
        f'find "$SMOLGPT_CACHE_DIR" -type f > {listing}\n'
        "exit $status\n"
    )
    smol_cli.cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        env=smol_cli.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    errors = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert errors[-1].startswith("error: the token cache of "), errors
    assert "corpus.txt needs about " in errors[-1], errors
    assert "are free there" in errors[-1] and "SMOLGPT_CACHE_DIR" in errors[-1]
    assert listing.read_text() == ""  # not a byte written


def test_room_is_checked_against_the_disk(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    tokencache.check_room(tmp_path / "a" / "b", 1000, "x.txt")  # (a directory not made yet)
    with pytest.raises(SmolGPTError, match=r"needs about .* GB in .*are free"):
        tokencache.check_room(tmp_path / "entry", free * 2, "x.txt")
