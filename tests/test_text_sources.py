"""Text from any operating system and editor trains the same model as clean UTF-8 text.

A book saved on Windows (CRLF, a UTF-8 byte-order mark, UTF-16, cp1252), on an old Mac
(lone CR) or typeset with curly quotes is read as the same text as its LF, UTF-8, ASCII-quote
version: the same vocabulary and the same token ids, with no CR or byte-order mark in the
vocabulary, from a file, a directory or a URL. A text that does not decode is refused with a
line that names --encoding, and word level reports (and refuses) too much <UNK>.

The command-line tests run ``smolgpt.cli.main`` in-process (the ``cli_main`` fixture of
test_cli.py) on a model that trains two steps; one runs train.py as a real process.
"""

from __future__ import annotations

import numpy as np
import pytest

import smolgpt
from smolgpt import checkpoint, sources
from smolgpt.sources import Corpus, resolve_corpus
from smolgpt.tokencache import prepare

from e2e import e2e_assert_one_line_error, e2e_corpus_text

TINY = (
    "--preset nano --n_layer 1 --n_embd 16 --n_head 2 --block_size 16 --batch_size 4 --max_iters "
    "2 --eval_iters 1 --eval_interval 1"
).split()


def book(chars: int = 6_000) -> str:
    """LF, ASCII-quoted English prose with a few accented letters and a dash."""
    return e2e_corpus_text(chars).replace("quiet", "naïve").replace(" -- ", " — ")


def typeset(text: str) -> str:
    """text as a book prints it: curly apostrophes and double quotes."""
    parts = text.replace("'", "’").split('"')
    return (
        "".join(part + ("“" if n % 2 == 0 else "”") for n, part in enumerate(parts[:-1]))
        + parts[-1]
    )


LF = book()
# The same text as other systems and editors save it (bytes), by name.
SAVED = {
    "CRLF": LF.replace("\n", "\r\n").encode("utf-8"),
    "lone CR": LF.replace("\n", "\r").encode("utf-8"),
    "UTF-8 BOM": ("\ufeff" + LF).encode("utf-8"),
    "UTF-8 BOM, CRLF": ("\ufeff" + LF.replace("\n", "\r\n")).encode("utf-8"),
    "UTF-16 LE BOM": ("\ufeff" + LF).encode("utf-16-le"),
    "UTF-16 BE BOM, CRLF": ("\ufeff" + LF.replace("\n", "\r\n")).encode("utf-16-be"),
    "curly quotes": typeset(LF).encode("utf-8"),
    "UTF-16 LE BOM, CRLF, curly quotes": ("\ufeff" + typeset(LF).replace("\n", "\r\n")).encode(
        "utf-16-le"
    ),
}


def ids(tokens) -> list:
    return np.concatenate([tokens.train, tokens.val]).tolist()


def test_the_variants_differ_from_the_lf_text():
    assert typeset(LF) != LF and typeset(LF).count("“") == typeset(LF).count("”") > 10
    for name, raw in SAVED.items():
        assert raw != LF.encode("utf-8"), name


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("name", SAVED)
def test_a_file_from_any_system_gives_the_ids_of_its_lf_utf8_text(tmp_path, level, name):
    clean, saved = tmp_path / "clean.txt", tmp_path / "saved.txt"
    clean.write_bytes(LF.encode("utf-8"))
    saved.write_bytes(SAVED[name])
    expected = prepare(resolve_corpus(str(clean)), level, min_word_freq=1)
    tokens = prepare(resolve_corpus(str(saved)), level, min_word_freq=1)
    assert tokens.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert ids(tokens) == ids(expected)
    vocabulary = "".join(tokens.tokenizer.to_dict()["chars" if level == "char" else "words"])
    for ch in "\r\ufeff“”’":
        assert ch not in vocabulary


@pytest.mark.parametrize("level", ["char", "word"])
def test_a_directory_and_a_url_are_normalised_alike(tmp_path, http_server, level):
    clean, mixed = tmp_path / "clean", tmp_path / "mixed"
    clean.mkdir()
    mixed.mkdir()
    for n, name in enumerate(["CRLF", "lone CR", "UTF-16 LE BOM", "curly quotes"]):
        (clean / f"{n}.txt").write_bytes(LF.encode("utf-8"))
        (mixed / f"{n}.txt").write_bytes(SAVED[name])
    expected = prepare(resolve_corpus(str(clean)), level, min_word_freq=1)
    assert ids(prepare(resolve_corpus(str(mixed)), level, min_word_freq=1)) == ids(expected)

    http_server.routes["/book.txt"] = SAVED["UTF-8 BOM, CRLF"]
    from_url = prepare(resolve_corpus(f"{http_server.url}/book.txt"), level, min_word_freq=1)
    alone = prepare(Corpus("clean", (clean / "0.txt",)), level, min_word_freq=1)
    assert ids(from_url) == ids(alone)


@pytest.mark.parametrize("name", ["CRLF", "UTF-16 BE BOM, CRLF"])
def test_crlf_split_between_reads_is_one_line_break(tmp_path, monkeypatch, name):
    path = tmp_path / "crlf.txt"
    path.write_bytes(SAVED[name])
    monkeypatch.setattr(sources, "CHUNK_BYTES", 97)  # reads that end inside many CRLFs
    tokens = prepare(resolve_corpus(str(path)), "char")
    assert tokens.tokenizer.decode(ids(tokens)) == LF


# ------------------------------------------------------------------- the command line


