"""Generation: logit filtering, the repetition penalty, greedy and seeded sampling, sliding
past block_size, stop strings and streamed text."""

from __future__ import annotations

import pytest
import torch

from smolgpt.config import ModelConfig, SampleConfig
from smolgpt.model import GPT
from smolgpt.sampling import TextStream, filter_logits, generate, next_token, penalize_repetition
from smolgpt.tokenizer import CharTokenizer, WordTokenizer


def random_logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture(params=["rope", "learned"])
def model64(request) -> GPT:
    """A float64 model, so cached and recomputed logits agree far below any argmax tie."""
    # Seeds whose greedy paths are non-trivial (the tests below assert that they are).
    torch.manual_seed({"rope": 4, "learned": 2}[request.param])
    config = ModelConfig(
        vocab_size=31,
        block_size=12,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        position=request.param,
    )
    model = GPT(config).double().eval()
    # At GPT-2's init a tied-embedding model mostly repeats its last token; large random
    # weights make the greedy path depend on the whole context and on positions.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model


def naive_generate(model: GPT, prompt: list[int], steps: int, pick) -> list[int]:
    """Reference decoding without a cache: each step recomputes the last block_size tokens
    (the whole context, once it is full: a sliding window)."""
    block = model.config.block_size
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens[-block:]]))
        tok = pick(logits[:, -1, :])
        tokens.append(tok)
        out.append(tok)
    return out


def sampler(**settings):
    """pick for naive_generate: next_token with these settings and its own seeded generator."""
    cfg = SampleConfig(**settings)
    gen = torch.Generator().manual_seed(cfg.seed)
    return lambda logits: int(next_token(logits, cfg, gen))


# --------------------------------------------------------------------------- filter_logits


@pytest.mark.parametrize("k", [1, 3, 10, 49])
def test_top_k_keeps_exactly_k(k):
    logits = random_logits()
    filtered = filter_logits(logits, top_k=k)
    kept = torch.isfinite(filtered)
    assert (kept.sum(dim=-1) == k).all()
    top = torch.topk(logits, k, dim=-1).indices
    assert kept.gather(-1, top).all()  # the k kept are the k largest
    torch.testing.assert_close(filtered[kept], logits[kept])  # unchanged values


def test_top_k_zero_or_at_least_vocab_keeps_all():
    logits = random_logits()
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=50), logits)
    assert torch.equal(filter_logits(logits, top_k=500), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_smallest_nucleus(p):
    logits = random_logits(rows=8)
    kept = torch.isfinite(filter_logits(logits, top_p=p))
    probs = torch.softmax(logits, dim=-1)
    for row in range(logits.size(0)):
        sorted_probs, order = torch.sort(probs[row], descending=True)
        n = int(kept[row].sum())
        assert n >= 1
        assert set(order[:n].tolist()) == set(torch.nonzero(kept[row]).flatten().tolist())
        assert sorted_probs[:n].sum() >= p - 1e-6  # enough mass ...
        assert n == 1 or sorted_probs[: n - 1].sum() < p  # ... and no smaller set has it


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    kept = torch.isfinite(filter_logits(logits, top_p=1e-9))
    assert kept.tolist() == [[False, True, False, False]]


def test_top_k_and_top_p_together():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.5))
    # top-k keeps {0, 1}; renormalised 0.57/0.43, so top-p 0.5 keeps {0}
    assert kept.tolist() == [[True, False, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=4, top_p=0.75))
    assert kept.tolist() == [[True, True, True, False, False]]


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_keeps_tokens_at_least_min_p_of_the_top(min_p):
    logits = random_logits(rows=8)
    kept = torch.isfinite(filter_logits(logits, min_p=min_p))
    probs = torch.softmax(logits, dim=-1)
    expected = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    assert torch.equal(kept, expected)


def test_min_p_edge_cases():
    logits = random_logits()
    assert torch.equal(filter_logits(logits, min_p=0.0), logits)  # 0 disables
    kept = torch.isfinite(filter_logits(logits, min_p=1.0))  # 1: the most likely only
    assert torch.equal(kept.nonzero()[:, 1], logits.argmax(-1))
    flat = torch.zeros(1, 10)  # all equally likely: every token is the most likely
    assert torch.isfinite(filter_logits(flat, min_p=1.0)).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 3.0, -1.0]]
    assert torch.equal(penalize_repetition(logits, seen, 1.0), logits)


def test_repetition_penalty_makes_repeats_rarer(tiny_model):
    def distinct(penalty):
        (ids,) = generate(
            tiny_model,
            [1, 2, 3],
            SampleConfig(max_new_tokens=60, temperature=0, repetition_penalty=penalty),
        )
        return len(set(ids))

    assert distinct(3.0) > distinct(1.0)


