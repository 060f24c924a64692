"""evaluate_text: loss, perplexity and bits per character of a text, on real tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from smolgpt.config import ModelConfig
from smolgpt.errors import SmolGPTError
from smolgpt.evaluate import evaluate_text
from smolgpt.model import GPT
from smolgpt.tokenizer import CharTokenizer, WordTokenizer

from e2e import names

CHARS = "abcdefg \n"
# 3 windows of block_size 8, and 5 tokens more in a shorter last window.
TEXT = ("bad cafe\nfeed a bead\nface a fad\n" * 3)[: 3 * 8 + 1 + 5]


def make_model(vocab_size: int, position: str = "rope", block_size: int = 8) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        position=position,
    )
    return GPT(config).eval()


def uniform_model(vocab_size: int, position: str = "rope") -> GPT:
    """A model whose every prediction is uniform: the output head is tied to the token
    embedding, so zeroing it makes every logit 0 whatever the hidden state."""
    model = make_model(vocab_size, position)
    with torch.no_grad():
        model.wte.weight.zero_()
    return model


def naive_nats(model: GPT, ids: list[int]) -> float:
    """The documented rule, one token at a time: t_j (j >= 1) is predicted from its window's
    tokens before it, the window starting at the largest multiple of block_size below j."""
    block = model.config.block_size
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(ids)):
            start = (j - 1) // block * block
            logits, _ = model(torch.tensor([ids[start:j]]))
            total -= F.log_softmax(logits[0, -1].double(), dim=-1)[ids[j]].item()
    return total


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_uniform_char_model_costs_log2_k_bits_per_char(position):
    tokenizer = CharTokenizer(CHARS)
    model = uniform_model(tokenizer.vocab_size, position)
    logits, _ = model(torch.tensor([tokenizer.encode(TEXT[:8])]))
    assert torch.all(logits == 0)  # uniform, as the test relies on
    result = evaluate_text(model, tokenizer, TEXT)
    k = len(CHARS)
    # n - 1 predictions of log k nats each, over n characters.
    assert result.loss == pytest.approx(math.log(k), abs=1e-6)
    assert result.bits_per_char == pytest.approx(
        math.log2(k) * (len(TEXT) - 1) / len(TEXT), abs=1e-6
    )
    assert result.tokens == result.chars == len(TEXT)
    assert result.unk_tokens == 0


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_every_token_after_the_first_is_predicted_once(position):
    tokenizer = CharTokenizer(CHARS)
    model = make_model(tokenizer.vocab_size, position).double()
    ids = tokenizer.encode(TEXT)
    result = evaluate_text(model, tokenizer, TEXT, batch_size=2)
    assert result.loss * (len(ids) - 1) == pytest.approx(naive_nats(model, ids), abs=1e-9)


def test_batch_size_does_not_change_the_result():
    tokenizer = CharTokenizer(CHARS)
    model = make_model(tokenizer.vocab_size).double()
    text = TEXT * 3
    results = [evaluate_text(model, tokenizer, text, batch_size=b) for b in (1, 3, 100)]
    for r in results[1:]:
        assert r.loss == pytest.approx(results[0].loss, abs=1e-9)
        assert r.bits_per_char == pytest.approx(results[0].bits_per_char, abs=1e-9)


def test_perplexity_is_exp_loss_and_to_dict_has_the_six_scores():
    tokenizer = CharTokenizer(CHARS)
    result = evaluate_text(make_model(tokenizer.vocab_size), tokenizer, TEXT)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    assert result.to_dict() == {
        "loss": result.loss,
        "perplexity": result.perplexity,
        "bits_per_char": result.bits_per_char,
        "tokens": result.tokens,
        "chars": result.chars,
        "unk_tokens": result.unk_tokens,
    }


def test_unknown_words_are_charged_8_bits_per_utf8_byte():
    tokenizer = WordTokenizer(["the", "cat", "sat", "."], min_word_freq=1)
    vocab = tokenizer.vocab_size  # 6: <PAD>, <UNK> and four words
    model = uniform_model(vocab)
    # "Café" is unknown before anything is predicted: context only, never charged. "on"
    # (2 bytes) and "café" (5 bytes: é is two) are predicted <UNK>s.
    text = "Café: the cat sat on the café."
    result = evaluate_text(model, tokenizer, text)
    assert tokenizer.encode(text).count(WordTokenizer.UNK_ID) == 4  # café, :, on, café
    predicted = 8  # café : the cat sat on the café .  -> 9 tokens
    unk_bytes = len(":") + len("on") + len("café".encode("utf-8"))
    assert result.tokens == 9 and result.unk_tokens == 4 and result.chars == len(text)
    assert result.loss == pytest.approx(math.log(vocab), abs=1e-6)  # the model's own cost
    expected = (predicted * math.log2(vocab) + 8 * unk_bytes) / len(text)
    assert result.bits_per_char == pytest.approx(expected, abs=1e-6)


def test_too_short_text_is_refused():
    tokenizer = CharTokenizer(CHARS)
    model = make_model(tokenizer.vocab_size)
    for text in ("", "a"):
        # How many tokens it has, and the least it needs.
        with pytest.raises(SmolGPTError, match=names("short", f"{len(text)} token", "2")):
            evaluate_text(model, tokenizer, text)


def test_characters_outside_the_vocabulary_are_named():
    tokenizer = CharTokenizer(CHARS)
    with pytest.raises(SmolGPTError, match="'z'"):
        evaluate_text(make_model(tokenizer.vocab_size), tokenizer, "a fez")


def test_bad_batch_size_is_refused_and_training_mode_is_restored():
    tokenizer = CharTokenizer(CHARS)
    model = make_model(tokenizer.vocab_size).train()
    with pytest.raises(SmolGPTError, match="batch_size"):
        evaluate_text(model, tokenizer, TEXT, batch_size=0)
    evaluate_text(model, tokenizer, TEXT)
    assert model.training


def test_a_loaded_model_evaluates_text_through_the_api(tmp_path):
    """smolgpt.load(...).evaluate(text): the same numbers as evaluate_text."""
    from smolgpt.api import Model

    tok = CharTokenizer("abc ")
    torch.manual_seed(0)
    module = GPT(ModelConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    model = Model(module, tok, {})
    text = "abc cab bca " * 5
    assert model.evaluate(text).to_dict() == evaluate_text(module, tok, text).to_dict()
