"""Character and word tokenizers: round trips, vocabulary rules, text normalisation,
serialisation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from smolgpt.errors import SmolGPTError
from smolgpt.tokenizer import CharTokenizer, WordTokenizer, normalize_text, tokenizer_from_dict

from e2e import names

UNICODE_TEXT = "Héllo, wörld! “Quoted” — naïve café. 日本語 and 🙂 emoji.\nTabs\tand\r\nCRLF."
# UNICODE_TEXT as the tokenizers read it.
UNICODE_READ = 'Héllo, wörld! "Quoted" — naïve café. 日本語 and 🙂 emoji.\nTabs\tand\nCRLF.'


# --------------------------------------------------------------------------- char level


def test_char_round_trip_including_unicode():
    tok = CharTokenizer.train([UNICODE_TEXT])
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) == len(UNICODE_READ)
    assert tok.decode(ids) == UNICODE_READ
    assert tok.encode(UNICODE_READ) == ids


def test_char_vocabulary_is_sorted_distinct_characters():
    tok = CharTokenizer.train(["banana", "\n", "🙂a"])
    assert tok.chars == sorted(set("banana\n🙂"))
    assert tok.vocab_size == 5
    assert tok.encode("ab") == [tok.chars.index("a"), tok.chars.index("b")]


def test_char_training_over_chunks_equals_whole_text():
    chunks = [UNICODE_TEXT[:10], UNICODE_TEXT[10:30], UNICODE_TEXT[30:]]
    assert CharTokenizer.train(chunks).chars == CharTokenizer.train([UNICODE_TEXT]).chars


def test_char_encode_array_equals_encode():
    tok = CharTokenizer.train([UNICODE_TEXT])
    arr = tok.encode_array(UNICODE_TEXT)
    assert len(arr) == len(UNICODE_READ)
    assert arr.dtype == np.int64
    assert arr.tolist() == tok.encode(UNICODE_TEXT)
    assert tok.encode_array("").tolist() == []


@pytest.mark.parametrize("method", ["encode", "encode_array"])
def test_char_unknown_characters_raise_and_are_named(method):
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(SmolGPTError) as err:
        getattr(tok, method)("abzcy~")  # z, y: inside the code-point range; ~: above it
    message = str(err.value)
    for ch in "zy~":
        assert repr(ch) in message
    assert tok.unknown("abzcyz") == ["z", "y"]
    with pytest.raises(SmolGPTError, match="'A'"):  # below the smallest code point
        getattr(tok, method)("A")


def test_char_empty_vocabulary_raises():
    with pytest.raises(SmolGPTError):
        CharTokenizer.train([""])


# --------------------------------------------------------------------------- word level


def test_word_split_lowercases_and_separates_punctuation():
    assert WordTokenizer.split("Holmes SAID: don't, Watson's!") == [
        "holmes",
        "said",
        ":",
        "don't",
        ",",
        "watson's",
        "!",
    ]


def test_word_special_ids_and_min_freq_cutoff():
    text = "the cat the dog the cat a bird"
    tok = WordTokenizer.train([text], min_word_freq=2)
    assert tok.itos[:2] == ["<PAD>", "<UNK>"]
    assert tok.stoi["<PAD>"] == tok.PAD_ID and tok.stoi["<UNK>"] == tok.UNK_ID
    # 'the' (3) then 'cat' (2) are kept; dog, a, bird (1 each) are cut.
    assert tok.itos[2:] == ["the", "cat"]
    assert tok.encode("The dog and THE cat") == [2, 1, 1, 2, 3]
    assert tok.unknown("the dog and the cat dog") == ["dog", "and"]


def test_word_min_freq_one_keeps_everything():
    text = "one two two three three three"
    tok = WordTokenizer.train([text], min_word_freq=1)
    assert tok.itos[2:] == ["three", "two", "one"]
    assert 1 not in tok.encode(text)


def test_word_vocabulary_order_is_deterministic():
    text = "b a c b a c d e e f"
    # frequency first, then alphabetical among ties; independent of insertion order
    first = WordTokenizer.train([text], 1).itos
    second = WordTokenizer.from_counts(
        Counter(dict(reversed(list(Counter(text.split()).items())))), 1
    ).itos
    assert first == second == ["<PAD>", "<UNK>", "a", "b", "c", "e", "d", "f"]


def test_word_training_over_chunks_equals_whole_text():
    lines = ["It was the best of times,\n", "it was the worst of times.\n"] * 3
    assert WordTokenizer.train(lines, 2).itos == WordTokenizer.train(["".join(lines)], 2).itos


def test_word_encode_array_equals_encode():
    text = "Holmes said: it is quite simple, Watson. Simple!"
    tok = WordTokenizer.train([text], 2)
    arr = tok.encode_array(text)
    assert arr.dtype == np.int64
    assert arr.tolist() == tok.encode(text)
    assert tok.encode_array("").tolist() == []


@pytest.mark.parametrize(
    "text",
    [
        "holmes said, “it is (quite) simple.” red-headed man's",
        "he said, \"it is so.\" and she said 'no' to him.",
        "one/two—three: four; five? six! [seven] {eight} $9 10% ‘single’ holmes’s",
    ],
)
def test_word_decode_reattaches_punctuation(text):
    tok = WordTokenizer.train([text], 1)
    assert tok.decode(tok.encode(text)) == normalize_text(text)  # with ASCII quotes


def test_word_decode_lowercases_and_shows_unk():
    tok = WordTokenizer.train(["the the cat"], 2)
    assert tok.decode(tok.encode("The Cat.")) == "the <UNK> <UNK>"


# --------------------------------------------------------------------------- normalisation


def test_normalize_text():
    assert normalize_text("\ufeffa\r\nb\rc\n\r\n\rd") == "a\nb\nc\n\n\nd"
    assert (
        normalize_text("‘single’ “double” ‚low‛ „low‟ don’t")
        == "'single' \"double\" 'low' \"low\" don't"
    )
    assert normalize_text("a\ufeffb") == "ab"  # a mark left mid-text by joining two files
    untouched = "plain ASCII, «guillemets», — dashes ′primes″ and ünïcödé\n"
    assert normalize_text(untouched) == untouched
    assert normalize_text(normalize_text(UNICODE_TEXT)) == normalize_text(UNICODE_TEXT)


CURLY_BOOK = (
    "“Don’t,” said Holmes, “it’s the ‘speckled band’.” I don’t know. " * 3
    + "\ufeffCRLF line\r\nand a lone CR\r" * 2
)


def trained_on_curly_book(level: str):
    if level == "char":
        return CharTokenizer.train([CURLY_BOOK])
    return WordTokenizer.train([CURLY_BOOK], 1)


@pytest.mark.parametrize("level", ["char", "word"])
def test_vocabulary_holds_no_curly_quote_cr_or_bom(level):
    tok = trained_on_curly_book(level)
    vocabulary = "".join(tok.chars if level == "char" else tok.itos)
    for ch in "‘’“”\r\ufeff":
        assert ch not in vocabulary
    assert tok.unknown(CURLY_BOOK) == []


@pytest.mark.parametrize("level", ["char", "word"])
def test_curly_and_typed_quotes_give_the_same_ids(level):
    tok = trained_on_curly_book(level)
    typed = "I don't know, said Holmes. \"It's the 'speckled band'.\""
    curly = "I don’t know, said Holmes. “It’s the ‘speckled band’.”"
    assert tok.encode(curly) == tok.encode(typed)
    assert tok.encode_array(curly).tolist() == tok.encode(typed)
    assert tok.unknown(curly) == tok.unknown(typed) == []
    if level == "word":
        assert tok.stoi["don't"] in tok.encode(curly)
        assert "don’t" not in tok.stoi


def test_a_tokenizer_saved_before_normalisation_reads_text_as_given():
    # A checkpoint from before 0.5 has no "normalize": its vocabulary may hold CR and curly
    # quotes, and it must read a prompt the way it read its training text.
    char = tokenizer_from_dict({"type": "char", "chars": list("\r\n'dnot’")})
    assert char.normalize is False
    assert char.decode(char.encode("don’t\r\n")) == "don’t\r\n"
    assert char.encode("don't") != char.encode("don’t")
    word = tokenizer_from_dict({"type": "word", "words": ["don’t", "“", "”"], "min_word_freq": 1})
    assert word.normalize is False
    assert word.decode(word.encode("“Don’t”")) == "“don’t”"
    assert word.to_dict()["normalize"] is False


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("level", ["char", "word"])
def test_to_dict_round_trip_through_json(level):
    text = "The quick brown fox, the lazy dog; the end. Ünïcödé 🙂"
    tok = CharTokenizer.train([text]) if level == "char" else WordTokenizer.train([text], 1)
    data = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(data)
    assert type(again) is type(tok) and again.level == level
    assert again.vocab_size == tok.vocab_size
    assert again.encode(text) == tok.encode(text)
    assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert again.to_dict() == tok.to_dict()


def test_word_to_dict_keeps_min_word_freq():
    tok = WordTokenizer.train(["a a a b b c"], 2)
    assert tokenizer_from_dict(tok.to_dict()).min_word_freq == 2


@pytest.mark.parametrize("level", ["char", "word"])
def test_to_dict_keeps_normalisation(level):
    tok = CharTokenizer.train(["abc"]) if level == "char" else WordTokenizer.train(["abc"], 1)
    assert tok.to_dict()["normalize"] is True
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))).normalize is True


@pytest.mark.parametrize(
    "data, kind",  # the type the message names
    [
        ({"type": "sentencepiece"}, "'sentencepiece'"),
        ({}, "None"),
        ({"type": None}, "None"),
        ([], "None"),
        ("char", "None"),
    ],
)
def test_unknown_tokenizer_type_raises(data, kind):
    with pytest.raises(SmolGPTError, match=names("tokenizer", kind)):
        tokenizer_from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        {"type": "char"},
        {"type": "word"},
        {"type": "char", "chars": [1, 2]},
        {"type": "char", "chars": []},
    ],
)
def test_malformed_tokenizer_dict_raises(data):
    with pytest.raises(SmolGPTError):
        tokenizer_from_dict(data)