@pytest.fixture
def cp1252_book(tmp_path):
    """A Windows text in cp1252 (curly quotes and — are bytes 0x91 to 0x97 there), and the
    same text in UTF-8."""
    text = typeset(LF)
    windows, utf8 = tmp_path / "windows.txt", tmp_path / "utf8.txt"
    windows.write_bytes(text.replace("\n", "\r\n").encode("cp1252"))
    utf8.write_bytes(text.encode("utf-8"))
    return windows, utf8


def train_args(text, out, *extra) -> list:
    return ["train", "--level", "char", "--data", text, *TINY, "--out_dir", out, *extra]


@pytest.mark.slow
def test_cp1252_is_refused_naming_encoding_and_trains_with_it(cli_main, cp1252_book, tmp_path):
    windows, utf8 = cp1252_book
    refused = cli_main(train_args(windows, tmp_path / "refused"))
    line = e2e_assert_one_line_error(refused, str(windows), "utf-8", "--encoding cp1252")
    assert "binary" not in line and "iconv" not in line  # the old, wrong, hints
    assert not (tmp_path / "refused" / "latest_model.pth").exists()

    trained = cli_main(train_args(windows, tmp_path / "cp1252", "--encoding", "cp1252"))
    assert trained.returncode == 0, trained.describe()
    reference = cli_main(train_args(utf8, tmp_path / "utf8"))
    assert reference.returncode == 0, reference.describe()
    saved = checkpoint.load(tmp_path / "cp1252" / "latest_model.pth")
    assert saved.train_config["encoding"] == "cp1252"
    reference_saved = checkpoint.load(tmp_path / "utf8" / "latest_model.pth")
    assert saved.tokenizer.to_dict() == reference_saved.tokenizer.to_dict()
    chars = saved.tokenizer.to_dict()["chars"]
    assert "\r" not in chars and "’" not in chars


@pytest.mark.parametrize("level", ["char", "word"])
def test_curly_and_typed_prompts_generate_the_same(cli_main, tmp_path, level):
    path = tmp_path / "book.txt"
    path.write_bytes(SAVED["UTF-16 LE BOM, CRLF, curly quotes"])
    out = tmp_path / "run"
    result = cli_main(["train", "--level", level, "--data", path, *TINY, "--out_dir", out])
    assert result.returncode == 0, result.describe()
    model = smolgpt.load(out / "latest_model.pth")
    typed, curly = "Holmes's letter wasn't \"old\"", "Holmes’s letter wasn’t “old”"
    assert model.tokenizer.encode(curly) == model.tokenizer.encode(typed)
    assert model.tokenizer.unknown(curly) == model.tokenizer.unknown(typed)
    if level == "word":  # the book's wasn’t is the word a user types
        assert model.tokenizer.stoi["wasn't"] in model.tokenizer.encode(curly)
    else:
        assert model.tokenizer.unknown(curly) == []
    sample = dict(max_new_tokens=5, seed=3)
    assert model.generate(curly, **sample) == model.generate(typed, **sample)


@pytest.mark.slow
def test_unk_share_is_reported_and_warned_about_with_the_flag(cli_main, tmp_path):
    # A word in eight is seen once: at the default --min_word_freq 3 it is <UNK>.
    words = [
        f"rare{i}" if i % 8 == 7 else ("the", "old", "grey", "house")[i % 4] for i in range(800)
    ]
    path = tmp_path / "rare.txt"
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    result = cli_main(
        ["train", "--level", "word", "--data", path, *TINY, "--out_dir", tmp_path / "run"]
    )
    assert result.returncode == 0, result.describe()
    # Two lines name <UNK>: the summary and the warning, each with the share of both splits;
    # the warning names the flag that keeps rarer words.
    unk = [line for line in result.stderr.splitlines() if "<UNK>" in line]
    assert len(unk) == 2 and all(line.count("12.5%") == 2 for line in unk), result.describe()
    assert any("--min_word_freq 1" in line for line in unk), result.describe()

    clean = cli_main(
        [
            "train",
            "--level",
            "word",
            "--data",
            path,
            *TINY,
            "--min_word_freq",
            "1",
            "--out_dir",
            tmp_path / "run1",
        ]
    )
    assert clean.returncode == 0, clean.describe()
    unk = [line for line in clean.stderr.splitlines() if "<UNK>" in line]
    assert len(unk) == 1 and unk[0].count("0.0%") == 2, clean.describe()  # no warning


def test_a_vocabulary_without_words_is_refused_in_one_line(cli_main, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(LF, encoding="utf-8")
    result = cli_main(
        [
            "train",
            "--level",
            "word",
            "--data",
            path,
            *TINY,
            "--min_word_freq",
            "1000",
            "--out_dir",
            tmp_path / "run",
        ]
    )
    e2e_assert_one_line_error(result, "--min_word_freq 1000", "<UNK>", "--min_word_freq 3")
    assert not (tmp_path / "run" / "latest_model.pth").exists()


@pytest.mark.slow
def test_cp1252_in_real_processes(smol_cli, cp1252_book, tmp_path):
    windows, _ = cp1252_book
    refused, trained = smol_cli.run_many(
        [
            ("train", ["--level", "char", "--data", windows, *TINY, "--out_dir", tmp_path / "a"]),
            (
                "train",
                [
                    "--level",
                    "char",
                    "--data",
                    windows,
                    *TINY,
                    "--out_dir",
                    tmp_path / "b",
                    "--encoding",
                    "cp1252",
                ],
            ),
        ]
    )
    e2e_assert_one_line_error(refused, "windows.txt", "--encoding cp1252")
    assert trained.returncode == 0, trained.describe()
    assert (tmp_path / "b" / "latest_model.pth").is_file()
