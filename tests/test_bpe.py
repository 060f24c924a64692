"""Byte-level BPE (--level bpe): lossless round trips of any text, the vocabulary size asked
for, learned from the training split only, and the same ids from a checkpoint, an export
and transformers' tokenizer."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import smolgpt
from smolgpt import sources, tokencache
from smolgpt.errors import SmolGPTError
from smolgpt.tokenizer import BYTE_SYMBOLS, BPETokenizer, tokenizer_from_dict

from e2e import (
    E2E_TINY,
    e2e_assert_install_advice,
    e2e_assert_one_line_error,
    e2e_corpus_text,
    loss_tolerance,
    names,
    smolgpt_without,
)

tokenizers = pytest.importorskip("tokenizers")

# Any Unicode scalar value: every category (controls, combining marks, emoji, unassigned)
# but surrogates, which are not characters and cannot be written to a file as UTF-8.
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([e2e_corpus_text(40_000)], 600)


def test_the_byte_alphabet_is_gpt2s():
    assert set(BYTE_SYMBOLS) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_SYMBOLS[ord(" ")] == "Ġ" and BYTE_SYMBOLS[ord("\n")] == "Ċ"
    assert BYTE_SYMBOLS[ord("A")] == "A"


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
@example("")
@example("\r\n\x00\x1b\t \u200b\ufeff")  # control and invisible characters, kept as they are
@example("e\u0301 \u0915\u094d\u0937 Z\u0351\u0362")  # combining marks
@example("👩‍👩‍👧 🏳️‍🌈 🙂" * 3)  # emoji, zero-width joiners, variation selectors
@example("“Holmes’s” — naïve — 日本語 — ﷽")
def test_any_text_round_trips(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.unknown(text) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(ANY_TEXT, max_size=5))
def test_text_cut_after_line_breaks_encodes_piece_by_piece(bpe, lines):
    # What lets a large text be encoded in chunks, on every core, to the ids of the whole.
    pieces = [line + "\n" for line in lines] + ["tail"]
    whole = bpe.encode("".join(pieces))
    assert whole == [i for piece in pieces for i in bpe.encode(piece)]
    assert whole == bpe._hf.encode("".join(pieces)).ids  # as one string, without our pieces


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 599), max_size=60), st.integers(1, 5))
def test_streamed_decoding_joins_into_decode(bpe, ids, step):
    # Random ids include byte tokens that do not form UTF-8: U+FFFD, the same either way.
    decoder = bpe.decoder()
    pieces = [decoder.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    assert "".join(pieces) + decoder.flush() == bpe.decode(ids)


def test_starts_are_where_tokens_begin(bpe):
    text = "The door opened.\n\nnaïve 🙂 x\n"
    starts = bpe.starts(text)
    ids = bpe.encode(text)
    assert len(starts) == len(ids) and starts[0] == 0
    for n in range(len(ids)):  # the text from a token's start on encodes to the ids from it
        if n == 0 or starts[n] != starts[n - 1]:  # (not in the middle of a character)
            assert bpe.decode(ids[n:]) == text[starts[n] :]


def test_a_word_never_seen_still_encodes(bpe):
    word = "Zyxwvutsrq"
    assert "zyx" not in e2e_corpus_text(40_000).lower()
    ids = bpe.encode(f"Holmes met {word}.")
    assert bpe.decode(ids) == f"Holmes met {word}."


def test_vocab_size_is_honoured_and_survives_a_round_trip_through_json(bpe):
    assert bpe.vocab_size == 600 == len(bpe.token_bytes)
    copy = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    text = e2e_corpus_text(5_000, seed=7) + "🙂 naïve"
    assert copy.encode(text) == bpe.encode(text)


def test_learning_is_deterministic():
    text = e2e_corpus_text(20_000, seed=3)
    assert BPETokenizer.train([text], 400).to_dict() == BPETokenizer.train([text], 400).to_dict()


@pytest.mark.parametrize(
    "vocab_size, needles",
    [
        (0, ("--vocab_size", "256")),  # the least it may be
        (255, ("--vocab_size", "256", "255")),
        (100_000, ("--vocab_size", "100000")),
    ],
)
def test_bad_vocab_sizes_are_refused(vocab_size, needles):
    with pytest.raises(SmolGPTError, match=names(*needles)):
        BPETokenizer.train(["a small text\n" * 20], vocab_size)


def test_a_malformed_tokenizer_is_refused(bpe):
    broken = bpe.to_dict()
    broken["vocab"] = broken["vocab"][1:]  # a byte value lost
    with pytest.raises(SmolGPTError, match=names("bpe", "malformed")):
        tokenizer_from_dict(broken)


def test_the_tokenizer_learns_from_the_training_split_only(write_text):
    # A word only the validation split (the text's last tenth) holds: learning from the whole
    # text, 2,000 merges would make it one token; learning from the training split, they can't.
    train = e2e_corpus_text(20_000)
    val = "zanzibarquux\n" * 170
    path = write_text("t.txt", train + val)
    tokens = tokencache.prepare(sources.resolve_corpus(str(path)), "bpe", vocab_size=500)
    bpe = tokens.tokenizer
    assert not any("zanz" in t for t in bpe.vocab)
    cut = sources.text_cut(sources.resolve_corpus(str(path)))
    text = path.read_text()
    assert text[cut - 1] == "\n" and cut >= 0.9 * len(text)
    assert tokens.val_text() == text[cut:]
    assert bpe.decode(tokens.train) == text[:cut] and bpe.decode(tokens.val) == text[cut:]
    assert tokens.val_chars == len(text) - cut


def test_a_text_without_line_breaks_is_cut_at_nine_tenths(write_text):
    text = "word " * 2000
    path = write_text("t.txt", text)
    corpus = sources.resolve_corpus(str(path))
    assert sources.text_cut(corpus) == int(len(text) * 0.9)
    tokens = tokencache.prepare(corpus, "bpe", vocab_size=260)
    assert tokens.tokenizer.decode(np.concatenate([tokens.train, tokens.val])) == text


def test_the_cache_is_keyed_by_vocab_size(write_text):
    path = write_text("t.txt", e2e_corpus_text(20_000))
    corpus = sources.resolve_corpus(str(path))
    small = tokencache.prepare(corpus, "bpe", vocab_size=300)
    large = tokencache.prepare(corpus, "bpe", vocab_size=500)
    assert (small.tokenizer.vocab_size, large.tokenizer.vocab_size) == (300, 500)
    assert len(large.train) < len(small.train)
    again = tokencache.prepare(corpus, "bpe", vocab_size=300)
    assert again.tokenizer.to_dict() == small.tokenizer.to_dict()


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny bpe model trained through the API on a text of its own."""
    root = tmp_path_factory.mktemp("bpe_run")
    corpus = root / "corpus.txt"
    corpus.write_text(e2e_corpus_text(30_000), encoding="utf-8")
    flags = dict(zip(E2E_TINY[::2], E2E_TINY[1::2]))  # (--no-plot is last, unpaired)
    settings_ = {k[2:]: (v if not v.isdigit() else int(v)) for k, v in flags.items()}
    result = smolgpt.train(
        level="bpe",
        vocab_size=400,
        data=corpus,
        out_dir=root / "run",
        max_iters=20,
        plot=False,
        **{**settings_, "eval_iters": 20},
    )
    return root, result


