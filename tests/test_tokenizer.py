"""Character and word tokenizers: round trips, vocabulary rules, text normalisation,
serialisation; and the Tokenizer interface every level implements (issue #32)."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from smolgpt import tokenizer as tokenizer_module
from smolgpt.errors import SmolGPTError
from smolgpt.tokenizer import (
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    normalize_text,
    tokenizer_from_dict,
)

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


# ------------------------------------------------------------------ the Tokenizer interface

INTERFACE_TEXT = "The cat sat.\nThe dog sat on the mat, the cat ran!\nA café? The end.\n" * 3


def level_tokenizer(level: str) -> Tokenizer:
    """A tokenizer of level trained on INTERFACE_TEXT (bpe: skipped without tokenizers)."""
    if level == "char":
        return CharTokenizer.train([INTERFACE_TEXT])
    if level == "word":
        return WordTokenizer.train([INTERFACE_TEXT], min_word_freq=2)
    pytest.importorskip("tokenizers")
    from smolgpt.tokenizer import BPETokenizer

    return BPETokenizer.train([INTERFACE_TEXT], 270)


LEVELS = ("char", "word", "bpe")


def tokenizer_class_names() -> set[str]:
    return {
        name
        for name, obj in vars(tokenizer_module).items()
        if isinstance(obj, type) and issubclass(obj, Tokenizer)
    }


def isinstance_on_tokenizers(source: str, classes: set[str]) -> list[int]:
    """The lines of source that call isinstance or issubclass on one of classes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            named |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if named & classes:
                found.append(node.lineno)
    return found


def test_the_isinstance_check_finds_tokenizer_classes():
    classes = tokenizer_class_names()
    assert {"Tokenizer", "CharTokenizer", "WordTokenizer", "BPETokenizer"} <= classes
    source = (
        "isinstance(t, WordTokenizer)\n"
        "isinstance(t, (str, tokenizer.BPETokenizer))\n"
        "isinstance(t, str)\n"
        "issubclass(k, CharTokenizer)\n"
    )
    assert isinstance_on_tokenizers(source, classes) == [1, 2, 4]


def test_no_module_but_tokenizer_py_asks_which_tokenizer_class_it_has():
    # Each level's behaviour is a method of its class (issue #32): no module branches on it.
    classes = tokenizer_class_names()
    package = Path(tokenizer_module.__file__).parent
    found = {
        path.name: lines
        for path in sorted(package.glob("*.py"))
        if path.name != "tokenizer.py"
        and (lines := isinstance_on_tokenizers(path.read_text(encoding="utf-8"), classes))
    }
    assert found == {}


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_is_a_tokenizer(level):
    tok = level_tokenizer(level)
    assert isinstance(tok, Tokenizer)
    assert tok.level == level == tok.to_dict()["type"]
    assert tokenizer_from_dict(tok.to_dict()).to_dict() == tok.to_dict()


@pytest.mark.parametrize("level", LEVELS)
def test_the_default_prompt_encodes_without_unknowns(level):
    tok = level_tokenizer(level)
    prompt = tok.default_prompt()
    assert tok.encode(prompt) and tok.unknown(prompt) == []
    assert tok.default_prompt() == {"char": "\n", "word": "the", "bpe": "\n"}[level]


def test_default_prompts_without_a_line_break_or_a_word():
    assert CharTokenizer.train(["abc"]).default_prompt() == "c"  # its last character
    assert WordTokenizer(["!", "."]).default_prompt() == "."  # no word: its last token


@pytest.mark.parametrize("level", LEVELS)
def test_unknown_and_padding_ids(level):
    tok = level_tokenizer(level)
    expected = {"word": (WordTokenizer.UNK_ID, WordTokenizer.PAD_ID)}.get(level, (None, None))
    assert (tok.unk_id, tok.pad_id) == expected
    assert tok.multiprocess_encoding == (level == "word")
    special = {"pad_token": "<PAD>", "unk_token": "<UNK>"} if level == "word" else {}
    assert tok.hf_special_tokens() == special


@pytest.mark.parametrize("level", LEVELS)
def test_charged_unk_bytes(level):
    tok = level_tokenizer(level)
    # The first token (zebra) is never predicted, so never charged.
    text = "zebra the gnu sat by the yak’s café" if level != "char" else "the cat"
    charged = tok.charged_unk_bytes(text)
    if level == "word":
        assert tok.unknown(text) == ["zebra", "gnu", "by", "yak's"]
        assert charged == len("gnu") + len("by") + len("yak's") == sum(tok.unk_bytes(text)[1:])
    else:
        assert charged == 0


@pytest.mark.parametrize("level", LEVELS)
def test_token_start_is_where_starts_says(level):
    tok = level_tokenizer(level)
    text = "  The cat, sat!\n on the mat"
    starts = tok.starts(text)
    assert [tok.token_start(text, i) for i in range(len(starts))] == starts


@pytest.mark.parametrize("level", LEVELS)
def test_encode_known_drops_only_what_a_char_vocabulary_lacks(level):
    tok = level_tokenizer(level)
    text = "The zebra sat. Ω"
    dropped: Counter = Counter()
    ids = tok.encode_known(text, dropped)
    if level == "char":
        assert dropped == Counter({"z": 1, "b": 1, "Ω": 1})
        assert tok.decode(ids) == "The era sat. "
    else:
        assert dropped == Counter()
        assert ids.tolist() == tok.encode(text)


@pytest.mark.parametrize("level", LEVELS)
def test_frequent_ids_and_training_settings(level):
    tok = level_tokenizer(level)
    if level == "word":
        assert tok.frequent_ids(3) == [2, 3, 4]
        assert tok.itos[2] == "the"
        assert tok.frequent_ids(10_000) == list(range(2, tok.vocab_size))
    else:
        assert tok.frequent_ids(3) == []
    settings = {"char": {}, "word": {"min_word_freq": 2}, "bpe": {"vocab_size": tok.vocab_size}}
    assert tok.training_settings() == settings[level]


@pytest.mark.parametrize("level", LEVELS)
def test_hf_tokenizer_gives_the_same_ids(level):
    pytest.importorskip("tokenizers")
    tok = level_tokenizer(level)
    text = "The cat sat.\r\nThe “dog” ran!" if level != "char" else "The cat sat.\nThe mat"
    assert tok.hf_tokenizer().encode(text).ids == tok.encode(text)