def test_repetition_penalty_counts_prompt_and_generated_tokens(model64):
    prompt = [3, 1, 4]
    (got,) = generate(
        model64, prompt, SampleConfig(max_new_tokens=20, temperature=0, repetition_penalty=3.0)
    )
    (plain,) = generate(model64, prompt, SampleConfig(max_new_tokens=20, temperature=0))
    assert got != plain
    # The same loop written without a cache, marking prompt and picks as seen, agrees.
    cfg = SampleConfig(temperature=0, repetition_penalty=3.0)
    seen = torch.zeros(1, 31, dtype=torch.bool)
    seen[0, prompt] = True

    def pick(logits):
        tok = int(next_token(logits, cfg, None, seen))
        seen[0, tok] = True
        return tok

    assert naive_generate(model64, prompt, 20, pick) == got


def test_next_token_never_picks_filtered_tokens():
    logits = random_logits(rows=1, vocab=20).expand(2000, 20)
    gen = torch.Generator().manual_seed(0)
    picks = next_token(logits, SampleConfig(temperature=1.0, top_k=3), gen)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(picks.tolist()) == allowed


def test_next_token_temperature_zero_is_argmax():
    logits = random_logits()
    assert torch.equal(
        next_token(logits, SampleConfig(temperature=0.0, top_k=5, top_p=0.5)), logits.argmax(-1)
    )


# --------------------------------------------------------------------------- generate


def test_greedy_equals_naive_argmax_within_block(model64):
    prompt = [3, 1, 4, 1, 5]
    steps = model64.config.block_size - len(prompt)
    expected = naive_generate(model64, prompt, steps, lambda logits: int(logits.argmax()))
    (got,) = generate(model64, prompt, SampleConfig(max_new_tokens=steps, temperature=0.0))
    assert got == expected
    assert len(set(got)) > 1  # a non-trivial path


def test_greedy_past_block_size_slides_the_window(model64):
    prompt = [2, 7, 1, 8]
    steps = 3 * model64.config.block_size + 5  # far past the window
    expected = naive_generate(model64, prompt, steps, lambda logits: int(logits.argmax()))
    (got,) = generate(model64, prompt, SampleConfig(max_new_tokens=steps, temperature=0.0))
    assert len(got) == steps
    assert got == expected


def test_each_token_past_the_window_sees_a_full_window(model64):
    """No cliff at the boundary: the logits behind every token past block_size are those of
    the last block_size tokens, as in training (the old rule restarted from half a block)."""
    block = model64.config.block_size
    prompt = [5, 3]
    (got,) = generate(model64, prompt, SampleConfig(max_new_tokens=2 * block, temperature=0.0))
    tokens = prompt + got
    for end in range(block, len(tokens)):  # the token at position end
        with torch.no_grad():
            logits, _ = model64(torch.tensor([tokens[end - block : end]]))
        assert int(logits[0, -1].argmax()) == tokens[end]


def test_prompt_longer_than_block_uses_its_tail(model64):
    block = model64.config.block_size
    prompt = [i % 31 for i in range(2 * block + 3)]
    expected = naive_generate(model64, prompt, 6, lambda logits: int(logits.argmax()))
    assert generate(model64, prompt, SampleConfig(max_new_tokens=6, temperature=0.0))[0] == expected
    assert (
        generate(model64, prompt[-block:], SampleConfig(max_new_tokens=6, temperature=0.0))[0]
        == expected
    )


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.9, top_k=10, top_p=0.95, seed=11),
        dict(temperature=1.3, min_p=0.05, seed=3),
        dict(temperature=1.0, top_k=0, seed=5),
    ],
)
def test_cached_sampling_equals_uncached_sampling(model64, settings):
    prompt = [5, 6]
    steps = 2 * model64.config.block_size  # within the window and past it
    expected = naive_generate(model64, prompt, steps, sampler(**settings))
    got = generate(model64, prompt, SampleConfig(max_new_tokens=steps, **settings))
    assert got == [expected]


def test_same_seed_same_tokens_different_seed_different(tiny_model):
    def run(seed):
        return generate(
            tiny_model,
            [1, 2, 3],
            SampleConfig(max_new_tokens=40, temperature=1.0, num_samples=2, seed=seed),
        )

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_num_samples_rows_are_independent(tiny_model):
    rows = generate(
        tiny_model, [1, 2], SampleConfig(max_new_tokens=30, temperature=1.0, num_samples=3, seed=0)
    )
    assert len(rows) == 3 and all(len(r) == 30 for r in rows)
    assert all(0 <= t < tiny_model.config.vocab_size for r in rows for t in r)
    assert len({tuple(r) for r in rows}) > 1  # different continuations


def test_greedy_rows_are_identical(tiny_model):
    rows = generate(
        tiny_model, [4, 5, 6], SampleConfig(max_new_tokens=20, temperature=0.0, num_samples=3)
    )
    assert rows[0] == rows[1] == rows[2]


def test_zero_new_tokens(tiny_model):
    assert generate(tiny_model, [1, 2, 3], SampleConfig(max_new_tokens=0, num_samples=2)) == [
        [],
        [],
    ]


def test_block_size_one_model_can_generate():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=7, block_size=1, n_layer=1, n_head=1, n_embd=8)).eval()
    (got,) = generate(model, [3], SampleConfig(max_new_tokens=5, temperature=0.0))
    assert len(got) == 5
    expected = naive_generate(model, [3], 5, lambda logits: int(logits.argmax()))
    assert got == expected