def test_checkpoint_generate_eval_and_export_share_the_ids(bpe_run, tmp_path):
    root, result = bpe_run
    model = smolgpt.load(result.best_checkpoint, device="cpu")
    assert model.tokenizer.level == "bpe" and model.config.vocab_size == 400
    prompt = "Holmes saw Zyxwvut 🙂 naïve\r\n"
    tokens = tokencache.prepare(
        sources.resolve_corpus(str(root / "corpus.txt")), "bpe", vocab_size=400
    )
    assert model.tokenizer.encode(prompt) == tokens.tokenizer.encode(prompt)
    assert model.generate(prompt, max_new_tokens=0) == prompt  # lossless
    text = model.generate(prompt, max_new_tokens=20, seed=3)
    assert text.startswith(prompt) and text == "".join(
        model.stream(prompt, max_new_tokens=20, seed=3)
    )
    # The log's val loss is smolgpt eval's: the split is small enough to be scored whole.
    assert model.evaluate().loss == pytest.approx(result.best_val_loss, abs=loss_tolerance())

    transformers = pytest.importorskip("transformers")
    out = model.export(tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf(prompt)["input_ids"] == model.tokenizer.encode(prompt)
    assert hf.decode(hf(prompt)["input_ids"]) == prompt
    assert hf.bos_token_id == model.tokenizer.encode("\n")[0]  # the begin token: a line break
    lines = "two\nlines"  # the begin token, special to transformers, is found in text as such
    assert hf(lines)["input_ids"] == model.tokenizer.encode(lines)
    again = smolgpt.load(out, device="cpu")
    assert again.tokenizer.to_dict() == model.tokenizer.to_dict()
    assert again.generate(prompt, max_new_tokens=5, temperature=0) == model.generate(
        prompt, max_new_tokens=5, temperature=0
    )


def test_bad_vocab_size_flags_are_one_line(bpe_run, cli_main):
    root, _ = bpe_run
    corpus = root / "corpus.txt"
    base = ["train", "--level", "bpe", "--data", corpus, *E2E_TINY, "--max_iters", "2"]
    for value, needles in (
        ("0", ("--vocab_size", "256")),  # the least it may be
        ("200", ("--vocab_size", "256", "200")),
        ("90000", ("--vocab_size 90000",)),
    ):
        result = cli_main([*base, "--vocab_size", value, "--out_dir", root / f"bad{value}"])
        e2e_assert_one_line_error(result, *needles)
        assert not (root / f"bad{value}").exists()
    e2e_assert_one_line_error(
        cli_main(["train", "--level", "char", "--vocab_size", "512"]), "--vocab_size", "--level bpe"
    )
    # Resuming keeps the vocabulary: another size would be another model.
    resumed = cli_main(
        [
            "train",
            "--level",
            "bpe",
            "--data",
            corpus,
            "--out_dir",
            root / "run",
            "--resume",
            "--vocab_size",
            "500",
        ]
    )
    e2e_assert_one_line_error(resumed, "--resume", "--vocab_size 500", "400")


@pytest.mark.slow
def test_without_tokenizers_one_line_says_what_to_install(bpe_run):
    root, result = bpe_run
    trained = smolgpt_without(
        "tokenizers",
        "train",
        "--level",
        "bpe",
        "--data",
        root / "corpus.txt",
        "--out_dir",
        root / "none",
        *E2E_TINY,
    )
    assert trained.returncode == 2 and trained.stderr.count("\n") == 1, trained.stderr
    e2e_assert_install_advice(trained.stderr, "bpe")
    sampled = smolgpt_without("tokenizers", "generate", result.best_checkpoint)
    assert sampled.returncode == 2
    e2e_assert_install_advice(sampled.stderr, "bpe")


def test_fine_tuning_a_bpe_model_keeps_its_tokenizer(bpe_run, tmp_path):
    root, result = bpe_run
    other = tmp_path / "other.txt"
    other.write_text(e2e_corpus_text(20_000, seed=11) + "Zyxwvut 🙂\n", encoding="utf-8")
    source = smolgpt.load(result.best_checkpoint, device="cpu")
    tuned = smolgpt.train(
        init_from=result.best_checkpoint,
        data=other,
        out_dir=tmp_path / "ft",
        max_iters=2,
        eval_interval=2,
        eval_iters=2,
        plot=False,
    )
    model = smolgpt.load(tuned.best_checkpoint, device="cpu")
    assert model.tokenizer.to_dict() == source.tokenizer.to_dict()
    assert model.train_config["vocab_size"] == 400
    info = smolgpt.info(tuned.out_dir)
    assert info["level"] == "bpe" and info["tokenizer"]["vocab_size"] == 400
    with pytest.raises(SmolGPTError, match=names("--vocab_size", "--init_from")):
        smolgpt.train(
            init_from=result.best_checkpoint, data=other, vocab_size=500, out_dir=tmp_path / "ft2"
        )


def test_a_presets_vocab_size_gives_way_to_a_small_text(tmp_path, caplog):
    small = tmp_path / "small.txt"
    small.write_text("the cat sat on the mat\n" * 60 + "a dog\n" * 20, encoding="utf-8")
    result = smolgpt.train(
        level="bpe",
        preset="nano",
        data=small,
        out_dir=tmp_path / "run",
        max_iters=2,
        eval_interval=2,
        eval_iters=1,
        block_size=16,
        batch_size=2,
        plot=False,
    )
    model = smolgpt.load(result.best_checkpoint, device="cpu")
    assert 256 < model.config.vocab_size < 1024
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        "vocab_size" in w and "small.txt" in w and str(model.config.vocab_size) in w
        for w in warnings
    ), warnings
    assert model.evaluate().tokens > 2  # the run's split is found again (strict=False)


def test_a_large_training_split_is_sampled_evenly_for_learning():
    chunks = ["".join(f"chunk{c} line {i}\n" for i in range(1000)) for c in range(10)]
    total = sum(map(len, chunks))
    sampled = list(tokencache._sample(iter(chunks), total, total // 10))
    assert len(sampled) == 10  # some of every chunk
    assert all(
        piece.endswith("\n") and chunk.startswith(piece) for piece, chunk in zip(sampled, chunks)
    )
    assert total // 10 <= sum(map(len, sampled)) < total // 10 + 10 * 20
    assert list(tokencache._sample(iter(chunks), total, total)) == chunks