# --------------------------------------------------------------------- text and stop strings

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n!"  # 31 characters: model64's vocabulary


def stream_pieces(model, tokenizer, prompt: str, **settings) -> tuple[list[str], TextStream]:
    """The first sample's pieces of a TextStream, and the stream (for new_tokens)."""
    stream = TextStream(model, tokenizer, tokenizer.encode(prompt), SampleConfig(**settings))
    return [pieces[0] for pieces in stream], stream


def continuation(model, tokenizer, prompt: str, **settings) -> str:
    ids = tokenizer.encode(prompt)
    (new,) = generate(model, ids, SampleConfig(**settings))
    return tokenizer.decode(ids + new)[len(tokenizer.decode(ids)) :]


def test_streamed_pieces_join_into_the_generated_text(model64):
    tok = CharTokenizer(CHARS)
    pieces, stream = stream_pieces(model64, tok, "abc", max_new_tokens=30, temperature=1.0, seed=4)
    (new,) = generate(
        model64, tok.encode("abc"), SampleConfig(max_new_tokens=30, temperature=1.0, seed=4)
    )
    assert pieces[0] == "abc"  # the prompt comes first
    assert "".join(pieces) == tok.decode(tok.encode("abc") + new)
    assert len([p for p in pieces if p]) >= 30  # one piece per token: it really streams
    assert stream.new_tokens == 30


def test_stop_strings_cut_the_text_before_the_first_one(model64):
    tok = CharTokenizer(CHARS)
    settings = dict(max_new_tokens=40, temperature=1.5, seed=7)
    full = continuation(model64, tok, "abc", **settings)
    assert len(set(full)) > 5  # a varied text, so the cases below mean something
    one_token, several = full[6], full[9:13]
    cases = {
        (one_token,): full[: full.index(one_token)],
        (several,): full[: full.index(several)],
        (several, one_token): full[: min(full.index(several), full.index(one_token))],
        ("~never~",): full,  # never reached: the whole text
        (full[:2] + "~",): full,  # starts like the text, then differs: nothing is lost
    }
    for stops, expected in cases.items():
        pieces, stream = stream_pieces(model64, tok, "abc", stop=stops, **settings)
        assert "".join(pieces) == "abc" + expected, stops
        if expected != full:  # generation stopped at the stop string, not at max_new_tokens
            first = min(full.index(s) + len(s) for s in stops if s in full)
            assert stream.new_tokens == first, stops
            assert not any(s in "".join(pieces)[3:] for s in stops)


def test_stop_strings_end_each_sample_on_its_own(model64):
    tok = CharTokenizer(CHARS)
    settings = SampleConfig(max_new_tokens=40, temperature=1.5, num_samples=3, seed=2, stop=("e",))
    rows = list(zip(*TextStream(model64, tok, tok.encode("ab"), settings)))
    texts = ["".join(pieces) for pieces in rows]
    unstopped = generate(
        model64,
        tok.encode("ab"),
        SampleConfig(max_new_tokens=40, temperature=1.5, num_samples=3, seed=2),
    )
    for text, new in zip(texts, unstopped):
        full = tok.decode(new)
        assert text == "ab" + full.split("e")[0]
    assert len(set(texts)) > 1


def test_word_level_streaming_spaces_and_joins_like_decode(model64):
    words = [
        "the",
        "cat",
        "said",
        ".",
        ",",
        '"',
        "(",
        ")",
        "don't",
        "-",
        "n't",
        "holmes",
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
        "g",
        "h",
        "i",
        "j",
        "k",
        "l",
        "m",
        "n",
        "o",
        "p",
        "q",
    ]
    tok = WordTokenizer(words)
    assert tok.vocab_size == 31
    for seed in range(5):
        pieces, _ = stream_pieces(
            model64, tok, 'The "cat" said', max_new_tokens=40, temperature=1.5, top_k=0, seed=seed
        )
        ids = tok.encode('The "cat" said')
        (new,) = generate(
            model64, ids, SampleConfig(max_new_tokens=40, temperature=1.5, top_k=0, seed=seed)
        )
        assert "".join(pieces) == tok.decode(ids + new)


def test_a_stream_stopped_early_runs_no_further(model64):
    tok = CharTokenizer(CHARS)
    stream = TextStream(model64, tok, tok.encode("abc"), SampleConfig(max_new_tokens=50))
    for _ in range(5):
        next(stream)
    stream.close()
    assert stream.new_tokens == 4  # the prompt, then four tokens
    with pytest.raises(StopIteration):
        next(stream)


def test_word_level_stop_string_ends_the_text_before_it(model64):
    words = ["the", "cat", "said", ".", ",", "holmes"] + [chr(ord("a") + i) for i in range(23)]
    tok = WordTokenizer(words)
    settings = dict(max_new_tokens=60, temperature=1.5, top_k=0, seed=1)
    full = continuation(model64, tok, "the cat", **settings)
    stop = " ".join(full.split()[4:6])  # two words: a stop string across tokens and a space
    pieces, stream = stream_pieces(model64, tok, "the cat", stop=(stop,), **settings)
    assert "".join(pieces) == "the cat" + full[: full.index(stop)]
    assert stream.new_tokens < 60
